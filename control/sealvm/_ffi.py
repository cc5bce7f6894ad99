"""
cffi bindings to the few Linux system calls the standard library lacks
(inotify), and the struct-layout check the ioctl bindings share.

ABI mode against the C library already loaded into the process: no compiler
is needed at install time.  What the standard library has is used from it:
`os.memfd_create`, `fcntl.ioctl` (integer arguments); cffi is kept for the
ioctls that take a struct (`sealvm.vfio`, `sealvm.iommufd`).
"""

from __future__ import annotations

import os

from cffi import FFI

ffi = FFI()
ffi.cdef(
    """
    int inotify_init1(int flags);
    int inotify_add_watch(int fd, const char *pathname, uint32_t mask);
    """
)
_libc = ffi.dlopen(None)

# <sys/inotify.h>
IN_MODIFY = 0x00000002
IN_CLOEXEC = 0o2000000

# <linux/memfd.h>: Python 3.11's os module lacks these two (Linux 6.3)
MFD_NOEXEC_SEAL: int = getattr(os, "MFD_NOEXEC_SEAL", 0x0008)
MFD_EXEC: int = getattr(os, "MFD_EXEC", 0x0010)


def _check(ret: int) -> int:
    if ret < 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err))
    return ret


def inotify_init1(flags: int) -> int:
    return _check(_libc.inotify_init1(flags))


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    return _check(_libc.inotify_add_watch(fd, os.fsencode(path), mask))



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
