"""
An operator's VM: the Linux test guest with a NIC (tap, virtio-net) and a
disk (raw image, virtio-blk), through live updates alternating cpr-exec and
cpr-transfer, with traffic from a network namespace the test creates.

Checked after each update: the QEMU of the VM is the only process holding
the image and the tap (no address-space holder of cpr-exec, no old QEMU, no
keeper left with them).  At the end: TCP streams verified byte for byte
both ways without a reset, every UDP datagram lost counted per update, the
disk verified by the guest (a full re-read after the last update) and by
the host, the memory pattern without a mismatch.  The negative controls
show each instrument failing when it should.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from pyroute2 import NetNS

from sealvm import Machine, confine, live_update
from sealvm.console import ConsoleFollower, ConsoleLog
from sealvm.errors import HostError, PreflightError
from sealvm.net import in_netns, tap_exists
from sealvm.preflight import run_preflight
from sealvm.spec import VmSpec

from . import guest
from .conftest import ROWS
from .guest import DISK_SIZE, HB_MS, make_disk
from .traffic import (
    Traffic,
    check_disk_image,
    flip_latest_block,
    image_holders,
    tap_holders,
    write_perm_locked,
)

UPDATES = 20

pytestmark = pytest.mark.qemu


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_disk(tmp_path / "disk.img")


@pytest.fixture
def linux_spec(qemu_binary: Path, linux_kernel: Path, linux_initrd: Path,
               image: Path) -> Callable[..., VmSpec]:
    def make(ns: str, *, name: str = "lvm", **net: object) -> VmSpec:
        return guest.linux_spec(name=name, qemu=qemu_binary, kernel=linux_kernel,
                                initrd=linux_initrd, ns=ns, image=image, nic=net)
    return make


@pytest.fixture
async def linux_vm(linux_spec: Callable[..., VmSpec], test_netns: str,
                   run_root: Path) -> AsyncIterator[Machine]:
    vm = Machine(linux_spec(test_netns), run_root=run_root)
    await vm.launch()
    tap = vm.spec.net[0].tap
    try:
        yield vm
    finally:
        await vm.shutdown()
        # sealvm removed its tap; the namespace is the test's, it stays
        assert not tap_exists(tap, test_netns), f"tap {tap} left behind"
        assert not tap_holders(tap)
        # the image was the VM's user's while it ran: root's again
        assert all(os.stat(d.path).st_uid == 0 for d in vm.spec.disk)


def hb(log: ConsoleLog, key: str) -> int:
    return log.heartbeats[-1].int(key) if log.heartbeats else -1


async def wait_hb(con: ConsoleFollower, pred: Callable[[ConsoleLog], bool],
                  timeout: float = 60.0) -> None:
    await con.wait_for(lambda log: bool(log.heartbeats) and pred(log), timeout)


async def start_traffic(vm: Machine, con: ConsoleFollower) -> Traffic:
    # the disk is formatted and verified once before anything else
    await wait_hb(con, lambda log: hb(log, "dpass") >= 1, timeout=120)
    traffic = Traffic(vm.spec.net[0].netns or "")
    await asyncio.to_thread(traffic.start)
    await wait_hb(con, lambda log: hb(log, "tcp_in") > 0 and hb(log, "udp") > 0)
    return traffic


def only_qemu_holds(vm: Machine, image: Path) -> None:
    assert vm.pid is not None
    assert set(image_holders(image)) == {vm.pid}, image_holders(image)
    # ... and it took the image's write permission lock (so it is its own)
    assert write_perm_locked(image)
    assert set(tap_holders(vm.spec.net[0].tap)) == {vm.pid}, tap_holders(vm.spec.net[0].tap)


def assert_confined(vm: Machine) -> None:
    """QEMU runs confined (the default, `sealvm.confine`): the VM's uid, no
    capability, one seccomp filter, its own namespaces; the image is the
    VM's user's while it runs."""
    assert vm.pid is not None and vm.confinement is not None
    p = confine.inspect(vm.pid)
    assert p.uid == vm.confinement.uid != 0 and p.cap_eff == p.cap_bnd == 0, p
    assert (p.seccomp, p.filters, p.no_new_privs) == (2, 1, True), p
    assert {"mnt", "net"} <= set(p.own_namespaces), p
    assert all(os.stat(d.path).st_uid == p.uid for d in vm.spec.disk)


async def test_twenty_alternating_updates_keep_net_disk_and_memory(
        linux_vm: Machine, image: Path) -> None:
    vm = linux_vm
    async with ConsoleFollower(vm.paths.serial) as con:
        traffic = await start_traffic(vm, con)
        try:
            await con.wait_full_pass(60)
            only_qemu_holds(vm, image)
            assert_confined(vm)
            windows = []
            for i in range(UPDATES):
                mode = "cpr-exec" if i % 2 == 0 else "cpr-transfer"
                writes = hb(con.log, "dw")
                t0 = time.monotonic()
                report = await live_update(vm, mode=mode, heartbeat_interval=HB_MS / 1000)
                windows.append((i + 1, mode, report, t0, time.monotonic()))
                assert report.heartbeat_continuous and report.mismatches == 0, f"update {i}"
                # the image and the tap: only the new QEMU has them (the cpr-exec
                # holder and the old QEMU of cpr-transfer are gone with theirs)
                only_qemu_holds(vm, image)
                assert_confined(vm)
                # the disk writer goes on
                await wait_hb(con, lambda log: hb(log, "dw") > writes + 5)  # noqa: B023
                assert not traffic.tcp_errors(), (i, traffic.tcp_errors())
            # a full re-read of the disk that started after the last update
            passes = hb(con.log, "dpass")
            await wait_hb(con, lambda log: hb(log, "dpass") >= passes + 2)
            await con.wait_full_pass(60)
            await asyncio.sleep(2.0)  # the last datagrams' answers
            echoed, streamed = traffic.echo_verified(), traffic.stream.received \
                if traffic.stream else 0
            errors = traffic.tcp_errors()
        finally:
            await asyncio.to_thread(traffic.close)
        log = con.log
    for n, mode, report, t0, t1 in windows:
        w = traffic.window(t0, t1)
        ROWS.append({"n": n, "mode": mode, "pause_qmp": report.pause_qmp,
                     "pause_guest": report.pause_guest, "udp_lost": w.udp_lost,
                     "udp_sent": w.udp_sent, "tcp_stall": w.tcp_stall})
        assert w.tcp_stall < 30, (n, w)  # a sanity bound, not a timing claim
    assert not errors, errors
    assert echoed > 100_000 and streamed > 100_000, (echoed, streamed)
    assert hb(log, "tcp_bad") == 0, "the guest saw a wrong byte"
    assert hb(log, "dbad") == 0, [ln for ln in log.heartbeats[-1:]]
    assert hb(log, "mism") == 0 and not log.mismatches
    assert log.counter_continuous() and log.reboots == 0
    assert len(traffic.udp_answered) > 0.9 * len(traffic.udp_sent)
    await vm.shutdown()
    assert not write_perm_locked(image)  # the lock check can say no
    disk = check_disk_image(image)
    assert disk.blocks == DISK_SIZE // 4096 and not disk.bad, disk.bad[:10]


async def test_negative_controls_each_instrument_fails(linux_vm: Machine, image: Path) -> None:
    """A dropped packet, a wrong TCP byte, a flipped disk block and an extra
    holder of the image are each reported."""
    vm = linux_vm
    ns = vm.spec.net[0].netns
    assert ns is not None
    async with ConsoleFollower(vm.paths.serial) as con:
        traffic = await start_traffic(vm, con)
        try:
            # 1. packets dropped: the tap is down for a second
            await asyncio.sleep(1.0)
            tap = vm.spec.net[0].tap

            def set_tap(state: str) -> None:
                with NetNS(ns, flags=0) as rtnl:
                    rtnl.link("set", index=rtnl.link_lookup(ifname=tap)[0], state=state)

            t0 = time.monotonic()
            await asyncio.to_thread(in_netns, None, lambda: set_tap("down"))
            await asyncio.sleep(1.0)
            await asyncio.to_thread(in_netns, None, lambda: set_tap("up"))
            t1 = time.monotonic()
            await asyncio.sleep(3.0)
            w = traffic.window(t0, t1)
            assert w.udp_lost > 0, w
            assert w.tcp_stall >= 0.5, w
            ROWS.append({"n": 0, "mode": "control:tap-down-1s", "pause_qmp": None,
                         "pause_guest": None, "udp_lost": w.udp_lost, "udp_sent": w.udp_sent,
                         "tcp_stall": w.tcp_stall})
            # 2. a wrong byte on TCP: the guest counts it, the echo check sees it
            at = traffic.sent_echo + 2048
            traffic.corrupt_at = at
            await wait_hb(con, lambda log: hb(log, "tcp_bad") >= 1, timeout=30)
            for _ in range(100):
                if traffic.tcp_errors():
                    break
                await asyncio.sleep(0.1)
            assert any(f"byte {at} differs" in e for e in traffic.tcp_errors()), \
                traffic.tcp_errors()
            # 3. a disk block flipped behind the guest's back
            lba = flip_latest_block(image)
            await wait_hb(con, lambda log: hb(log, "dbad") >= 1, timeout=30)
            assert any(f"{lba}: checksum" == b for b in check_disk_image(image).bad)
            # 4. the holder scan sees another process's fd on the image
            with open(image, "rb"):
                assert len(image_holders(image)) == 2
            with pytest.raises(AssertionError):
                with open(image, "rb"):
                    only_qemu_holds(vm, image)
        finally:
            await asyncio.to_thread(traffic.close)


async def test_down_removes_the_namespace_sealvm_created(
        linux_spec: Callable[..., VmSpec], run_root: Path, test_netns: str) -> None:
    """A namespace that did not exist is created with the tap and removed
    with it; the test's own namespace is only used to pick a free name."""
    own = f"{test_netns}-vm"
    vm = Machine(linux_spec(own), run_root=run_root)
    await vm.launch()
    try:
        tap = vm.spec.net[0].tap
        assert tap_exists(tap, own)
        assert vm.state is not None and vm.state.net[0]["created_netns"] is True
        # QEMU killed behind sealvm's back: the next `up` removes the dead
        # VM's tap and namespace before creating its own
        assert vm.process is not None
        vm.process.send_signal(signal.SIGKILL)
        assert await vm.process.wait_exit(10)
        await vm.detach()
        vm = Machine(linux_spec(own), run_root=run_root)
        await vm.launch()
        assert tap_exists(tap, own)
    finally:
        await vm.shutdown()
    assert not tap_exists(tap, own)
    from pyroute2 import netns
    assert own not in netns.listnetns()


async def test_vhost_and_a_swapped_image_are_refused(
        linux_spec: Callable[..., VmSpec], run_root: Path, test_netns: str,
        image: Path) -> None:
    # this host has no /dev/vhost-net: launch refuses, nothing is left behind
    spec = linux_spec(test_netns, vhost=True)
    vm = Machine(spec, run_root=run_root)
    if Path("/dev/vhost-net").exists():
        await vm.launch()
        try:
            with pytest.raises(PreflightError, match="vhost=on: the vhost-net worker"):
                await live_update(vm, mode="cpr-transfer")
        finally:
            await vm.shutdown()
    else:
        with pytest.raises(HostError, match="/dev/vhost-net"):
            await vm.launch()
    assert not tap_exists(spec.net[0].tap, test_netns)
    # an image replaced under its path after launch: refused, naming it
    vm = Machine(linux_spec(test_netns), run_root=run_root)
    await vm.launch()
    try:
        image.rename(image.with_suffix(".old"))
        make_disk(image)
        for mode in ("cpr-exec", "cpr-transfer"):
            with pytest.raises(PreflightError, match="now names another file"):
                await live_update(vm, mode=mode)
        image.unlink()
        image.with_suffix(".old").rename(image)
        checks = await run_preflight(vm, mode="cpr-transfer", qemu=Path(vm.argv[0]))
        assert any(c.name == "net-net0" and c.ok for c in checks)
        assert any(c.name == "disk-disk0" and c.ok for c in checks)
        assert await vm.status() == "running"
    finally:
        await vm.shutdown()
