"""
Live update: replace the QEMU under a running (or paused) guest, keeping its RAM.

One call, `live_update`, three modes, one module each:

- `cpr_exec`: the same process exec()s the new binary (cpr-exec);
- `transfer`: a new process beside the old one (cpr-transfer), or classic
  migration (RAM copied) as the baseline to compare with.

Around every mode: the VM's lock, the guest's run state kept (a paused guest
stays paused), preflight before anything is touched, and a journal
(`journal`) written before every step that cannot be undone, so that
`recover` can finish or roll back an update whose controller died.  The
new QEMU waits after loading (``-S``) until the controller resumes it: the
fence.  Before it, failures roll back; after it, the update only goes
forward ("completed with errors" at worst).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from pathlib import Path

from .. import endpoint, procfs
from ..console import ConsoleFollower
from ..errors import PreflightError, QMPReplyError, SealvmError, StateError, UpdateError
from ..machine import Machine
from ..machine import Runstate as VmRunstate
from ..preflight import MODES, Check, run_preflight
from . import cpr_exec, transfer, warm
from .context import UpdateContext
from .journal import Journal
from .monitor import UPDATABLE
from .recover import RecoverReport, abandon, plan_recovery, recover
from .report import Clock, Progress, RamBlock, UpdateReport, measure_gaps, ram_blocks, verify

log = logging.getLogger("sealvm.update")


async def live_update(
    vm: Machine,
    *,
    qemu: Path | None = None,
    mode: str = "cpr-exec",
    heartbeat_interval: float | None = None,
    timeout: float = 60.0,
    progress: Progress | None = None,
    require_sealed: bool = True,
    verify_pass: bool = True,
    way_back: bool = True,
    warm_pages: int | None = None,
) -> UpdateReport:
    """Replace the QEMU running *vm* with *qemu* (default: the same binary).

    The guest keeps its run state: running stays running, paused stays paused.
    With *heartbeat_interval* (seconds), the guest is the sealvm test guest:
    its serial log is followed and the pause it saw is measured.
    *progress(phase, seconds)* is called as each phase ends.
    A stock QEMU is updated like sealvm's (its unsealed aux RAM is a
    preflight warning); *require_sealed* False also lets unsealed guest RAM
    pass, for comparisons; sealvm's own QEMU always seals.  With the test guest,
    the update waits (*verify_pass*) until the guest has verified all of its
    RAM once after the update, and reports the mismatches its own counter
    saw; ``total`` does not include that wait.  *way_back* False makes
    cpr-exec one-way (no keeper, no trampoline: a new QEMU that fails after
    the exec takes the guest with it); for measurements.

    :raise StateError: the VM is busy (another update holds its lock), has an
        interrupted update (`InterruptedUpdateError`: run `recover`), or its
        guest is neither running nor paused; nothing was touched.
    :raise PreflightError: refused before the guest paused; VM untouched.
    :raise UpdateError: failed after the update started; ``outcome`` says
        whether it was rolled back, completed with errors, or left the guest
        not resumed (the journal stays: `recover`).
    """
    if mode not in MODES:
        raise PreflightError([f"mode {mode!r} is not one of {', '.join(MODES)}"])
    if vm.runstate is not VmRunstate.RUNNING or vm.pid is None or vm.state is None:
        raise StateError(f"VM {vm.name} is {vm.runstate.value}: attach or launch it first")
    with vm.lock.hold("update"):
        return await _update(vm, qemu=qemu, mode=mode, heartbeat_interval=heartbeat_interval,
                             timeout=timeout, progress=progress, require_sealed=require_sealed,
                             verify_pass=verify_pass, way_back=way_back,
                             warm_pages=warm.auto_size() if warm_pages is None else warm_pages)


async def _update(vm: Machine, *, qemu: Path | None, mode: str,
                  heartbeat_interval: float | None, timeout: float,
                  progress: Progress | None, require_sealed: bool,
                  verify_pass: bool, way_back: bool, warm_pages: int) -> UpdateReport:
    assert vm.state is not None and vm.pid is not None
    if vm.paths.journal.exists():
        Journal.begin(vm.paths)  # raises InterruptedUpdateError, naming the file
    guest = await vm.status()
    if guest not in UPDATABLE:
        raise StateError(f"VM {vm.name}: the guest is {guest}; only a running or paused "
                         "guest can be updated")
    was_running = guest == "running"
    new_qemu = (qemu or Path(vm.argv[0])).resolve()
    clock = Clock(progress)
    checks = await run_preflight(vm, mode=mode, qemu=new_qemu, require_sealed=require_sealed,
                                 way_back=way_back)
    pid = vm.pid
    report = UpdateReport(
        mode=mode,
        qemu_before=procfs.exe_of(pid),
        qemu_after=str(new_qemu),
        pid_before=pid,
        pid_after=-1,
        ram_before=ram_blocks(pid),
        ram_after=[],
        guest_state=guest,
        checks=[str(c) for c in checks],
    )
    clock.mark("preflight")
    marker = f"sealvm-{secrets.token_hex(6)}"
    journal = Journal.begin(
        vm.paths, mode=mode, vm=vm.name, old_pid=pid, old_start_time=vm.state.start_time,
        old_argv=vm.argv, qemu=str(new_qemu), was_running=was_running, marker=marker,
        generation=vm.state.generation)
    journal.pids["old"] = pid
    ctx = UpdateContext(vm=vm, qemu=new_qemu, clock=clock, report=report, journal=journal,
                        deadline=asyncio.get_running_loop().time() + timeout,
                        timeout=timeout, was_running=was_running, marker=marker,
                        way_back=way_back, warm_pages=warm_pages)
    vm.runstate = VmRunstate.UPDATING
    completed_error: UpdateError | None = None
    endpoint.notify(vm.paths, "update-start", mode=mode, old_qemu=report.qemu_before,
                    new_qemu=str(new_qemu), pid=pid)
    ended = False

    def tell_end(result: str, error: str | None = None) -> None:
        nonlocal ended
        if not ended:
            ended = True
            endpoint.notify(vm.paths, "update-end", mode=mode, result=result, pid=vm.pid,
                            qemu=vm.argv[0] if vm.state is not None else None,
                            pause_qmp=report.pause_qmp, error=error)
    try:
        async with contextlib.AsyncExitStack() as stack:
            follower = None
            first = 0
            if heartbeat_interval is not None and was_running:
                follower = await stack.enter_async_context(
                    ConsoleFollower(vm.serial_log))
                await follower.wait_heartbeats(2, timeout)
                first = len(follower.log.heartbeats) - 1
            try:
                if mode == "cpr-exec":
                    await cpr_exec.run(ctx)
                else:
                    await transfer.run(ctx, cpr=mode == "cpr-transfer")
            except UpdateError as exc:
                if not exc.completed:
                    raise
                completed_error = exc
            # ---- past the fence: record the new QEMU, then check it
            try:
                _record_success(vm, report, mode, new_qemu)
                journal.end("completed" if completed_error is None else
                            "completed-with-errors",
                            error=None if completed_error is None else completed_error.message)
                tell_end("completed" if completed_error is None else "completed-with-errors",
                         None if completed_error is None else completed_error.message)
            except OSError as exc:  # e.g. a full disk: the journal stays, recover writes
                where = exc.filename or vm.paths.root
                raise UpdateError(f"the new QEMU runs the guest, but {where}: {exc.strerror}; "
                                  f"run `sealvm recover {vm.name}` once it is writable",
                                  rolled_back=False, completed=True) from exc
            report.ram_after = ram_blocks(report.pid_after)
            try:
                report.devices_missing = await _missing_devices(vm)
            except SealvmError as exc:
                raise UpdateError(f"listing the new QEMU's devices: {exc}",
                                  rolled_back=False, completed=True) from exc
            report.total = time.monotonic() - clock.start
            if follower is not None and heartbeat_interval is not None:
                await follower.wait_heartbeats(3, timeout)
                measure_gaps(report, follower.log, first, heartbeat_interval,
                             resumed=clock.ended.get("resume"))
                report.heartbeat_continuous = follower.log.counter_continuous()
                if verify_pass:
                    await follower.wait_full_pass(timeout)
                # the guest's own counter, from the last heartbeat before the
                # update to the end of a pass that began after it
                base = follower.log.heartbeats[first].int("mism")
                now = follower.log.mismatch_counter()
                report.mismatches = max(follower.log.mismatched_words,
                                        -1 if now is None else now - base)
    except UpdateError as exc:
        tell_end(exc.outcome, exc.message)
        raise
    except BaseException as exc:
        tell_end("interrupted" if vm.paths.journal.exists() else "failed", str(exc))
        raise
    finally:
        tell_end("completed")
        if vm.runstate is VmRunstate.UPDATING:
            vm.runstate = VmRunstate.RUNNING if vm.alive() else VmRunstate.STOPPED
    report.phases = clock.phases
    if completed_error is not None:
        raise completed_error
    verify(report)
    log.info("%s: %s done, pause %.3f s (QMP)", vm.name, mode, report.pause_qmp or -1)
    return report


def _record_success(vm: Machine, report: UpdateReport, mode: str, qemu: Path) -> None:
    """The new QEMU is the VM's now: say so in state.json."""
    assert vm.state is not None
    vm.spec = vm.spec.with_qemu(qemu)
    vm.state.spec["qemu"] = str(qemu)
    vm.state.generation += 1
    vm.state.updates.append(
        {"mode": mode, "qemu": str(qemu), "pause_qmp": report.pause_qmp,
         "time": time.time()})
    vm.save_state()


async def _missing_devices(vm: Machine) -> list[str]:
    """Assigned devices of the spec that the (new) QEMU does not have."""
    if not vm.spec.vfio:
        return []
    reply = await vm.execute("qom-list", {"path": "/machine/peripheral"})
    if not isinstance(reply, list):
        raise QMPReplyError("qom-list", f"malformed reply {reply!r}")
    present = {p.get("name") for p in reply if isinstance(p, dict)}
    return [d.id for d in vm.spec.vfio if d.id not in present]


__all__ = [
    "Check",
    "RamBlock",
    "RecoverReport",
    "UpdateReport",
    "abandon",
    "live_update",
    "plan_recovery",
    "recover",
]
