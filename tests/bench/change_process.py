"""
How long IOMMU_IOAS_CHANGE_PROCESS takes against the guest memory mapped by
file (a benchmark, not a test): in the nested L1 (our kernel, IOMMUFD_TEST),
per size a sealed memfd pinned through an IOMMUFD_TEST mock domain, then
``--execs`` exec()s, each timing the ioctl in the new image -- what a
cpr-exec'd QEMU with an assigned device calls before it resumes the guest.

    make bench-change-process [CHANGE_PROCESS_ARGS="--sizes 256M,1G --execs 5"]

Prints per size n, p50 / p95 / max of the ioctl (µs), the p50 of a second
call right after it (same process, nothing to move: the fixed cost) and the time
IOMMU_IOAS_MAP_FILE took to pin the memory (s), then the ratio of the
largest size's p50 to the smallest's.  L1 gets the largest size + 2 GiB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from nested.harness.l1 import run_cancellable, run_in_l1, tree_python_env
from sealvm.bench.stats import summarize
from sealvm.errors import SpecError
from sealvm.spec import parse_size

HERE = Path(__file__).resolve().parent
DEFAULT_SIZES = "256M,512M,1G,2G,4G,8G"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.change_process", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=DEFAULT_SIZES)
    p.add_argument("--execs", type=int, default=5)
    p.add_argument("--qemu", default=os.environ.get("SEALVM_QEMU"))
    p.add_argument("--kernel", default=os.environ.get("SEALVM_HOST_KERNEL"))
    args = p.parse_args()
    if not args.qemu or not args.kernel:
        p.error("set SEALVM_QEMU and SEALVM_HOST_KERNEL (or --qemu/--kernel); "
                "`make bench-change-process` does")
    if args.execs < 1:
        p.error("--execs must be at least 1")
    try:
        args.size_list = [parse_size(s, "--sizes") for s in args.sizes.split(",")]
    except SpecError as exc:
        p.error(str(exc))
    if any(s < 1 << 20 or s % (1 << 20) for s in args.size_list):
        p.error("--sizes: each a whole number of MiB")
    return args


async def run(args: argparse.Namespace) -> int:
    sizes_mib = [s >> 20 for s in args.size_list]
    env = tree_python_env()
    command = [sys.executable, "-m", "nested.l1_change_process", *map(str, sizes_mib),
               "--execs", str(args.execs)]
    memory = max(sizes_mib) + 2048
    print(f"L1: {memory} MiB, sizes {args.sizes}, {args.execs} exec()s each", file=sys.stderr)
    r = await run_in_l1(command, kernel=Path(args.kernel), qemu=Path(args.qemu),
                        timeout=3600, env=env, memory_mib=memory)
    rows = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    kernel = next((x["kernel"] for x in rows if "kernel" in x), "?")
    print(f"IOMMU_IOAS_CHANGE_PROCESS in L1 (kernel {kernel}, IOMMUFD_TEST mock domain, TCG); "
          f"n = exec()s per size; µs p50 / p95 / max; MAP_FILE (pinning) s")
    print(f"{'mapped':>8} {'n':>3} {'p50':>8} {'p95':>8} {'max':>8} {'again p50':>9} "
          f"{'map s':>7}  status")
    p50s: dict[int, float] = {}
    for size_mib in sizes_mib:
        row = next((x for x in rows if x.get("size_mib") == size_mib), None)
        if row is None:
            print(f"{size_mib:>7}M  no result")
            continue
        d = summarize(row.get("change_process_us", []))
        cells = " ".join(f"{v:8.1f}" if v is not None else f"{'-':>8}"
                         for v in (d.p50, d.p95, d.max))
        status = "ok" if row["ok"] else row.get("error", "failed")
        again = summarize(row.get("again_us", [])).p50
        cells += f" {again:9.1f}" if again is not None else f" {'-':>9}"
        map_s = row.get("map_s")
        map_cell = f"{map_s:7.2f}" if map_s is not None else f"{'-':>7}"
        print(f"{size_mib:>7}M {d.n_ok:>3} {cells} {map_cell}  {status}")
        if row["ok"] and d.p50 is not None:
            p50s[size_mib] = d.p50
    if len(p50s) >= 2:
        lo, hi = min(p50s), max(p50s)
        print(f"p50({hi}M)/p50({lo}M) = {p50s[hi] / p50s[lo]:.2f}")
    ok = len(p50s) == len(sizes_mib)
    print("change_process: OK" if ok else "change_process: FAILED (see above)")
    return 0 if ok else 1


def main() -> int:
    return asyncio.run(run_cancellable(run(parse_args())))


if __name__ == "__main__":
    sys.exit(main())
