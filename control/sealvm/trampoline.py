"""
cpr-exec's trampoline (data/exec-trampoline.c): the small static binary
QEMU exec()s first on the way to a new image, which hands every preserved
fd to the keeper (`sealvm.update.wayback`).  Built from its source on
first use and cached by content; a confined QEMU's view has it
(`sealvm.confine`), so its path is known from launch on.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from .errors import HostError

_SOURCE = "exec-trampoline.c"


def _cache_root() -> Path:
    env = os.environ.get("SEALVM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sealvm"


def trampoline() -> Path:
    """The trampoline binary, built from its source on first use (cached by
    content under $SEALVM_CACHE/trampoline, or $SEALVM_TRAMPOLINE).

    :raise HostError: when it cannot be built (no C compiler, no static libc).
    """
    env = os.environ.get("SEALVM_TRAMPOLINE")
    if env:
        return Path(env)
    source = resources.files("sealvm").joinpath("data", _SOURCE).read_bytes()
    key = hashlib.sha256(source).hexdigest()[:16]
    dest = _cache_root() / "trampoline" / key / "sealvm-exec-trampoline"
    if dest.is_file():
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        return _build(source, dest)
    except OSError:  # a read-only cache (the nested L1 sees the host's): build aside
        tmp = Path(tempfile.mkdtemp(prefix="sealvm-trampoline-"))
        return _build(source, tmp / "sealvm-exec-trampoline")


def _build(source: bytes, dest: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise HostError("cpr-exec's way back needs a C compiler to build its trampoline "
                        "once (or $SEALVM_TRAMPOLINE)")
    with tempfile.TemporaryDirectory(dir=dest.parent) as work:
        src = Path(work) / _SOURCE
        src.write_bytes(source)
        out = Path(work) / "t"
        p = subprocess.run([cc, "-O2", "-static", "-Wall", "-o", str(out), str(src)],
                           capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise HostError(f"building the cpr-exec trampoline failed: {p.stderr.strip()}")
        os.chmod(out, 0o755)
        os.replace(out, dest)
    return dest
