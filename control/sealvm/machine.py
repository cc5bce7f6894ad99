"""
One QEMU process running one VM: launch, QMP, lifecycle, teardown.

A `Machine` owns a run directory (0700) holding the QMP socket (0600),
``state.json``, QEMU's log and the guest's serial log.  The state file lets
another controller process `Machine.attach` to a VM launched elsewhere (for
example ``sealvm status`` after ``sealvm up`` returned).

QEMU runs in its own session so it outlives the controller that started it;
the controller watches it through a pidfd, which also works for a process it
did not start.  Teardown is idempotent: ``quit`` -> SIGTERM -> SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from qemu.qmp import ExecInterruptedError, QMPClient, QMPError
from qemu.qmp.qmp_client import ExecuteError

from . import procfs
from .errors import LaunchError, QMPReplyError, StateError
from .plan import FdPlan, RunPaths, qemu_argv
from .spec import VmSpec, check_files, spec_from_dict

log = logging.getLogger("sealvm.vm")

STATE_VERSION = 1


def default_run_root() -> Path:
    """$SEALVM_RUN_DIR, else /run/sealvm for root, else $XDG_RUNTIME_DIR/sealvm."""
    env = os.environ.get("SEALVM_RUN_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/sealvm")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "sealvm" if xdg else Path(f"/tmp/sealvm-{os.geteuid()}")


class Runstate(Enum):
    """Where a Machine object is in its life (not the guest's run state)."""

    IDLE = "idle"  # nothing launched or attached
    RUNNING = "running"  # QEMU process alive, QMP connected
    UPDATING = "updating"  # a live update owns the monitor
    STOPPED = "stopped"  # QEMU gone, resources released


@dataclass
class VmState:
    """What a run directory records about its VM (``state.json``)."""

    name: str
    pid: int
    argv: list[str]
    fds: dict[str, Any]
    spec: dict[str, Any]
    started: float
    generation: int = 0  # live updates completed
    updates: list[dict[str, Any]] = field(default_factory=list)
    version: int = STATE_VERSION

    def fd_plan(self) -> FdPlan:
        return FdPlan(
            qmp_listen=int(self.fds["qmp_listen"]),
            iommufd=self.fds.get("iommufd"),
            vfio={str(k): int(v) for k, v in self.fds.get("vfio", {}).items()},
        )


class Machine:
    """A VM run by QEMU, controlled over QMP.

    Create with a spec and `launch`, or `attach` to a VM by name.
    """

    def __init__(self, spec: VmSpec, *, run_root: Path | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self.paths = RunPaths((run_root or default_run_root()) / spec.name)
        self.logger = log.getChild(spec.name)
        self.runstate = Runstate.IDLE
        self.state: VmState | None = None
        self._qmp: QMPClient | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        self._exited: asyncio.Event | None = None
        self._exitcode: int | None = None
        self._subscribers: list[tuple[frozenset[str] | None, asyncio.Queue[dict[str, Any]]]] = []
        self._pump: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ info

    def __repr__(self) -> str:
        return f"<Machine {self.name} {self.runstate.value} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        return self.state.pid if self.state else None

    @property
    def argv(self) -> list[str]:
        self._require_state()
        assert self.state is not None
        return list(self.state.argv)

    @property
    def qmp(self) -> QMPClient:
        if self._qmp is None:
            raise StateError(f"VM {self.name}: not connected (call launch() or attach() first)")
        return self._qmp

    @property
    def exitcode(self) -> int | None:
        return self._exitcode

    def alive(self) -> bool:
        return self.pid is not None and procfs.pid_alive(self.pid)

    def _require_state(self) -> None:
        if self.state is None:
            raise StateError(f"VM {self.name}: not launched (call launch() or attach() first)")

    # -------------------------------------------------------------- launching

    async def launch(self, *, timeout: float = 30.0) -> None:
        """Start QEMU and connect to its monitor.

        :raise SpecError: when a file the spec names is missing.
        :raise StateError: when this object or the run directory already has
            a live VM.
        :raise LaunchError: when QEMU exits or does not answer in *timeout*;
            everything acquired is released, the run directory is cleaned.
        """
        if self.runstate is not Runstate.IDLE:
            raise StateError(f"VM {self.name}: already {self.runstate.value}")
        check_files(self.spec)
        self._prepare_run_dir()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.paths.qmp))
            os.chmod(self.paths.qmp, 0o600)
            listener.listen(4)
            fds = FdPlan(qmp_listen=listener.fileno())
            argv = qemu_argv(self.spec, self.paths, fds)
            self.logger.info("launching: %s", " ".join(argv))
            logf = os.open(
                self.paths.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
            try:
                self._popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    pass_fds=fds.all(),
                    start_new_session=True,
                    umask=0o077,
                )
            except OSError as exc:
                raise LaunchError(f"cannot execute {argv[0]}: {exc.strerror}") from exc
            finally:
                os.close(logf)
        except BaseException:
            listener.close()
            self._cleanup_run_dir()
            raise
        listener.close()  # QEMU holds it now
        self.state = VmState(
            name=self.name,
            pid=self._popen.pid,
            argv=argv,
            fds={"qmp_listen": fds.qmp_listen, "iommufd": fds.iommufd, "vfio": fds.vfio},
            spec=self.spec.to_dict(),
            started=time.time(),
        )
        try:
            self._watch_pid()
            await self._connect_or_fail(timeout)
        except BaseException:
            await self._kill()
            self._release()
            raise
        self.save_state()
        self.runstate = Runstate.RUNNING

    def _prepare_run_dir(self) -> None:
        root = self.paths.root
        root.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            root.mkdir(mode=0o700)
        except FileExistsError:
            old = self._read_state()
            if old is not None and procfs.pid_alive(old.pid):
                raise StateError(
                    f"VM {self.name} is already running (pid {old.pid}); "
                    f"attach to it or run `sealvm down {self.name}`"
                ) from None
            self._cleanup_run_dir()
        os.chmod(root, 0o700)

    def _read_state(self) -> VmState | None:
        try:
            data = json.loads(self.paths.state.read_text())
            return VmState(**data)
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None

    def save_state(self) -> None:
        """Write state.json atomically."""
        self._require_state()
        tmp = self.paths.state.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.state), f, indent=1)  # type: ignore[arg-type]
        os.replace(tmp, self.paths.state)

    @classmethod
    async def attach(cls, name: str, *, run_root: Path | None = None,
                     timeout: float = 10.0) -> Machine:
        """Attach to a VM another controller launched.

        :raise StateError: when no live VM of that name exists.
        :raise LaunchError: when its monitor does not answer in *timeout*.
        """
        paths = RunPaths((run_root or default_run_root()) / name)
        try:
            data = json.loads(paths.state.read_text())
            state = VmState(**data)
        except FileNotFoundError:
            raise StateError(f"no VM named {name!r} in {paths.root.parent}") from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise StateError(f"VM {name}: unreadable state file {paths.state}: {exc}") from exc
        if not procfs.pid_alive(state.pid):
            raise StateError(f"VM {name}: QEMU (pid {state.pid}) is not running")
        spec = spec_from_dict(state.spec)
        self = cls(spec, run_root=paths.root.parent)
        self.state = state
        self._watch_pid()
        try:
            await self._connect_or_fail(timeout)
        except BaseException:
            self._release(keep_run_dir=True)
            raise
        self.runstate = Runstate.RUNNING
        return self

    # ------------------------------------------------------------------- QMP

    def _watch_pid(self) -> None:
        assert self.state is not None
        self._exited = asyncio.Event()
        try:
            self._pidfd = os.pidfd_open(self.state.pid)
        except ProcessLookupError:
            self._on_exit()
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        if self._pidfd >= 0:
            asyncio.get_running_loop().remove_reader(self._pidfd)
        if self._popen is not None:
            self._exitcode = self._popen.poll()
        if self._exited is not None:
            self._exited.set()

    async def wait_exit(self, timeout: float | None = None) -> bool:
        """Wait for QEMU to exit; False on timeout."""
        if self._exited is None:
            return not self.alive()
        try:
            async with asyncio.timeout(timeout):
                await self._exited.wait()
        except TimeoutError:
            return False
        return True

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.paths.qemu_log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    async def _connect_or_fail(self, timeout: float) -> None:
        """Connect to the monitor, racing QEMU's exit."""
        assert self._exited is not None
        qmp = QMPClient(self.name)
        qmp.logger = self.logger.getChild("qmp")
        connect = asyncio.ensure_future(qmp.connect(str(self.paths.qmp)))
        died = asyncio.ensure_future(self._exited.wait())
        try:
            done, _ = await asyncio.wait({connect, died}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
        if connect in done and connect.exception() is None:
            self._set_qmp(qmp)
            return
        connect.cancel()
        with contextlib.suppress(BaseException):
            await connect
        with contextlib.suppress(QMPError, OSError):
            await qmp.disconnect()
        if died.done() or self._exited.is_set():
            raise LaunchError(f"QEMU for VM {self.name} exited before its monitor answered",
                              exitcode=self._exitcode, output=self.log_tail())
        exc = connect.exception() if connect.done() and not connect.cancelled() else None
        if exc is not None:
            raise LaunchError(f"cannot connect to {self.paths.qmp}: {exc}",
                              output=self.log_tail()) from exc
        raise LaunchError(
            f"QEMU's monitor for VM {self.name} did not answer within {timeout:.0f} s "
            "(another client may hold it)", output=self.log_tail())

    def _set_qmp(self, qmp: QMPClient) -> None:
        self._qmp = qmp
        if self._pump is not None:
            self._pump.cancel()
        self._pump = asyncio.create_task(self._pump_events(qmp), name=f"sealvm-events-{self.name}")

    async def _pump_events(self, qmp: QMPClient) -> None:
        async for event in qmp.events:
            for names, queue in self._subscribers:
                if names is None or event["event"] in names:
                    queue.put_nowait(dict(event))

    async def reconnect(self, *, timeout: float = 30.0) -> None:
        """Drop the current QMP session and connect again (after an exec).

        :raise LaunchError: when QEMU exits or its monitor does not answer.
        """
        await self._disconnect()
        await self._connect_or_fail(timeout)

    async def _disconnect(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            with contextlib.suppress(QMPError, OSError, EOFError):
                await qmp.disconnect()

    async def execute(self, command: str, arguments: dict[str, object] | None = None) -> Any:
        """Run a QMP command and return its result.

        :raise QMPReplyError: when QEMU answers with an error.
        :raise StateError: when not connected, or the monitor went away.
        """
        try:
            return await self.qmp.execute(command, arguments)
        except ExecuteError as exc:
            raise QMPReplyError(command, f"{exc.error_class}: {exc.error.error.desc}") from exc
        except ExecInterruptedError as exc:
            raise StateError(f"VM {self.name}: monitor disconnected during {command}") from exc

    async def events(self, names: Iterable[str] | None = None) -> AsyncIterator[dict[str, Any]]:
        """Iterate over QMP events (optionally only *names*), across reconnects."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        entry = (frozenset(names) if names is not None else None, queue)
        self._subscribers.append(entry)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.remove(entry)

    # ------------------------------------------------------------- lifecycle

    async def status(self) -> str:
        """The guest's run state as QEMU reports it ("running", "paused", ...)."""
        reply = await self.execute("query-status")
        if not isinstance(reply, dict) or not isinstance(reply.get("status"), str):
            raise QMPReplyError("query-status", f"malformed reply {reply!r}")
        return str(reply["status"])

    async def pause(self) -> None:
        await self.execute("stop")

    async def resume(self) -> None:
        await self.execute("cont")

    async def reset(self) -> None:
        await self.execute("system_reset")

    async def powerdown(self, *, timeout: float = 10.0) -> bool:
        """ACPI power button; True if QEMU exited within *timeout*."""
        await self.execute("system_powerdown")
        return await self.wait_exit(timeout)

    async def shutdown(self, *, timeout: float = 10.0) -> None:
        """Stop QEMU (quit, then SIGTERM, then SIGKILL) and release everything.

        Safe to call twice, after a failed launch, and on a VM that already
        exited.  Never raises for a QEMU that is already gone.
        """
        if self.runstate is Runstate.STOPPED and self._pidfd < 0:
            return
        try:
            if self._qmp is not None and self.alive():
                with contextlib.suppress(QMPError, OSError, EOFError, StateError, QMPReplyError):
                    async with asyncio.timeout(timeout):
                        await self.qmp.execute("quit")
                await self.wait_exit(timeout)
            await self._kill(timeout=timeout)
        finally:
            await self._disconnect()
            self._release()

    async def _kill(self, *, timeout: float = 5.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self.alive():
                break
            self.logger.debug("sending %s", sig.name)
            with contextlib.suppress(ProcessLookupError):
                if self._pidfd >= 0:
                    signal.pidfd_send_signal(self._pidfd, sig)
                elif self.pid is not None:
                    os.kill(self.pid, sig)
            await self.wait_exit(timeout)
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._exitcode = self._popen.wait(timeout=timeout)

    def _release(self, *, keep_run_dir: bool = False) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if not keep_run_dir and not self.alive():
            self._cleanup_run_dir()
        self.runstate = Runstate.STOPPED

    def _cleanup_run_dir(self) -> None:
        """Remove what only a live VM needs; logs stay for post-mortems."""
        for p in (self.paths.qmp, self.paths.state, self.paths.cpr_state, self.paths.lock,
                  self.paths.state.with_suffix(".tmp")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
