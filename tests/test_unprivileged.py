"""
QEMU without root (issue 18): what live update does today when QEMU drops
to another user (``-run-with user=``) or loads its own seccomp filter
(``-sandbox``).  The groundwork: each case ends refused and rolled back
with the guest intact, or completes; docs/unprivileged.md has the whole
picture and the figures.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest

from helpers import processes_mentioning
from sealvm import UpdateError, procfs
from sealvm.host import parse_status
from sealvm.pytest_plugin import GuestChecker, Updater, VmLauncher

NOBODY = ["-run-with", "user=65534:65534"]


def proc_status(pid: int) -> dict[str, str]:
    return parse_status(Path(f"/proc/{pid}/status").read_text())


def no_keeper_left(name: str) -> list[int]:
    """cpr-exec keepers of VM *name* still running, killed (the run root's
    leftover check does not see them: their argv does not name it)."""
    left = processes_mentioning(f"--name\0{name}\0", b"keeper.py")
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


async def test_cpr_exec_refused_by_a_qemu_running_as_another_user(
    sealvm_launch: VmLauncher, sealvm_update: Updater, sealvm_check_guest: GuestChecker
) -> None:
    """QEMU dropped to nobody cannot create the CPR state file in the
    root-owned run directory: migrate is refused at once.  The update is
    rolled back (UpdateError, not a bare QMP error), the keeper started for
    it is released, and the guest runs on in the same process."""
    vm = await sealvm_launch(extra_args=NOBODY, name="nobody-exec")
    assert vm.pid is not None
    assert proc_status(vm.pid)["Uid"] == "65534 65534 65534 65534"
    assert proc_status(vm.pid)["CapEff"] == "0000000000000000"
    with pytest.raises(UpdateError, match=r"the old QEMU refused migrate: .*"
                       r"Could not create '.*/cpr-state': Permission denied") as err:
        await sealvm_update(vm, "cpr-exec")
    assert err.value.rolled_back
    assert no_keeper_left("nobody-exec") == []
    assert procfs.pid_alive(vm.pid) and await vm.status() == "running"
    await sealvm_check_guest(vm)
