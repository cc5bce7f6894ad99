"""
The soak: many consecutive live updates of one VM, alternating cpr-exec and
cpr-transfer, with the test guest writing and verifying its pattern over all
its RAM the whole time.  Afterwards: zero mismatches, a continuous heartbeat,
a complete verified pass, and the QEMU's open fds and anonymous RSS flat from
the first update to the last (a leak per update would show).

    python -m soak.soak --updates 1000 --size 512M     (make soak)

tests/soak/test_soak.py runs 50 updates in `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sealvm import Machine, live_update, spec_from_dict
from sealvm.console import ConsoleFollower

HB = 0.010
MODES = ("cpr-exec", "cpr-transfer")


@dataclass
class Sample:
    update: int
    mode: str
    pid: int
    pause_qmp: float | None
    pause_guest: float | None
    #: QEMU's open fds (link targets), settled (`settled_fds`)
    fd_targets: list[str]
    rss_anon_kib: int

    @property
    def fds(self) -> int:
        return len(self.fd_targets)


@dataclass
class SoakResult:
    samples: list[Sample] = field(default_factory=list)
    mismatches: int = 0
    heartbeat_continuous: bool = False
    passes_after: int = 0
    wall: float = 0.0

    def pauses(self, what: str) -> list[float]:
        return [v for s in self.samples if (v := getattr(s, what)) is not None]

    def flat(self, mode: str) -> tuple[Sample, Sample]:
        """The first and last sample of *mode* (a fresh QEMU's after a
        transfer, the same process's after an exec)."""
        same = [s for s in self.samples if s.mode == mode]
        return same[0], same[-1]


def fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # closed meanwhile
            continue
    return sorted(out)


async def settled_fds(pid: int, *, tries: int = 20) -> list[str]:
    """*pid*'s open fds once two reads 0.1 s apart agree: right after an
    update QEMU may still hold a transient one (CI saw 23 fds after the first
    cpr-exec, 22 after the last)."""
    last = fd_targets(pid)
    for _ in range(tries):
        await asyncio.sleep(0.1)
        now = fd_targets(pid)
        if now == last:
            break
        last = now
    return last


def rss_anon_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise ValueError(f"no RssAnon for {pid}")


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def soak(*, qemu: Path, guest: Path, run_root: Path, updates: int, size: str,
               progress: bool = False) -> SoakResult:
    spec = spec_from_dict({"name": "soak", "qemu": str(qemu),
                           "memory": {"size": size, "backend": "memfd"},
                           "guest": {"kernel": str(guest), "cmdline": f"hb_ms={int(HB * 1000)}"}})
    vm = Machine(spec, run_root=run_root)
    result = SoakResult()
    start = time.monotonic()
    await vm.launch()
    try:
        async with ConsoleFollower(vm.paths.serial) as con:
            await con.wait_full_pass(120)
            for i in range(updates):
                mode = MODES[i % 2]
                # the guest's own counter and the final pass judge the memory;
                # no pass per update (the soak is about many updates)
                report = await live_update(vm, mode=mode, heartbeat_interval=HB,
                                           verify_pass=False)
                assert vm.pid is not None
                s = Sample(i + 1, mode, vm.pid, report.pause_qmp, report.pause_guest,
                           await settled_fds(vm.pid), rss_anon_kib(vm.pid))
                result.samples.append(s)
                if progress:
                    print(f"{s.update:5d} {mode:<13} pid {s.pid:<8} "
                          f"QMP {1000 * (s.pause_qmp or -1):6.1f} ms  "
                          f"guest {1000 * (s.pause_guest or -1):6.1f} ms  "
                          f"fds {s.fds}  RssAnon {s.rss_anon_kib} KiB", flush=True)
            result.passes_after = (await con.wait_full_pass(120)).gen
            counter = con.log.mismatch_counter()  # the guest's own count since boot
            result.mismatches = -1 if counter is None else counter + con.log.mismatched_words
            result.heartbeat_continuous = con.log.counter_continuous() and con.log.reboots == 0
    finally:
        await vm.shutdown()
    result.wall = time.monotonic() - start
    return result


def summary(result: SoakResult) -> list[str]:
    lines = []
    n = len(result.samples)
    for what in ("pause_qmp", "pause_guest"):
        v = [1000 * x for x in result.pauses(what)]
        if v:
            lines.append(f"{what:<12} n={len(v):<5} p50 {statistics.median(v):7.1f} ms  "
                         f"p95 {percentile(v, 95):7.1f} ms  max {max(v):7.1f} ms"
                         + ("" if len(v) == n else f"  ({n - len(v)} missing)"))
    for mode in MODES:
        if any(s.mode == mode for s in result.samples):
            a, b = result.flat(mode)
            grew = 100 * (b.rss_anon_kib / a.rss_anon_kib - 1)
            lines.append(f"{mode:<12} fds {a.fds} -> {b.fds}, RssAnon {a.rss_anon_kib} -> "
                         f"{b.rss_anon_kib} KiB ({grew:+.2f} %) from update {a.update} to "
                         f"{b.update}")
    lines.append(f"updates {n}, mismatches {result.mismatches}, heartbeat continuous "
                 f"{result.heartbeat_continuous}, wall {result.wall:.0f} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=1000)
    p.add_argument("--size", default="512M", help="guest RAM")
    args = p.parse_args(argv)
    qemu, guest = os.environ.get("SEALVM_QEMU"), os.environ.get("SEALVM_GUEST")
    if not qemu or not guest:
        p.error("SEALVM_QEMU and SEALVM_GUEST must name the built QEMU and test guest "
                "(make soak sets them)")
    if args.updates < 2:
        p.error("--updates must be at least 2 (one of each mode)")
    with tempfile.TemporaryDirectory(prefix="sealvm-soak-") as tmp:
        root = Path(tmp) / "run"
        root.mkdir(mode=0o700)
        result = asyncio.run(soak(qemu=Path(qemu), guest=Path(guest), run_root=root,
                                  updates=args.updates, size=args.size, progress=True))
    for line in summary(result):
        print(line)
    ok = result.mismatches == 0 and result.heartbeat_continuous
    print("soak:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
