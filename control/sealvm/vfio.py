"""
cffi bindings to the VFIO device ioctls sealvm reads, and a way to reach
the device a running QEMU holds.

Whether an assigned device supports VFIO migration is the kernel driver's
answer to ``VFIO_DEVICE_FEATURE`` (``GET`` of ``VFIO_DEVICE_FEATURE_MIGRATION``)
on a *bound* device fd.  A vfio cdev can be bound once (QEMU did it), so a
fresh ``open()`` cannot ask; `qemu_device_fd` instead duplicates QEMU's own fd
with ``pidfd_getfd(2)`` (ptrace access to QEMU needed: same user or root).
The duplicate shares QEMU's open file; the reads below change nothing.

ABI mode, structs copied field by field from Linux 7.2's
``include/uapi/linux/vfio.h``, sizes checked at import (`HEADER_SIZES`).
Each ioctl comes as a pair: ``_name()`` returns ``(result, errno)``,
``name()`` raises `OSError` carrying errno (as in the IOMMUFD_TEST bindings,
tests/nested/harness/iommufd.py).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any

from cffi import FFI

from ._ffi import check_layouts, pidfd_getfd

ffi = FFI()
ffi.cdef(
    """
    /* include/uapi/linux/vfio.h (Linux 7.2) */
    struct vfio_device_feature {
        uint32_t argsz;
        uint32_t flags;
    };
    struct vfio_device_feature_migration {
        uint64_t flags;
    };
    struct vfio_device_feature_mig_state {
        uint32_t device_state;
        int32_t data_fd;
    };
    struct vfio_region_info {
        uint32_t argsz;
        uint32_t flags;
        uint32_t index;
        uint32_t cap_offset;
        uint64_t size;
        uint64_t offset;
    };

    int ioctl(int fd, unsigned long request, ...);
    """
)
_libc = ffi.dlopen(None)

#: sizeof() from the 7.2 headers (x86_64), checked against cffi at import.
HEADER_SIZES: dict[str, int] = {
    "struct vfio_device_feature": 8,
    "struct vfio_device_feature_migration": 8,
    "struct vfio_device_feature_mig_state": 8,
    "struct vfio_region_info": 32,
}


check_layouts(ffi, HEADER_SIZES, __name__)

VFIO_TYPE = ord(";")
VFIO_BASE = 100


def vfio_io(nr: int) -> int:
    """<linux/vfio.h>: _IO(VFIO_TYPE, VFIO_BASE + nr)."""
    return (VFIO_TYPE << 8) | (VFIO_BASE + nr)


VFIO_API_VERSION = 0
VFIO_GET_API_VERSION = vfio_io(0)
VFIO_CHECK_EXTENSION = vfio_io(1)
VFIO_SET_IOMMU = vfio_io(2)
VFIO_GROUP_GET_STATUS = vfio_io(3)
VFIO_GROUP_SET_CONTAINER = vfio_io(4)
VFIO_GROUP_UNSET_CONTAINER = vfio_io(5)
VFIO_GROUP_GET_DEVICE_FD = vfio_io(6)
VFIO_IOMMU_MAP_DMA = vfio_io(13)
VFIO_IOMMU_UNMAP_DMA = vfio_io(14)
VFIO_TYPE1v2_IOMMU = 3
#: VFIO_CHECK_EXTENSION: type1 can unmap everything at once
VFIO_UNMAP_ALL = 9
#: VFIO_CHECK_EXTENSION: type1 can update a mapping's vaddr (cpr-exec, legacy backend)
VFIO_UPDATE_VADDR = 10

#: struct vfio_iommu_type1_dma_map / _unmap flags
VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_DMA_MAP_FLAG_VADDR = 1 << 2
VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1
VFIO_DMA_UNMAP_FLAG_VADDR = 1 << 2


VFIO_DEVICE_GET_REGION_INFO = vfio_io(8)
VFIO_DEVICE_RESET = vfio_io(11)
VFIO_DEVICE_FEATURE = vfio_io(17)

VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18
VFIO_DEVICE_FEATURE_MIGRATION = 1
VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE = 2

VFIO_MIGRATION_STOP_COPY = 1 << 0
VFIO_MIGRATION_P2P = 1 << 1
VFIO_MIGRATION_PRE_COPY = 1 << 2
MIGRATION_FLAG_NAMES = {
    VFIO_MIGRATION_STOP_COPY: "STOP_COPY",
    VFIO_MIGRATION_P2P: "P2P",
    VFIO_MIGRATION_PRE_COPY: "PRE_COPY",
}

#: enum vfio_device_mig_state
MIG_STATES = ("ERROR", "STOP", "RUNNING", "STOP_COPY", "RESUMING", "RUNNING_P2P",
              "PRE_COPY", "PRE_COPY_P2P")

#: vfio-pci region index of BAR0 (VFIO_PCI_BAR0_REGION_INDEX)
VFIO_PCI_BAR0_REGION_INDEX = 0

def migration_flag_names(flags: int) -> list[str]:
    """``0x7`` -> ``['STOP_COPY', 'P2P', 'PRE_COPY']``."""
    return [name for bit, name in MIGRATION_FLAG_NAMES.items() if flags & bit]


def mig_state_name(state: int) -> str:
    return MIG_STATES[state] if 0 <= state < len(MIG_STATES) else f"state-{state}"


def _raise(err: int, what: str) -> None:
    if err:
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _ioctl(fd: int, request: int, arg: Any) -> int:
    """ioctl(fd, request, arg): 0, or the errno it failed with."""
    ret = _libc.ioctl(fd, ffi.cast("unsigned long", request), arg)
    return int(ffi.errno) if ret < 0 else 0


# ------------------------------------------------------------ pidfd_getfd


def fd_of(pid: int, path: str) -> int | None:
    """The lowest fd number of *pid* open on *path* (from /proc), or None."""
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == path:
                found.append(int(name))
        except OSError:
            continue
    return min(found) if found else None


# --------------------------------------------------------- device features


def _feature_get(fd: int, feature: int, payload: str) -> tuple[Any, Any, int]:
    """VFIO_DEVICE_FEATURE_GET of *feature*, whose data is struct *payload*:
    (buffer to keep alive, payload cdata, errno)."""
    head = ffi.sizeof("struct vfio_device_feature")
    size = head + ffi.sizeof(payload)
    buf = ffi.new("uint8_t[]", size)
    hdr = ffi.cast("struct vfio_device_feature *", buf)
    hdr.argsz = size
    hdr.flags = VFIO_DEVICE_FEATURE_GET | feature
    err = _ioctl(fd, VFIO_DEVICE_FEATURE, buf)
    return buf, ffi.cast(f"{payload} *", buf + head), err


def _migration_flags(fd: int) -> tuple[int, int]:
    _buf, data, err = _feature_get(fd, VFIO_DEVICE_FEATURE_MIGRATION,
                                   "struct vfio_device_feature_migration")
    return (0, err) if err else (int(data.flags), 0)


def migration_flags(fd: int) -> int:
    """The device's VFIO_MIGRATION_* flags.

    :raise OSError: ENOTTY when the device does not support VFIO migration.
    """
    flags, err = _migration_flags(fd)
    _raise(err, "VFIO_DEVICE_FEATURE_MIGRATION")
    return flags


def _mig_state(fd: int) -> tuple[int, int]:
    _buf, data, err = _feature_get(fd, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                                   "struct vfio_device_feature_mig_state")
    return (-1, err) if err else (int(data.device_state), 0)


def mig_state(fd: int) -> int:
    """The device's migration state (enum vfio_device_mig_state)."""
    state, err = _mig_state(fd)
    _raise(err, "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE")
    return state


@dataclass(frozen=True)
class RegionInfo:
    index: int
    flags: int
    size: int
    offset: int


def _region_info(fd: int, index: int) -> tuple[RegionInfo | None, int]:
    info = ffi.new("struct vfio_region_info *")
    info.argsz = ffi.sizeof("struct vfio_region_info")
    info.index = index
    err = _ioctl(fd, VFIO_DEVICE_GET_REGION_INFO, info)
    if err:
        return None, err
    return RegionInfo(index, int(info.flags), int(info.size), int(info.offset)), 0


def region_info(fd: int, index: int) -> RegionInfo:
    info, err = _region_info(fd, index)
    _raise(err, f"VFIO_DEVICE_GET_REGION_INFO({index})")
    assert info is not None
    return info


def _device_reset(fd: int) -> int:
    return _ioctl(fd, VFIO_DEVICE_RESET, ffi.cast("unsigned long", 0))


def device_reset(fd: int) -> None:
    _raise(_device_reset(fd), "VFIO_DEVICE_RESET")


# ------------------------------------------------------ a device QEMU holds


@dataclass(frozen=True)
class DeviceMigration:
    """What the kernel says about one device's VFIO migration support."""

    #: VFIO_MIGRATION_* flags; 0 when the device does not support migration
    flags: int
    #: current migration state, None when unsupported
    state: int | None

    @property
    def supported(self) -> bool:
        return bool(self.flags & VFIO_MIGRATION_STOP_COPY)

    def __str__(self) -> str:
        if not self.supported:
            return "no VFIO migration"
        state = mig_state_name(self.state) if self.state is not None else "?"
        return f"VFIO migration {'|'.join(migration_flag_names(self.flags))}, state {state}"


def device_migration(fd: int) -> DeviceMigration:
    """Ask the driver behind a bound device fd (read-only).

    :raise OSError: on any error but ENOTTY (= not supported).
    """
    flags, err = _migration_flags(fd)
    if err == 0 and flags:
        return DeviceMigration(flags, mig_state(fd))
    if err and err != errno.ENOTTY:  # ENOTTY: the driver has no migration ops
        _raise(err, "VFIO_DEVICE_FEATURE_MIGRATION")
    return DeviceMigration(0, None)


def qemu_device_fd(pid: int, cdev: str) -> int:
    """A duplicate of QEMU's fd on vfio cdev *cdev* (close it when done).

    :raise FileNotFoundError: when QEMU holds no fd on *cdev*.
    :raise OSError: when pidfd_getfd is refused (ptrace access) or fails.
    """
    target = fd_of(pid, cdev)
    if target is None:
        raise FileNotFoundError(f"QEMU (pid {pid}) holds no fd on {cdev}")
    return pidfd_getfd(pid, target)


__all__ = [
    "DeviceMigration",
    "MIG_STATES",
    "RegionInfo",
    "device_migration",
    "device_reset",
    "fd_of",
    "mig_state",
    "mig_state_name",
    "migration_flag_names",
    "migration_flags",
    "pidfd_getfd",
    "qemu_device_fd",
    "region_info",
]
