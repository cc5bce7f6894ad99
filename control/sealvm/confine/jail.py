"""
sealvm's jail: starts QEMU confined (`sealvm.confine`).

Run by path, in isolated mode, with the standard library only (it runs
between sealvm's fork and QEMU's exec, and imports nothing of sealvm)::

    python -I -S jail.py PLAN -- QEMU-ARGV...

PLAN is JSON: ``{"uid": U, "gid": G, "root": DIR, "binds": [[PATH, MODE],
...], "dev": [NODE, ...], "proc": true}``; MODE is ``ro``, ``rx`` (read-only,
executable) or ``rw``.  As root, the jail

1. unshares the mount, network, IPC and UTS namespaces, and makes every
   mount private, so that nothing here reaches the host;
2. mounts a tmpfs on *root* and binds each PATH at the same absolute path
   inside it (so the command line's paths stay valid), read-only unless
   ``rw``, nosuid and nodev always, noexec unless ``rx``; the directories
   leading to a bind are the tmpfs's own (0755), so the VM's user reaches a
   file whatever the modes of its directories on the host;
3. adds a /dev with only the *dev* nodes, a /proc of its own that shows
   only the user's processes (``hidepid=invisible``), the host's top-level
   symlinks (/lib -> usr/lib, ...), and pivots into it; the tmpfs is then
   made read-only;
4. drops every capability from the bounding set, sets the groups to *gid*
   only, the gids and uids to *gid* and *uid* (which empties the effective,
   permitted and ambient sets), sets ``no_new_privs``, and exec()s QEMU.

Every fd it inherited stays open at its number (QEMU's passed fds).  Any
failure exits 126 with one line on stderr naming the step, before QEMU
runs.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
SYS_PIVOT_ROOT = 155  # x86_64

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


class JailError(Exception):
    pass


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(err)}")


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(src: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(_b(src), _b(target), _b(fstype), flags, _b(data)),
           f"mount {src or fstype} on {target}")


def _mkpoint(target: str, is_dir: bool) -> None:
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if is_dir:
        os.makedirs(target, mode=0o755, exist_ok=True)
    elif not os.path.lexists(target):
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def _flags(mode: str) -> int:
    flags = MS_NOSUID | MS_NODEV
    if mode != "rw":
        flags |= MS_RDONLY
    if mode != "rx":
        flags |= MS_NOEXEC
    return flags


def bind(root: str, path: str, mode: str, covered: bool) -> None:
    """Bind *path* at the same path under *root*.  *covered*: a bind made
    before already shows it (a directory above it); its mount point is then
    the file itself, not one made in the tmpfs."""
    target = root + path
    if not covered:
        _mkpoint(target, os.path.isdir(path))
    mount(path, target, None, MS_BIND | MS_REC)
    mount(None, target, None, MS_REMOUNT | MS_BIND | _flags(mode))


def build(plan: dict[str, object]) -> None:
    root = str(plan["root"])
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=1m")
    done: list[tuple[str, str]] = []
    binds = plan["binds"]
    assert isinstance(binds, list)
    for path, mode in sorted((str(p), str(m)) for p, m in binds):
        if not os.path.exists(path):
            raise JailError(f"{path}: does not exist")
        under = [(p, m) for p, m in done if path == p or path.startswith(p.rstrip("/") + "/")]
        if under and all(_flags(m) == _flags(mode) for _, m in under[-1:]):
            continue  # already shown, the same way
        bind(root, path, mode, covered=bool(under))
        done.append((path, mode))
    # the host's top-level symlinks (/lib -> usr/lib, ...)
    for name in os.listdir("/"):
        src = "/" + name
        if os.path.islink(src) and not os.path.lexists(root + src):
            os.symlink(os.readlink(src), root + src)
    os.makedirs(root + "/dev", mode=0o755, exist_ok=True)
    mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    nodes = plan.get("dev", [])
    assert isinstance(nodes, list)
    for node in nodes:
        _mkpoint(root + str(node), False)
        mount(str(node), root + str(node), None, MS_BIND)
        mount(None, root + str(node), None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NOEXEC)
    os.symlink("/proc/self/fd", root + "/dev/fd")
    if plan.get("proc", True):
        os.makedirs(root + "/proc", mode=0o555, exist_ok=True)
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        try:
            mount("proc", root + "/proc", "proc", flags, "hidepid=invisible")
        except JailError:
            mount("proc", root + "/proc", "proc", flags, "hidepid=2")
    os.makedirs(root + "/tmp", mode=0o755, exist_ok=True)
    os.chdir(root)
    _check(_libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detach the host's root")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def drop(uid: int, gid: int, cap_last: int) -> None:
    if uid == 0 or gid == 0:
        raise JailError("refusing uid or gid 0")
    for cap in range(cap_last + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    os.setgroups([gid])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: jail.py PLAN -- ARGV...", file=sys.stderr)
        return 2
    plan = json.loads(argv[1])
    try:
        cap_last = last_cap()  # read before /proc changes
        if plan.get("binds") is not None:
            umask = os.umask(0o022)  # the view's directories: 0755 whatever sealvm's umask
            build(plan)
            os.umask(umask)
        drop(int(plan["uid"]), int(plan["gid"]), cap_last)
        try:
            os.execv(argv[3], argv[3:])
        except OSError as exc:
            raise JailError(f"exec {argv[3]}: {exc.strerror} (in the VM's view, as uid "
                            f"{os.getuid()})") from exc
    except (OSError, JailError) as exc:
        print(f"sealvm-jail: {exc}", file=sys.stderr, flush=True)
    return 126


if __name__ == "__main__":
    sys.exit(main(sys.argv))
