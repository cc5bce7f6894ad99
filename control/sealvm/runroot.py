"""
The run root: the directory holding every VM's run directory.

``$SEALVM_RUN_DIR``, else /run/sealvm for root, else
``$XDG_RUNTIME_DIR/sealvm``.  Whatever it is, sealvm uses it only if no
other user could tamper with it (`check_run_root`).
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from .errors import StateError


def default_run_root() -> Path:
    """$SEALVM_RUN_DIR, else /run/sealvm for root, else $XDG_RUNTIME_DIR/sealvm.

    A non-root user without $XDG_RUNTIME_DIR gets no default: a fixed path
    under /tmp is one any other user can create first.

    :raise StateError: for a non-root user when XDG_RUNTIME_DIR is unset.
    """
    env = os.environ.get("SEALVM_RUN_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/sealvm")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if not xdg:
        raise StateError("no run root: XDG_RUNTIME_DIR is unset and sealvm does not guess a "
                         "path under /tmp; set SEALVM_RUN_DIR (or --run-dir) to a directory "
                         "of yours that only you can write")
    return Path(xdg) / "sealvm"


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_run_root(root: Path, *, what: str = "run root") -> None:
    """Refuse a run root (or run directory) another user could tamper with:
    it must be a directory owned by the effective uid, neither group- nor
    world-writable; a symlink to it must itself belong to us or to root.

    :raise StateError: naming the path, its owner and mode.
    """
    euid = os.geteuid()
    st = os.lstat(root)
    if stat.S_ISLNK(st.st_mode):
        if st.st_uid not in (euid, 0):
            raise StateError(f"{what} {root} is a symlink owned by {_owner(st.st_uid)}, "
                             f"not by {_owner(euid)}: refusing to use it")
        st = os.stat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"{what} {root} is not a directory")
    if st.st_uid != euid:
        raise StateError(f"{what} {root} is owned by {_owner(st.st_uid)}, not by "
                         f"{_owner(euid)}: refusing to use it (its owner could replace the "
                         "VM's socket and state file)")
    if st.st_mode & 0o022:
        raise StateError(f"{what} {root} (owner {_owner(st.st_uid)}) has mode "
                         f"{stat.S_IMODE(st.st_mode):04o}: group/world-writable, refusing to "
                         f"use it (chmod go-w {root})")
