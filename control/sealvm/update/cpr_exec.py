"""
cpr-exec: the old QEMU stops the guest, saves device state to a file and
exec()s the new binary in the same process; guest RAM (sealed memfds), VFIO
fds and the QMP listening socket are inherited.  The new image starts with
``-S -incoming defer``; the controller reconnects to the inherited socket,
sends ``migrate-incoming``, and resumes the guest itself once it is loaded.

Before exec, a failure leaves the guest with the old image (QEMU resumes it
itself): rolled back.  After exec there is no old image to go back to: the
journal records each step and `recover` finishes what a dead controller
left (the device-state file stays until the new image has loaded it).  A new
image that dies during load takes the guest with it: preflight is what makes
that unlikely (docs/crash-safety.md).
"""

from __future__ import annotations

import asyncio
from typing import Any

from qemu.qmp import EventListener

from ..errors import LaunchError, SealvmError, UpdateError
from ..plan import incoming_argv
from .context import UpdateContext, remove
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


async def run(ctx: UpdateContext) -> None:
    """The update, up to and including the fence (the guest runs, or stays
    paused, on the new image); the caller finishes (state, journal end).

    :raise UpdateError: rolled back (exec did not happen) or not resumed.
    """
    vm, clock, report, journal = ctx.vm, ctx.clock, ctx.report, ctx.journal
    assert vm.state is not None and vm.process is not None
    new_argv = incoming_argv(vm.argv, ctx.qemu, marker=ctx.marker)
    uri = f"file:{vm.paths.cpr_state}"
    await vm.execute("migrate-set-capabilities", EVENTS_ON)
    await vm.execute("migrate-set-parameters",
                     {"mode": "cpr-exec", "cpr-exec-command": new_argv})
    journal.record("migrate", argv=new_argv, uri=uri)
    old = vm.qmp
    stop_ts: float | None = None
    listener = EventListener(("STOP", "MIGRATION"))
    with old.listen(listener):
        dropped = asyncio.ensure_future(wait_disconnected(old))
        try:
            await vm.execute("migrate", {"uri": uri})
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
                    await _exec_failed(ctx, f"cpr-exec to {ctx.qemu} failed: {why}")
        except TimeoutError:
            await _exec_failed(ctx, "old QEMU neither exec'd nor failed in time")
        finally:
            dropped.cancel()
    if "save" not in clock.phases:
        clock.mark("save")
    try:
        await vm.connect(timeout=ctx.timeout)
    except LaunchError as exc:
        alive = vm.alive()
        if not alive:
            journal.end("lost", error=str(exc))
        raise UpdateError(f"new QEMU did not come up after exec: {exc}"
                          + ("" if not alive else
                             f"; `sealvm recover {vm.name}` finishes the update"),
                          rolled_back=False) from exc
    journal.record("exec")
    clock.mark("exec")
    report.pid_after = vm.process.pid
    try:
        await incoming(vm.qmp, {"uri": uri}, deadline=ctx.deadline, proc=vm.process,
                       log_tail=lambda: vm.log_tail(5))
    except UpdateError as exc:
        if not vm.alive():
            journal.end("lost", error=exc.message)
        raise
    journal.record("loaded")
    clock.mark("load")
    remove(vm.paths.cpr_state)
    if ctx.was_running:
        try:
            resume_ts = await resume(vm.qmp, deadline=ctx.deadline)
        except (SealvmError, TimeoutError) as exc:
            raise UpdateError(f"new QEMU loaded the guest but did not resume it: {exc}; "
                              f"`sealvm recover {vm.name}` resumes it",
                              rolled_back=False) from exc
        if stop_ts is not None:
            report.pause_qmp = resume_ts - stop_ts
        clock.mark("resume")
    journal.record("resumed", running=ctx.was_running)
    vm.state.argv = new_argv
    # Parameters reset at exec: re-arm them for the next update.
    try:
        await arm(vm.qmp, new_argv)
    except SealvmError as exc:
        raise UpdateError(f"re-arming the migration parameters: {exc}",
                          rolled_back=False, completed=True) from exc


async def _exec_failed(ctx: UpdateContext, message: str) -> None:
    """The exec did not happen: the old image has the guest (QEMU resumed it
    if it was running)."""
    vm = ctx.vm
    try:
        guest = await status(vm.qmp)
    except SealvmError:
        guest = "unknown"
    back = guest == ("running" if ctx.was_running else "paused")
    if back:
        ctx.journal.end("rolled-back", error=message)
        remove(vm.paths.cpr_state)
    else:  # the journal stays: recover resumes the old image
        message += f" (guest {guest}; `sealvm recover {vm.name}` takes it back)"
    raise UpdateError(message, rolled_back=back)
