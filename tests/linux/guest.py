"""
The operator's VM the Linux tests, the demo and the TCP bench run: the Linux
test guest (images/linux-guest) with a virtio-net NIC on a tap in a network
namespace and a virtio-blk raw disk, its workload's settings on the kernel
command line (heartbeat, memory pattern, disk writer).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from sealvm import Machine, VmSpec, spec_from_dict
from sealvm.console import ConsoleFollower, ConsoleLog

from .traffic import GUEST_IP, HOST_IP, Traffic, check_disk_image

HB_MS = 20
DISK_SIZE = 4 << 20
CMDLINE = (f"console=ttyS0 loglevel=1 panic=-1 sealvm.ip={GUEST_IP}/24 sealvm.hb_ms={HB_MS} "
           "sealvm.pattern=25% sealvm.disk_ms=10 sealvm.dpass_ms=1500")


def make_disk(path: Path) -> Path:
    """An empty raw image of DISK_SIZE for the guest's disk writer."""
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
    return path


def linux_spec(*, name: str, qemu: Path | str, kernel: Path | str, initrd: Path | str,
               ns: str, image: Path, memory: str = "256M",
               nic: dict[str, object] | None = None) -> VmSpec:
    """The VM: NIC on a tap in namespace *ns* (the host end HOST_IP),
    *image* as its disk (cache=none); *nic*: more of the NIC's spec."""
    return spec_from_dict({
        "name": name, "qemu": str(qemu), "memory": {"size": memory},
        "guest": {"kernel": str(kernel), "initrd": str(initrd), "cmdline": CMDLINE},
        "net": [{"netns": ns, "address": f"{HOST_IP}/24", **(nic or {})}],
        "disk": [{"path": str(image), "cache": "none"}]})


def hb(log: ConsoleLog, key: str) -> int:
    """*key* of the guest's last heartbeat (-1 before the first)."""
    return log.heartbeats[-1].int(key) if log.heartbeats else -1


@asynccontextmanager
async def running_with_traffic(vm: Machine, ns: str
                               ) -> AsyncIterator[tuple[ConsoleFollower, Traffic]]:
    """Launch *vm* (its NIC in namespace *ns*); once the guest's disk writer
    has done a pass, start `Traffic` and wait for its first TCP and UDP
    replies.  On exit the traffic stops and the VM shuts down."""
    await vm.launch()
    try:
        async with ConsoleFollower(vm.paths.serial) as con:
            await con.wait_for(lambda log: hb(log, "dpass") >= 1, 120)
            traffic = Traffic(ns)
            await asyncio.to_thread(traffic.start)
            try:
                await con.wait_for(lambda log: hb(log, "tcp_in") > 0 and hb(log, "udp") > 0, 60)
                yield con, traffic
            finally:
                await asyncio.to_thread(traffic.close)
    finally:
        await vm.shutdown()


@dataclass(frozen=True)
class TrafficEnd:
    """What the traffic showed once the updates were over."""

    errors: list[str]
    echoed: int
    streamed: int


async def end_traffic(con: ConsoleFollower, traffic: Traffic) -> TrafficEnd:
    """After the last update: a complete disk pass of the guest's, 1 s
    more of traffic, then what TCP verified (call before closing it)."""
    passes = hb(con.log, "dpass")
    await con.wait_for(lambda log: hb(log, "dpass") >= passes + 1, 60)
    await asyncio.sleep(1.0)
    return TrafficEnd(traffic.tcp_errors(), traffic.echo_verified(),
                      traffic.stream.received if traffic.stream else 0)


def guest_failures(end: TrafficEnd, log: ConsoleLog) -> list[str]:
    """Print what TCP verified; the failures of TCP and of the guest's own
    checks (wrong byte received, disk block, memory, heartbeat)."""
    print(f"TCP: {end.echoed} bytes echoed and {end.streamed} streamed, verified byte for "
          f"byte, {'no reset' if not end.errors else end.errors}")
    failures = [f"TCP: {e}" for e in end.errors]
    if hb(log, "tcp_bad"):
        failures.append("TCP: the guest received a wrong byte")
    if hb(log, "dbad") or hb(log, "mism") or log.mismatches or not log.counter_continuous():
        failures.append("guest: disk block, memory mismatch or heartbeat reset")
    return failures


def disk_failures(image: Path) -> list[str]:
    """Re-read the disk image from the host (the VM gone); print and
    return what is wrong with it."""
    disk = check_disk_image(image)
    print(f"disk: {disk.blocks} blocks re-read by the host, {len(disk.bad)} bad")
    return [f"disk: {len(disk.bad)} bad blocks"] if disk.bad else []
