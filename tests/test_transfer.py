"""
cpr-transfer (a new QEMU process beside the old one) and its rollback, on
the real QEMU under TCG.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import assert_guest_intact, backend_memfd, failing_qemu
from sealvm import Machine, UpdateError, live_update
from sealvm.console import ConsoleFollower

HB = 0.010


async def test_transfer_and_exec_alternate(vm: Machine) -> None:
    inode = backend_memfd(vm).inode
    pids = [vm.pid]
    async with ConsoleFollower(vm.paths.serial) as con:
        await con.wait_full_pass()
        for mode in ("cpr-transfer", "cpr-exec") * 3:
            report = await live_update(vm, mode=mode, heartbeat_interval=HB)
            assert report.ram_inode_unchanged and report.mismatches == 0
            assert report.heartbeat_continuous
            assert report.pause_qmp is not None and 0 <= report.pause_qmp < 10
            if mode == "cpr-transfer":
                assert report.pid_after != report.pid_before
                assert "handover" in report.phases
            else:
                assert report.pid_after == report.pid_before
            pids.append(report.pid_after)
        await con.wait_full_pass()
        assert_guest_intact(con.log)
    assert backend_memfd(vm).inode == inode
    # every replaced QEMU is gone, only the last one runs
    from sealvm import procfs

    assert [p for p in set(pids) if p is not None and procfs.pid_alive(p)] == [vm.pid]
    assert vm.paths.qmp.is_socket() and not list(vm.paths.root.glob("qmp-next-*"))


@pytest.mark.parametrize("how", ["start", "load"])
async def test_failed_transfer_rolls_back(vm: Machine, tmp_path: Path, how: str) -> None:
    assert vm.pid is not None
    pid = vm.pid
    bad = failing_qemu(tmp_path, Path(vm.argv[0]), how)
    async with ConsoleFollower(vm.paths.serial) as con:
        await con.wait_full_pass()
        with pytest.raises(UpdateError) as ei:
            await live_update(vm, qemu=bad, mode="cpr-transfer", heartbeat_interval=HB)
        assert ei.value.rolled_back, str(ei.value)
        print(ei.value)
        assert ("did not come up" if how == "start" else "failed to load") in str(ei.value)
        assert vm.pid == pid and await vm.status() == "running"
        await con.wait_full_pass()
        assert_guest_intact(con.log)
    # and the VM still updates afterwards
    report = await live_update(vm, mode="cpr-transfer")
    assert report.ram_inode_unchanged
