"""
One VM run by QEMU: launch, QMP, lifecycle, teardown.

A `Machine` owns a run directory (0700) holding the QMP socket (0600),
``state.json`` (0600), QEMU's log and the guest's serial log.  Run
directories live under a run root (`default_run_root`) that must belong to
the effective user and be writable by no one else (`check_run_root`):
whoever can write there can swap the socket or the state file sealvm
trusts (the state file names the pid sealvm signals).  The state file lets
another controller process `Machine.attach` to a VM launched elsewhere (for
example ``sealvm status`` after ``sealvm up`` returned).

sealvm creates the QMP listening socket itself and passes it to QEMU as an
fd, together with the VFIO fds it opened (/dev/iommu, vfio cdevs) and the
taps it created and attached to (`sealvm.net`; removed again when QEMU is
gone, with the namespaces sealvm created).  QEMU
runs in its own session so it outlives the controller that started it,
confined by default (`sealvm.confine`): its own uid, no capabilities,
seccomp, and a mount namespace showing it only what the VM needs.
Teardown is idempotent: ``quit`` -> SIGTERM -> SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from qemu.qmp import ExecInterruptedError, QMPClient, QMPError
from qemu.qmp.qmp_client import ExecuteError, GreetingError

from . import confine, endpoint, net, procfs
from .confine import Confinement
from .errors import HostError, InterruptedUpdateError, LaunchError, QMPReplyError, StateError
from .host import open_vfio_fds
from .lock import VmLock
from .net import NetRecord
from .plan import FdPlan, RunPaths, qemu_argv, serial_path
from .process import QemuProcess
from .runroot import check_run_root, default_run_root
from .spec import VmSpec, check_files, spec_from_dict
from .trampoline import trampoline as cpr_trampoline

log = logging.getLogger("sealvm.vm")

#: 2: the process is named by pid and start time (``start_time``).
STATE_VERSION = 2


class Runstate(Enum):
    """Where a Machine object is in its life (not the guest's run state)."""

    IDLE = "idle"  # nothing launched or attached
    RUNNING = "running"  # QEMU process alive, QMP connected
    DETACHED = "detached"  # QEMU left running, this object let go (connect() again)
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
    start_time: int = 0  # the QEMU process's start time (procfs.start_time)
    generation: int = 0  # live updates completed
    updates: list[dict[str, Any]] = field(default_factory=list)
    version: int = STATE_VERSION
    #: what sealvm created for the NICs (`net.NetRecord`), removed at the end
    net: list[dict[str, Any]] = field(default_factory=list)
    #: each disk's image as QEMU opened it at launch: id -> [st_dev, st_ino]
    disks: dict[str, list[int]] = field(default_factory=dict)
    #: how QEMU is confined (`Confinement.to_state`); empty: it is not
    security: dict[str, Any] = field(default_factory=dict)

    def alive(self) -> bool:
        """True while the QEMU process this state names runs (pid + start time)."""
        return procfs.same_process(self.pid, self.start_time)

    def fd_plan(self) -> FdPlan:
        return FdPlan.from_state(self.fds)

    def net_records(self) -> list[NetRecord]:
        return [NetRecord.from_dict(r) for r in self.net]

    def confinement(self) -> Confinement | None:
        return Confinement.from_state(self.security)


def listen_unix(path: Path) -> socket.socket:
    """A listening unix socket at *path*, mode 0600 (stale path replaced)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(4)
    except BaseException:
        sock.close()
        raise
    return sock


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
        self.process: QemuProcess | None = None
        self._qmp: QMPClient | None = None
        self._subscribers: list[tuple[frozenset[str] | None, asyncio.Queue[dict[str, Any]]]] = []
        self._pump: asyncio.Task[None] | None = None
        #: held by every verb that changes the VM (`sealvm.lock`)
        self.lock = VmLock(self.paths.lock, spec.name)
        self._confinement: Confinement | None = None

    # ------------------------------------------------------------------ info

    def __repr__(self) -> str:
        return f"<Machine {self.name} {self.runstate.value} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        """The QEMU process's pid (changes with cpr-transfer), None before
        launch or attach."""
        return self.state.pid if self.state else None

    @property
    def argv(self) -> list[str]:
        """The command line QEMU runs with.

        :raise StateError: before launch or attach.
        """
        if self.state is None:
            raise StateError(f"VM {self.name}: not launched (call launch() or attach() first)")
        return list(self.state.argv)

    @property
    def qmp(self) -> QMPClient:
        """The connected qemu.qmp client (prefer `execute`; it is replaced
        at every live update).

        :raise StateError: when not connected.
        """
        if self._qmp is None:
            raise StateError(f"VM {self.name}: not connected (call launch() or attach() first)")
        return self._qmp

    @property
    def script_socket(self) -> Path | None:
        """Where scripts connect to this VM's QMP endpoint (`sealvm.endpoint`),
        or None when the spec turned it off."""
        return self.paths.scripts if self.spec.scripts.enabled else None

    @property
    def exitcode(self) -> int | None:
        """QEMU's exit status once it exited (negative: killed by a signal)."""
        return self.process.exitcode if self.process else None

    def alive(self) -> bool:
        """True while this object's QEMU process runs."""
        return self.process is not None and self.process.alive()

    # -------------------------------------------------------------- launching

    def spawn(self, spec: VmSpec, qmp_path: Path, *, extra: list[str] | None = None,
              extra_fds: list[int] | None = None, fds: FdPlan | None = None,
              marker: str | None = None,
              nets: list[net.NetRecord] | None = None) -> tuple[QemuProcess, list[str], FdPlan]:
        """Start a QEMU for *spec* with its QMP socket at *qmp_path*.

        Without *fds*, the VFIO fds are opened here (first launch); with
        *fds*, their numbers are only named on the command line (a cpr
        successor receives the fds themselves through CPR state).  Taps:
        while a QEMU of this VM runs, its tap fds are duplicated
        (`net.take_taps`: the same tap, handed over); otherwise sealvm
        attaches to the taps *nets* names.  *extra* is appended to the
        command line, *extra_fds* passed as they are.

        :raise HostError: when a VFIO fd or a tap cannot be opened.
        :raise LaunchError: when QEMU cannot be executed.
        """
        if self.state is not None and (spec.serial_log or self.paths.serial) != self.serial_log:
            # a successor logs where its VM always has (a VM from before qemu/)
            spec = replace(spec, serial_log=self.serial_log)
        listener = listen_unix(qmp_path)
        vfio = None
        taps: dict[str, int] = {}
        vhost: dict[str, int] = {}
        try:
            vfio = open_vfio_fds(spec.vfio) if fds is None else None
            if self.state is not None and self.state.alive():
                taps = net.take_taps(self.state.pid, self.state.fd_plan().taps)
            else:
                taps = net.open_taps(nets or [])
                vhost = net.open_vhost(spec.net)
            if vfio is not None:
                plan = FdPlan(qmp_listen=listener.fileno(), iommufd=vfio.iommufd,
                              vfio=dict(vfio.devices), taps=taps, vhost=vhost)
            else:
                assert fds is not None
                plan = FdPlan(qmp_listen=listener.fileno(), iommufd=fds.iommufd,
                              vfio=dict(fds.vfio), taps=taps, vhost=vhost)
            argv = qemu_argv(spec, self.paths, plan, marker=marker) + (extra or [])
            pass_fds = [listener.fileno(), *(extra_fds or []), *taps.values(),
                        *vhost.values()]
            if vfio is not None:  # opened here; a successor gets them through CPR state
                pass_fds += [*plan.vfio.values(), *([] if plan.iommufd is None
                                                    else [plan.iommufd])]
            self.logger.info("starting: %s", " ".join(argv))
            try:
                proc = QemuProcess.spawn(self.confined_argv(argv), pass_fds=pass_fds,
                                         log_path=self.paths.qemu_log, logger=self.logger)
            except OSError as exc:
                with contextlib.suppress(FileNotFoundError):
                    qmp_path.unlink()
                raise LaunchError(f"cannot execute {argv[0]}: {exc.strerror}") from exc
        finally:
            listener.close()  # QEMU holds its own copy
            if vfio is not None:
                vfio.close()
            net.close_fds(taps)
            net.close_fds(vhost)
        return proc, argv, plan

    @property
    def serial_log(self) -> Path:
        """The file the guest's serial console is logged to, as QEMU's command
        line names it (a VM launched before QEMU's files moved to ``qemu/``
        has it in the run directory itself)."""
        named = serial_path(self.state.argv) if self.state is not None else None
        return named or self.spec.serial_log or self.paths.serial

    @property
    def confinement(self) -> Confinement | None:
        """How this VM's QEMU is confined (None: it is not)."""
        return self._confinement if self.state is None else self.state.confinement()

    def confined_argv(self, argv: list[str]) -> list[str]:
        """*argv* (a QEMU command line of this VM) as sealvm starts it: through
        the jail when the VM is confined (`sealvm.confine`), with the view
        made for the binary argv[0] names."""
        conf = self.confinement
        if conf is None:
            return argv
        spec = self.spec.with_qemu(Path(argv[0]))
        trampoline = None
        if spec.security.cpr_exec:
            with contextlib.suppress(HostError):
                trampoline = cpr_trampoline()
        plan = confine.jail_plan(spec, conf, self.paths.qemu_dir, self.paths.jail_root,
                                 trampoline=trampoline)
        return confine.wrap(argv, plan)

    async def launch(self, *, timeout: float = 30.0) -> None:
        """Start QEMU and connect to its monitor.

        :raise SpecError: when a file the spec names is missing.
        :raise HostError: when a VFIO device cannot be opened.
        :raise StateError: when this object or the run directory already has
            a live VM, or the run root is not safe (`check_run_root`).
        :raise LaunchError: when QEMU exits or does not answer in *timeout*;
            everything acquired is released, the run directory is cleaned.
        """
        if self.runstate is not Runstate.IDLE:
            raise StateError(f"VM {self.name}: already {self.runstate.value}")
        check_files(self.spec)
        with self.lock.hold("up"):
            await self._launch(timeout)

    async def _launch(self, timeout: float) -> None:
        self._prepare_run_dir()
        nets: list[net.NetRecord] = []
        conf = None
        try:
            conf = confine.confinement(self.spec, self.paths.root)
            # the serial log may be left from a QEMU of another uid: the new one's
            confine.prepare(conf, self.paths.qemu_dir, self.paths.jail_root,
                            self.spec.serial_log or self.paths.serial)
            if conf is not None:
                conf = confine.hand_disks(self.spec, conf)
            self._confinement = conf
            nets = net.setup(self.spec)
            if self.spec.scripts.enabled:
                endpoint.start(self.paths, self.name, self.spec.scripts, owner=conf)
            self.process, argv, plan = self.spawn(self.spec, self.paths.qmp, nets=nets)
        except BaseException:
            net.teardown(nets)
            self._cleanup_run_dir()
            confine.restore_disks(conf)
            confine.release(conf, self.paths.root)
            self._confinement = None
            raise
        self.state = VmState(
            name=self.name,
            pid=self.process.pid,
            argv=argv,
            fds=plan.to_state(),
            spec=self.spec.to_dict(),
            started=time.time(),
            start_time=procfs.start_time(self.process.pid) or 0,
            net=[r.to_dict() for r in nets],
            disks={d.id: _file_id(d.path) for d in self.spec.disk},
            security=conf.to_state() if conf is not None else {},
        )
        try:
            await self.connect(timeout=timeout)
        except BaseException:
            await self.process.kill()
            self._release()
            raise
        self.save_state()
        self.runstate = Runstate.RUNNING

    def _prepare_run_dir(self) -> None:
        root = self.paths.root
        root.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_run_root(root.parent)
        try:
            root.mkdir(mode=0o700)
        except FileExistsError:
            check_run_root(root, what="run directory")
            # Never clean up what may belong to a live VM: an unreadable state
            # file or an interrupted update stops here, naming the file.
            old = read_state(self.paths)
            if self.paths.journal.exists():
                raise InterruptedUpdateError(
                    f"VM {self.name}: an update was interrupted ({self.paths.journal}); "
                    f"run `sealvm recover {self.name}` first") from None
            if old is not None and old.alive():
                raise StateError(
                    f"VM {self.name} is already running (pid {old.pid}); "
                    f"attach to it or run `sealvm down {self.name}`"
                ) from None
            self._cleanup_run_dir()
            if old is not None:  # its QEMU died: what sealvm created for it goes too
                release_host_resources(old, self.paths)
        os.chmod(root, 0o700)

    def save_state(self) -> None:
        """Write state.json atomically."""
        if self.state is None:
            raise StateError(f"VM {self.name}: nothing to save")
        tmp = self.paths.state.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.state), f, indent=1)
        os.replace(tmp, self.paths.state)

    @classmethod
    async def attach(cls, name: str, *, run_root: Path | None = None,
                     timeout: float = 10.0, lock: VmLock | None = None) -> Machine:
        """Attach to a VM another controller launched.  *lock*, when given,
        is the VM's lock the caller already holds (the Machine uses it).

        :raise StateError: when no live VM of that name exists, or the run
            root is not safe (`check_run_root`).
        :raise LaunchError: when its monitor does not answer in *timeout*.
        """
        paths = RunPaths((run_root or default_run_root()) / name)
        with contextlib.suppress(FileNotFoundError):
            check_run_root(paths.root.parent)
        state = read_state(paths)
        if state is None:
            raise StateError(f"no VM named {name!r} in {paths.root.parent}")
        if paths.journal.exists():
            raise InterruptedUpdateError(
                f"VM {name}: an update was interrupted ({paths.journal}); "
                f"run `sealvm recover {name}`")
        if not state.alive():
            raise StateError(f"VM {name}: QEMU (pid {state.pid}) is not running")
        self = cls(spec_from_dict(state.spec), run_root=paths.root.parent)
        if lock is not None:
            self.lock = lock
        self.state = state
        # a VM launched before QEMU's files moved to qemu/ (root's: unconfined)
        if not state.security:
            with contextlib.suppress(FileExistsError):
                paths.qemu_dir.mkdir(mode=0o700)
        self.process = QemuProcess(state.pid, logger=self.logger)
        try:
            if not state.alive():  # the pid was recycled while the pidfd opened
                raise StateError(f"VM {name}: QEMU (pid {state.pid}) is not running")
            await self.connect(timeout=timeout)
        except BaseException:
            self.process.close()
            self.process = None
            raise
        self.runstate = Runstate.RUNNING
        return self

    # ------------------------------------------------------------------- QMP

    def log_tail(self, lines: int = 20) -> str:
        """The last *lines* lines of QEMU's log (its stderr), or ""."""
        try:
            text = self.paths.qemu_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def open_qmp(self, path: Path, process: QemuProcess, *, timeout: float) -> QMPClient:
        """Connect a QMP client to *path*, racing *process*'s exit.

        :raise LaunchError: when the process exits first, or on timeout
            (with the tail of QEMU's log).
        """
        try:
            qmp = await connect_qmp(path, name=self.name, timeout=timeout, process=process)
        except LaunchError as exc:
            raise LaunchError(exc.message, exitcode=exc.exitcode,
                              output=self.log_tail()) from exc
        qmp.logger = self.logger.getChild("qmp")
        return qmp

    async def connect(self, *, timeout: float = 30.0) -> None:
        """(Re)connect to the monitor, e.g. after an exec dropped it.

        :raise LaunchError: when QEMU exits or its monitor does not answer.
        """
        if self.process is None or self.state is None:
            raise StateError(f"VM {self.name}: no QEMU process (launch() or attach() first)")
        if not self.process.watching and not self.process.exited.is_set():
            self.process = QemuProcess(self.state.pid, logger=self.logger)
        await self._disconnect()
        self._set_qmp(await self.open_qmp(self.paths.qmp, self.process, timeout=timeout))
        if self.runstate is Runstate.DETACHED:
            self.runstate = Runstate.RUNNING

    def _set_qmp(self, qmp: QMPClient) -> None:
        self._qmp = qmp
        self._pump = asyncio.create_task(self._pump_events(qmp), name=f"sealvm-events-{self.name}")

    async def _pump_events(self, qmp: QMPClient) -> None:
        async for event in qmp.events:
            for names, queue in self._subscribers:
                if names is None or event["event"] in names:
                    queue.put_nowait(dict(event))

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

    async def adopt(self, process: QemuProcess, qmp: QMPClient, argv: list[str],
                    fds: FdPlan) -> None:
        """Make a successor QEMU (cpr-transfer) this VM's process."""
        assert self.state is not None
        await self._disconnect()
        if self.process is not None:
            self.process.close()
        self.process = process
        self._set_qmp(qmp)
        self.state.pid = process.pid
        self.state.start_time = procfs.start_time(process.pid) or 0
        self.state.argv = argv
        self.state.fds = fds.to_state()

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run a QMP command and return its result.

        :raise QMPReplyError: when QEMU answers with an error.
        :raise StateError: when not connected, or the monitor went away.
        """
        try:
            return await self.qmp.execute(command, dict(arguments) if arguments else None)
        except ExecuteError as exc:
            raise QMPReplyError(command, f"{exc.error_class}: {exc.error.error.desc}") from exc
        except ExecInterruptedError as exc:
            raise StateError(f"VM {self.name}: monitor disconnected during {command}") from exc
        except QMPError as exc:  # not connected, connection lost, protocol
            raise StateError(f"VM {self.name}: monitor connection lost ({command}): "
                             f"{type(exc).__name__}: {exc}") from exc

    async def events(
        self, names: Iterable[str] | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
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
        """The guest's run state as QEMU reports it ("running", "paused", ...).

        :raise QMPReplyError: on an error or malformed reply.
        """
        reply = await self.execute("query-status")
        if not isinstance(reply, dict) or not isinstance(reply.get("status"), str):
            raise QMPReplyError("query-status", f"malformed reply {reply!r}")
        return str(reply["status"])

    async def pause(self) -> None:
        """Pause the guest (QMP ``stop``)."""
        await self.execute("stop")

    async def resume(self) -> None:
        """Resume the guest (QMP ``cont``)."""
        await self.execute("cont")

    async def reset(self) -> None:
        """Reset the guest (QMP ``system_reset``): it boots again."""
        await self.execute("system_reset")

    async def powerdown(self, *, timeout: float = 10.0) -> bool:
        """ACPI power button; True if QEMU exited within *timeout*."""
        await self.execute("system_powerdown")
        assert self.process is not None
        return await self.process.wait_exit(timeout)

    async def wait_exit(self, timeout: float | None = None) -> bool:
        """Wait until QEMU exited; False if it still runs after *timeout*."""
        return True if self.process is None else await self.process.wait_exit(timeout)

    async def detach(self) -> None:
        """Let go of the VM without stopping it (another controller may attach)."""
        await self._disconnect()
        if self.process is not None:
            self.process.close()
        if self.runstate is not Runstate.STOPPED:
            self.runstate = Runstate.DETACHED

    async def shutdown(self, *, timeout: float = 10.0) -> None:
        """Stop QEMU (quit, then SIGTERM, then SIGKILL) and release everything.

        Safe to call twice, after a failed launch, and on a VM that already
        exited.  Never raises for a QEMU that is already gone.
        """
        if self.runstate in (Runstate.STOPPED, Runstate.IDLE):
            return
        if self.runstate is Runstate.DETACHED:
            with contextlib.suppress(LaunchError):
                await self.connect(timeout=timeout)
        try:
            if self._qmp is not None and self.alive():
                with contextlib.suppress(QMPError, OSError, EOFError, StateError, QMPReplyError,
                                         TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self.qmp.execute("quit")
                await self.wait_exit(timeout)
            if self.process is not None:
                await self.process.kill(timeout=timeout)
        finally:
            await self._disconnect()
            self._release()

    def _release(self) -> None:
        if self.process is not None:
            self.process.close()
            if not self.process.alive():
                self._cleanup_run_dir()
                if self.state is not None:
                    release_host_resources(self.state, self.paths)
        self.runstate = Runstate.STOPPED

    def _cleanup_run_dir(self) -> None:
        cleanup_run_files(self.paths)


def release_host_resources(state: VmState, paths: RunPaths) -> list[str]:
    """Remove what sealvm created on the host for a VM whose QEMU is gone
    (taps, namespaces), give its disk images their owners back and its uid
    back to sealvm's range; returns what was removed."""
    removed = net.teardown(state.net_records())
    conf = state.confinement()
    removed += [f"{p}: owner restored" for p in confine.restore_disks(conf)]
    confine.release(conf, paths.root)
    for what in removed:
        log.info("%s: removed %s", state.name, what)
    return removed


def _file_id(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino]


def cleanup_run_files(paths: RunPaths) -> None:
    """Remove what only a live VM needs (and stop its script endpoint);
    logs stay for post-mortems."""
    endpoint.stop(paths)
    for p in (paths.qmp, paths.state, paths.cpr_state, paths.cpr_sock, paths.main_sock,
              paths.keeper_sock, paths.state.with_suffix(".tmp"),
              *paths.root.glob("qmp-next-*.sock")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _message_before_greeting(exc: BaseException | None) -> bool:
    """Whether a connection failed because QEMU sent something else before
    its greeting.  QEMU resets a QMP monitor's negotiation only when the
    next client connects, so an event emitted after one client went away
    (a killed controller's MIGRATION "failed") can reach the next client
    ahead of the greeting; that client may simply connect again."""
    return isinstance(exc, GreetingError) or isinstance(getattr(exc, "exc", None),
                                                        GreetingError)


async def connect_qmp(path: Path, *, name: str, timeout: float,
                      process: QemuProcess | None = None) -> QMPClient:
    """A QMP client connected to *path*, racing *process*'s exit if given.
    A stale message ahead of QEMU's greeting (`_message_before_greeting`)
    is not a failure: it connects again, twice at most.

    :raise LaunchError: when the process exits first, the connection is
        refused, or nothing answers in *timeout*.
    """
    deadline = time.monotonic() + timeout
    attempts = 3
    for attempt in range(1, attempts + 1):
        try:
            return await _connect_qmp_once(path, name=name, process=process,
                                           timeout=max(0.1, deadline - time.monotonic()))
        except LaunchError as exc:
            if attempt == attempts or not _message_before_greeting(exc.__cause__):
                raise
            log.warning("%s: QEMU sent a stale message before its greeting (%s); "
                        "connecting again", path, exc.__cause__)
    raise AssertionError("not reached")


async def _connect_qmp_once(path: Path, *, name: str, timeout: float,
                            process: QemuProcess | None) -> QMPClient:
    qmp = QMPClient(name)
    connect = asyncio.ensure_future(qmp.connect(str(path)))
    waits: set[asyncio.Future[Any]] = {connect}
    died = None
    if process is not None:
        died = asyncio.ensure_future(process.exited.wait())
        waits.add(died)
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if died is not None:
            died.cancel()
    if connect in done and connect.exception() is None:
        return qmp
    connect.cancel()
    with contextlib.suppress(BaseException):
        await connect
    with contextlib.suppress(QMPError, OSError, EOFError):
        await qmp.disconnect()
    if process is not None:
        if connect in done:
            # a refused or reset connection usually means QEMU is exiting
            await process.wait_exit(1.0)
        if process.exited.is_set():
            await process.wait_exit(1)
            raise LaunchError(f"QEMU (pid {process.pid}) exited before its monitor answered",
                              exitcode=process.exitcode)
    if connect in done:
        exc = connect.exception()
        raise LaunchError(f"cannot connect to {path}: {exc}") from exc
    raise LaunchError(f"QEMU's monitor at {path} did not answer within {timeout:.0f} s "
                      "(another client may hold it)")


def read_state(paths: RunPaths) -> VmState | None:
    """The state file of a run directory, or None if there is none.

    :raise StateError: naming the file, when it is unreadable, corrupt or of
        another version (nothing is deleted).
    """
    try:
        data = json.loads(paths.state.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as exc:
        raise StateError(f"{paths.state}: unreadable state file ({exc}); "
                         "left as it is") from exc
    version = data.get("version") if isinstance(data, dict) else None
    if version != STATE_VERSION:
        raise StateError(f"{paths.state}: state file version {version!r}, this sealvm "
                         f"reads version {STATE_VERSION}; left as it is")
    try:
        return VmState(**data)
    except TypeError as exc:
        raise StateError(f"{paths.state}: malformed state file ({exc}); "
                         "left as it is") from exc


def list_vms(run_root: Path | None = None) -> list[VmState]:
    """Every VM with a state file under *run_root* (alive or not)."""
    root = run_root or default_run_root()
    found = []
    with contextlib.suppress(FileNotFoundError):
        check_run_root(root)
        for d in sorted(root.iterdir()):
            if not d.is_dir():
                continue
            try:
                state = read_state(RunPaths(d))
            except StateError as exc:
                log.warning("%s", exc)
                continue
            if state is not None:
                found.append(state)
    return found
