"""
Live update: replace the QEMU under a running guest, keeping its RAM.

Two modes, one call (`live_update`):

cpr-exec
    Old QEMU stops the guest, saves device state to a file, and exec()s the
    new binary in the same process; guest RAM (sealed memfds), VFIO fds and
    the QMP listening socket are inherited.  The new QEMU starts with
    ``-incoming defer``; the controller reconnects to the inherited socket,
    issues ``migrate-incoming`` and waits for RESUME.  No way back once the
    exec happened: preflight is what makes it safe.

cpr-transfer
    The controller starts the new QEMU beside the old one, with a CPR
    channel (a listening socket sealvm creates and passes by fd) and
    ``-incoming defer``.  Order is fixed, or it deadlocks: ``migrate`` to
    the old QEMU first (it sends fds over the CPR channel; the new QEMU's
    monitor only exists after that), then connect to the new monitor and
    ``migrate-incoming``.  If the new QEMU fails to start or to load, the
    old QEMU resumes the guest (``rolled_back=True``).

Either way: listen for events before acting, never sleep-poll, re-arm the
migration parameters on the new QEMU, verify pid, RAM inodes and seals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError, Runstate

from . import procfs
from .console import ConsoleFollower
from .errors import LaunchError, PreflightError, QMPReplyError, SealvmError, UpdateError
from .machine import Machine, listen_unix
from .machine import Runstate as VmRunstate
from .plan import incoming_argv
from .preflight import MODES, Check, run_preflight
from .process import QemuProcess

log = logging.getLogger("sealvm.update")

EVENTS_ON: dict[str, object] = {"capabilities": [{"capability": "events", "state": True}]}
#: Classic migration between two local processes: do not throttle the copy.
MIGRATE_BANDWIDTH = 1 << 40


@dataclass(frozen=True)
class RamBlock:
    name: str
    inode: int
    size: int
    seals: list[str]

    @classmethod
    def of(cls, m: procfs.Memfd) -> RamBlock:
        return cls(m.name, m.inode, m.size, m.seal_names)


@dataclass
class UpdateReport:
    """What one live update did and how long the guest was paused."""

    mode: str
    qemu_before: str
    qemu_after: str
    pid_before: int
    pid_after: int
    ram_before: list[RamBlock]
    ram_after: list[RamBlock]
    #: STOP -> RESUME, from QEMU's QMP event timestamps (seconds).
    pause_qmp: float | None = None
    #: largest heartbeat gap minus the heartbeat interval (seconds).
    pause_guest: float | None = None
    heartbeat_continuous: bool | None = None
    mismatches: int | None = None
    #: phase -> seconds, in order (preflight, start, stop, save, exec, load, ...)
    phases: dict[str, float] = field(default_factory=dict)
    total: float = 0.0
    checks: list[str] = field(default_factory=list)
    #: assigned devices (spec ids) the new QEMU does not have
    devices_missing: list[str] = field(default_factory=list)

    @property
    def ram_inode_unchanged(self) -> bool:
        before = {b.name: b.inode for b in self.ram_before}
        after = {b.name: b.inode for b in self.ram_after}
        return bool(before) and before == after

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ram_inode_unchanged"] = self.ram_inode_unchanged
        return d


Progress = Callable[[str, float], None]


class _Clock:
    """Phase timings on the monotonic clock, reported as they end."""

    def __init__(self, progress: Progress | None) -> None:
        self.start = self.last = time.monotonic()
        self.phases: dict[str, float] = {}
        self.progress = progress

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = now - self.last
        self.last = now
        if self.progress is not None:
            self.progress(phase, self.phases[phase])


def _event_time(event: dict[str, Any]) -> float:
    ts = event.get("timestamp", {})
    return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6


def _ram_blocks(pid: int) -> list[RamBlock]:
    return [RamBlock.of(m) for m in procfs.memfds(pid)]


async def live_update(
    vm: Machine,
    *,
    qemu: Path | None = None,
    mode: str = "cpr-exec",
    heartbeat_interval: float | None = None,
    timeout: float = 60.0,
    progress: Progress | None = None,
    require_sealed: bool = True,
) -> UpdateReport:
    """Replace the QEMU running *vm* with *qemu* (default: the same binary).

    With *heartbeat_interval* (seconds), the guest is the sealvm test guest:
    its serial log is followed and the pause it saw is measured.
    *progress(phase, seconds)* is called as each phase ends.
    *require_sealed* False lets a stock QEMU (unsealed aux RAM) be updated,
    for comparisons; sealvm's own QEMU always seals.

    :raise PreflightError: refused before the guest paused; VM untouched.
    :raise UpdateError: failed after the update started; ``rolled_back``
        says whether the old QEMU resumed the guest.
    """
    if mode not in MODES:
        raise PreflightError([f"mode {mode!r} is not one of {', '.join(MODES)}"])
    if vm.runstate is not VmRunstate.RUNNING or vm.pid is None or vm.state is None:
        raise PreflightError([f"VM {vm.name} is {vm.runstate.value}, not running"])
    new_qemu = (qemu or Path(vm.argv[0])).resolve()
    clock = _Clock(progress)
    checks = await run_preflight(vm, mode=mode, qemu=new_qemu, require_sealed=require_sealed)
    pid = vm.pid
    report = UpdateReport(
        mode=mode,
        qemu_before=procfs.exe_of(pid),
        qemu_after=str(new_qemu),
        pid_before=pid,
        pid_after=-1,
        ram_before=_ram_blocks(pid),
        ram_after=[],
        checks=[str(c) for c in checks],
    )
    clock.mark("preflight")
    vm.runstate = VmRunstate.UPDATING
    try:
        async with contextlib.AsyncExitStack() as stack:
            follower = None
            first = 0
            if heartbeat_interval is not None:
                follower = await stack.enter_async_context(ConsoleFollower(vm.paths.serial))
                await follower.wait_heartbeats(2, timeout)
                first = len(follower.log.heartbeats) - 1
            if mode == "cpr-exec":
                await _cpr_exec(vm, new_qemu, clock, report, timeout)
            else:
                await _to_new_process(vm, new_qemu, clock, report, timeout,
                                      cpr=mode == "cpr-transfer")
            report.ram_after = _ram_blocks(report.pid_after)
            report.devices_missing = await _missing_devices(vm)
            if follower is not None and heartbeat_interval is not None:
                await follower.wait_heartbeats(3, timeout)
                gap = follower.log.largest_gap(first)
                report.pause_guest = max(0.0, gap - heartbeat_interval)
                report.heartbeat_continuous = follower.log.counter_continuous()
                report.mismatches = follower.log.mismatched_words
    finally:
        if vm.runstate is VmRunstate.UPDATING:
            vm.runstate = VmRunstate.RUNNING if vm.alive() else VmRunstate.STOPPED
        with contextlib.suppress(FileNotFoundError):
            vm.paths.cpr_state.unlink()
    report.total = time.monotonic() - clock.start
    report.phases = clock.phases
    vm.spec = vm.spec.with_qemu(new_qemu)
    vm.state.spec["qemu"] = str(new_qemu)
    vm.state.generation += 1
    vm.state.updates.append(
        {"mode": mode, "qemu": report.qemu_after, "pause_qmp": report.pause_qmp,
         "total": report.total, "time": time.time()}
    )
    vm.save_state()
    _verify(report)
    log.info("%s: %s done, pause %.3f s (QMP)", vm.name, mode, report.pause_qmp or -1)
    return report


# ---------------------------------------------------------------- cpr-exec


async def _cpr_exec(vm: Machine, qemu: Path, clock: _Clock, report: UpdateReport,
                    timeout: float) -> None:
    assert vm.state is not None and vm.process is not None
    new_argv = incoming_argv(vm.argv, qemu)
    uri = f"file:{vm.paths.cpr_state}"
    await vm.execute("migrate-set-capabilities", EVENTS_ON)
    await vm.execute("migrate-set-parameters",
                     {"mode": "cpr-exec", "cpr-exec-command": new_argv})
    deadline = asyncio.get_running_loop().time() + timeout
    old = vm.qmp
    stop_ts: float | None = None
    listener = EventListener(("STOP", "MIGRATION"))
    with old.listen(listener):
        dropped = asyncio.ensure_future(_wait_disconnected(old))
        try:
            await vm.execute("migrate", {"uri": uri})
            # STOP, MIGRATION completed, then exec drops the connection.
            # Events in flight at exec may be lost: the drop itself says the
            # exec happened.  If execvp fails, QEMU reports MIGRATION failed
            # and resumes the guest.
            pending: list[dict[str, Any]] = []
            while True:
                if not pending:
                    ev = None if dropped.done() else await _event_or(listener, dropped, deadline)
                    if ev is None:
                        # dropped: what was read before the drop is still queued
                        pending = [dict(e) for e in listener.clear()]
                        if not pending:
                            break
                        continue
                else:
                    ev = pending.pop(0)
                if ev["event"] == "STOP":
                    stop_ts = _event_time(ev)
                    clock.mark("stop")
                elif ev["data"]["status"] == "completed":
                    clock.mark("save")
                elif ev["data"]["status"] in ("failed", "cancelled"):
                    raise UpdateError(f"cpr-exec to {qemu} failed: {await _migration_error(vm)}",
                                      rolled_back=await _running(vm))
        except TimeoutError:
            raise UpdateError("old QEMU neither exec'd nor failed in time",
                              rolled_back=await _running(vm)) from None
        finally:
            dropped.cancel()
    if "save" not in clock.phases:
        clock.mark("save")
    try:
        await vm.connect(timeout=timeout)
    except LaunchError as exc:
        raise UpdateError(f"new QEMU did not come up after exec: {exc}",
                          rolled_back=False) from exc
    clock.mark("exec")
    report.pid_after = vm.process.pid if vm.alive() else -1
    resume_ts = await _incoming(vm, vm.qmp, {"uri": uri}, clock, deadline, vm.process)
    if stop_ts is not None:
        report.pause_qmp = resume_ts - stop_ts
    # Parameters reset at exec: re-arm them for the next update.
    await _arm(vm.qmp, new_argv)
    vm.state.argv = new_argv


# ------------------------------------- cpr-transfer, and classic migration


async def _to_new_process(vm: Machine, qemu: Path, clock: _Clock, report: UpdateReport,
                          timeout: float, *, cpr: bool) -> None:
    """cpr-transfer (*cpr*), or classic live migration to a new local QEMU."""
    assert vm.state is not None
    paths = vm.paths
    what = "cpr-transfer" if cpr else "migration"
    deadline = asyncio.get_running_loop().time() + timeout
    # A QEMU unlinks the path its QMP socket was bound to when it quits: a
    # successor's socket gets a path of its own, renamed to qmp.sock only
    # after the old QEMU has quit.
    qmp_next = paths.qmp_next(vm.state.generation + 1)
    main = {"channel-type": "main",
            "addr": {"transport": "socket", "type": "unix", "path": str(paths.main_sock)}}
    channels: list[dict[str, Any]] = [main]
    extra = ["-incoming", "defer"]
    cpr_listener = None
    if cpr:
        cpr_listener = listen_unix(paths.cpr_sock)
        cpr_in = {"channel-type": "cpr",
                  "addr": {"transport": "socket", "type": "fd",
                           "str": str(cpr_listener.fileno())}}
        channels.append({"channel-type": "cpr",
                         "addr": {"transport": "socket", "type": "unix",
                                  "path": str(paths.cpr_sock)}})
        extra = ["-incoming", json.dumps(cpr_in), *extra]
    try:
        proc, argv, fds = vm.spawn(
            vm.spec.with_qemu(qemu), qmp_next, extra=extra,
            extra_fds=[cpr_listener.fileno()] if cpr_listener else [],
            fds=vm.state.fd_plan() if cpr else None)
    except LaunchError as exc:
        raise UpdateError(f"new QEMU did not start: {exc}", rolled_back=True) from exc
    finally:
        if cpr_listener is not None:
            cpr_listener.close()
    clock.mark("start")
    new: QMPClient | None = None
    adopted = False
    try:
        await vm.execute("migrate-set-capabilities", EVENTS_ON)
        if cpr:
            await vm.execute("migrate-set-parameters", {"mode": "cpr-transfer"})
        else:
            await vm.execute("migrate-set-parameters",
                             {"mode": "normal", "max-bandwidth": MIGRATE_BANDWIDTH})
        old_events = EventListener(("STOP", "MIGRATION"))
        with vm.qmp.listen(old_events):
            if cpr:
                # Old first: the new monitor exists only once CPR state arrived.
                try:
                    await vm.execute("migrate", {"channels": channels})
                except QMPReplyError as exc:  # e.g. the new QEMU is already gone
                    raise _RollBack(f"old QEMU: {exc}") from exc
            try:
                new = await vm.open_qmp(qmp_next, proc, timeout=timeout)
            except LaunchError as exc:
                raise _RollBack(f"new QEMU did not come up: {exc}") from exc
            clock.mark("cpr-state" if cpr else "start-monitor")
            stop_ts: float | None = None

            async def old_side() -> None:
                nonlocal stop_ts
                while True:
                    ev: dict[str, Any] = dict(await old_events.get())
                    if ev["event"] == "STOP":
                        stop_ts = _event_time(ev)
                    elif ev["data"]["status"] in ("failed", "cancelled"):
                        raise _RollBack(f"old QEMU: migration {ev['data']['status']}: "
                                        f"{await _migration_error(vm)}")
                    elif ev["data"]["status"] == "completed":
                        return

            old_task = asyncio.ensure_future(old_side())
            async def start_copy() -> None:
                # classic: the new QEMU listens first, then the old one sends
                await vm.execute("migrate", {"channels": channels})

            try:
                resume_ts = await _incoming(vm, new, {"channels": [main]}, clock, deadline, proc,
                                            then=None if cpr else start_copy)
                async with asyncio.timeout_at(deadline):
                    await old_task
            except UpdateError as exc:
                raise _RollBack(exc.message) from exc
            finally:
                old_task.cancel()
        if stop_ts is not None:
            report.pause_qmp = resume_ts - stop_ts
        await _arm(new, None)
        # The old QEMU handed everything over: let it go, then take over.
        old_proc = vm.process
        with contextlib.suppress(QMPError, OSError, EOFError, SealvmError):
            await vm.execute("quit")
        assert old_proc is not None
        if not await old_proc.wait_exit(timeout):
            await old_proc.kill()
        os.replace(qmp_next, paths.qmp)
        await vm.adopt(proc, new, argv, fds)
        adopted = True
        clock.mark("handover")
        report.pid_after = proc.pid
    except _RollBack as exc:
        rolled_back = await _roll_back(vm, proc, new)
        raise UpdateError(f"{what} to {qemu} failed: {exc}",
                          rolled_back=rolled_back) from exc
    finally:
        if not adopted:
            if new is not None:
                with contextlib.suppress(QMPError, OSError, EOFError):
                    await new.disconnect()
            await proc.kill()
            proc.close()
        for p in (qmp_next, paths.cpr_sock, paths.main_sock):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


class _RollBack(Exception):
    """Internal: the new QEMU failed; the old one must take the guest back."""


async def _roll_back(vm: Machine, new_proc: QemuProcess, new: QMPClient | None) -> bool:
    """Kill the new QEMU, resume the guest on the old one; True if running."""
    if new is not None:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await new.disconnect()
    await new_proc.kill()
    try:
        status = await vm.status()
        if status != "running":
            vm.logger.warning("rolling back: guest is %s on the old QEMU, resuming", status)
            await vm.execute("cont")
        return await vm.status() == "running"
    except SealvmError as exc:
        vm.logger.error("rollback failed: %s", exc)
        return False


# ---------------------------------------------------------------- helpers


async def _incoming(vm: Machine, qmp: QMPClient, args: dict[str, object], clock: _Clock,
                    deadline: float, proc: QemuProcess,
                    then: Callable[[], Awaitable[None]] | None = None) -> float:
    """migrate-incoming on a new QEMU, then *then()*; returns the RESUME
    timestamp.

    :raise UpdateError: when the load fails or the process dies.
    """
    listener = EventListener(("MIGRATION", "RESUME"))
    died = asyncio.ensure_future(proc.exited.wait())
    try:
        with qmp.listen(listener):
            await qmp.execute("migrate-set-capabilities", EVENTS_ON)
            await qmp.execute("migrate-incoming", args)
            if then is not None:
                await then()
            # QEMU resumes the guest before it declares the load completed.
            resume_ts: float | None = None
            status = ""
            while resume_ts is None or status != "completed":
                ev = await _event_or(listener, died, deadline)
                if ev is None:
                    raise UpdateError("new QEMU failed to load the device state (it exited):\n"
                                      f"{vm.log_tail(5)}", rolled_back=False)
                if ev["event"] == "MIGRATION":
                    status = ev["data"]["status"]
                    if status in ("failed", "cancelled"):
                        raise UpdateError("new QEMU failed to load the device state:\n"
                                          f"{vm.log_tail(5)}", rolled_back=False)
                elif ev["event"] == "RESUME":
                    resume_ts = _event_time(ev)
                    clock.mark("load")
            return resume_ts
    except TimeoutError:
        raise UpdateError("new QEMU did not resume the guest in time", rolled_back=False) from None
    except QMPError as exc:
        raise UpdateError(f"new QEMU's monitor: {exc}", rolled_back=False) from exc
    finally:
        died.cancel()


async def _arm(qmp: QMPClient, cpr_exec_argv: list[str] | None) -> None:
    """Migration parameters reset in a new QEMU: set them for the next update."""
    await qmp.execute("migrate-set-capabilities", EVENTS_ON)
    if cpr_exec_argv is not None:
        await qmp.execute("migrate-set-parameters",
                          {"mode": "cpr-exec", "cpr-exec-command": incoming_argv(cpr_exec_argv)})


async def _event_or(listener: EventListener, other: asyncio.Future[Any],
                    deadline: float) -> dict[str, Any] | None:
    """The next event, or None when *other* completes first."""
    get = asyncio.ensure_future(listener.get())
    try:
        async with asyncio.timeout_at(deadline):
            await asyncio.wait({get, other}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        get.cancel()
    if get.done() and not get.cancelled():
        return dict(get.result())
    return None


async def _wait_disconnected(qmp: QMPClient) -> None:
    while qmp.runstate not in (Runstate.DISCONNECTING, Runstate.IDLE):
        await qmp.runstate_changed()


async def _migration_error(vm: Machine) -> str:
    try:
        info = await vm.execute("query-migrate")
    except SealvmError as exc:
        return f"(query-migrate failed: {exc})"
    if isinstance(info, dict):
        return str(info.get("error-desc", info.get("status", "unknown")))
    return "unknown"


async def _running(vm: Machine) -> bool:
    try:
        return await vm.status() == "running"
    except SealvmError:
        return False


async def _missing_devices(vm: Machine) -> list[str]:
    """Assigned devices of the spec that the (new) QEMU does not have."""
    if not vm.spec.vfio:
        return []
    reply = await vm.execute("qom-list", {"path": "/machine/peripheral"})
    if not isinstance(reply, list):
        raise QMPReplyError("qom-list", f"malformed reply {reply!r}")
    present = {p.get("name") for p in reply if isinstance(p, dict)}
    return [d.id for d in vm.spec.vfio if d.id not in present]


def _verify(report: UpdateReport) -> None:
    """Post-update checks; a failure here means the guest may be damaged."""
    problems = []
    if report.mode == "cpr-exec" and report.pid_after != report.pid_before:
        problems.append(f"pid changed {report.pid_before} -> {report.pid_after}")
    if report.mode != "cpr-exec" and report.pid_after == report.pid_before:
        problems.append(f"{report.mode} kept the old pid")
    if report.mode != "migrate" and not report.ram_inode_unchanged:
        problems.append("guest RAM memfd inodes changed")
    ram = [b for b in report.ram_after if b.name == procfs.BACKEND_MEMFD_NAME]
    if not ram or not {"GROW", "SHRINK", "SEAL"} <= set(ram[0].seals):
        problems.append(f"guest RAM seals are {ram[0].seals if ram else 'missing'}")
    if report.heartbeat_continuous is False:
        problems.append("guest heartbeat counter did not continue")
    if report.mismatches:
        problems.append(f"guest saw {report.mismatches} mismatching RAM words")
    if report.devices_missing:
        problems.append(f"devices missing after the update: {', '.join(report.devices_missing)}")
    if problems:
        raise UpdateError("verification failed: " + "; ".join(problems), rolled_back=False)


__all__ = ["Check", "RamBlock", "UpdateReport", "live_update"]
