"""
The main job (``make demo``): launch the test guest with 1 GiB of sealed
memfd RAM, live-update its QEMU five times with cpr-exec, print one row per
update, and exit non-zero if anything is off.

    python -m sealvm.demo [--updates N] [--memory 1G] [--qemu PATH] [--guest PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from .console import ConsoleFollower
from .errors import SealvmError
from .machine import Machine
from .spec import spec_from_dict
from .update import live_update

HB_MS = 10


async def run(args: argparse.Namespace) -> int:
    spec = spec_from_dict({
        "name": "sealvm-demo",
        "qemu": args.qemu,
        "memory": {"size": args.memory},
        "guest": {"kernel": args.guest, "cmdline": f"hb_ms={HB_MS}"},
    })
    ok = True
    with tempfile.TemporaryDirectory(prefix="sealvm-demo-") as tmp:
        vm = Machine(spec, run_root=Path(tmp))
        await vm.launch()
        try:
            print(f"QEMU {spec.qemu}\nguest {spec.guest.kernel}, {args.memory} sealed memfd RAM,"
                  f" heartbeat every {HB_MS} ms; pid {vm.pid}\n")
            async with ConsoleFollower(vm.paths.serial) as con:
                await con.wait_for(lambda log: len(log.passes) >= 1, 120)
                print(f"{'#':>2} {'pause QMP':>10} {'pause guest':>12} {'pid':>8} "
                      f"{'RAM inode':>10} {'unchanged':>9} {'seals':>16} {'mismatches':>10}")
                for i in range(1, args.updates + 1):
                    r = await live_update(vm, heartbeat_interval=HB_MS / 1000)
                    ram = [b for b in r.ram_after if b.name == "memory-backend-memfd"]
                    row_ok = (r.pid_after == r.pid_before and r.ram_inode_unchanged
                              and r.mismatches == 0 and bool(r.heartbeat_continuous))
                    ok &= row_ok
                    print(f"{i:>2} {1000 * (r.pause_qmp or -1):>8.1f}ms "
                          f"{1000 * (r.pause_guest or -1):>10.1f}ms {r.pid_after:>8} "
                          f"{ram[0].inode if ram else -1:>10} {str(r.ram_inode_unchanged):>9} "
                          f"{'|'.join(ram[0].seals) if ram else '-':>16} {r.mismatches:>10}"
                          f"{'' if row_ok else '   <-- FAILED'}")
                # every word written before the last update, verified after it
                gen = con.log.heartbeats[-1].int("gen")
                await con.wait_for(lambda log: any(p.gen > gen for p in log.passes), 120)
                log = con.log
                intact = log.reboots == 0 and log.counter_continuous() and not log.mismatches
                ok &= intact
                print(f"\nguest after {args.updates} updates: heartbeat {log.heartbeats[-1].seq} "
                      f"(continuous: {log.counter_continuous()}), full pattern passes verified: "
                      f"{len(log.passes)}, mismatching words: {log.mismatched_words}, "
                      f"reboots: {log.reboots}")
        finally:
            await vm.shutdown()
    print("demo:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=5)
    p.add_argument("--memory", default="1G")
    p.add_argument("--qemu", default=os.environ.get("SEALVM_QEMU"))
    p.add_argument("--guest", default=os.environ.get("SEALVM_GUEST"))
    args = p.parse_args()
    if not args.qemu or not args.guest:
        p.error("need --qemu and --guest (or $SEALVM_QEMU, $SEALVM_GUEST: `make demo` sets them)")
    try:
        return asyncio.run(run(args))
    except SealvmError as exc:
        print(f"demo: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
