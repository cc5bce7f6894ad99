"""
Live updates of an L2 VM with an assigned device, per mode (a benchmark,
not a test): in the nested L1 (our kernel, emulated intel-iommu), one boot
runs the scenarios of tests/nested with ``--updates`` updates each

  - edu over iommufd (vfio cdev, guest RAM mapped by file), cpr-exec;
  - edu over the legacy type1 container (QEMU's own VADDR flow), cpr-exec;
  - mdma (a mediated device DMA-ing from guest RAM) over iommufd, cpr-exec
    then cpr-transfer,

and prints per mode n, the pause the L2 guest saw and QEMU's STOP->RESUME
(p50 / p95 / max, ms), the update's phases as the controller timed them
(p50 / p95, ms) and, for mdma, the largest gap in the device's own writes
(ms).  Every scenario also runs its checks (DMA through each update, nothing
left behind); a failed check fails the run.

    make bench-nested [NESTED_BENCH_ARGS="--updates 5"]

Nested TCG: L2 runs on an emulated CPU inside an emulated CPU, so every
figure is many times the L0 one; compare the rows with each other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from nested.harness.l1 import edu_addresses, run_cancellable, run_in_l1, tree_python_env
from sealvm.bench.report import cell
from sealvm.bench.stats import summarize
from sealvm.trampoline import trampoline

#: (the name a scenario gives its result, argv after ``nested.``)
SCENARIOS = (
    ("vfio-iommufd", "l1_vfio iommufd {bdf} --updates {n} --mode cpr-exec"),
    ("vfio-legacy", "l1_vfio legacy {bdf} --updates {n} --mode cpr-exec"),
    ("mdma-iommufd", "l1_mdma iommufd --updates {n}"),
)
L1_TIMEOUT = 7200.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.nested_vfio", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=20, help="per scenario and mode (default 20)")
    p.add_argument("--only", default="", help="comma-separated scenario names "
                   f"({', '.join(s[0] for s in SCENARIOS)}; default: all)")
    p.add_argument("--scenario-timeout", type=float, default=900.0,
                   help="s; a scenario still running then is killed, its stacks in its log")
    p.add_argument("--results", type=Path, help="keep L1's results (logs, JSON, dmesg) "
                   "and its console (console.log) in this new directory")
    p.add_argument("--qemu", default=os.environ.get("SEALVM_QEMU"))
    p.add_argument("--guest", default=os.environ.get("SEALVM_GUEST"))
    p.add_argument("--kernel", default=os.environ.get("SEALVM_HOST_KERNEL"))
    args = p.parse_args(argv)
    if not args.qemu or not args.guest or not args.kernel:
        p.error("set SEALVM_QEMU, SEALVM_GUEST and SEALVM_HOST_KERNEL (or --qemu/--guest/"
                "--kernel); `make bench-nested` does")
    if args.results is not None and args.results.exists():
        p.error(f"--results: {args.results} exists")
    if args.updates < 1:
        p.error("--updates must be at least 1")
    names = [s[0] for s in SCENARIOS]
    args.scenarios = [s for s in SCENARIOS if not args.only or s[0] in args.only.split(",")]
    unknown = set(args.only.split(",")) - set(names) if args.only else set()
    if unknown:
        p.error(f"--only: no scenario {', '.join(sorted(unknown))} (have {', '.join(names)})")
    return args


def rows_by_mode(name: str, result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    backend = result.get("figures", {}).get("backend", "?")
    for row in result.get("figures", {}).get("updates", []):
        device = "edu" if name.startswith("vfio") else name.split("-")[0]
        key = f"{device} {backend} {row.get('mode', result['figures'].get('mode'))}"
        out.setdefault(key, []).append(row)
    return out


def mdma_gap(row: dict[str, Any]) -> float | None:
    """The largest gap between the device's successive pins or writes
    around the update, less what L1 itself stalled (s)."""
    net_ms = (row.get("gaps") or {}).get("max_net_ms")
    return None if net_ms is None else net_ms / 1000


def report(results: dict[str, dict[str, Any]], scenarios: list[tuple[str, str]],
           updates: int) -> bool:
    ok = True
    print(f"L2 live updates in L1 (nested TCG), {updates} per mode; ms p50 / p95 / max")
    print(f"{'scenario, backend, mode':<28} {'n':>3} {'guest-seen pause':>22} "
          f"{'QMP STOP->RESUME':>22}  phases p50/p95")
    for name, _ in scenarios:
        result = results.get(name)
        if result is None:
            print(f"{name:<28} no result")
            ok = False
            continue
        failed = [c for c in result.get("checks", []) if not c.get("ok")]
        for key, rows in rows_by_mode(name, result).items():
            names = dict.fromkeys(p for r in rows for p in r.get("phases") or {})
            cells = " ".join(
                f"{phase} " + cell(summarize((r.get("phases") or {}).get(phase) for r in rows),
                                   stats=("p50", "p95"))
                for phase in names)
            guest = cell(summarize(r.get("pause_guest") for r in rows))
            qmp = cell(summarize(r.get("pause_qmp") for r in rows))
            print(f"{key:<28} {len(rows):>3} {guest:>22} {qmp:>22}  {cells}")
            steps = dict.fromkeys(k for r in rows for k in r.get("steps") or {})
            print(f"{'':<32} QEMU's steps p50/p95: " + " ".join(
                f"{k} " + cell(summarize((r.get("steps") or {}).get(k) for r in rows),
                               stats=("p50", "p95")) for k in steps))
            if name.startswith("mdma"):
                gap = cell(summarize(mdma_gap(r) for r in rows))
                print(f"{'':<32} the device's largest gap (net of L1's stalls) {gap}")
            if len(rows) != updates:
                ok = False
        if result.get("error"):
            ok = False
            print(f"{name}: error: {result['error'].strip().splitlines()[-1]}")
        if failed:
            ok = False
            print(f"{name}: {len(failed)} check(s) failed, first: {failed[0].get('name')}: "
                  f"{failed[0].get('detail')}")
    return ok


async def run(args: argparse.Namespace) -> int:
    bdf = edu_addresses(1)[0]
    commands = [f"{name}={template.format(bdf=bdf, n=args.updates)}"
                for name, template in args.scenarios]
    env = {"SEALVM_QEMU": str(args.qemu), "SEALVM_GUEST": str(args.guest),
           "SEALVM_TRAMPOLINE": str(trampoline()),
           "SEALVM_SCENARIO_TIMEOUT": str(args.scenario_timeout), **tree_python_env()}
    print(f"L1: {len(commands)} scenario(s), {args.updates} updates per mode", file=sys.stderr)
    if args.results is not None:
        args.results.mkdir(parents=True)
    r = await run_in_l1([sys.executable, "-m", "nested.l1_run", *commands],
                        kernel=Path(args.kernel), qemu=Path(args.qemu), edu=1,
                        timeout=L1_TIMEOUT, env=env, share=args.results,
                        console_log=None if args.results is None
                        else args.results / "console.log")
    results = {Path(name).stem: json.loads(data) for name, data in r.files.items()
               if Path(name).parent.name == "results" and name.endswith(".json")}
    ok = report(results, args.scenarios, args.updates) and r.exit_status == 0
    print("nested_vfio: OK" if ok else f"nested_vfio: FAILED (L1 command exit {r.exit_status})")
    return 0 if ok else 1


def main() -> int:
    return asyncio.run(run_cancellable(run(parse_args())))


if __name__ == "__main__":
    sys.exit(main())
