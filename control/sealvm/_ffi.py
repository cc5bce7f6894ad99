"""
cffi bindings to the few Linux system calls the standard library lacks.

ABI mode against the C library already loaded into the process: no compiler
is needed at install time.  Each binding comes as a pair: ``_name()`` returns
the raw result and ``name()`` raises `OSError` with errno on failure.
"""

from __future__ import annotations

import os

from cffi import FFI

ffi = FFI()
ffi.cdef(
    """
    int inotify_init1(int flags);
    int inotify_add_watch(int fd, const char *pathname, uint32_t mask);
    int memfd_create(const char *name, unsigned int flags);
    int ioctl(int fd, unsigned long request, ...);
    """
)
_libc = ffi.dlopen(None)

# <sys/inotify.h>
IN_MODIFY = 0x00000002
IN_CLOEXEC = 0o2000000

# <linux/memfd.h>
MFD_CLOEXEC = 0x0001
MFD_ALLOW_SEALING = 0x0002
MFD_HUGETLB = 0x0004
MFD_NOEXEC_SEAL = 0x0008
MFD_EXEC = 0x0010


def _check(ret: int) -> int:
    if ret < 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err))
    return ret


def inotify_init1(flags: int) -> int:
    return _check(_libc.inotify_init1(flags))


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    return _check(_libc.inotify_add_watch(fd, os.fsencode(path), mask))


def _memfd_create(name: str, flags: int) -> tuple[int, int]:
    """Raw memfd_create: (fd or -1, errno)."""
    fd = _libc.memfd_create(name.encode(), flags)
    return fd, (ffi.errno if fd < 0 else 0)


def memfd_create(name: str, flags: int) -> int:
    fd, err = _memfd_create(name, flags)
    if fd < 0:
        raise OSError(err, os.strerror(err))
    return fd


def _ioctl_int(fd: int, request: int, arg: int) -> tuple[int, int]:
    """Raw ioctl with an integer argument: (result, errno)."""
    ret = _libc.ioctl(fd, ffi.cast("unsigned long", request), ffi.cast("unsigned long", arg))
    return ret, (ffi.errno if ret < 0 else 0)


def ioctl_int(fd: int, request: int, arg: int) -> int:
    ret, err = _ioctl_int(fd, request, arg)
    if ret < 0:
        raise OSError(err, os.strerror(err))
    return int(ret)


def check_layouts(lib_ffi: FFI, sizes: dict[str, int], module: str) -> None:
    """Struct sizes cffi computed must equal the uapi headers' (copied as
    *sizes*): a wrong cdef would silently corrupt every ioctl.

    :raise ImportError: naming each struct that differs.
    """
    wrong = {name: (lib_ffi.sizeof(name), size) for name, size in sizes.items()
             if lib_ffi.sizeof(name) != size}
    if wrong:
        raise ImportError(f"{module}: struct sizes differ from the uapi headers "
                          f"(cffi, header): {wrong}")
