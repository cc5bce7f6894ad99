"""
cpr-transfer, and classic migration: the new QEMU is a second process.

cpr-transfer: the controller starts the new QEMU beside the old one, with a
CPR channel (a listening socket sealvm creates and passes by fd) and
``-S -incoming defer``.  Order is fixed, or it deadlocks: ``migrate`` to the
old QEMU first (it sends fds over the CPR channel; the new QEMU's monitor
only exists after that), then connect to the new monitor and
``migrate-incoming``.  Classic migration copies RAM over the same main
channel, the new QEMU listening first.

The fence: the new QEMU loads the device state and waits (``-S``); only the
controller resumes it.  Before that, any failure rolls back: the new QEMU is
killed (after checking it does not run the guest) and the old one resumes
the guest if it was running.  After it, nothing kills the new QEMU and the
old one is never continued: a later failure is "completed with errors".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient, Runstate

from .. import procfs
from ..confine import give
from ..errors import HostError, LaunchError, QMPReplyError, SealvmError, UpdateError
from ..machine import listen_unix
from ..plan import FdPlan
from ..process import QemuProcess
from .context import SETTLE_AFTER_RESUME, UpdateContext, remove
from .monitor import (
    EVENTS_ON,
    arm,
    disconnect,
    event_or,
    event_time,
    execute,
    incoming,
    migration_error,
    resume,
    settle_outgoing,
    status,
    wait_disconnected,
)

#: Classic migration between two local processes: do not throttle the copy.
MIGRATE_BANDWIDTH = 1 << 40


class _RollBack(Exception):
    """Internal: the new QEMU failed before the fence; the old one takes the
    guest back."""


class _Unsure(Exception):
    """Internal: ``cont`` went to the new QEMU but no answer came back: the
    guest may have run there, so the old QEMU is no way back."""


@dataclass
class _Successor:
    proc: QemuProcess
    qmp_path: Path
    qmp: QMPClient | None = None  # once its monitor answers


async def run(ctx: UpdateContext, *, cpr: bool) -> None:
    """cpr-transfer (*cpr*) or classic migration, through the handover.

    :raise UpdateError: rolled back (before the fence), or completed with
        errors (after it).
    """
    vm, clock, report, journal = ctx.vm, ctx.clock, ctx.report, ctx.journal
    assert vm.state is not None
    paths = vm.paths
    what = "cpr-transfer" if cpr else "migration"
    # A QEMU unlinks the path its QMP socket was bound to when it quits: a
    # successor's socket gets a path of its own, renamed to qmp.sock only
    # after the old QEMU has quit.
    qmp_next = paths.qmp_next(vm.state.generation + 1)
    main = {"channel-type": "main",
            "addr": {"transport": "socket", "type": "unix", "path": str(paths.main_sock)}}
    channels: list[dict[str, Any]] = [main]
    extra = ["-S", "-incoming", "defer"]
    cpr_listener = None
    if cpr:
        cpr_listener = listen_unix(paths.cpr_sock)
        give(paths.cpr_sock, vm.confinement)  # the old QEMU connects as the VM's user
        cpr_in = {"channel-type": "cpr",
                  "addr": {"transport": "socket", "type": "fd",
                           "str": str(cpr_listener.fileno())}}
        channels.append({"channel-type": "cpr",
                         "addr": {"transport": "socket", "type": "unix",
                                  "path": str(paths.cpr_sock)}})
        extra = ["-incoming", json.dumps(cpr_in), *extra]
    journal.record("spawn", qmp=str(qmp_next))
    try:
        proc, argv, fds = vm.spawn(
            vm.spec.with_qemu(ctx.qemu), qmp_next, extra=extra,
            extra_fds=[cpr_listener.fileno()] if cpr_listener else [],
            fds=vm.state.fd_plan() if cpr else None, marker=ctx.marker)
    except (LaunchError, HostError) as exc:
        journal.end("rolled-back", error=str(exc))
        remove(qmp_next, paths.cpr_sock)
        raise UpdateError(f"new QEMU did not start: {exc}", rolled_back=True) from exc
    finally:
        if cpr_listener is not None:
            cpr_listener.close()
    journal.pids["new"] = proc.pid
    journal.record("spawned", pid=proc.pid, start_time=procfs.start_time(proc.pid), argv=argv,
                   fds=fds.to_state())
    clock.mark("start")
    succ = _Successor(proc, qmp_next)
    fenced = False
    try:
        try:
            await _switch(ctx, succ, channels, cpr=cpr)
        except (_RollBack, asyncio.CancelledError) as exc:
            # last look before killing it: does the new QEMU run the guest?
            if succ.qmp is None or not await _runs_guest(succ.qmp):
                raise
            vm.logger.warning("new QEMU runs the guest despite %r: going forward", exc)
            journal.record("resumed", running=True)
        except _Unsure as exc:
            if succ.qmp is None or not proc.alive():
                journal.end("lost", error=str(exc))
                raise UpdateError(f"{what} to {ctx.qemu}: {exc}; the new QEMU died after "
                                  "it was told to resume the guest: the guest is lost",
                                  rolled_back=False) from exc
            vm.logger.warning("%s: going forward with the new QEMU", exc)
            with contextlib.suppress(SealvmError):
                if not await _runs_guest(succ.qmp):
                    await execute(succ.qmp, "cont")
            journal.record("resumed", running=True)
        fenced = True
        # ---- the fence: from here on, only forward
        assert succ.qmp is not None
        await _hand_over(ctx, proc, succ.qmp, qmp_next, argv, fds)
    except _RollBack as exc:
        rolled_back = await _roll_back(ctx, proc, succ.qmp)
        if rolled_back:  # else the journal stays: recover finishes the job
            journal.end("rolled-back", error=str(exc))
        raise UpdateError(f"{what} to {ctx.qemu} failed: {exc}"
                          + ("" if rolled_back else f"; run `sealvm recover {vm.name}`"),
                          rolled_back=rolled_back) from exc
    except asyncio.CancelledError:
        if not fenced and await _roll_back(ctx, proc, succ.qmp):
            journal.end("rolled-back", error="cancelled")
        raise
    finally:
        if not fenced:
            await disconnect(succ.qmp)
            await proc.kill()
            proc.close()
            remove(qmp_next)
        remove(paths.cpr_sock, paths.main_sock)
    report.pid_after = proc.pid


async def _switch(ctx: UpdateContext, succ: _Successor, channels: list[dict[str, Any]], *,
                  cpr: bool) -> None:
    """Migrate to the new QEMU and resume the guest there: the fence.

    :raise _RollBack: when anything fails before the guest runs on the new QEMU.
    """
    vm, clock, report, journal = ctx.vm, ctx.clock, ctx.report, ctx.journal
    proc = succ.proc
    main = channels[0]
    try:
        await vm.execute("migrate-set-capabilities", EVENTS_ON)
        if cpr:
            await vm.execute("migrate-set-parameters", {"mode": "cpr-transfer"})
        else:
            await vm.execute("migrate-set-parameters",
                             {"mode": "normal", "max-bandwidth": MIGRATE_BANDWIDTH})
    except SealvmError as exc:
        raise _RollBack(f"old QEMU: {exc}") from exc
    old_events = EventListener(("STOP", "MIGRATION"))
    with vm.qmp.listen(old_events):
        journal.record("migrate")
        if cpr:
            # Old first: the new monitor exists only once CPR state arrived.
            try:
                await vm.execute("migrate", {"channels": channels})
                journal.fault("migrate-sent")
            except SealvmError as exc:  # e.g. the new QEMU is already gone
                if await proc.wait_exit(0.5):
                    raise _RollBack(f"new QEMU did not come up (it exited, status "
                                    f"{proc.exitcode}):\n{vm.log_tail(5)}") from exc
                raise _RollBack(f"old QEMU: {exc}") from exc
        try:
            new = succ.qmp = await vm.open_qmp(succ.qmp_path, proc, timeout=ctx.timeout)
        except LaunchError as exc:
            raise _RollBack(f"new QEMU did not come up: {exc}") from exc
        clock.mark("cpr-state" if cpr else "start-monitor")
        stop_ts: float | None = None

        old_qmp = vm.qmp
        gone = asyncio.ensure_future(wait_disconnected(old_qmp))

        async def old_side() -> None:
            """Fail fast when the old QEMU reports failure.  If its connection
            goes, the new QEMU's own state decides (it loaded, or not)."""
            nonlocal stop_ts
            while True:
                got = await event_or(old_events, gone, ctx.deadline)
                if got is None:
                    vm.logger.warning("old QEMU's monitor connection went during the update")
                    return
                ev: dict[str, Any] = got
                if ev["event"] == "STOP":
                    stop_ts = event_time(ev)
                elif ev["data"]["status"] in ("failed", "cancelled"):
                    raise _RollBack(f"old QEMU: migration {ev['data']['status']}: "
                                    f"{await migration_error(old_qmp)}")
                elif ev["data"]["status"] == "completed":
                    return

        old_task = asyncio.ensure_future(old_side())

        async def start_copy() -> None:
            # classic: the new QEMU listens first, then the old one sends
            await vm.execute("migrate", {"channels": channels})

        try:
            await incoming(new, {"channels": [main]}, deadline=ctx.deadline, proc=proc,
                           log_tail=lambda: vm.log_tail(5),
                           then=None if cpr else start_copy)
            async with asyncio.timeout_at(ctx.deadline):
                await old_task
        except UpdateError as exc:
            raise _RollBack(exc.message) from exc
        except TimeoutError:
            raise _RollBack("old QEMU did not complete the migration in time") from None
        except SealvmError as exc:
            raise _RollBack(str(exc)) from exc
        finally:
            old_task.cancel()
            gone.cancel()
        journal.record("loaded")
        clock.mark("load")
        if ctx.was_running:
            if not proc.alive():
                raise _RollBack("new QEMU died after loading the device state")
            journal.record("resuming")
            try:
                resume_ts = await resume(new, deadline=ctx.deadline)
                report.resumed_at = resume_ts
            except QMPReplyError as exc:  # refused: the guest did not run there
                raise _RollBack(f"new QEMU did not resume the guest: {exc}") from exc
            except (SealvmError, TimeoutError) as exc:  # it may have run there
                raise _Unsure(f"new QEMU did not confirm it resumed the guest: "
                              f"{exc}") from exc
            if stop_ts is not None:
                report.pause_qmp = resume_ts - stop_ts
            clock.mark("resume")
        journal.record("resumed", running=ctx.was_running)
        if ctx.was_running:
            await asyncio.sleep(SETTLE_AFTER_RESUME)
            clock.mark("settle")


async def _hand_over(ctx: UpdateContext, proc: QemuProcess, new: QMPClient,
                     qmp_next: Path, argv: list[str], fds: FdPlan) -> None:
    """After the fence: the old QEMU goes, the new one becomes the VM's.

    :raise UpdateError: (completed with errors) when a step fails; the new
        QEMU keeps the guest whatever happens.
    """
    vm, clock, journal = ctx.vm, ctx.clock, ctx.journal
    problems = []
    try:
        await arm(new, None)
    except SealvmError as exc:
        problems.append(f"re-arming the new QEMU: {exc}")
    # The old QEMU handed everything over: let it go, then take over.
    old_proc = vm.process
    assert old_proc is not None
    try:
        await vm.execute("quit")
    except SealvmError:  # no monitor: it has nothing left to save, stop it
        await old_proc.kill(timeout=ctx.timeout)
    if not await old_proc.wait_exit(ctx.timeout):
        await old_proc.kill()
    journal.record("old-quit")
    os.replace(qmp_next, vm.paths.qmp)
    await vm.adopt(proc, new, argv, fds)
    clock.mark("handover")
    if problems:
        raise UpdateError("; ".join(problems), rolled_back=False, completed=True)


async def _runs_guest(new: QMPClient) -> bool:
    try:
        async with asyncio.timeout(2.0):
            return await status(new) == "running"
    except (SealvmError, TimeoutError):
        return False


async def _roll_back(ctx: UpdateContext, new_proc: QemuProcess, new: QMPClient | None) -> bool:
    """Kill the new QEMU; the old one takes the guest back (resumed if it was
    running).  True when the guest is as it was before the update."""
    vm = ctx.vm
    await disconnect(new)
    await new_proc.kill()
    try:
        if vm.qmp.runstate is not Runstate.RUNNING:  # the connection went: reconnect
            await vm.connect(timeout=ctx.timeout)
        await settle_outgoing(vm.qmp, deadline=asyncio.get_running_loop().time() + ctx.timeout,
                              cancel=True)
        guest = await status(vm.qmp)
        if ctx.was_running and guest != "running":
            vm.logger.warning("rolling back: guest is %s on the old QEMU, resuming", guest)
            await execute(vm.qmp, "cont")
            guest = await status(vm.qmp)
        return guest == "running" if ctx.was_running else guest in ("paused", "postmigrate")
    except (SealvmError, TimeoutError) as exc:
        vm.logger.error("rollback failed: %s (run `sealvm recover %s`)", exc, vm.name)
        return False
