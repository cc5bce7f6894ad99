"""
cffi bindings to the few Linux system calls the standard library lacks
(inotify, pidfd_getfd, unshare, mount), and the struct-layout check the
ioctl bindings share.

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
    long syscall(long number, ...);
    int unshare(int flags);
    int mount(const char *source, const char *target, const char *fstype,
              unsigned long flags, const void *data);
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


# <sched.h>, <sys/mount.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_REC = 16384
MS_PRIVATE = 1 << 18


def unshare_raw(flags: int) -> int:
    """unshare(2): 0, or the errno.  Python 3.11's os module lacks it."""
    return 0 if _libc.unshare(flags) == 0 else int(ffi.errno)


def mount_raw(target: str, flags: int) -> int:
    """mount(2) without source, type or data (a propagation change): 0, or
    the errno."""
    ret = _libc.mount(ffi.NULL, os.fsencode(target), ffi.NULL, flags, ffi.NULL)
    return 0 if ret == 0 else int(ffi.errno)


#: asm-generic/unistd.h, the same number on every architecture
SYS_PIDFD_GETFD = 438


def pidfd_getfd_raw(pidfd: int, targetfd: int) -> tuple[int, int]:
    """pidfd_getfd(2): (a duplicate of *targetfd*, 0) or (-1, errno)."""
    ret = _libc.syscall(ffi.cast("long", SYS_PIDFD_GETFD), ffi.cast("int", pidfd),
                        ffi.cast("int", targetfd), ffi.cast("unsigned int", 0))
    return (int(ret), 0) if ret >= 0 else (-1, int(ffi.errno))


def pidfd_getfd(pid: int, targetfd: int) -> int:
    """A duplicate (O_CLOEXEC) of fd *targetfd* of process *pid*: the same
    open file (ptrace access to *pid* needed: same user or root).

    :raise OSError: carrying errno.
    """
    pidfd = os.pidfd_open(pid)
    try:
        fd, err = pidfd_getfd_raw(pidfd, targetfd)
    finally:
        os.close(pidfd)
    if err:
        raise OSError(err, f"pidfd_getfd({pid}, {targetfd}): {os.strerror(err)}")
    return fd


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
