"""
cpr-exec of a running test guest on the patched QEMU (TCG): the walking
skeleton's claim, shown on real processes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import assert_guest_intact, backend_memfd, corrupt_guest_word
from sealvm import Machine, PreflightError, live_update, procfs
from sealvm.console import ConsoleFollower
from sealvm.spec import VmSpec

HB = 0.010
UPDATES = 10


async def test_ten_cpr_exec_updates_keep_the_guest(vm: Machine) -> None:
    pid = vm.pid
    ram = backend_memfd(vm)
    assert ram.has_seals(procfs.RAM_SEALS)
    async with ConsoleFollower(vm.paths.serial) as con:
        await con.wait_full_pass()
        for i in range(UPDATES):
            report = await live_update(vm, heartbeat_interval=HB)
            assert report.pid_before == report.pid_after == pid, f"update {i}"
            assert report.ram_inode_unchanged, f"update {i}"
            after = {b.name: b for b in report.ram_after}["memory-backend-memfd"]
            assert after.inode == ram.inode
            assert {"GROW", "SHRINK", "SEAL"} <= set(after.seals)
            assert report.heartbeat_continuous and report.mismatches == 0
            assert report.pause_qmp is not None and 0 < report.pause_qmp < 10
            assert report.pause_guest is not None and report.pause_guest < 10
        # every word written before the last update is verified after it
        await con.wait_full_pass()
        assert_guest_intact(con.log)
    assert vm.pid == pid and await vm.status() == "running"
    assert backend_memfd(vm).inode == ram.inode
    assert vm.state is not None and vm.state.generation == UPDATES


async def test_guest_reports_corrupted_memory(vm: Machine) -> None:
    """The pattern check can fail: a word changed behind the guest's back is
    reported with its address (so zero mismatches above means something)."""
    async with ConsoleFollower(vm.paths.serial) as con:
        await con.wait_full_pass()
        corrupt_guest_word(vm, 0x400000)
        await con.wait_for(lambda log: bool(log.mismatches), 30)
        bad = con.log.mismatches[0]
        assert bad.addr == 0x400000 and bad.words == 1
        assert bad.got == 0xEFBEADDEEFBEADDE
        # and its heartbeat counter says so too
        await con.wait_for(lambda log: (log.mismatch_counter() or 0) >= 1, 30)


async def test_cpr_exec_of_anonymous_ram_is_refused(
    make_spec: Callable[..., VmSpec], run_root: Path
) -> None:
    """memory-backend-ram would come back zeroed: refuse before pausing."""
    vm = Machine(make_spec(backend="ram"), run_root=run_root)
    await vm.launch()
    try:
        async with ConsoleFollower(vm.paths.serial) as con:
            await con.wait_full_pass()
            with pytest.raises(PreflightError, match="ram: guest RAM is memory-backend-ram"):
                await live_update(vm, heartbeat_interval=HB)
            params = await vm.execute("query-migrate-parameters")
            assert params["mode"] == "normal"  # left as it was
            await con.wait_full_pass()
            assert_guest_intact(con.log)
        assert await vm.status() == "running"
    finally:
        await vm.shutdown()


async def test_update_to_missing_binary_is_refused(vm: Machine, tmp_path: Path) -> None:
    with pytest.raises(PreflightError, match="does not exist"):
        await live_update(vm, qemu=tmp_path / "nope")
    assert await vm.status() == "running"
