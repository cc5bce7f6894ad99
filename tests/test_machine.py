"""Machine lifecycle on the real QEMU: launch, attach, events, teardown."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import HB_MS
from sealvm import LaunchError, Machine, SpecError, StateError, live_update
from sealvm.console import ConsoleFollower
from sealvm.spec import VmSpec


async def test_launch_failure_reports_qemu_output(
    make_spec: Callable[..., VmSpec], run_root: Path
) -> None:
    vm = Machine(make_spec(extra_args=["-device", "no-such-device"]), run_root=run_root)
    with pytest.raises(LaunchError) as ei:
        await vm.launch()
    assert ei.value.exitcode == 1
    assert "no-such-device" in ei.value.output
    await vm.shutdown()  # safe after a failed launch
    await vm.shutdown()


async def test_missing_kernel_is_a_spec_error(
    make_spec: Callable[..., VmSpec], run_root: Path, tmp_path: Path
) -> None:
    spec = make_spec(guest={"kernel": str(tmp_path / "none.bin")})
    with pytest.raises(SpecError, match="guest.kernel"):
        await Machine(spec, run_root=run_root).launch()


async def test_paths_with_commas(
    make_spec: Callable[..., VmSpec], run_root: Path, guest_image: Path
) -> None:
    """Kernel, run directory (QMP socket, serial log, CPR state) under a
    directory whose name has commas: QEMU boots the guest, the serial log
    is where sealvm reads it, and a cpr-exec (the same argv again, the
    state file by URI) keeps it running."""
    odd = run_root / "a,b,,c"
    odd.mkdir()
    kernel = odd / "guest,1.bin"
    shutil.copy(guest_image, kernel)
    spec = make_spec(guest={"kernel": str(kernel), "cmdline": f"hb_ms={HB_MS}"})
    vm = Machine(spec, run_root=odd)
    await vm.launch()
    try:
        assert str(kernel) in vm.argv and "," in str(vm.paths.serial)
        async with ConsoleFollower(vm.paths.serial) as con:
            await con.wait_heartbeats(2, 30)
            report = await live_update(vm, heartbeat_interval=HB_MS / 1000)
            assert report.pid_after == report.pid_before
            await con.wait_heartbeats(2, 30)
            assert con.log.counter_continuous() and con.log.reboots == 0
    finally:
        await vm.shutdown()


async def test_second_launch_of_same_name_is_refused(
    vm: Machine, make_spec: Callable[..., VmSpec], run_root: Path
) -> None:
    with pytest.raises(StateError, match="already running"):
        await Machine(make_spec(), run_root=run_root).launch()
    assert await vm.status() == "running"


async def test_attach_from_another_controller(vm: Machine, run_root: Path) -> None:
    pid = vm.pid
    await vm.detach()  # the monitor takes one client at a time
    other = await Machine.attach(vm.name, run_root=run_root)
    try:
        assert other.pid == pid and await other.status() == "running"
        assert other.spec == vm.spec
    finally:
        await other.detach()
    await vm.connect()
    assert await vm.status() == "running"


async def test_attach_to_unknown_vm(run_root: Path) -> None:
    with pytest.raises(StateError, match="no VM named"):
        await Machine.attach("ghost", run_root=run_root)


async def test_pause_resume_events(vm: Machine) -> None:
    events = vm.events(["STOP", "RESUME"])
    first = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0)
    await vm.pause()
    assert (await asyncio.wait_for(first, 10))["event"] == "STOP"
    assert await vm.status() == "paused"
    await vm.resume()
    assert (await asyncio.wait_for(anext(events), 10))["event"] == "RESUME"
    await events.aclose()


async def test_reset_reboots_the_guest(vm: Machine) -> None:
    async with ConsoleFollower(vm.paths.serial) as con:
        await con.wait_heartbeats(2, 10)
        await vm.reset()
        await con.wait_for(lambda log: log.reboots == 1, 30)


async def test_powerdown_ignored_then_shutdown(vm: Machine) -> None:
    # the test guest has no ACPI: the power button does nothing
    assert await vm.powerdown(timeout=1) is False
    pid = vm.pid
    await vm.shutdown(timeout=5)
    assert not vm.alive() and pid is not None
    await vm.shutdown()  # idempotent
