"""
cpr-exec of a running test guest on the patched QEMU (TCG): the walking
skeleton's claim, shown on real processes, through sealvm's pytest plugin
(`sealvm_vm`, `sealvm_update`, `sealvm_check_guest`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import backend_memfd, corrupt_guest_word
from sealvm import Machine, PreflightError, VmSpec, live_update, procfs
from sealvm.console import ConsoleFollower
from sealvm.pytest_plugin import GuestChecker, Updater, VmLauncher
from sealvm.update import warm

UPDATES = 10


async def test_ten_cpr_exec_updates_keep_the_guest(
    sealvm_vm: Machine, sealvm_update: Updater, sealvm_check_guest: GuestChecker
) -> None:
    vm = sealvm_vm
    pid = vm.pid
    ram = backend_memfd(vm)
    assert ram.has_seals(procfs.RAM_SEALS)
    await sealvm_check_guest(vm)  # all of guest RAM written and verified once
    for i in range(UPDATES):
        report = await sealvm_update(vm, "cpr-exec")
        assert report.pid_before == report.pid_after == pid, f"update {i}"
        assert report.ram_inode_unchanged, f"update {i}"
        after = {b.name: b for b in report.ram_after}["memory-backend-memfd"]
        assert after.inode == ram.inode
        assert {"GROW", "SHRINK", "SEAL"} <= set(after.seals)
        assert report.heartbeat_continuous and report.mismatches == 0
        assert report.pause_qmp is not None and 0 < report.pause_qmp < 10
        assert report.pause_guest is not None and report.pause_guest < 10
        # pages warmed for the new image before the pause, where the host reports free pages
        assert ("warm" in report.phases) == (warm.auto_size() > 0)
    # every word written before the last update is verified after it; the
    # heartbeat counter never reset since boot, no reboot, no mismatch
    check = await sealvm_check_guest(vm)
    assert check.verified_pass is not None and check.reboots == 0
    assert vm.pid == pid and await vm.status() == "running"
    assert backend_memfd(vm).inode == ram.inode
    assert vm.state is not None and vm.state.generation == UPDATES


async def test_guest_reports_corrupted_memory(
    sealvm_vm: Machine, sealvm_check_guest: GuestChecker
) -> None:
    """The pattern check can fail: a word changed behind the guest's back is
    reported with its address (so zero mismatches above means something),
    and the plugin's one-call guest check fails on it."""
    vm = sealvm_vm
    await sealvm_check_guest(vm)
    async with ConsoleFollower(vm.paths.serial) as con:
        corrupt_guest_word(vm, 0x400000)
        await con.wait_for(lambda log: bool(log.mismatches), 30)
        bad = con.log.mismatches[0]
        assert bad.addr == 0x400000 and bad.words == 1
        assert bad.got == 0xEFBEADDEEFBEADDE
        # and its heartbeat counter says so too
        await con.wait_for(lambda log: (log.mismatch_counter() or 0) >= 1, 30)
    with pytest.raises(AssertionError, match=r"1 mismatching word\(s\) of guest RAM, "
                       r"first at 0x400000.*the guest counted 1 mismatching word"):
        await sealvm_check_guest(vm)


async def test_cpr_exec_of_anonymous_ram_is_refused(
    sealvm_launch: VmLauncher, sealvm_update: Updater, sealvm_check_guest: GuestChecker
) -> None:
    """memory-backend-ram would come back zeroed: refuse before pausing."""
    vm = await sealvm_launch(backend="ram")
    await sealvm_check_guest(vm)
    with pytest.raises(PreflightError, match="ram: guest RAM is memory-backend-ram"):
        await sealvm_update(vm, "cpr-exec")
    params = await vm.execute("query-migrate-parameters")
    assert params["mode"] == "normal"  # left as it was
    await sealvm_check_guest(vm)
    assert await vm.status() == "running"


async def test_update_to_missing_binary_is_refused(
    sealvm_vm: Machine, sealvm_update: Updater, tmp_path: Path
) -> None:
    with pytest.raises(PreflightError, match="does not exist"):
        await sealvm_update(sealvm_vm, qemu=tmp_path / "nope")
    assert await sealvm_vm.status() == "running"


async def test_update_follows_a_serial_log_set_in_the_spec(
    sealvm_launch: VmLauncher, sealvm_update: Updater, tmp_path: Path
) -> None:
    """A spec's serial_log moves the console out of the run directory; the
    update follows the heartbeat there (it looked in the run directory and
    failed with FileNotFoundError)."""
    log = tmp_path / "console.log"
    vm = await sealvm_launch(serial_log=str(log))
    assert log.exists() and not vm.paths.serial.exists()
    report = await sealvm_update(vm, "cpr-transfer", heartbeat_interval=0.01)
    assert report.heartbeat_continuous and report.pause_guest is not None


async def test_a_vm_from_before_qemu_dir_updates(
        run_root: Path, make_spec: Callable[..., VmSpec], sealvm_check_guest: GuestChecker
) -> None:
    """A VM a sealvm started before QEMU's files moved to the run
    directory's ``qemu/`` (and before confinement) keeps running when sealvm
    is upgraded: its state has no ``security``, its command line names
    ``serial.log`` in the run directory itself, and there is no ``qemu/``.
    Today's sealvm attaches to it and updates it in both modes, following
    the serial log its command line names."""
    old_serial = run_root / "old" / "serial.log"
    spec = make_spec("old", serial_log=str(old_serial), scripts={"enabled": False},
                     security={"confine": False, "seccomp": False})
    vm = Machine(spec, run_root=run_root)
    await vm.launch()
    try:
        state = json.loads(vm.paths.state.read_text())
        del state["spec"]["serial_log"], state["spec"]["security"], state["security"]
        vm.paths.state.write_text(json.dumps(state))
        await vm.detach()
        vm.paths.qemu_dir.rmdir()
        vm = await Machine.attach("old", run_root=run_root)
        assert vm.confinement is None and vm.serial_log == old_serial
        for mode in ("cpr-exec", "cpr-transfer"):
            report = await live_update(vm, mode=mode, heartbeat_interval=0.01)
            assert report.heartbeat_continuous and report.mismatches == 0, report
        await sealvm_check_guest(vm)
    finally:
        await vm.shutdown()
