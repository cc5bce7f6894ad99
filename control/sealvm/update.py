"""
Live update: replace the QEMU under a running guest, keeping its RAM.

cpr-exec (this module, first cut): old QEMU stops the guest, saves device
state to a file, and exec()s the new binary in the same process; guest RAM
(a sealed memfd) and the QMP listening socket are inherited.  The new QEMU
starts with ``-incoming defer``; the controller connects to the inherited
socket, issues ``migrate-incoming`` and waits for the guest to run again.

Order matters and is fixed here: listen for events before acting, never
sleep-poll, re-arm the migration parameters (they reset at exec), verify
pid, RAM inodes and seals after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient, Runstate

from . import procfs
from .console import ConsoleFollower
from .errors import LaunchError, PreflightError, SealvmError, UpdateError
from .machine import Machine
from .machine import Runstate as VmRunstate
from .plan import incoming_argv
from .preflight import Check, run_preflight

log = logging.getLogger("sealvm.update")

_MIGRATION_DONE = ("completed", "failed", "cancelled")


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
    phases: dict[str, float] = field(default_factory=dict)
    total: float = 0.0
    checks: list[str] = field(default_factory=list)

    @property
    def ram_inode_unchanged(self) -> bool:
        before = {b.name: b.inode for b in self.ram_before}
        after = {b.name: b.inode for b in self.ram_after}
        return bool(before) and before == after

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ram_inode_unchanged"] = self.ram_inode_unchanged
        return d


class _Clock:
    """Phase timings on the monotonic clock."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = now - self.last
        self.last = now


def _event_time(event: dict[str, Any]) -> float:
    ts = event.get("timestamp", {})
    return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6


async def _next_event(listener: EventListener, deadline: float) -> dict[str, Any]:
    async with asyncio.timeout_at(deadline):
        return dict(await listener.get())


def _ram_blocks(pid: int) -> list[RamBlock]:
    return [RamBlock.of(m) for m in procfs.memfds(pid)]


async def live_update(
    vm: Machine,
    *,
    qemu: Path | None = None,
    mode: str = "cpr-exec",
    heartbeat_interval: float | None = None,
    timeout: float = 60.0,
) -> UpdateReport:
    """Replace the QEMU running *vm* with *qemu* (default: the same binary).

    With *heartbeat_interval* (seconds), the guest is the sealvm test guest:
    its serial log is followed and the pause it saw is measured.

    :raise PreflightError: refused before the guest paused; VM untouched.
    :raise UpdateError: failed after the guest paused; ``rolled_back`` says
        whether the old QEMU resumed the guest.
    """
    if mode != "cpr-exec":
        raise PreflightError([f"mode {mode!r}: only cpr-exec is implemented in this version"])
    if vm.runstate is not VmRunstate.RUNNING or vm.pid is None:
        raise PreflightError([f"VM {vm.name} is {vm.runstate.value}, not running"])
    new_qemu = (qemu or Path(vm.argv[0])).resolve()
    clock = _Clock()
    checks = await run_preflight(vm, mode=mode, qemu=new_qemu)
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
            if heartbeat_interval is not None:
                follower = await stack.enter_async_context(ConsoleFollower(vm.paths.serial))
                await follower.wait_heartbeats(2, timeout)
                watch_from = len(follower.log.heartbeats) - 1
            await _cpr_exec(vm, new_qemu, clock, report, timeout)
            if follower is not None and heartbeat_interval is not None:
                await follower.wait_heartbeats(3, timeout)
                gap = follower.log.largest_gap(watch_from)
                report.pause_guest = max(0.0, gap - heartbeat_interval)
                report.heartbeat_continuous = follower.log.counter_continuous()
                report.mismatches = follower.log.mismatched_words
    except BaseException:
        if vm.runstate is VmRunstate.UPDATING:
            vm.runstate = VmRunstate.RUNNING if vm.alive() else VmRunstate.STOPPED
        raise
    vm.runstate = VmRunstate.RUNNING
    report.total = time.monotonic() - clock.start
    report.phases = clock.phases
    _verify(report)
    assert vm.state is not None
    vm.state.generation += 1
    vm.state.updates.append(
        {"mode": mode, "qemu": report.qemu_after, "pause_qmp": report.pause_qmp,
         "total": report.total, "time": time.time()}
    )
    vm.save_state()
    log.info("%s: %s done, pause %.3f s (QMP)", vm.name, mode, report.pause_qmp or -1)
    return report


async def _cpr_exec(vm: Machine, qemu: Path, clock: _Clock, report: UpdateReport,
                    timeout: float) -> None:
    assert vm.state is not None
    new_argv = incoming_argv(vm.argv, qemu)
    uri = f"file:{vm.paths.cpr_state}"
    await vm.execute("migrate-set-capabilities",
                     {"capabilities": [{"capability": "events", "state": True}]})
    await vm.execute("migrate-set-parameters",
                     {"mode": "cpr-exec", "cpr-exec-command": new_argv})
    deadline = asyncio.get_running_loop().time() + timeout
    old: QMPClient = vm.qmp
    stop_ts: float | None = None
    listener = EventListener(("STOP", "MIGRATION"))
    with old.listen(listener):
        dropped = asyncio.ensure_future(_wait_disconnected(old))
        try:
            await vm.execute("migrate", {"uri": uri})
            # Old side: STOP, MIGRATION completed, then exec drops the
            # connection.  Events still in flight at exec may be lost; the
            # drop itself says the exec happened.  If execvp fails, QEMU
            # reports MIGRATION failed and resumes the guest.
            while not dropped.done():
                get = asyncio.ensure_future(listener.get())
                try:
                    async with asyncio.timeout_at(deadline):
                        await asyncio.wait({get, dropped}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    get.cancel()
                if not get.done() or get.cancelled():
                    continue
                ev: dict[str, Any] = dict(get.result())
                if ev["event"] == "STOP":
                    stop_ts = _event_time(ev)
                    clock.mark("stop")
                elif ev["data"]["status"] == "completed":
                    clock.mark("save")
                elif ev["data"]["status"] in ("failed", "cancelled"):
                    raise UpdateError(
                        f"cpr-exec to {qemu} failed: {await _migration_error(vm)}",
                        rolled_back=await _resumed(vm))
        except TimeoutError:
            raise UpdateError("old QEMU neither exec'd nor failed in time",
                              rolled_back=await _resumed(vm)) from None
        finally:
            dropped.cancel()
    if "save" not in clock.phases:
        clock.mark("save")
    try:
        await vm.reconnect(timeout=timeout)
    except LaunchError as exc:
        raise UpdateError(f"new QEMU did not come up: {exc}", rolled_back=False) from exc
    clock.mark("exec")
    report.pid_after = vm.pid if vm.alive() and vm.pid is not None else -1
    new = vm.qmp
    listener = EventListener(("MIGRATION", "RESUME"))
    resume_ts: float | None = None
    with new.listen(listener):
        await vm.execute("migrate-set-capabilities",
                         {"capabilities": [{"capability": "events", "state": True}]})
        await vm.execute("migrate-incoming", {"uri": uri})
        # QEMU resumes the guest before it declares the load completed.
        status = ""
        while resume_ts is None or status != "completed":
            ev = await _next_event(listener, deadline)
            if ev["event"] == "MIGRATION":
                status = ev["data"]["status"]
                if status in ("failed", "cancelled"):
                    raise UpdateError(f"new QEMU failed to load: {await _migration_error(vm)}",
                                      rolled_back=False)
            elif ev["event"] == "RESUME":
                resume_ts = _event_time(ev)
                clock.mark("load")
    if stop_ts is not None:
        report.pause_qmp = resume_ts - stop_ts
    # Parameters reset at exec: re-arm them for the next update.
    await vm.execute("migrate-set-parameters",
                     {"mode": "cpr-exec", "cpr-exec-command": incoming_argv(new_argv)})
    vm.state.argv = new_argv
    vm.state.spec["qemu"] = str(qemu)
    vm.spec = vm.spec.with_qemu(qemu)
    report.ram_after = _ram_blocks(vm.pid or -1)
    with contextlib.suppress(FileNotFoundError):
        vm.paths.cpr_state.unlink()
    status_now = await vm.status()
    if status_now != "running":
        raise UpdateError(f"guest is {status_now} after the update", rolled_back=False)


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


async def _resumed(vm: Machine) -> bool:
    try:
        return await vm.status() == "running"
    except SealvmError:
        return False


def _verify(report: UpdateReport) -> None:
    """Post-update checks; a failure here means the guest may be damaged."""
    problems = []
    if report.pid_after != report.pid_before:
        problems.append(f"pid changed {report.pid_before} -> {report.pid_after}")
    if not report.ram_inode_unchanged:
        problems.append("guest RAM memfd inodes changed")
    ram = [b for b in report.ram_after if b.name == procfs.BACKEND_MEMFD_NAME]
    if not ram or not {"GROW", "SHRINK", "SEAL"} <= set(ram[0].seals):
        problems.append(f"guest RAM seals are {ram[0].seals if ram else 'missing'}")
    if report.heartbeat_continuous is False:
        problems.append("guest heartbeat counter did not continue")
    if report.mismatches:
        problems.append(f"guest saw {report.mismatches} mismatching RAM words")
    if problems:
        raise UpdateError("verification failed: " + "; ".join(problems), rolled_back=False)


__all__ = ["Check", "RamBlock", "UpdateReport", "live_update"]
