"""
cffi bindings to iommufd (/dev/iommu) and its selftest interface.

ABI mode: the ioctl structs are declared below, copied field by field from
Linux 7.2's ``include/uapi/linux/iommufd.h`` and, for ``IOMMU_TEST_CMD``
(``CONFIG_IOMMUFD_TEST``), ``drivers/iommu/iommufd/iommufd_test.h``.  Every
struct size is checked at import against the size computed from those
headers (`HEADER_SIZES`); tests/nested/test_iommufd_layout.py recomputes
sizes and offsets with the C compiler against the built kernel's headers.

Each ioctl comes as a triad, like the kernel's selftests (iommufd_utils.h):
``_ioas_map()`` returns the raw ``(result, errno)``, ``ioas_map()`` raises
`OSError` carrying errno, and tests write
``expect_errno(errno.EINVAL, ioas_map, ...)``.

User pointers (``uptr``) are passed as buffers (`mmap.mmap`, `bytearray`):
the kernel reads or writes them during the call.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from cffi import FFI

from sealvm._ffi import check_layouts

ffi = FFI()
ffi.cdef(
    """
    /* include/uapi/linux/iommufd.h (Linux 7.2) */
    struct iommu_destroy {
        uint32_t size;
        uint32_t id;
    };
    struct iommu_ioas_alloc {
        uint32_t size;
        uint32_t flags;
        uint32_t out_ioas_id;
    };
    struct iommu_iova_range {
        uint64_t start;
        uint64_t last;
    };
    struct iommu_ioas_iova_ranges {
        uint32_t size;
        uint32_t ioas_id;
        uint32_t num_iovas;
        uint32_t __reserved;
        uint64_t allowed_iovas;
        uint64_t out_iova_alignment;
    };
    struct iommu_ioas_map {
        uint32_t size;
        uint32_t flags;
        uint32_t ioas_id;
        uint32_t __reserved;
        uint64_t user_va;
        uint64_t length;
        uint64_t iova;
    };
    struct iommu_ioas_map_file {
        uint32_t size;
        uint32_t flags;
        uint32_t ioas_id;
        int32_t fd;
        uint64_t start;
        uint64_t length;
        uint64_t iova;
    };
    struct iommu_ioas_unmap {
        uint32_t size;
        uint32_t ioas_id;
        uint64_t iova;
        uint64_t length;
    };
    struct iommu_option {
        uint32_t size;
        uint32_t option_id;
        uint16_t op;
        uint16_t __reserved;
        uint32_t object_id;
        uint64_t val64;
    };
    struct iommu_ioas_change_process {
        uint32_t size;
        uint32_t __reserved;
    };

    /* drivers/iommu/iommufd/iommufd_test.h (Linux 7.2) */
    struct iommu_test_cmd {
        uint32_t size;
        uint32_t op;
        uint32_t id;
        uint32_t __reserved;
        union {
            struct {
                uint64_t start;
                uint64_t length;
            } add_reserved;
            struct {
                uint32_t out_stdev_id;
                uint32_t out_hwpt_id;
                uint32_t out_idev_id;
            } mock_domain;
            struct {
                uint32_t out_stdev_id;
                uint32_t out_hwpt_id;
                uint32_t out_idev_id;
                uint32_t dev_flags;
            } mock_domain_flags;
            struct {
                uint32_t pt_id;
            } mock_domain_replace;
            struct {
                uint64_t iova;
                uint64_t length;
                uint64_t uptr;
            } check_map;
            struct {
                uint64_t length;
                uint64_t uptr;
                uint32_t refs;
            } check_refs;
            struct {
                uint32_t out_access_fd;
                uint32_t flags;
            } create_access;
            struct {
                uint32_t access_pages_id;
            } destroy_access_pages;
            struct {
                uint32_t flags;
                uint32_t out_access_pages_id;
                uint64_t iova;
                uint64_t length;
                uint64_t uptr;
            } access_pages;
            struct {
                uint64_t iova;
                uint64_t length;
                uint64_t uptr;
                uint32_t flags;
            } access_rw;
            struct {
                uint32_t limit;
            } memory_limit;
            struct {
                uint32_t ioas_id;
            } access_replace_ioas;
            struct {
                uint32_t flags;
                uint64_t iova;
                uint64_t length;
                uint64_t page_size;
                uint64_t uptr;
                uint64_t out_nr_dirty;
            } dirty;
            struct {
                uint32_t id;
                uint32_t iotlb;
            } check_iotlb;
            struct {
                uint32_t dev_id;
                uint32_t pasid;
                uint32_t grpid;
                uint32_t perm;
                uint64_t addr;
            } trigger_iopf;
            struct {
                uint32_t id;
                uint32_t cache;
            } check_dev_cache;
            struct {
                uint32_t dev_id;
            } trigger_vevent;
            struct {
                uint32_t pasid;
                uint32_t pt_id;
            } pasid_attach;
            struct {
                uint32_t pasid;
                uint32_t pt_id;
            } pasid_replace;
            struct {
                uint32_t pasid;
            } pasid_detach;
            struct {
                uint32_t pasid;
                uint32_t hwpt_id;
            } pasid_check;
            struct {
                uint32_t length;
                uint32_t open_flags;
            } dmabuf_get;
            struct {
                int32_t dmabuf_fd;
                uint32_t revoked;
            } dmabuf_revoke;
        };
        uint32_t last;
    };

    int ioctl(int fd, unsigned long request, ...);
    """
)
_libc = ffi.dlopen(None)

#: sizeof() of each struct as computed by the C compiler from the 7.2
#: headers (x86_64); checked against cffi's layout at import.
HEADER_SIZES: dict[str, int] = {
    "struct iommu_destroy": 8,
    "struct iommu_ioas_alloc": 12,
    "struct iommu_iova_range": 16,
    "struct iommu_ioas_iova_ranges": 32,
    "struct iommu_ioas_map": 40,
    "struct iommu_ioas_map_file": 40,
    "struct iommu_ioas_unmap": 24,
    "struct iommu_option": 24,
    "struct iommu_ioas_change_process": 8,
    "struct iommu_test_cmd": 72,
}


check_layouts(ffi, HEADER_SIZES, __name__)

# ioctl numbers: _IO(IOMMUFD_TYPE, nr), IOMMUFD_TYPE = ';'
IOMMUFD_TYPE = ord(";")


def _io(nr: int) -> int:
    return (IOMMUFD_TYPE << 8) | nr


IOMMU_DESTROY = _io(0x80)
IOMMU_IOAS_ALLOC = _io(0x81)
IOMMU_IOAS_IOVA_RANGES = _io(0x84)
IOMMU_IOAS_MAP = _io(0x85)
IOMMU_IOAS_UNMAP = _io(0x86)
IOMMU_OPTION = _io(0x87)
IOMMU_IOAS_MAP_FILE = _io(0x8F)
IOMMU_IOAS_CHANGE_PROCESS = _io(0x92)
IOMMU_TEST_CMD = _io(0x80 + 32)

# enum iommufd_ioas_map_flags
IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2
MAP_RW = IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE

# iommufd_test.h: IOMMU_TEST_OP_*
IOMMU_TEST_OP_ADD_RESERVED = 1
IOMMU_TEST_OP_MOCK_DOMAIN = 2
IOMMU_TEST_OP_MD_CHECK_MAP = 3
IOMMU_TEST_OP_MD_CHECK_REFS = 4
IOMMU_TEST_OP_CREATE_ACCESS = 5
IOMMU_TEST_OP_DESTROY_ACCESS_PAGES = 6
IOMMU_TEST_OP_ACCESS_PAGES = 7
IOMMU_TEST_OP_ACCESS_RW = 8

MOCK_APERTURE_START = 1 << 24
MOCK_APERTURE_LAST = (1 << 31) - 1
MOCK_FLAGS_ACCESS_WRITE = 1 << 0
MOCK_ACCESS_RW_WRITE = 1 << 0
MOCK_ACCESS_RW_SLOW_PATH = 1 << 2
MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES = 1 << 0

DEV_IOMMU = "/dev/iommu"

P = ParamSpec("P")
T = TypeVar("T")


def _ioctl(fd: int, request: int, arg: Any) -> int:
    """ioctl(fd, request, &struct): 0, or the errno it failed with."""
    ret = _libc.ioctl(fd, ffi.cast("unsigned long", request), arg)
    return int(ffi.errno) if ret < 0 else 0


def _raise(err: int, what: str) -> None:
    if err:
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _new(ctype: str, **fields: int) -> Any:
    cmd = ffi.new(f"{ctype} *")
    cmd.size = ffi.sizeof(ctype)
    for name, value in fields.items():
        setattr(cmd, name, value)
    return cmd


def _test_cmd(op: int, obj_id: int) -> Any:
    return _new("struct iommu_test_cmd", op=op, id=obj_id)


def _uptr(buf: Any) -> tuple[Any, int]:
    """(keep-alive cdata, address) of a writable buffer, for __u64 uptr."""
    if buf is None:
        return None, 0
    ptr = ffi.from_buffer(buf)
    return ptr, int(ffi.cast("uintptr_t", ptr))


def expect_errno(err: int, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> OSError:
    """Call *fn*, which must fail with OSError *err*; return that error.

    :raise AssertionError: when *fn* succeeds or fails otherwise.
    """
    try:
        result = fn(*args, **kwargs)
    except OSError as exc:
        if exc.errno != err:
            raise AssertionError(
                f"{fn.__name__}: expected {_errno.errorcode.get(err, err)}, got "
                f"{_errno.errorcode.get(exc.errno or 0, exc.errno)} ({exc})") from exc
        return exc
    raise AssertionError(f"{fn.__name__}: expected {_errno.errorcode.get(err, err)}, "
                         f"succeeded with {result!r}")


# ------------------------------------------------------------------ iommufd


def open_iommufd() -> int:
    """Open /dev/iommu (O_RDWR | O_CLOEXEC)."""
    return os.open(DEV_IOMMU, os.O_RDWR | os.O_CLOEXEC)


def _destroy(fd: int, obj_id: int) -> int:
    return _ioctl(fd, IOMMU_DESTROY, _new("struct iommu_destroy", id=obj_id))


def destroy(fd: int, obj_id: int) -> None:
    _raise(_destroy(fd, obj_id), f"IOMMU_DESTROY {obj_id}")


def _ioas_alloc(fd: int) -> tuple[int, int]:
    """Raw IOMMU_IOAS_ALLOC: (ioas id or -1, errno)."""
    cmd = _new("struct iommu_ioas_alloc")
    err = _ioctl(fd, IOMMU_IOAS_ALLOC, cmd)
    return (-1 if err else int(cmd.out_ioas_id)), err


def ioas_alloc(fd: int) -> int:
    ioas, err = _ioas_alloc(fd)
    _raise(err, "IOMMU_IOAS_ALLOC")
    return ioas


def _ioas_map(fd: int, ioas_id: int, buf: Any, *, iova: int | None = None,
              flags: int = MAP_RW) -> tuple[int, int]:
    """Raw IOMMU_IOAS_MAP of the user memory behind *buf* (by vaddr):
    (iova or -1, errno)."""
    keep, addr = _uptr(buf)
    cmd = _new("struct iommu_ioas_map", ioas_id=ioas_id, user_va=addr, length=len(buf),
               flags=flags | (IOMMU_IOAS_MAP_FIXED_IOVA if iova is not None else 0),
               iova=iova or 0)
    err = _ioctl(fd, IOMMU_IOAS_MAP, cmd)
    del keep
    return (-1 if err else int(cmd.iova)), err


def ioas_map(fd: int, ioas_id: int, buf: Any, *, iova: int | None = None,
             flags: int = MAP_RW) -> int:
    """Map *buf* by virtual address; returns the IOVA."""
    out, err = _ioas_map(fd, ioas_id, buf, iova=iova, flags=flags)
    _raise(err, "IOMMU_IOAS_MAP")
    return out


def _ioas_map_file(fd: int, ioas_id: int, mfd: int, start: int, length: int, *,
                   iova: int | None = None, flags: int = MAP_RW) -> tuple[int, int]:
    """Raw IOMMU_IOAS_MAP_FILE: (iova or -1, errno)."""
    cmd = _new("struct iommu_ioas_map_file", ioas_id=ioas_id, fd=mfd, start=start,
               length=length, iova=iova or 0,
               flags=flags | (IOMMU_IOAS_MAP_FIXED_IOVA if iova is not None else 0))
    err = _ioctl(fd, IOMMU_IOAS_MAP_FILE, cmd)
    return (-1 if err else int(cmd.iova)), err


def ioas_map_file(fd: int, ioas_id: int, mfd: int, start: int, length: int, *,
                  iova: int | None = None, flags: int = MAP_RW) -> int:
    """Map *length* bytes of file *mfd* from *start* (by file); returns the IOVA."""
    out, err = _ioas_map_file(fd, ioas_id, mfd, start, length, iova=iova, flags=flags)
    _raise(err, "IOMMU_IOAS_MAP_FILE")
    return out


def _ioas_unmap(fd: int, ioas_id: int, iova: int, length: int) -> tuple[int, int]:
    """Raw IOMMU_IOAS_UNMAP: (bytes unmapped or -1, errno)."""
    cmd = _new("struct iommu_ioas_unmap", ioas_id=ioas_id, iova=iova, length=length)
    err = _ioctl(fd, IOMMU_IOAS_UNMAP, cmd)
    return (-1 if err else int(cmd.length)), err


def ioas_unmap(fd: int, ioas_id: int, iova: int, length: int) -> int:
    out, err = _ioas_unmap(fd, ioas_id, iova, length)
    _raise(err, "IOMMU_IOAS_UNMAP")
    return out


def _ioas_change_process(fd: int) -> int:
    """Raw IOMMU_IOAS_CHANGE_PROCESS: errno (0 on success)."""
    return _ioctl(fd, IOMMU_IOAS_CHANGE_PROCESS, _new("struct iommu_ioas_change_process"))


def ioas_change_process(fd: int) -> None:
    """Move the pinned-page accounting of every IOAS of *fd* to this process.

    Fails with EINVAL while any mapping is by vaddr (or a dma-buf).
    """
    _raise(_ioas_change_process(fd), "IOMMU_IOAS_CHANGE_PROCESS")


# ---------------------------------------------------- IOMMU_TEST_CMD (selftest)


@dataclass(frozen=True)
class MockDomain:
    """A mock device attached to an IOAS through a mock IOMMU domain."""

    stdev_id: int
    hwpt_id: int
    idev_id: int


def _mock_domain(fd: int, ioas_id: int) -> tuple[MockDomain | None, int]:
    cmd = _test_cmd(IOMMU_TEST_OP_MOCK_DOMAIN, ioas_id)
    err = _ioctl(fd, IOMMU_TEST_CMD, cmd)
    if err:
        return None, err
    md = cmd.mock_domain
    return MockDomain(int(md.out_stdev_id), int(md.out_hwpt_id), int(md.out_idev_id)), 0


def mock_domain(fd: int, ioas_id: int) -> MockDomain:
    """Attach a mock device (and domain) to *ioas_id*: mappings get pinned."""
    md, err = _mock_domain(fd, ioas_id)
    _raise(err, "IOMMU_TEST_OP_MOCK_DOMAIN")
    assert md is not None
    return md


def _md_check_map(fd: int, hwpt_id: int, iova: int, buf: Any) -> int:
    """Raw MD_CHECK_MAP: errno; 0 when the mock domain maps [iova, +len(buf))
    to the very pages behind *buf*."""
    keep, addr = _uptr(buf)
    cmd = _test_cmd(IOMMU_TEST_OP_MD_CHECK_MAP, hwpt_id)
    cmd.check_map.iova = iova
    cmd.check_map.length = len(buf)
    cmd.check_map.uptr = addr
    err = _ioctl(fd, IOMMU_TEST_CMD, cmd)
    del keep
    return err


def md_check_map(fd: int, hwpt_id: int, iova: int, buf: Any) -> None:
    _raise(_md_check_map(fd, hwpt_id, iova, buf), "IOMMU_TEST_OP_MD_CHECK_MAP")


def _create_access(fd: int, ioas_id: int, flags: int) -> tuple[int, int]:
    """Raw CREATE_ACCESS: (access fd or -1, errno)."""
    cmd = _test_cmd(IOMMU_TEST_OP_CREATE_ACCESS, ioas_id)
    cmd.create_access.flags = flags
    err = _ioctl(fd, IOMMU_TEST_CMD, cmd)
    return (-1 if err else int(cmd.create_access.out_access_fd)), err


def create_access(fd: int, ioas_id: int,
                       flags: int = MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES) -> int:
    """An emulated-device access (like an mdev's) to *ioas_id*; returns its fd
    (close it to destroy the access)."""
    afd, err = _create_access(fd, ioas_id, flags)
    _raise(err, "IOMMU_TEST_OP_CREATE_ACCESS")
    return afd


def _access_pages(fd: int, access_fd: int, iova: int, length: int, buf: Any = None,
                       flags: int = 0) -> tuple[int, int]:
    """Raw ACCESS_PAGES (pin): (access-pages id or -1, errno).  With *buf*,
    the kernel also checks that the pinned pages are the pages behind it."""
    keep, addr = _uptr(buf)
    cmd = _test_cmd(IOMMU_TEST_OP_ACCESS_PAGES, access_fd)
    cmd.access_pages.flags = flags
    cmd.access_pages.iova = iova
    cmd.access_pages.length = length
    cmd.access_pages.uptr = addr
    err = _ioctl(fd, IOMMU_TEST_CMD, cmd)
    del keep
    return (-1 if err else int(cmd.access_pages.out_access_pages_id)), err


def access_pages(fd: int, access_fd: int, iova: int, length: int, buf: Any = None,
                      flags: int = 0) -> int:
    pid, err = _access_pages(fd, access_fd, iova, length, buf, flags)
    _raise(err, "IOMMU_TEST_OP_ACCESS_PAGES")
    return pid


def _destroy_access_pages(fd: int, access_fd: int, pages_id: int) -> int:
    cmd = _test_cmd(IOMMU_TEST_OP_DESTROY_ACCESS_PAGES, access_fd)
    cmd.destroy_access_pages.access_pages_id = pages_id
    return _ioctl(fd, IOMMU_TEST_CMD, cmd)


def destroy_access_pages(fd: int, access_fd: int, pages_id: int) -> None:
    _raise(_destroy_access_pages(fd, access_fd, pages_id),
           "IOMMU_TEST_OP_DESTROY_ACCESS_PAGES")


def _access_rw(fd: int, access_fd: int, iova: int, buf: Any, flags: int = 0) -> int:
    """Raw ACCESS_RW: errno.  Reads [iova, +len(buf)) into *buf*, or writes
    *buf* there with MOCK_ACCESS_RW_WRITE (the way an mdev uses vfio_dma_rw)."""
    keep, addr = _uptr(buf)
    cmd = _test_cmd(IOMMU_TEST_OP_ACCESS_RW, access_fd)
    cmd.access_rw.iova = iova
    cmd.access_rw.length = len(buf)
    cmd.access_rw.uptr = addr
    cmd.access_rw.flags = flags
    err = _ioctl(fd, IOMMU_TEST_CMD, cmd)
    del keep
    return err


def access_rw(fd: int, access_fd: int, iova: int, buf: Any, flags: int = 0) -> None:
    _raise(_access_rw(fd, access_fd, iova, buf, flags), "IOMMU_TEST_OP_ACCESS_RW")


def access_read(fd: int, access_fd: int, iova: int, length: int) -> bytes:
    buf = bytearray(length)
    access_rw(fd, access_fd, iova, buf)
    return bytes(buf)


def access_write(fd: int, access_fd: int, iova: int, data: bytes) -> None:
    access_rw(fd, access_fd, iova, bytearray(data), MOCK_ACCESS_RW_WRITE)


__all__ = [
    "DEV_IOMMU",
    "HEADER_SIZES",
    "IOMMU_IOAS_MAP_FIXED_IOVA",
    "IOMMU_IOAS_MAP_READABLE",
    "IOMMU_IOAS_MAP_WRITEABLE",
    "MAP_RW",
    "MOCK_ACCESS_RW_WRITE",
    "MOCK_APERTURE_LAST",
    "MOCK_APERTURE_START",
    "MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES",
    "MOCK_FLAGS_ACCESS_WRITE",
    "MockDomain",
    "destroy",
    "expect_errno",
    "ffi",
    "ioas_alloc",
    "ioas_change_process",
    "ioas_map",
    "ioas_map_file",
    "ioas_unmap",
    "open_iommufd",
    "access_pages",
    "access_read",
    "access_rw",
    "access_write",
    "create_access",
    "destroy_access_pages",
    "md_check_map",
    "mock_domain",
]
