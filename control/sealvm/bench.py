"""
Side-by-side live-update benchmark (``make bench``; not a test).

One run, one machine: for each guest RAM size and each mode, launch the
test guest, perform N updates and record sealvm's `UpdateReport` for each.
Prints a table, writes JSON and a PNG plot (pause vs guest RAM, one line
per mode), and prints the ratios last.

What the guest touches matters, so it is stated: in the CPR modes the
guest rewrites all its RAM forever and every update waits for a complete
pass first, so all of it (>= 90 % of guest RAM) is mapped in the QEMU being
replaced -- the worst case for exec's teardown.  For classic migration the
guest writes its RAM once and then idles (``pattern_passes=1``): every page
holds data and must be copied, and the copy can converge.

Modes:
  sealvm-exec       cpr-exec with our QEMU
  sealvm-exec-oneway  the same without the way back (no keeper, no trampoline:
                    what the way back costs)
  upstream-exec     cpr-exec with pristine QEMU 10.2.2 (make qemu-upstream)
  sealvm-transfer   cpr-transfer with our QEMU
  classic           live migration to a new local QEMU over a unix socket
                    (RAM copied)
  sealvm-exec-2M    cpr-exec with our QEMU, guest RAM in a hugetlb memfd
  upstream-exec-2M  the same with pristine QEMU
The hugetlb rows run only where the machine can reserve the huge pages
(the bench reserves them through vm.nr_hugepages and gives them back);
otherwise they are skipped, saying why.

    python -m sealvm.bench [--sizes 64M,1G,4G,8G] [--updates 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .console import ConsoleFollower, ConsoleLog
from .errors import SealvmError
from .machine import Machine
from .spec import parse_size, spec_from_dict
from .update import UpdateReport, live_update

HB_MS = 10
MODES = {
    "sealvm-exec": ("sealvm", "cpr-exec"),
    "sealvm-exec-oneway": ("sealvm", "cpr-exec"),
    "upstream-exec": ("upstream", "cpr-exec"),
    "sealvm-transfer": ("sealvm", "cpr-transfer"),
    "classic": ("sealvm", "migrate"),
    "sealvm-exec-2M": ("sealvm", "cpr-exec"),
    "upstream-exec-2M": ("upstream", "cpr-exec"),
}
HUGEPAGE = 2 << 20
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def reserve_hugepages(size: int) -> str | None:
    """Make *size* bytes of 2 MiB pages free; None if done, else why not."""
    try:
        total = int(NR_HUGEPAGES.read_text())
        free = int(Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
                   .read_text())
    except OSError as exc:
        return f"cannot read huge page counters: {exc}"
    need = size // HUGEPAGE - free
    if need <= 0:
        return None
    try:
        NR_HUGEPAGES.write_text(str(total + need))
    except OSError as exc:
        return f"cannot reserve {need} huge pages: {exc.strerror}"
    got = int(NR_HUGEPAGES.read_text()) - total
    if got < need:
        NR_HUGEPAGES.write_text(str(total))
        return f"the kernel gave {got} of {need} huge pages (memory fragmented or short)"
    return None


@dataclass
class Point:
    mode: str
    size: int
    touched: int = 0
    reports: list[UpdateReport] = field(default_factory=list)

    def values(self, attr: str) -> list[float]:
        return [v for r in self.reports if (v := getattr(r, attr)) is not None]

    def added(self) -> list[float]:
        return [r.pause_guest - r.pause_qmp for r in self.reports
                if r.pause_guest is not None and r.pause_qmp is not None]

    def summary(self) -> dict[str, Any]:
        def med(xs: list[float]) -> float | None:
            return statistics.median(xs) if xs else None

        phases: dict[str, list[float]] = {}
        for r in self.reports:
            for k, v in r.phases.items():
                phases.setdefault(k, []).append(v)
        return {
            "mode": self.mode,
            "size": self.size,
            "touched": self.touched,
            "updates": len(self.reports),
            "pause_guest_median": med(self.values("pause_guest")),
            "pause_guest_max": max(self.values("pause_guest"), default=None),
            "pause_qmp_median": med(self.values("pause_qmp")),
            "pause_qmp_max": max(self.values("pause_qmp"), default=None),
            "total_median": med(self.values("total")),
            "controller_added_median": med(self.added()),
            "phases_median": {k: statistics.median(v) for k, v in phases.items()},
        }


def _passes_at_least(n: int) -> Callable[[ConsoleLog], bool]:
    return lambda log: len(log.passes) >= n


def _touched(serial: Path) -> int:
    text = serial.read_text(errors="replace")
    m = re.search(r"PATTERN bytes=(\d+)", text)
    return int(m.group(1)) if m else 0


async def run_point(mode: str, size: int, *, qemu: Path, guest: Path, updates: int,
                    run_root: Path) -> Point:
    _, live_mode = MODES[mode]
    passes = " pattern_passes=1" if live_mode == "migrate" else ""
    spec = spec_from_dict({
        "name": f"bench-{mode}-{size >> 20}m",
        "qemu": str(qemu),
        "memory": {"size": size, "hugetlb": mode.endswith("-2M")},
        "guest": {"kernel": str(guest), "cmdline": f"hb_ms={HB_MS}{passes}"},
    })
    point = Point(mode, size)
    vm = Machine(spec, run_root=run_root)
    await vm.launch()
    try:
        async with ConsoleFollower(vm.paths.serial) as con:
            for _ in range(updates):
                if passes:
                    # classic: one pass writes all RAM, then the guest idles
                    await con.wait_for(_passes_at_least(1), 900)
                else:
                    # a whole pass, begun after the last update: all of the
                    # RAM is mapped in the QEMU about to be replaced
                    await con.wait_for(_passes_at_least(len(con.log.passes) + 2), 900)
                point.touched = _touched(vm.paths.serial)
                # the next round waits for two passes anyway: no extra pass here
                report = await live_update(vm, qemu=qemu, mode=live_mode,
                                           heartbeat_interval=HB_MS / 1000, timeout=900,
                                           require_sealed=not mode.startswith("upstream"),
                                           verify_pass=False,
                                           way_back=not mode.endswith("-oneway"))
                point.reports.append(report)
            if point.reports and any(r.mismatches for r in point.reports):
                raise SystemExit(f"bench: {mode} {size >> 20} MiB: guest memory mismatches")
    finally:
        await vm.shutdown()
    return point


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.1f}"


def print_table(points: list[Point]) -> None:
    print(f"\n{'mode':<16} {'RAM':>6} {'touched':>7} {'n':>2} {'guest med':>9} {'guest max':>9} "
          f"{'QMP med':>8} {'QMP max':>8} {'total med':>9} {'ctl added':>9}  phases (median ms)")
    for p in points:
        s = p.summary()
        phases = " ".join(f"{k}={1000 * v:.1f}" for k, v in s["phases_median"].items())
        print(f"{p.mode:<16} {p.size >> 20:>5}M {100 * p.touched / p.size:>6.1f}% "
              f"{s['updates']:>2} {_ms(s['pause_guest_median']):>9} "
              f"{_ms(s['pause_guest_max']):>9} {_ms(s['pause_qmp_median']):>8} "
              f"{_ms(s['pause_qmp_max']):>8} {_ms(s['total_median']):>9} "
              f"{_ms(s['controller_added_median']):>9}  {phases}")


GOALS = {
    "pause(8G)/pause(1G) sealvm-exec": 1.2,
    "sealvm/upstream cpr-exec pause at 8G": 0.3,
    "sealvm cpr-exec/classic total at 4G": 0.05,
    "controller added (sealvm-exec, median s)": 0.005,
}


def ratios(points: list[Point]) -> dict[str, float | None]:
    def get(mode: str, size: int, key: str) -> float | None:
        for p in points:
            if p.mode == mode and p.size == size:
                v = p.summary()[key]
                return float(v) if v is not None else None
        return None

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    gib = 1 << 30
    out: dict[str, float | None] = {}
    for mode in MODES:
        out[f"pause(8G)/pause(1G) {mode}"] = div(get(mode, 8 * gib, "pause_guest_median"),
                                                 get(mode, gib, "pause_guest_median"))
    out["sealvm/upstream cpr-exec pause at 8G"] = div(
        get("sealvm-exec", 8 * gib, "pause_guest_median"),
        get("upstream-exec", 8 * gib, "pause_guest_median"))
    out["sealvm cpr-exec/classic total at 4G"] = div(
        get("sealvm-exec", 4 * gib, "total_median"), get("classic", 4 * gib, "total_median"))
    out["way back cost: sealvm-exec/sealvm-exec-oneway pause at 1G"] = div(
        get("sealvm-exec", gib, "pause_guest_median"),
        get("sealvm-exec-oneway", gib, "pause_guest_median"))
    added = [a for p in points if p.mode == "sealvm-exec" for a in p.added()]
    out["controller added (sealvm-exec, median s)"] = statistics.median(added) if added else None
    return out


def plot(points: list[Point], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib missing, no plot (pip install '.[bench]')", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in MODES:
        pts = sorted((p for p in points if p.mode == mode), key=lambda p: p.size)
        xs = [p.size / (1 << 30) for p in pts]
        ys = [1000 * (p.summary()["pause_guest_median"] or 0) for p in pts]
        if xs:
            ax.plot(xs, ys, marker="o", label=mode)
    ax.set_xlabel("guest RAM (GiB, >= 90 % touched)")
    ax.set_ylabel("guest-seen pause, median (ms)")
    ax.set_yscale("log")
    ax.set_title("Live update pause vs guest RAM (TCG; -2M: hugetlb, else 4 KiB pages)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


async def run_all(args: argparse.Namespace, skipped: list[str],
                  failed: list[str]) -> list[Point]:
    binaries = {"sealvm": Path(args.qemu), "upstream": Path(args.qemu_upstream)}
    sizes = [parse_size(s, "--sizes") for s in args.sizes.split(",")]
    huge_sizes = {parse_size(s, "--hugetlb-sizes") for s in args.hugetlb_sizes.split(",")}
    points: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="sealvm-bench-") as tmp:
        for size in sorted(set(sizes) | huge_sizes):
            for mode in args.modes.split(","):
                huge = mode.endswith("-2M")
                if size not in (huge_sizes if huge else sizes):
                    continue
                if huge and (why := reserve_hugepages(size)) is not None:
                    skipped.append(f"{mode} {size >> 20} MiB: {why}")
                    print(f"bench: skip {skipped[-1]}", flush=True)
                    continue
                which, _ = MODES[mode]
                start = time.monotonic()
                try:
                    p = await run_point(mode, size, qemu=binaries[which],
                                        guest=Path(args.guest), updates=args.updates,
                                        run_root=Path(tmp))
                except SealvmError as exc:
                    failed.append(f"{mode} {size >> 20} MiB: {type(exc).__name__}: {exc}")
                    print(f"bench: FAILED {failed[-1]}", flush=True)
                    continue
                points.append(p)
                s = p.summary()
                print(f"bench: {mode:<16} {size >> 20:>6} MiB: guest pause median "
                      f"{_ms(s['pause_guest_median'])} ms, QMP {_ms(s['pause_qmp_median'])} ms "
                      f"({time.monotonic() - start:.0f} s)", flush=True)
    return points


async def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    failed: list[str] = []
    hugepages_before = NR_HUGEPAGES.read_text() if NR_HUGEPAGES.exists() else None
    try:
        points = await run_all(args, skipped, failed)
    finally:
        if hugepages_before is not None:
            NR_HUGEPAGES.write_text(hugepages_before)
    print_table(points)
    r = ratios(points)
    data = {"points": [p.summary() for p in points], "ratios": r, "skipped": skipped,
            "failed": failed,
            "reports": [{"mode": p.mode, "size": p.size,
                         "reports": [x.to_dict() for x in p.reports]} for p in points],
            "host": {"nproc": os.cpu_count(), "time": time.time()}}
    (out / "bench.json").write_text(json.dumps(data, indent=1))
    plotted = plot(points, out / "bench.png")
    print(f"\nwrote {out / 'bench.json'}" + (f" and {out / 'bench.png'}" if plotted else ""))
    for line in skipped:
        print(f"skipped: {line}")
    for line in failed:
        print(f"FAILED: {line}")
    print("\nratios (goal in brackets):")
    for k, v in r.items():
        goal = GOALS.get(k)
        verdict = "" if goal is None or v is None else ("  ok" if v <= goal else "  MISSED")
        print(f"  {k:<44} {'-' if v is None else f'{v:.3f}':>8}"
              f"{'' if goal is None else f'  [<= {goal}]'}{verdict}")
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64M,1G,4G,8G")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--hugetlb-sizes", default="1G,4G",
                   help="sizes for the -2M (hugetlb) modes; the others use --sizes")
    p.add_argument("--updates", type=int, default=5)
    p.add_argument("--out", default="bench-results")
    p.add_argument("--qemu", default=os.environ.get("SEALVM_QEMU"))
    p.add_argument("--qemu-upstream", default=os.environ.get("SEALVM_QEMU_UPSTREAM"))
    p.add_argument("--guest", default=os.environ.get("SEALVM_GUEST"))
    args = p.parse_args()
    if not (args.qemu and args.qemu_upstream and args.guest):
        p.error("need --qemu, --qemu-upstream, --guest (`make bench` sets them)")
    for mode in args.modes.split(","):
        if mode not in MODES:
            p.error(f"unknown mode {mode}; known: {', '.join(MODES)}")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
