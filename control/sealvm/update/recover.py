"""
Recovery: finish or roll back an update whose controller died.

`recover` reads the journal (`journal`) and the processes as they are now,
and ends with exactly one QEMU running the guest (or holding it paused, if
it was paused), every file of the update removed and the journal retired:

cpr-exec (one process, two images)
    The argv of the process tells the images apart (the new one carries the
    update's marker).  Old image: a migration still in flight is waited for;
    then the guest is resumed if it was running: *rolled back*.  New image:
    the device state is loaded from the file if that had not happened, the
    guest resumed: *completed*.
cpr-transfer / migration (two processes)
    The new QEMU wins if it runs the guest or has loaded the state: the old
    QEMU is made to quit, the new one becomes the VM's: *completed*.
    Otherwise the new QEMU (found by pid, or by its marker if the controller
    died while starting it) is killed and the old one resumes the guest:
    *rolled back*.

If the QEMU that could have taken the guest is gone, the guest is *lost*:
the report says so and the run directory is cleaned.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from .. import endpoint, procfs
from ..confine import strip_sandbox
from ..errors import QMPReplyError, SealvmError, StateError, UpdateError
from ..lock import VmLock
from ..machine import Machine, cleanup_run_files, read_state, release_host_resources
from ..plan import RunPaths, name_arg
from ..process import QemuProcess
from ..runroot import default_run_root
from ..spec import spec_from_dict
from .context import remove
from .cpr_exec import fall_back
from .journal import Journal
from .monitor import (
    MIGRATING,
    arm,
    connect,
    disconnect,
    execute,
    incoming,
    migration_status,
    resume,
    settle_outgoing,
    status,
)
from .wayback import Keeper


@dataclass
class RecoverReport:
    """What `recover` found and did."""

    name: str
    #: "none" (nothing to recover), "completed", "rolled-back" or "lost"
    outcome: str
    mode: str | None = None
    #: the last step the journal recorded
    interrupted_at: str | None = None
    #: the guest's state afterwards ("running", "paused", or "gone")
    guest: str = "gone"
    pid: int | None = None
    actions: list[str] = field(default_factory=list)


def plan_recovery(paths: RunPaths) -> str | None:
    """What `recover` would do for the VM in *paths*, from the journal and
    the processes (no QMP); None when no update was interrupted."""
    journal = Journal.load(paths)
    if journal is None:
        return None
    start = journal.start
    old_alive = procfs.same_process(start["old_pid"], start["old_start_time"])
    head = f"{start['mode']} interrupted after '{journal.last}'"
    if start["mode"] == "cpr-exec":
        if not old_alive:
            return f"{head}; QEMU is gone: the guest is lost"
        image = "new" if _is_new_image(journal, start["old_pid"]) else "old"
        return (f"{head}; the process runs the {image} image: recover will "
                + ("finish the update" if image == "new" else "give the guest back to it"))
    new_pid = _successor_pid(journal)
    if journal.has("resumed"):
        return f"{head}; the new QEMU (pid {new_pid}) runs the guest: recover will finish"
    if new_pid is not None:
        return (f"{head}; new QEMU pid {new_pid}: recover will finish if it has loaded "
                "the guest, else kill it and roll back")
    return f"{head}; recover will roll back to the old QEMU" + (
        "" if old_alive else " (gone: the guest is lost)")


async def recover(name: str, *, run_root: Path | None = None, timeout: float = 60.0,
                  lock: VmLock | None = None) -> RecoverReport:
    """Finish or roll back an interrupted update of VM *name*.

    Takes the VM's lock, or uses *lock* the caller holds (a held lock means
    a controller is alive and working: recover does not wait for it).

    :raise StateError: when the VM is busy or its files are unreadable.
    :raise SealvmError: when a QEMU does not answer; the journal stays and
        recover can be run again.
    """
    paths = RunPaths((run_root or default_run_root()) / name)
    state = read_state(paths)
    if state is None:
        raise StateError(f"no VM named {name!r} in {paths.root.parent}")
    vm = Machine(spec_from_dict(state.spec), run_root=paths.root.parent)
    vm.state = state
    if lock is not None:
        vm.lock = lock
    with vm.lock.hold("recover"):
        journal = Journal.load(paths)
        if journal is None:
            return RecoverReport(name, "none", guest="running" if state.alive() else "gone",
                                 pid=state.pid)
        report = RecoverReport(name, "", mode=journal.start["mode"],
                               interrupted_at=journal.last)
        deadline = asyncio.get_running_loop().time() + timeout
        if journal.start["mode"] == "cpr-exec":
            await _recover_exec(vm, journal, report, deadline, timeout)
        else:
            await _recover_transfer(vm, journal, report, deadline, timeout)
        remove(paths.cpr_state, paths.cpr_sock, paths.main_sock,
               *paths.root.glob("qmp-next-*.sock"))
        if report.outcome == "lost":
            cleanup_run_files(paths)
            release_host_resources(state, paths)
        journal.end(report.outcome, actions=report.actions, by="recover")
        endpoint.notify(paths, "update-end", mode=report.mode, result=report.outcome,
                        pid=report.pid, by="recover")
        return report


async def abandon(name: str, *, run_root: Path | None = None,
                  lock: VmLock | None = None) -> list[int]:
    """Give up an interrupted update that `recover` cannot finish: SIGKILL
    every process it involves (old QEMU, new QEMU, keeper), remove its files
    and the VM's run files, retire the journal.  For `sealvm down`, which must
    always be able to stop a VM.  Returns the pids killed.
    """
    paths = RunPaths((run_root or default_run_root()) / name)
    lock = lock or VmLock(paths.lock, name)
    with lock.hold("down"):
        state = read_state(paths)
        journal = Journal.load(paths)
        pids: list[int] = []
        if state is not None and state.alive():
            pids.append(state.pid)
        if journal is not None:
            start = journal.start
            if procfs.same_process(start["old_pid"], start["old_start_time"]):
                pids.append(start["old_pid"])
            if (succ := _successor_pid(journal)) is not None:
                pids.append(succ)
            keeper = Keeper.of(paths, journal.get("migrate").get("keeper", {}))
            if keeper is not None:
                pids.append(keeper.pid)
        killed = sorted(set(pids))
        for pid in killed:
            proc = QemuProcess(pid)
            proc.send_signal(signal.SIGKILL)
            await proc.wait_exit(10.0)
            proc.close()
        cleanup_run_files(paths)
        if state is not None:
            release_host_resources(state, paths)
        if journal is not None:
            journal.end("abandoned", killed=killed, by="down")
        return killed


# ------------------------------------------------------------------ cpr-exec


def _is_new_image(journal: Journal, pid: int) -> bool:
    """Whether *pid* runs the update's new image: its command line is the
    journal's, which the image got without ``-sandbox`` (`strip_sandbox`)."""
    new_argv = journal.get("migrate").get("argv")
    argv = procfs.cmdline(pid)
    if not new_argv or argv is None:
        return False
    return strip_sandbox(argv) == strip_sandbox(list(new_argv))


async def _recover_exec(vm: Machine, journal: Journal, report: RecoverReport,
                        deadline: float, timeout: float) -> None:
    start, paths = journal.start, vm.paths
    pid = start["old_pid"]
    keeper = Keeper.of(paths, journal.get("migrate").get("keeper", {}))
    # cont may have reached the new image: from then on the saved state is
    # no way back (the guest may have run on)
    ran = journal.has("resuming") or journal.has("resumed")
    try:
        why = ""
        for _ in range(3):  # old image mid-migration -> exec: look again
            if not procfs.same_process(pid, start["old_start_time"]):
                why = f"QEMU (pid {pid}) is gone"
                break
            new_image = _is_new_image(journal, pid)
            try:
                qmp = await connect(paths.qmp, name=vm.name, timeout=timeout)
            except StateError as exc:
                why = f"QEMU (pid {pid}) does not answer: {exc}"
                break
            try:
                if not new_image:
                    if await settle_outgoing(qmp, deadline=deadline, cancel=False):
                        continue  # it exec'd meanwhile
                    await _take_back(qmp, bool(start["was_running"]), report)
                    report.outcome = "rolled-back"
                    report.pid = pid
                    return
                try:
                    await _finish_exec(vm, qmp, journal, report, deadline)
                except UpdateError as exc:  # the load failed
                    why = str(exc)
                    break
                report.outcome = "completed"
                report.pid = pid
                return
            finally:
                await disconnect(qmp)
        else:
            raise StateError(f"VM {vm.name}: QEMU (pid {pid}) keeps changing; "
                             "run recover again")
        if ran:
            if procfs.same_process(pid, start["old_start_time"]):
                raise StateError(f"VM {vm.name}: {why}; the guest may have run on the new "
                                 "QEMU, so the saved state is no way back: run recover "
                                 "again, or `sealvm down`")
            report.outcome = "lost"
            report.actions.append(f"{why} after the guest ran on it: the guest is lost")
            return
        if keeper is None:
            report.outcome = "lost"
            report.actions.append(f"{why} and no keeper holds the guest: the guest is lost")
            return
        report.pid = await fall_back(vm, journal, keeper, why=why, timeout=timeout)
        keeper = None  # released by fall_back
        report.outcome = "rolled-back"
        report.guest = "running" if start["was_running"] else "paused"
        report.actions.append(f"{why}: started the previous QEMU (pid {report.pid}) on the "
                              "memory and device state the keeper held")
    finally:
        if keeper is not None:
            await keeper.release()


async def _take_back(qmp: QMPClient, was_running: bool, report: RecoverReport) -> None:
    """The old QEMU keeps the guest: resume it if it was running."""
    guest = await status(qmp)
    if was_running and guest != "running":
        await execute(qmp, "cont")
        report.actions.append(f"resumed the guest on the old QEMU (it was {guest})")
        guest = await status(qmp)
    report.guest = guest
    report.actions.append(f"old QEMU has the guest ({guest})")


async def _finish_exec(vm: Machine, qmp: QMPClient, journal: Journal, report: RecoverReport,
                       deadline: float) -> None:
    assert vm.state is not None
    start = journal.start
    new_argv: list[str] = journal.get("migrate")["argv"]
    guest = await status(qmp)
    if guest == "inmigrate":
        st, _ = await migration_status(qmp)
        args = None if st in MIGRATING else {"uri": journal.get("migrate")["uri"]}
        proc = QemuProcess(start["old_pid"], logger=vm.logger)
        try:
            await incoming(qmp, args, deadline=deadline, proc=proc,
                           log_tail=lambda: vm.log_tail(5))
        finally:
            proc.close()
        report.actions.append("new image loaded the device state" +
                              (" (sent migrate-incoming)" if args else ""))
        guest = await status(qmp)
    guest = await _resume_if_it_ran(qmp, guest, journal, report, deadline, "new image")
    await arm(qmp, new_argv)
    vm.state.argv = new_argv
    _record(vm, start["qemu"])
    report.guest = guest


async def _resume_if_it_ran(qmp: QMPClient, guest: str, journal: Journal,
                            report: RecoverReport, deadline: float, where: str) -> str:
    """Resume the guest on the new QEMU if it was running before the update
    (a paused one stays paused); returns its state."""
    if journal.start["was_running"] and guest != "running":
        journal.record("resuming")
        await resume(qmp, deadline=deadline)
        report.actions.append(f"resumed the guest on the {where}")
        return "running"
    return guest


def _record(vm: Machine, qemu: str) -> None:
    """The new QEMU is the VM's: state.json says so (as a live update does)."""
    assert vm.state is not None
    vm.spec = vm.spec.with_qemu(Path(qemu))
    vm.state.spec["qemu"] = qemu
    vm.state.generation += 1
    vm.state.updates.append({"mode": "recovered", "qemu": qemu})
    vm.save_state()


# -------------------------------------------------- cpr-transfer, migration


def _successor_pid(journal: Journal) -> int | None:
    """The new QEMU's pid: recorded, or found by its marker argument."""
    spawned = journal.get("spawned")
    if spawned:
        pid = int(spawned["pid"])
        return pid if procfs.same_process(pid, spawned["start_time"]) else None
    start = journal.start
    found = procfs.pids_with_arg(name_arg(start["vm"], start["marker"]))
    return found[0] if found else None


async def _recover_transfer(vm: Machine, journal: Journal, report: RecoverReport,
                            deadline: float, timeout: float) -> None:
    start, paths = journal.start, vm.paths
    was_running = bool(start["was_running"])
    old_alive = procfs.same_process(start["old_pid"], start["old_start_time"])
    new_pid = _successor_pid(journal)
    new_qmp: QMPClient | None = None
    qmp_next = Path(journal.get("spawn").get("qmp", paths.qmp_next(0)))
    # once cont may have reached the new QEMU, only forward: the old QEMU's
    # state is stale (a paused guest is never resumed, so the load decides)
    forward_only = journal.has("resuming") or journal.has("resumed")
    # the new QEMU's socket: its own path until the handover renamed it
    sock = qmp_next if qmp_next.exists() or old_alive else paths.qmp
    try:
        loaded = False
        if new_pid is not None and journal.has("migrate"):
            try:
                new_qmp = await connect(sock, name=f"{vm.name}-new",
                                        timeout=min(timeout, 5.0))
            except StateError as exc:
                if forward_only:
                    raise StateError(f"VM {vm.name}: the new QEMU (pid {new_pid}) may run "
                                     f"the guest but does not answer ({exc}); run recover "
                                     "again, or `sealvm down`") from exc
            if new_qmp is not None:
                journal.pids["new"] = new_pid
                journal.fault("recover-probe")
                try:
                    guest = await status(new_qmp)
                    loaded = guest == "running" or (await migration_status(new_qmp))[0] == \
                        "completed"
                except (StateError, QMPReplyError) as exc:
                    # it died or answers nonsense: before `cont` it never ran the
                    # guest, so the old QEMU takes it back
                    if forward_only:
                        raise StateError(f"VM {vm.name}: the new QEMU (pid {new_pid}) may run "
                                         f"the guest but its monitor failed ({exc}); run "
                                         "recover again, or `sealvm down`") from exc
                    report.actions.append(f"the new QEMU's monitor failed: {exc}")
                    await disconnect(new_qmp)
                    new_qmp = None
        if new_pid is not None and new_qmp is not None and (loaded or forward_only):
            await _forward(vm, journal, report, new_pid, new_qmp, sock, deadline,
                           timeout, old_alive)
            return
        # back: the new QEMU goes, the old one keeps the guest
        if new_pid is not None:
            await disconnect(new_qmp)
            new_qmp = None
            proc = QemuProcess(new_pid, logger=vm.logger)
            await proc.kill()
            proc.close()
            report.actions.append(f"killed the new QEMU (pid {new_pid})")
        if not old_alive or journal.has("resuming"):
            report.outcome = "lost"
            report.actions.append(
                f"old QEMU (pid {start['old_pid']}) is gone and the new one never had the "
                "guest: the guest is lost" if not old_alive else
                "the new QEMU died after it was told to resume the guest: the old one's "
                "state is no way back; the guest is lost")
            return
        qmp = await connect(paths.qmp, name=vm.name, timeout=timeout)
        try:
            await settle_outgoing(qmp, deadline=deadline, cancel=True)
            await _take_back(qmp, was_running, report)
        finally:
            await disconnect(qmp)
        report.outcome = "rolled-back"
        report.pid = start["old_pid"]
    finally:
        await disconnect(new_qmp)


async def _forward(vm: Machine, journal: Journal, report: RecoverReport, new_pid: int,
                   new_qmp: QMPClient, qmp_next: Path, deadline: float, timeout: float,
                   old_alive: bool) -> None:
    assert vm.state is not None
    start, paths = journal.start, vm.paths
    guest = await _resume_if_it_ran(new_qmp, await status(new_qmp), journal, report, deadline,
                                    "new QEMU")
    await arm(new_qmp, None)
    if old_alive:
        old = QemuProcess(start["old_pid"], logger=vm.logger)
        try:
            with contextlib.suppress(SealvmError):
                qmp = await connect(paths.qmp, name=vm.name, timeout=min(timeout, 5.0))
                try:
                    with contextlib.suppress(SealvmError):
                        await execute(qmp, "quit")
                finally:
                    await disconnect(qmp)
            if not await old.wait_exit(timeout):
                await old.kill()
        finally:
            old.close()
        report.actions.append(f"old QEMU (pid {start['old_pid']}) quit")
    if qmp_next.exists():
        os.replace(qmp_next, paths.qmp)
    spawned: dict[str, Any] = journal.get("spawned")
    if spawned:
        vm.state.argv = spawned["argv"]
        vm.state.fds = spawned["fds"]
    else:
        argv = procfs.cmdline(new_pid)
        if argv:
            vm.state.argv = argv
    vm.state.pid = new_pid
    vm.state.start_time = procfs.start_time(new_pid) or 0
    _record(vm, start["qemu"])
    report.outcome = "completed"
    report.pid = new_pid
    report.guest = guest


__all__ = ["RecoverReport", "abandon", "plan_recovery", "recover"]
