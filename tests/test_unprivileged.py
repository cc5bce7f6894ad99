"""
What QEMU itself does, without sealvm's confinement (``security.confine``
and ``seccomp`` off), when it drops to another user (``-run-with user=``)
or loads its own seccomp filter (``-sandbox``): why sealvm starts QEMU as
its user through the jail and manages the filter itself
(tests/test_confinement.py has sealvm's confinement).  Each case ends
refused and rolled back with the guest intact, or completes;
docs/unprivileged.md has the figures.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from helpers import processes_mentioning
from sealvm import UpdateError, procfs
from sealvm.pytest_plugin import GuestChecker, Updater, VmLauncher
from sealvm.update import cpr_exec

NOBODY = ["-run-with", "user=65534:65534"]
#: issue 18's sandbox for cpr-transfer, and the one cpr-exec needs today
SANDBOX = ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
SANDBOX_SPAWN = ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny"]


#: sealvm's confinement off: QEMU as sealvm started it before issue 18
UNCONFINED = {"confine": False, "seccomp": False}


def proc_status(pid: int) -> dict[str, str]:
    return procfs.status(pid)


def seccomp(pid: int) -> tuple[str, str]:
    """(mode, number of filters) from /proc/PID/status: ("2", "1") is one
    filter."""
    st = proc_status(pid)
    return st["Seccomp"], st["Seccomp_filters"]


def no_keeper_left(name: str) -> list[int]:
    """cpr-exec keepers of VM *name* still running, killed (the run root's
    leftover check sees them too: their argv names the run directory)."""
    left = processes_mentioning(f"/{name}\0", b"keeper.py\0--fd")
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
    vm = await sealvm_launch(extra_args=NOBODY, name="nobody-exec", security=UNCONFINED)
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


async def test_cpr_transfer_under_the_full_sandbox(
    sealvm_launch: VmLauncher, sealvm_update: Updater, sealvm_check_guest: GuestChecker
) -> None:
    """spawn denied: sealvm starts the new QEMU, which loads a filter of its
    own (one, not stacked on the old one's)."""
    vm = await sealvm_launch(extra_args=SANDBOX, security=UNCONFINED)
    assert vm.pid is not None and seccomp(vm.pid) == ("2", "1")
    for _ in range(2):
        before = vm.pid
        report = await sealvm_update(vm, "cpr-transfer")
        assert vm.pid is not None and vm.pid != before
        assert seccomp(vm.pid) == ("2", "1")
        assert report.mismatches == 0 and report.heartbeat_continuous
    await sealvm_check_guest(vm)


async def test_cpr_exec_under_spawn_deny_is_refused_and_rolled_back(
    sealvm_launch: VmLauncher, sealvm_update: Updater, sealvm_check_guest: GuestChecker
) -> None:
    """spawn=deny makes execve fail with EPERM (and the address-space
    holder's clone too): QEMU reports the migration failed and runs the
    guest on; sealvm rolls back."""
    vm = await sealvm_launch(extra_args=SANDBOX, name="sandboxed-exec", security=UNCONFINED)
    pid = vm.pid
    assert pid is not None
    with pytest.raises(UpdateError, match=r"execvp \S+ failed: Operation not permitted") as err:
        await sealvm_update(vm, "cpr-exec")
    assert err.value.rolled_back
    assert no_keeper_left("sandboxed-exec") == []
    assert vm.pid == pid and seccomp(pid) == ("2", "1") and await vm.status() == "running"
    log = vm.paths.qemu_log.read_text()
    assert "cpr-exec: cannot start the address space holder: Operation not permitted" in log
    await sealvm_check_guest(vm)


async def test_cpr_exec_command_line_with_sandbox_stacks_a_filter_per_update(
    sealvm_launch: VmLauncher, sealvm_update: Updater, sealvm_check_guest: GuestChecker,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The negative control of `confine.strip_sandbox`: a cpr-exec whose new
    command line has ``-sandbox`` again (sealvm before it) adds a filter to
    the ones the image inherited, one more per update, up to the kernel's
    limit (docs/unprivileged.md).  sealvm's own updates keep one
    (test_confinement.py)."""
    monkeypatch.setattr(cpr_exec, "strip_sandbox", lambda argv: argv)
    vm = await sealvm_launch(extra_args=SANDBOX_SPAWN, security=UNCONFINED)
    pid = vm.pid
    assert pid is not None and seccomp(pid) == ("2", "1")
    for n in (2, 3):
        report = await sealvm_update(vm, "cpr-exec")
        assert vm.pid == pid and seccomp(pid) == ("2", str(n))
        assert report.mismatches == 0 and report.heartbeat_continuous
    await sealvm_check_guest(vm)


def test_qemu_cannot_drop_to_a_user_under_elevateprivileges_deny(qemu_binary: Path) -> None:
    """-run-with user= changes uid after the filter is loaded, and
    elevateprivileges=deny kills the process at setgid(): an unprivileged
    sandboxed QEMU must be started as its user by sealvm."""
    p = subprocess.run([str(qemu_binary), "-machine", "none", "-nodefaults", "-display", "none",
                        *SANDBOX, *NOBODY], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=60, check=False)
    assert p.returncode == -signal.SIGSYS, (p.returncode, p.stderr)
