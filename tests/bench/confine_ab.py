"""
What QEMU's confinement (`sealvm.confine`) costs an update's pause (a
benchmark, not a test): VMs side by side, updated round by round, modes
and variants interleaved, only the guest being updated running --
``unconfined`` (``security.confine = false, seccomp = false``: QEMU as root,
as before issue 18), ``seccomp`` (root, ``-sandbox on``), ``confined`` (the
default: its own uid, no capabilities, namespaces, seccomp) and, for
cpr-transfer only, ``no-spawn`` (confined, ``cpr_exec = false``: spawn
denied too).

    make bench-confine [CONFINE_AB_ARGS="--rounds 20 --size 256M"]

Prints p50 / p95 / max with n (missing values counted) for the QMP-seen
and the guest-seen pause and the launch time, and each variant's p50 and
p95 relative to ``unconfined``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import ab_args
from sealvm import Machine, live_update, spec_from_dict
from sealvm.bench.stats import Dist, summarize

VARIANTS: dict[str, dict[str, bool]] = {
    "unconfined": {"confine": False, "seccomp": False},
    "seccomp": {"confine": False, "seccomp": True},
    "confined": {},
    "no-spawn": {"cpr_exec": False},
}
MODES = ("cpr-exec", "cpr-transfer")


def runs(variant: str, mode: str) -> bool:
    return not (variant == "no-spawn" and mode == "cpr-exec")


def fmt(d: Dist) -> str:
    if d.p50 is None or d.p95 is None or d.max is None:
        return f"{'-':>8} {'-':>7} {'-':>7}"
    return f"{d.p50:8.1f} {d.p95:7.1f} {d.max:7.1f}"


async def run(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="sealvm-confine-ab-"))
    vms: dict[str, Machine] = {}
    launch: dict[str, float] = {}
    rows: dict[tuple[str, str], list[tuple[float | None, float | None]]] = {}
    try:
        for v, security in VARIANTS.items():
            spec = spec_from_dict({
                "name": v, "qemu": args.qemu, "memory": {"size": args.size},
                "guest": {"kernel": args.guest, "cmdline": "hb_ms=10"},
                "scripts": {"enabled": False}, "security": security})
            vms[v] = Machine(spec, run_root=root)
            t0 = time.monotonic()
            await vms[v].launch()
            launch[v] = (time.monotonic() - t0) * 1000
            await vms[v].pause()
        for r in range(args.rounds):
            for mode in MODES:
                order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
                for v in order:
                    if not runs(v, mode):
                        continue
                    # only the guest being updated runs: busy guests on two
                    # cores would measure the contention, not the confinement
                    await vms[v].resume()
                    rep = await live_update(vms[v], mode=mode, heartbeat_interval=0.01,
                                            verify_pass=False)
                    await vms[v].pause()
                    rows.setdefault((v, mode), []).append((
                        None if rep.pause_qmp is None else rep.pause_qmp * 1000,
                        None if rep.pause_guest is None else rep.pause_guest * 1000))
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    finally:
        for vm in vms.values():
            await vm.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    print(f"guest {args.size}, {args.rounds} rounds, modes and variants interleaved; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("launch (ms, n=1): " + ", ".join(f"{v} {t:.0f}" for v, t in launch.items()))
    print(f"{'mode':<13} {'variant':<11} {'n':>3} {'miss':>4}  {'QMP p50':>8} {'p95':>7} "
          f"{'max':>7}   {'guest p50':>9} {'p95':>7} {'max':>7}   {'x p50':>6} {'x p95':>6}")
    for mode in MODES:
        base = summarize(g for _, g in rows[("unconfined", mode)])
        for v in VARIANTS:
            if not runs(v, mode):
                continue
            q = summarize(x for x, _ in rows[(v, mode)])
            g = summarize(y for _, y in rows[(v, mode)])
            ratio = "   -      -"
            if g.p50 and g.p95 and base.p50 and base.p95:
                ratio = f"{g.p50 / base.p50:6.2f} {g.p95 / base.p95:6.2f}"
            print(f"{mode:<13} {v:<11} {g.n:>3} {g.missing:>4}  {fmt(q)}   "
                  f"{fmt(g).replace('        ', '         ', 1)}   {ratio}")
    print("(ms; x = guest-seen pause relative to unconfined)")
    return 0


def main() -> int:
    return asyncio.run(run(ab_args("confine_ab", __doc__, "bench-confine")))


if __name__ == "__main__":
    sys.exit(main())
