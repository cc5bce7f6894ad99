"""QMP steps shared by the update modes and by recovery: listen first, then act."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError, Runstate
from qemu.qmp.qmp_client import ExecuteError

from ..errors import LaunchError, QMPReplyError, StateError, UpdateError
from ..machine import connect_qmp
from ..plan import incoming_argv
from ..process import QemuProcess

EVENTS_ON: dict[str, object] = {"capabilities": [{"capability": "events", "state": True}]}

#: guest run states an update keeps (anything else is refused, naming it)
UPDATABLE = ("running", "paused")


def event_time(event: dict[str, Any]) -> float:
    ts = event.get("timestamp", {})
    return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6


async def execute(qmp: QMPClient, command: str, args: dict[str, object] | None = None) -> Any:
    """Run *command* on a bare client (a successor QEMU's, or in recovery).

    :raise QMPReplyError: when QEMU answers with an error.
    :raise StateError: when the connection is gone.
    """
    try:
        return await qmp.execute(command, args)
    except ExecuteError as exc:
        raise QMPReplyError(command, f"{exc.error_class}: {exc.error.error.desc}") from exc
    except QMPError as exc:
        raise StateError(f"monitor connection lost ({command}): {type(exc).__name__}: "
                         f"{exc}") from exc


async def status(qmp: QMPClient) -> str:
    reply = await execute(qmp, "query-status")
    if not isinstance(reply, dict) or not isinstance(reply.get("status"), str):
        raise QMPReplyError("query-status", f"malformed reply {reply!r}")
    return str(reply["status"])


async def migration_status(qmp: QMPClient) -> tuple[str, str]:
    """(status, error-desc) of ``query-migrate`` ("none" when idle)."""
    info = await execute(qmp, "query-migrate")
    if not isinstance(info, dict):
        raise QMPReplyError("query-migrate", f"malformed reply {info!r}")
    return str(info.get("status", "none")), str(info.get("error-desc", ""))


async def connect(path: Path, *, name: str, timeout: float,
                  process: QemuProcess | None = None) -> QMPClient:
    """A QMP client connected to *path* (racing *process*'s exit).

    :raise StateError: when nothing answers in *timeout* or the process exits.
    """
    try:
        return await connect_qmp(path, name=name, timeout=timeout, process=process)
    except LaunchError as exc:
        raise StateError(str(exc)) from exc


async def disconnect(qmp: QMPClient | None) -> None:
    if qmp is not None:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await qmp.disconnect()


async def event_or(listener: EventListener, other: asyncio.Future[Any],
                   deadline: float) -> dict[str, Any] | None:
    """The next event, or None when *other* completes first.

    :raise TimeoutError: at *deadline*.
    """
    get = asyncio.ensure_future(listener.get())
    try:
        async with asyncio.timeout_at(deadline):
            await asyncio.wait({get, other}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        get.cancel()
    if get.done() and not get.cancelled():
        return dict(get.result())
    return None


async def wait_disconnected(qmp: QMPClient) -> None:
    while qmp.runstate not in (Runstate.DISCONNECTING, Runstate.IDLE):
        await qmp.runstate_changed()


async def incoming(qmp: QMPClient, args: dict[str, object] | None, *, deadline: float,
                   proc: QemuProcess, log_tail: Callable[[], str],
                   then: Callable[[], Awaitable[None]] | None = None) -> None:
    """``migrate-incoming`` *args* on a new QEMU (started with ``-S``), then
    *then()*; returns once the device state is loaded (the guest is paused:
    the caller resumes it).  With *args* None, only waits (the command was
    sent before).

    :raise UpdateError: (not resumed) when the load fails, the process
        dies, or *deadline* passes.
    """
    listener = EventListener(("MIGRATION",))
    died = asyncio.ensure_future(proc.exited.wait())
    try:
        async with asyncio.timeout_at(deadline):  # a hung QEMU answers nothing
            await _incoming(qmp, args, listener=listener, died=died, deadline=deadline,
                            log_tail=log_tail, then=then)
    except TimeoutError:
        raise UpdateError("new QEMU did not load the device state in time",
                          rolled_back=False) from None
    except (QMPReplyError, StateError) as exc:
        if isinstance(exc, StateError) and await proc.wait_exit(1.0):
            raise UpdateError("new QEMU failed to load the device state (it exited):\n"
                              f"{log_tail()}", rolled_back=False) from exc
        raise UpdateError(f"new QEMU's monitor: {exc}", rolled_back=False) from exc
    finally:
        died.cancel()


async def _incoming(qmp: QMPClient, args: dict[str, object] | None, *,
                    listener: EventListener, died: asyncio.Future[Any], deadline: float,
                    log_tail: Callable[[], str],
                    then: Callable[[], Awaitable[None]] | None) -> None:
    with qmp.listen(listener):
        await execute(qmp, "migrate-set-capabilities", EVENTS_ON)
        if args is not None:
            await execute(qmp, "migrate-incoming", args)
        if then is not None:
            await then()
        if (await migration_status(qmp))[0] == "completed":
            return
        while True:
            ev = await event_or(listener, died, deadline)
            if ev is None:
                raise UpdateError("new QEMU failed to load the device state (it exited):\n"
                                  f"{log_tail()}", rolled_back=False)
            st = ev["data"]["status"]
            if st == "completed":
                return
            if st in ("failed", "cancelled"):
                raise UpdateError("new QEMU failed to load the device state:\n"
                                  f"{log_tail()}", rolled_back=False)


async def resume(qmp: QMPClient, *, deadline: float) -> float:
    """``cont``; returns the RESUME event's timestamp.

    :raise QMPReplyError: when QEMU refused ``cont`` (the guest did not run).
    :raise StateError: when the connection went (it may have run).
    :raise TimeoutError: at *deadline*.
    """
    listener = EventListener(("RESUME",))
    with qmp.listen(listener):
        async with asyncio.timeout_at(deadline):
            await execute(qmp, "cont")
            return event_time(dict(await listener.get()))


async def arm(qmp: QMPClient, cpr_exec_argv: list[str] | None) -> None:
    """Migration parameters reset in a new QEMU: set them for the next update."""
    await execute(qmp, "migrate-set-capabilities", EVENTS_ON)
    if cpr_exec_argv is not None:
        await execute(qmp, "migrate-set-parameters",
                      {"mode": "cpr-exec", "cpr-exec-command": incoming_argv(cpr_exec_argv)})


#: migration states in which a QEMU is still busy migrating out
MIGRATING = ("setup", "active", "device", "pre-switchover", "wait-unplug", "cancelling",
             "postcopy-active")


async def settle_outgoing(qmp: QMPClient, *, deadline: float, cancel: bool) -> bool:
    """Wait until *qmp*'s outgoing migration is over, cancelling it first
    with *cancel*.  True when the connection dropped meanwhile (a cpr-exec
    went through with its exec).

    :raise TimeoutError: at *deadline*.
    """
    listener = EventListener(("MIGRATION",))
    with qmp.listen(listener):
        dropped = asyncio.ensure_future(wait_disconnected(qmp))
        try:
            while True:
                try:
                    st, _ = await migration_status(qmp)
                except StateError:
                    return True
                if st not in MIGRATING:
                    return False
                if cancel:
                    with contextlib.suppress(QMPReplyError):
                        await execute(qmp, "migrate_cancel")
                    cancel = False
                if await event_or(listener, dropped, deadline) is None:
                    return True
        finally:
            dropped.cancel()


async def migration_error(qmp: QMPClient) -> str:
    try:
        st, desc = await migration_status(qmp)
    except (QMPReplyError, StateError) as exc:
        return f"(query-migrate failed: {exc})"
    return desc or st
