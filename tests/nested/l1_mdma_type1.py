"""
Inside L1: the legacy VFIO type1 ioctls the mdma scenario drives by hand,
and a user-space driver for the mdma device's BAR.

Layouts from Linux 7.2 ``include/uapi/linux/vfio.h`` (x86_64), packed with
`struct`; requests are ``_IO(VFIO_TYPE, VFIO_BASE + n)``.  Each call raises
`OSError` carrying the kernel's errno (use `nested.harness.iommufd.expect_errno`).
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from sealvm.vfio import (
    VFIO_CHECK_EXTENSION,
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_VADDR,
    VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_DMA_UNMAP_FLAG_VADDR,
    VFIO_GROUP_GET_DEVICE_FD,
    VFIO_GROUP_SET_CONTAINER,
    VFIO_GROUP_UNSET_CONTAINER,
    VFIO_IOMMU_MAP_DMA,
    VFIO_IOMMU_UNMAP_DMA,
    VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_SET_IOMMU,
    VFIO_TYPE1v2_IOMMU,
)

# struct vfio_iommu_type1_dma_map: argsz, flags, vaddr, iova, size
_DMA_MAP = struct.Struct("=IIQQQ")
# struct vfio_iommu_type1_dma_unmap: argsz, flags, iova, size
_DMA_UNMAP = struct.Struct("=IIQQ")
# struct vfio_region_info: argsz, flags, index, cap_offset, size, offset
_REGION_INFO = struct.Struct("=IIIIQQ")
assert (_DMA_MAP.size, _DMA_UNMAP.size, _REGION_INFO.size) == (32, 24, 32)


def check_extension(container: int, ext: int) -> int:
    return fcntl.ioctl(container, VFIO_CHECK_EXTENSION, ext)


def set_iommu(container: int, kind: int = VFIO_TYPE1v2_IOMMU) -> None:
    fcntl.ioctl(container, VFIO_SET_IOMMU, kind)


def group_set_container(group: int, container: int) -> None:
    fcntl.ioctl(group, VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("=i", container)))


def group_unset_container(group: int) -> None:
    fcntl.ioctl(group, VFIO_GROUP_UNSET_CONTAINER, 0)


def group_get_device_fd(group: int, name: str) -> int:
    return int(fcntl.ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bytearray(name.encode() + b"\0")))


def dma_map(container: int, *, vaddr: int, iova: int, size: int, flags: int | None = None) -> None:
    if flags is None:
        flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE
    fcntl.ioctl(container, VFIO_IOMMU_MAP_DMA,
                bytearray(_DMA_MAP.pack(_DMA_MAP.size, flags, vaddr, iova, size)))


def dma_remap_vaddr(container: int, *, vaddr: int, iova: int, size: int) -> None:
    """VFIO_DMA_MAP_FLAG_VADDR: give an invalidated mapping its new vaddr."""
    dma_map(container, vaddr=vaddr, iova=iova, size=size, flags=VFIO_DMA_MAP_FLAG_VADDR)


def dma_unmap(container: int, *, iova: int, size: int, flags: int = 0) -> int:
    buf = bytearray(_DMA_UNMAP.pack(_DMA_UNMAP.size, flags, iova, size))
    fcntl.ioctl(container, VFIO_IOMMU_UNMAP_DMA, buf)
    return int(_DMA_UNMAP.unpack(buf)[3])


def dma_unmap_vaddr(container: int, *, iova: int, size: int) -> int:
    """VFIO_DMA_UNMAP_FLAG_VADDR: invalidate the vaddr, keep the IOMMU
    mapping (what QEMU's legacy CPR does before exec)."""
    return dma_unmap(container, iova=iova, size=size, flags=VFIO_DMA_UNMAP_FLAG_VADDR)


def region_offset(device: int, index: int) -> tuple[int, int]:
    """(offset, size) of region *index* in the device fd."""
    buf = bytearray(_REGION_INFO.pack(_REGION_INFO.size, 0, index, 0, 0, 0))
    fcntl.ioctl(device, VFIO_DEVICE_GET_REGION_INFO, buf)
    _, _, _, _, size, offset = _REGION_INFO.unpack(buf)
    return int(offset), int(size)


class DmaBuffer:
    """A view (MAP_SHARED) of a memfd to map for DMA: its address, contents.

    `another_view` maps the same pages at a new address: what a re-exec'd
    QEMU hands to VFIO_DMA_MAP_FLAG_VADDR.
    """

    def __init__(self, size: int, memfd: int | None = None) -> None:
        self.size = size
        self.memfd = os.memfd_create("mdma-dma", os.MFD_CLOEXEC) if memfd is None \
            else os.dup(memfd)
        os.ftruncate(self.memfd, size)
        self.mm = mmap.mmap(self.memfd, size, flags=mmap.MAP_SHARED)
        self._anchor = ctypes.c_char.from_buffer(self.mm)
        self.vaddr = ctypes.addressof(self._anchor)

    def another_view(self) -> DmaBuffer:
        return DmaBuffer(self.size, self.memfd)

    def u64(self, offset: int) -> int:
        return int(struct.unpack_from("<Q", self.mm, offset)[0])

    def close(self) -> None:
        del self._anchor
        self.mm.close()
        os.close(self.memfd)


# ------------------------------------------------------------ mdma's BAR

MDMA_REG_IOVA_LO = 0x08
MDMA_REG_IOVA_HI = 0x0C
MDMA_REG_LEN = 0x10
MDMA_REG_PERIOD_MS = 0x14
MDMA_REG_CTRL = 0x18
MDMA_REG_STATUS = 0x1C
MDMA_REG_SEQ = 0x20
MDMA_MAGIC = 0x31304248414D444D  # "MDMAHB01"


@dataclass
class MdmaBar:
    """The mdma registers through a VFIO device fd (what a guest driver does)."""

    device: int
    offset: int

    @classmethod
    def of(cls, device: int) -> MdmaBar:
        return cls(device, region_offset(device, VFIO_PCI_BAR0_REGION_INDEX)[0])

    def read(self, reg: int) -> int:
        return int(struct.unpack("<I", os.pread(self.device, 4, self.offset + reg))[0])

    def write(self, reg: int, value: int) -> None:
        os.pwrite(self.device, struct.pack("<I", value), self.offset + reg)

    def start(self, *, iova: int, length: int, period_ms: int) -> None:
        self.write(MDMA_REG_IOVA_LO, iova & 0xFFFFFFFF)
        self.write(MDMA_REG_IOVA_HI, iova >> 32)
        self.write(MDMA_REG_LEN, length)
        self.write(MDMA_REG_PERIOD_MS, period_ms)
        self.write(MDMA_REG_CTRL, 1)

    def stop(self) -> None:
        self.write(MDMA_REG_CTRL, 0)


class Fds:
    """Open files closed in reverse order, on exit or on error."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def open(self, path: str | Path) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.fds.append(fd)
        return fd

    def add(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def __enter__(self) -> Fds:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        while self.fds:
            os.close(self.fds.pop())
