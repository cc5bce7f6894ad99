"""
Host capabilities and host devices, probed by using them.

- `open_vfio_fds`: what QEMU must not open itself (/dev/iommu, vfio cdevs),
  opened by sealvm and passed by number.
- `host_check`: MFD_NOEXEC_SEAL, vm.memfd_noexec, memfd seals, /dev/iommu,
  type1 VFIO_UPDATE_VADDR.  Each probe tries the real thing (create the
  memfd, open the device, issue the ioctl) rather than looking for a path.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import _ffi, procfs
from .errors import HostError
from .spec import VfioSpec
from .vfio import (
    VFIO_CHECK_EXTENSION,
    VFIO_GET_API_VERSION,
    VFIO_UPDATE_VADDR,
    VFIO_TYPE1v2_IOMMU,
)


def vfio_cdev(dev: VfioSpec) -> Path:
    """The vfio cdev (/dev/vfio/devices/vfioN) of an assigned device.

    :raise HostError: when the device is not bound to a vfio driver with
        cdev support.
    """
    vdir = dev.sysfs_path / "vfio-dev"
    try:
        names = sorted(n for n in os.listdir(vdir) if n.startswith("vfio"))
    except FileNotFoundError:
        raise HostError(
            f"vfio device {dev.id}: {dev.sysfs_path} has no vfio cdev "
            "(bind it to vfio-pci; the kernel needs CONFIG_VFIO_DEVICE_CDEV)"
        ) from None
    if not names:
        raise HostError(f"vfio device {dev.id}: no cdev under {vdir}")
    return Path("/dev/vfio/devices") / names[0]


@dataclass
class VfioFds:
    """fds sealvm opened for QEMU; close() after QEMU inherited them."""

    iommufd: int | None
    devices: dict[str, int]

    def close(self) -> None:
        for fd in [self.iommufd, *self.devices.values()]:
            if fd is not None:
                os.close(fd)
        self.iommufd = None
        self.devices = {}


def open_vfio_fds(devices: tuple[VfioSpec, ...]) -> VfioFds:
    """Open /dev/iommu and the cdev of every iommufd-backed device.

    :raise HostError: naming the device and what is missing; nothing stays open.
    """
    fds = VfioFds(iommufd=None, devices={})
    wanted = [d for d in devices if d.backend == "iommufd"]
    if not wanted:
        return fds
    try:
        try:
            fds.iommufd = os.open("/dev/iommu", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise HostError(f"cannot open /dev/iommu: {exc.strerror} "
                            "(the kernel needs CONFIG_IOMMUFD)") from exc
        for dev in wanted:
            path = vfio_cdev(dev)
            try:
                fds.devices[dev.id] = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise HostError(f"vfio device {dev.id}: cannot open {path}: "
                                f"{exc.strerror}") from exc
    except BaseException:
        fds.close()
        raise
    return fds


# ------------------------------------------------------------------ probes


@dataclass(frozen=True)
class Probe:
    name: str
    ok: bool
    detail: str


def probe_memfd_noexec_seal() -> Probe:
    try:
        fd = os.memfd_create(
            "sealvm-probe", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | _ffi.MFD_NOEXEC_SEAL)
    except OSError as exc:
        why = errno.errorcode.get(exc.errno or 0, exc.strerror)
        return Probe("memfd-noexec-seal", False, f"memfd_create(MFD_NOEXEC_SEAL): {why}")
    try:
        seals = procfs.get_seals(fd)
        mode = os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
    ok = bool(seals & procfs.F_SEAL_EXEC) and not mode & 0o111
    return Probe("memfd-noexec-seal", ok,
                 f"supported: seals {'|'.join(procfs.seal_names(seals))}, mode {mode:o}")


def probe_memfd_noexec_sysctl() -> Probe:
    try:
        value = Path("/proc/sys/vm/memfd_noexec").read_text().strip()
    except FileNotFoundError:
        return Probe("vm.memfd_noexec", True, "absent (kernel before 6.3)")
    meaning = {"0": "exec allowed", "1": "noexec by default",
               "2": "exec refused: memfd_create without MFD_NOEXEC_SEAL fails"}
    return Probe("vm.memfd_noexec", True, f"{value} ({meaning.get(value, 'unknown')})")


def probe_memfd_seals() -> Probe:
    fd = os.memfd_create("sealvm-probe", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 1 << 20)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, procfs.RAM_SEALS)
        for size in (0, 2 << 20):
            try:
                os.ftruncate(fd, size)
            except PermissionError:
                continue
            return Probe("memfd-seals", False, f"ftruncate({size}) succeeded on a sealed memfd")
        seals = procfs.get_seals(fd)
    finally:
        os.close(fd)
    return Probe("memfd-seals", True,
                 f"{'|'.join(procfs.seal_names(seals))}: resize refused with EPERM")


def probe_iommufd() -> Probe:
    try:
        fd = os.open("/dev/iommu", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Probe("iommufd", False, f"/dev/iommu: {exc.strerror} (CONFIG_IOMMUFD off?)")
    os.close(fd)
    return Probe("iommufd", True, "/dev/iommu opens")


def probe_type1_update_vaddr() -> Probe:
    try:
        fd = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Probe("vfio-type1-vaddr", False, f"/dev/vfio/vfio: {exc.strerror}")
    try:
        api = fcntl.ioctl(fd, VFIO_GET_API_VERSION, 0)
        type1 = fcntl.ioctl(fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU)
        vaddr = fcntl.ioctl(fd, VFIO_CHECK_EXTENSION, VFIO_UPDATE_VADDR)
    except OSError as exc:
        return Probe("vfio-type1-vaddr", False, f"VFIO_CHECK_EXTENSION: {exc.strerror}")
    finally:
        os.close(fd)
    return Probe("vfio-type1-vaddr", bool(vaddr),
                 f"API {api}, TYPE1v2 {'yes' if type1 else 'no'}, "
                 f"VFIO_UPDATE_VADDR {'yes' if vaddr else 'no'}")


#: Every probe by the name it reports, in the order `host_check` runs them.
PROBES: dict[str, Callable[[], Probe]] = {
    "memfd-noexec-seal": probe_memfd_noexec_seal,
    "vm.memfd_noexec": probe_memfd_noexec_sysctl,
    "memfd-seals": probe_memfd_seals,
    "iommufd": probe_iommufd,
    "vfio-type1-vaddr": probe_type1_update_vaddr,
}


def host_check() -> list[Probe]:
    """Every probe, in a fixed order."""
    return [probe() for probe in PROBES.values()]
