"""
What the QMP endpoint for scripts costs an update's pause (a benchmark, not
a test): three VMs side by side, updated round by round, modes and VMs
interleaved, only the guest being updated running -- no endpoint
(``[scripts] enabled = false``), the endpoint with no script, and the
endpoint with three scripts connected, each polling ``query-status`` every
50 ms (their commands are held in the pause).

    make bench-endpoint [ENDPOINT_AB_ARGS="--rounds 20 --size 256M"]

Prints p50 / p95 / max with n for the QMP-seen and the guest-seen pause,
and the ratio of each variant's p50 and p95 to the one without endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from qemu.qmp import QMPClient, QMPError

from bench import ab_args
from sealvm import Machine, live_update, spec_from_dict

VARIANTS = ("no-endpoint", "endpoint", "endpoint+3")
MODES = ("cpr-exec", "cpr-transfer")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def poll(path: Path, name: str, stop: asyncio.Event) -> int:
    qmp = QMPClient(name)
    await qmp.connect(str(path))
    n = 0
    try:
        while not stop.is_set():
            await qmp.execute("query-status")
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
    finally:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await qmp.disconnect()
    return n


async def run(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="sealvm-endpoint-ab-"))
    vms: dict[str, Machine] = {}
    stop = asyncio.Event()
    pollers: list[asyncio.Task[int]] = []
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        for v in VARIANTS:
            spec = spec_from_dict({
                "name": v.replace("+", "-"), "qemu": args.qemu,
                "memory": {"size": args.size},
                "guest": {"kernel": args.guest, "cmdline": "hb_ms=10"},
                "scripts": {"enabled": v != "no-endpoint"}})
            vms[v] = Machine(spec, run_root=root)
            await vms[v].launch()
            await vms[v].pause()
        path = vms["endpoint+3"].script_socket
        assert path is not None
        pollers = [asyncio.ensure_future(poll(path, f"s{i}", stop)) for i in range(3)]
        for r in range(args.rounds):
            for mode in MODES:
                order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
                for v in order:
                    # only the guest being updated runs: three busy guests on
                    # two cores would measure the contention, not the endpoint
                    await vms[v].resume()
                    rep = await live_update(vms[v], mode=mode, heartbeat_interval=0.01,
                                            verify_pass=False)
                    await vms[v].pause()
                    rows.setdefault((v, mode), []).append(
                        ((rep.pause_qmp or -1) * 1000, (rep.pause_guest or -1) * 1000))
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        stop.set()
        answered = sum(await asyncio.gather(*pollers))
    finally:
        stop.set()
        for p in pollers:
            p.cancel()
        for vm in vms.values():
            await vm.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    print(f"guest {args.size}, {args.rounds} rounds, modes and variants interleaved; "
          f"load average {os.getloadavg()[0]:.2f}; scripts' commands answered: {answered}")
    print(f"{'mode':<13} {'variant':<12} {'n':>3}  {'QMP p50':>8} {'p95':>7} {'max':>7}   "
          f"{'guest p50':>9} {'p95':>7} {'max':>7}   {'x p50':>6} {'x p95':>6}")
    for mode in MODES:
        base = [g for _, g in rows[("no-endpoint", mode)]]
        for v in VARIANTS:
            q = [x for x, _ in rows[(v, mode)]]
            g = [y for _, y in rows[(v, mode)]]
            print(f"{mode:<13} {v:<12} {len(q):>3}  {pct(q, .5):8.1f} {pct(q, .95):7.1f} "
                  f"{max(q):7.1f}   {pct(g, .5):9.1f} {pct(g, .95):7.1f} {max(g):7.1f}   "
                  f"{pct(g, .5) / pct(base, .5):6.2f} {pct(g, .95) / pct(base, .95):6.2f}")
    print("(ms; x = guest-seen pause relative to no-endpoint)")
    return 0


def main() -> int:
    return asyncio.run(run(ab_args("endpoint_ab", __doc__, "bench-endpoint")))


if __name__ == "__main__":
    sys.exit(main())
