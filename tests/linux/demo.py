"""
`make demo`, part 2: an operator's VM -- the Linux test guest with a NIC
and a disk -- through live updates alternating cpr-exec and cpr-transfer,
with a TCP stream, a UDP sequence and the guest's disk writer running.

    cd tests && python -m linux.demo [--updates 5] [--run-dir DIR]

Per update: the pause QEMU saw and the guest saw, the TCP stall and the UDP
datagrams lost (sent every 5 ms from a network namespace sealvm creates
for the VM).  At the end: TCP verified byte for byte both ways, the disk
re-read by the guest and by the host, the memory pattern; ``demo: OK`` or
``demo: FAILED`` with what failed (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sealvm import Machine, live_update

from .guest import (
    DISK_SIZE,
    HB_MS,
    disk_failures,
    end_traffic,
    guest_failures,
    linux_spec,
    make_disk,
    running_with_traffic,
)


async def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="sealvm-demo2-"))
    try:
        return await _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _run(args: argparse.Namespace, work: Path) -> int:
    """The demo, its disk image and (without --run-dir) its run root in *work*."""
    image = make_disk(work / "disk.img")
    ns = f"sealvm-demo-{secrets.token_hex(3)}"
    spec = linux_spec(name="demo-linux", qemu=args.qemu, kernel=args.kernel,
                      initrd=args.initrd, ns=ns, image=image, memory=args.memory)
    vm = Machine(spec, run_root=args.run_dir or work / "run")
    failures: list[str] = []
    print(f"Linux guest ({args.memory}, virtio-net on tap {spec.net[0].tap} in namespace {ns}, "
          f"virtio-blk on a {DISK_SIZE >> 20} MiB raw image): {args.updates} live updates")
    async with running_with_traffic(vm, ns) as (con, traffic):
        print(f"{'#':>2} {'mode':<13} {'pause QMP':>9} {'guest':>7} {'TCP stall':>9} "
              f"{'UDP lost':>10}")
        stalls, lost = [], []
        for i in range(args.updates):
            mode = "cpr-exec" if i % 2 == 0 else "cpr-transfer"
            t0 = time.monotonic()
            rep = await live_update(vm, mode=mode, heartbeat_interval=HB_MS / 1000)
            w = traffic.window(t0, time.monotonic())
            stalls.append(w.tcp_stall)
            lost.append(w.udp_lost)
            print(f"{i + 1:>2} {mode:<13} {(rep.pause_qmp or 0) * 1000:7.0f}ms "
                  f"{(rep.pause_guest or 0) * 1000:5.0f}ms {w.tcp_stall * 1000:7.0f}ms "
                  f"{w.udp_lost:>4}/{w.udp_sent:<5}")
            if rep.mismatches or not rep.heartbeat_continuous:
                failures.append(f"update {i + 1}: guest memory or heartbeat")
        end = await end_traffic(con, traffic)
    print(f"TCP stall median {statistics.median(stalls) * 1000:.0f} ms, max "
          f"{max(stalls) * 1000:.0f} ms; UDP lost median {statistics.median(lost):.0f}, "
          f"max {max(lost)} per update")
    failures += guest_failures(end, con.log)
    failures += disk_failures(image)
    print("demo: OK" if not failures else "demo: FAILED\n  " + "\n  ".join(failures))
    return 0 if not failures else 1


def main() -> int:
    p = argparse.ArgumentParser(prog="linux.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=5)
    p.add_argument("--memory", default="256M")
    p.add_argument("--qemu", default=os.environ.get("SEALVM_QEMU"))
    p.add_argument("--kernel", default=os.environ.get("SEALVM_HOST_KERNEL"))
    p.add_argument("--initrd", default=os.environ.get("SEALVM_LINUX_GUEST"))
    p.add_argument("--run-dir", type=Path)
    args = p.parse_args()
    if not (args.qemu and args.kernel and args.initrd):
        p.error("set SEALVM_QEMU, SEALVM_HOST_KERNEL and SEALVM_LINUX_GUEST (`make demo` does)")
    if args.updates < 1:
        p.error("--updates must be at least 1")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
