"""
cpr-exec: the old QEMU stops the guest, saves device state to a file and
exec()s the new binary in the same process; guest RAM (sealed memfds), VFIO
fds and the QMP listening socket are inherited.  The new image starts with
``-S -incoming defer``; the controller reconnects to the inherited socket,
sends ``migrate-incoming``, and resumes the guest itself once it is loaded.

Before exec, a failure leaves the guest with the old image (QEMU resumes it
itself): rolled back.  After exec, the old image is gone, but not the way
back (`wayback`): QEMU exec()s a trampoline that hands every preserved fd to
a keeper, then the new QEMU.  If the new QEMU dies, exits or hangs before
it has loaded the device state and been resumed, it is killed and the
keeper starts the previous QEMU on the same memory and CPR state (a new
pid): rolled back.  The journal records each step, and `recover` does the
same for a controller that died (the device-state file stays until a QEMU
has loaded it).
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from qemu.qmp import EventListener

from .. import procfs
from ..confine import strip_sandbox
from ..errors import LaunchError, QMPReplyError, SealvmError, StateError, UpdateError
from ..machine import Machine
from ..plan import incoming_argv
from ..process import QemuProcess
from ..trampoline import trampoline
from .context import SETTLE_AFTER_RESUME, UpdateContext, remove
from .journal import Journal
from .monitor import (
    EVENTS_ON,
    arm,
    event_or,
    event_time,
    incoming,
    migration_error,
    resume,
    status,
    wait_disconnected,
)
from .warm import warm
from .wayback import Keeper


async def run(ctx: UpdateContext) -> None:
    """The update, up to and including the fence (the guest runs, or stays
    paused, on the new image); the caller finishes (state, journal end).

    :raise UpdateError: rolled back (exec did not happen) or not resumed.
    """
    vm, clock, report, journal = ctx.vm, ctx.clock, ctx.report, ctx.journal
    assert vm.state is not None and vm.process is not None
    new_argv = incoming_argv(vm.argv, ctx.qemu, marker=ctx.marker)
    uri = f"file:{vm.paths.cpr_state}"
    keeper = None
    try:
        # the new image runs under the filter the old one loaded (the same
        # policy): another -sandbox would stack one more filter per update
        command = strip_sandbox(new_argv)
        if ctx.way_back:
            command = [str(trampoline()), str(vm.paths.keeper_sock), "--", *command]
            keeper = await Keeper.start(vm.paths, owner=vm.confinement)
        await vm.execute("migrate-set-capabilities", EVENTS_ON)
        await vm.execute("migrate-set-parameters",
                         {"mode": "cpr-exec", "cpr-exec-command": command})
    except SealvmError as exc:  # nothing was touched
        if keeper is not None:
            await keeper.release()
        journal.end("rolled-back", error=str(exc))
        raise UpdateError(f"cpr-exec not started: {exc}", rolled_back=True) from exc
    if ctx.warm_pages > 0:
        vm.logger.info("%s", await warm(vm.process.pid, ctx.warm_pages))
        clock.mark("warm")
    journal.record("migrate", argv=new_argv, uri=uri, command=command,
                   keeper=keeper.record() if keeper is not None else {})
    old = vm.qmp
    stop_ts: float | None = None
    listener = EventListener(("STOP", "MIGRATION"))
    with old.listen(listener):
        dropped = asyncio.ensure_future(wait_disconnected(old))
        try:
            try:
                await vm.execute("migrate", {"uri": uri})
            except QMPReplyError as exc:
                # refused before anything stopped or was saved (e.g. a QEMU
                # that runs as another user cannot create the state file)
                if keeper is not None:
                    await keeper.release()
                journal.end("rolled-back", error=str(exc))
                raise UpdateError(f"cpr-exec not started: the old QEMU refused "
                                  f"migrate: {exc}", rolled_back=True) from exc
            journal.fault("migrate-sent")
            # STOP, MIGRATION completed, then exec drops the connection.
            # Events in flight at exec may be lost: the drop itself says the
            # exec happened.  If execvp fails, QEMU reports MIGRATION failed
            # and resumes the guest.
            pending: list[dict[str, Any]] = []
            while True:
                if not pending:
                    ev = None if dropped.done() else await event_or(listener, dropped,
                                                                     ctx.deadline)
                    if ev is None:
                        pending = [dict(e) for e in listener.clear()]
                        if not pending:
                            break
                        continue
                else:
                    ev = pending.pop(0)
                if ev["event"] == "STOP":
                    stop_ts = event_time(ev)
                    clock.mark("stop")
                elif ev["data"]["status"] == "completed":
                    clock.mark("save")
                elif ev["data"]["status"] in ("failed", "cancelled"):
                    why = await migration_error(old)
                    await _exec_failed(ctx, keeper, f"cpr-exec to {ctx.qemu} failed: {why}")
        except TimeoutError:
            await _exec_failed(ctx, keeper, "old QEMU neither exec'd nor failed in time")
        finally:
            dropped.cancel()
    if "save" not in clock.phases:
        clock.mark("save")
    journal.pids["new"] = vm.process.pid  # the same process, a new image
    try:
        await vm.connect(timeout=ctx.timeout)
        journal.record("exec")
        clock.mark("exec")
        report.pid_after = vm.process.pid
        await incoming(vm.qmp, {"uri": uri}, deadline=ctx.deadline, proc=vm.process,
                       log_tail=lambda: vm.log_tail(5))
        journal.record("loaded")
        clock.mark("load")
        if ctx.was_running:
            if not vm.alive():
                raise LaunchError("new QEMU died after loading the device state")
            journal.record("resuming")
            resume_ts = await resume(vm.qmp, deadline=ctx.deadline)
            report.resumed_at = resume_ts
            if stop_ts is not None:
                report.pause_qmp = resume_ts - stop_ts
            clock.mark("resume")
    except (LaunchError, UpdateError, QMPReplyError) as exc:
        # the new image never ran the guest (-S; or it refused cont)
        await _way_back(ctx, keeper, f"new QEMU failed after exec: {exc}", exc)
    except (StateError, TimeoutError) as exc:  # cont sent, the reply lost
        raise UpdateError(f"new QEMU did not confirm it resumed the guest: {exc}; "
                          f"`sealvm recover {vm.name}` finishes the update",
                          rolled_back=False) from exc
    journal.record("resumed", running=ctx.was_running)
    if ctx.was_running:
        await asyncio.sleep(SETTLE_AFTER_RESUME)
        clock.mark("settle")
    remove(vm.paths.cpr_state)
    vm.state.argv = new_argv
    if keeper is not None:
        await keeper.release()
    # Parameters reset at exec: re-arm them for the next update.
    try:
        await arm(vm.qmp, new_argv)
    except SealvmError as exc:
        raise UpdateError(f"re-arming the migration parameters: {exc}",
                          rolled_back=False, completed=True) from exc


async def _way_back(ctx: UpdateContext, keeper: Keeper | None, why: str,
                    exc: Exception) -> None:
    pid = await fall_back(ctx.vm, ctx.journal, keeper, why=why, timeout=ctx.timeout)
    ctx.report.pid_after = pid
    ctx.journal.end("rolled-back", error=why, fallback_pid=pid)
    raise UpdateError(f"{why}\nthe previous QEMU took the guest back (pid {pid})",
                      rolled_back=True) from exc


async def fall_back(vm: Machine, journal: Journal, keeper: Keeper | None, *, why: str,
                    timeout: float) -> int:
    """The new image failed before it ran the guest: kill it, start the
    previous QEMU through the keeper, load the device state, resume the guest
    if it was running, release the keeper.  Returns the new pid.

    :raise UpdateError: (not resumed) when there is no way back or it fails.
    """
    assert vm.state is not None
    start = journal.start
    vm.logger.warning("%s: falling back to the previous QEMU", why)
    if keeper is None or not keeper.alive() or not await keeper.held():
        raise UpdateError(f"{why}; no way back (the keeper holds nothing)",
                          rolled_back=False)
    journal.record("fallback", why=why)
    await vm.detach()
    if procfs.same_process(start["old_pid"], start["old_start_time"]):
        gone = QemuProcess(start["old_pid"], logger=vm.logger)
        gone.send_signal(signal.SIGKILL)  # failed (maybe stopped): nothing to save
        await gone.wait_exit(timeout)
        gone.close()
    deadline = asyncio.get_running_loop().time() + timeout  # a fresh one: it starts now
    argv = incoming_argv(start["old_argv"], marker=f"{start['marker']}-back")
    try:
        # through the jail: the previous QEMU runs confined as before
        pid = await keeper.fall_back(vm.confined_argv(argv), vm.paths.qemu_log)
        vm.process = QemuProcess(pid, logger=vm.logger)
        vm.state.pid = pid
        vm.state.start_time = procfs.start_time(pid) or 0
        vm.state.argv = argv
        vm.save_state()
        await vm.connect(timeout=timeout)
        await incoming(vm.qmp, {"uri": journal.get("migrate")["uri"]}, deadline=deadline,
                       proc=vm.process, log_tail=lambda: vm.log_tail(5))
        journal.record("loaded", fallback=True)
        if start["was_running"]:
            await resume(vm.qmp, deadline=deadline)
        journal.record("resumed", running=start["was_running"], fallback=True)
        remove(vm.paths.cpr_state)
        await arm(vm.qmp, argv)
    except (SealvmError, TimeoutError) as exc:
        raise UpdateError(f"{why}; the way back failed too: {exc}",
                          rolled_back=False) from exc
    await keeper.release()
    return pid


async def _exec_failed(ctx: UpdateContext, keeper: Keeper | None, message: str) -> None:
    """The exec did not happen: the old image has the guest (QEMU resumed it
    if it was running)."""
    vm = ctx.vm
    try:
        guest = await status(vm.qmp)
    except SealvmError:
        guest = "unknown"
    back = guest == ("running" if ctx.was_running else "paused")
    if back:
        if keeper is not None:
            await keeper.release()
        ctx.journal.end("rolled-back", error=message)
        remove(vm.paths.cpr_state)
    else:  # the journal stays: recover resumes the old image
        message += f" (guest {guest}; `sealvm recover {vm.name}` takes it back)"
    raise UpdateError(message, rolled_back=back)
