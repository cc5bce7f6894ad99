"""
Inside L1: how long IOMMU_IOAS_CHANGE_PROCESS takes against the size
mapped by file (a benchmark's L1 side, run by tests/bench/change_process.py).

    python -m nested.l1_change_process SIZE_MIB [SIZE_MIB ...] [--execs N]

Per size, in a process of its own: a sealed memfd of that size, allocated
(fallocate), mapped with IOMMU_IOAS_MAP_FILE, 1 GiB per IOAS, each IOAS
with an IOMMUFD_TEST mock domain (so every page is pinned, as for an
assigned device), then N times: exec() this script again, keeping the fds, and time
IOMMU_IOAS_CHANGE_PROCESS in the new image (the call a cpr-exec'd QEMU
makes).  The time is the ioctl alone (perf_counter_ns around it).

Prints ``{"kernel"}``, then one JSON line per size on stdout:
``{"size_mib", "map_s", "change_process_us": [...], "again_us": [...], "ok"}``; a failed
ioctl is reported with its errno name, not raised.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, NoReturn

from sealvm import procfs

from .harness import iommufd as iofd

#: what one IOAS maps (an IOMMUFD_TEST mock domain's aperture is under 2 GiB)
CHUNK = 1 << 30
SEALS = procfs.F_SEAL_GROW | procfs.F_SEAL_SHRINK | procfs.F_SEAL_SEAL


def errname(err: int) -> str:
    return errno.errorcode.get(err, str(err))


def first(size: int, execs: int) -> dict[str, Any]:
    """Map *size* bytes by file, then hand over to the exec chain."""
    fd = iofd.open_iommufd()
    mfd = os.memfd_create("sealvm-change-process", os.MFD_ALLOW_SEALING)
    os.ftruncate(mfd, size)
    os.posix_fallocate(mfd, 0, size)
    fcntl.fcntl(mfd, fcntl.F_ADD_SEALS, SEALS)
    map_s = 0.0
    for start in range(0, size, CHUNK):
        # a mock domain's aperture is under 2 GiB: one IOAS per GiB
        ioas = iofd.ioas_alloc(fd)
        iofd.mock_domain(fd, ioas)
        t = time.perf_counter()
        _, err = iofd._ioas_map_file(fd, ioas, mfd, start, min(CHUNK, size - start))
        map_s += time.perf_counter() - t
        if err:
            return {"size_mib": size >> 20, "ok": False,
                    "error": f"MAP_FILE at {start >> 20} MiB: {errname(err)}"}
    state = {"fd": fd, "size": size, "left": execs, "map_s": map_s, "us": []}
    return chain(state, (fd, mfd))


def chain(state: dict[str, Any], keep: tuple[int, ...]) -> NoReturn:
    """exec() this script with the state."""
    for f in keep:
        os.set_inheritable(f, True)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", __spec__.name, "--after-exec",
                              json.dumps({**state, "keep": list(keep)})])


def after_exec(state: dict[str, Any]) -> dict[str, Any] | None:
    """In the new image: time CHANGE_PROCESS, then exec again or report.

    The argument is built and the call path (cffi, libc) warmed on a bad fd
    first, so the time is the ioctl's; a second call right after (the same
    process: nothing to move) is the fixed cost, reported as ``again_us``."""
    arg = iofd._new("struct iommu_ioas_change_process")
    iofd._ioctl(-1, iofd.IOMMU_IOAS_CHANGE_PROCESS, arg)  # EBADF: warms the path
    t = time.perf_counter_ns()
    err = iofd._ioctl(state["fd"], iofd.IOMMU_IOAS_CHANGE_PROCESS, arg)
    dt = time.perf_counter_ns() - t
    t = time.perf_counter_ns()
    iofd._ioctl(state["fd"], iofd.IOMMU_IOAS_CHANGE_PROCESS, arg)
    state.setdefault("again", []).append((time.perf_counter_ns() - t) / 1000)
    if err:
        return {"size_mib": state["size"] >> 20, "ok": False, "map_s": state["map_s"],
                "change_process_us": state["us"], "error": f"CHANGE_PROCESS {errname(err)}"}
    state["us"].append(dt / 1000)
    state["left"] -= 1
    if state["left"] > 0:
        chain(state, tuple(state["keep"]))
    return {"size_mib": state["size"] >> 20, "ok": True, "map_s": state["map_s"],
            "change_process_us": state["us"], "again_us": state["again"]}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--after-exec":
        result = after_exec(json.loads(sys.argv[2]))
        print(json.dumps(result), flush=True)
        return 0 if result and result["ok"] else 1
    if len(sys.argv) >= 2 and sys.argv[1] == "--one":
        result = first(int(sys.argv[2]) << 20, int(sys.argv[3]))
        print(json.dumps(result), flush=True)  # only when mapping failed
        return 1
    args = sys.argv[1:]
    print(json.dumps({"kernel": platform.release()}), flush=True)
    execs = 5
    if "--execs" in args:
        i = args.index("--execs")
        execs = int(args[i + 1])
        del args[i:i + 2]
    status = 0
    for size_mib in (int(a) for a in args):
        # a process per size: its memory is gone before the next size
        p = subprocess.run([sys.executable, "-m", __spec__.name, "--one", str(size_mib),
                            str(execs)], check=False)
        status |= p.returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
