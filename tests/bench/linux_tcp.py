"""
What a live update costs an operator's VM's network (a benchmark, not a
test): the Linux test guest with a virtio-net NIC on a tap sealvm creates in
a network namespace and a virtio-blk disk, a TCP stream, a TCP echo and a
UDP sequence (one datagram every 5 ms) running to it from the namespace,
updated ``--rounds`` times per mode, modes interleaved round by round (the
order rotating), 0.5 s between updates.  Mode ``none`` updates nothing: the
same figures over 1 s of the running guest, the floor the others stand on
(the guest's heartbeat on a TCG serial port, TCP's own pace).

    make bench-linux [LINUX_BENCH_ARGS="--rounds 20 --modes cpr-exec,cpr-transfer,migrate"]

Prints per mode, p50 / p95 / max with n (missing values counted): QEMU's
STOP->RESUME, the pause the guest saw, the longest gap in TCP arrivals (both
connections) and what of it lay beyond QEMU's pause, the datagrams lost;
then each mode's p50 and p95 relative to ``migrate`` (classic migration to a
new QEMU).  At the end the stream and the echo are verified byte for byte,
the disk re-read by the guest and by the host, the memory pattern checked:
``linux_tcp: OK`` or ``linux_tcp: FAILED`` (exit 1) with what failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from linux.guest import (
    HB_MS,
    disk_failures,
    end_traffic,
    guest_failures,
    linux_spec,
    make_disk,
    running_with_traffic,
)
from linux.traffic import Traffic
from sealvm import Machine, live_update
from sealvm.bench.report import cell
from sealvm.bench.stats import Dist, summarize
from sealvm.console import ConsoleLog
from sealvm.errors import SealvmError
from sealvm.preflight import MODES

BASELINE = "migrate"
GAP = 0.5  # s between updates: UDP answers arrive, TCP settles
NONE = "none"  # no update: the same window over the running guest
NONE_WINDOW = 1.0  # s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.linux_tcp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20, help="updates per mode (default 20)")
    p.add_argument("--modes", default=",".join((*MODES, NONE)),
                   help="comma-separated (default %(default)s)")
    p.add_argument("--memory", default="256M", help="guest RAM (default %(default)s)")
    p.add_argument("--qemu", default=os.environ.get("SEALVM_QEMU"))
    p.add_argument("--kernel", default=os.environ.get("SEALVM_HOST_KERNEL"))
    p.add_argument("--initrd", default=os.environ.get("SEALVM_LINUX_GUEST"))
    args = p.parse_args(argv)
    if not (args.qemu and args.kernel and args.initrd):
        p.error("set SEALVM_QEMU, SEALVM_HOST_KERNEL and SEALVM_LINUX_GUEST (or --qemu/"
                "--kernel/--initrd); `make bench-linux` does")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    args.modes = [m.strip() for m in args.modes.split(",")]
    bad = [m for m in args.modes if m not in (*MODES, NONE)] or (
        [] if len(set(args.modes)) == len(args.modes) else ["a mode given twice"])
    if bad:
        p.error(f"--modes: {', '.join(bad)} (have {', '.join((*MODES, NONE))})")
    return args


def _count(d: Dist) -> str:
    if d.p50 is None:
        return "n/a"
    text = f"{d.p50:.0f}/{d.p95:.0f}/{d.max:.0f}"
    return text if d.missing == 0 else f"{text} [{d.n_ok}/{d.n}]"


def report(rows: list[dict[str, Any]], modes: list[str]) -> None:
    print(f"{'mode':<13} {'n':>3} {'QMP STOP->RESUME':>20} {'guest-seen':>20} "
          f"{'TCP stall':>20} {'TCP beyond QMP':>20} {'UDP lost':>12}")
    dists: dict[str, dict[str, Dist]] = {}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        d = {k: summarize(r.get(k) for r in mine)
             for k in ("pause_qmp", "pause_guest", "tcp_stall", "beyond")}
        dists[mode] = d
        lost = summarize(r.get("udp_lost") for r in mine)
        print(f"{mode:<13} {len(mine):>3} {cell(d['pause_qmp']):>20} "
              f"{cell(d['pause_guest']):>20} {cell(d['tcp_stall']):>20} "
              f"{cell(d['beyond']):>20} {_count(lost):>12}")
    base = dists.get(BASELINE)
    if base is None:
        return
    for mode in modes:
        if mode == BASELINE:
            continue
        parts = []
        for key in ("pause_guest", "tcp_stall"):
            a, b = dists[mode][key], base[key]
            if a.p50 and b.p50 and a.p95 and b.p95:
                parts.append(f"{key} p50 {a.p50 / b.p50:.3f}, p95 {a.p95 / b.p95:.3f}")
        print(f"{mode} / {BASELINE}: " + ("; ".join(parts) or "n/a"))


async def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="sealvm-bench-linux-") as work:
        return await _run(args, Path(work))


async def _run(args: argparse.Namespace, work: Path) -> int:
    image = make_disk(work / "disk.img")
    ns = f"sealvm-bench-{secrets.token_hex(3)}"
    vm = Machine(linux_spec(name="bench-linux", qemu=args.qemu, kernel=args.kernel,
                            initrd=args.initrd, ns=ns, image=image, memory=args.memory),
                 run_root=work / "run")
    failures: list[str] = []
    rows: list[dict[str, Any]] = []
    print(f"Linux guest ({args.memory}, virtio-net + virtio-blk), TCP stream + echo, UDP "
          f"every 5 ms; {args.rounds} updates per mode, interleaved; ms p50 / p95 / max",
          flush=True)
    async with running_with_traffic(vm, ns) as (con, traffic):
        for r in range(args.rounds):
            k = r % len(args.modes)
            for mode in args.modes[k:] + args.modes[:k]:
                rows.append(await one_update(vm, con.log, traffic, mode, failures))
                print(f"{len(rows):>3} {mode:<13} " + " ".join(
                    f"{key} {rows[-1][key] * 1000:.0f}" if isinstance(rows[-1][key], float)
                    else f"{key} -" for key in ("pause_qmp", "pause_guest", "tcp_stall")),
                    f"udp_lost {rows[-1]['udp_lost']}", flush=True)
        end = await end_traffic(con, traffic)
    report(rows, args.modes)
    failures += guest_failures(end, con.log)
    failures += disk_failures(image)
    print("linux_tcp: OK" if not failures else "linux_tcp: FAILED\n  " + "\n  ".join(failures))
    return 0 if not failures else 1


async def one_update(vm: Machine, log: ConsoleLog, traffic: Traffic, mode: str,
                     failures: list[str]) -> dict[str, Any]:
    """One update in *mode* (or none); its figures, None where it gave none."""
    row: dict[str, Any] = {"mode": mode, "pause_qmp": None, "pause_guest": None,
                           "tcp_stall": None, "beyond": None, "udp_lost": None}
    t0 = time.monotonic()
    if mode == NONE:
        first = max(len(log.heartbeats) - 1, 0)
        await asyncio.sleep(NONE_WINDOW)
        t1 = time.monotonic()
        row["pause_guest"] = max(0.0, log.largest_gap(first) - HB_MS / 1000)
    else:
        try:
            rep = await live_update(vm, mode=mode, heartbeat_interval=HB_MS / 1000)
        except SealvmError as exc:
            failures.append(f"{mode}: {type(exc).__name__}: {exc}")
            row["error"] = str(exc)
            return row
        t1 = time.monotonic()
        row.update(pause_qmp=rep.pause_qmp, pause_guest=rep.pause_guest)
        if rep.mismatches or not rep.heartbeat_continuous:
            failures.append(f"{mode}: guest memory or heartbeat")
    await asyncio.sleep(GAP)
    w = traffic.window(t0, t1)
    row.update(tcp_stall=w.tcp_stall, udp_lost=w.udp_lost,
               beyond=None if row["pause_qmp"] is None else w.tcp_stall - row["pause_qmp"])
    return row


def main() -> int:
    return asyncio.run(run(parse_args()))


if __name__ == "__main__":
    sys.exit(main())
