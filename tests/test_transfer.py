"""
cpr-transfer (a new QEMU process beside the old one) and its rollback, on
the real QEMU under TCG, through sealvm's pytest plugin.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import backend_memfd, failing_qemu, script_view
from sealvm import Machine, UpdateError, procfs
from sealvm.pytest_plugin import GuestChecker, Updater, VmLauncher


async def test_transfer_and_exec_alternate(
    sealvm_vm: Machine, sealvm_update: Updater, sealvm_check_guest: GuestChecker
) -> None:
    vm = sealvm_vm
    inode = backend_memfd(vm).inode
    pids = [vm.pid]
    await sealvm_check_guest(vm)
    for mode in ("cpr-transfer", "cpr-exec") * 3:
        report = await sealvm_update(vm, mode)
        assert report.ram_inode_unchanged and report.mismatches == 0
        assert report.heartbeat_continuous
        assert report.pause_qmp is not None and 0 <= report.pause_qmp < 10
        if mode == "cpr-transfer":
            assert report.pid_after != report.pid_before
            assert "handover" in report.phases
        else:
            assert report.pid_after == report.pid_before
        pids.append(report.pid_after)
    await sealvm_check_guest(vm)
    assert backend_memfd(vm).inode == inode
    # every replaced QEMU is gone, only the last one runs
    assert [p for p in set(pids) if p is not None and procfs.pid_alive(p)] == [vm.pid]
    assert vm.paths.qmp.is_socket() and not list(vm.paths.root.glob("qmp-next-*"))


@pytest.mark.parametrize("how", ["start", "load"])
async def test_failed_transfer_rolls_back(
    sealvm_launch: VmLauncher, sealvm_update: Updater, sealvm_check_guest: GuestChecker,
    tmp_path: Path, how: str
) -> None:
    vm = await sealvm_launch(security=script_view(tmp_path))
    assert vm.pid is not None
    pid = vm.pid
    bad = failing_qemu(tmp_path, Path(vm.argv[0]), how)
    await sealvm_check_guest(vm)
    with pytest.raises(UpdateError) as ei:
        await sealvm_update(vm, "cpr-transfer", qemu=bad)
    assert ei.value.rolled_back, str(ei.value)
    print(ei.value)
    assert ("did not come up" if how == "start" else "failed to load") in str(ei.value)
    assert vm.pid == pid and await vm.status() == "running"
    await sealvm_check_guest(vm)
    # and the VM still updates afterwards
    report = await sealvm_update(vm, "cpr-transfer", heartbeat_interval=None)
    assert report.ram_inode_unchanged
