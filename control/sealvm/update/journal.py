"""
The update journal: nothing irreversible without a record.

One JSON object per line in ``update.journal`` in the VM's run directory,
each written and fsync'd (file, then directory for the first) *before* the
step it announces.  Steps, in order (each update writes a subset):

========== ===========================================================
begin      mode, old QEMU (pid, start time, argv), new binary, the
           guest's run state, the marker argument of the new QEMU
migrate    ``migrate`` is about to be sent to the old QEMU
spawn      (new process modes) the new QEMU is about to be started
spawned    its pid, start time, argv, fds, QMP socket
exec       (cpr-exec) the new image answers on the inherited socket
fallback   (cpr-exec) the new image failed: the previous QEMU is started
           on the fds the keeper holds (`wayback`)
loaded     the new QEMU has loaded the device state (paused by ``-S``)
resuming   ``cont`` is about to be sent to the new QEMU: from here on the
           guest may have run there, so the old state is no way back
resumed    the new QEMU runs the guest: the fence.  From here on the
           update only goes forward
old-quit   (new process modes) the old QEMU has exited
end        the outcome; the file is then renamed ``last-update.journal``
========== ===========================================================

Steps taken while the guest is paused (exec, loaded, resuming) are written
but not fsync'd: a record only has to outlive the controller, which the
page cache guarantees; a power loss takes QEMU and the guest with it, and
an fsync inside the pause would lengthen every update.

While ``update.journal`` exists, the VM has an interrupted update and only
``recover`` (`sealvm.update.recover`) may touch it.  The files the update
needs (the device-state file, the successor's socket) stay until ``end``.

Fault injection, for the fault matrix (tests/faults): with
``SEALVM_FAULT=ACTION@POINT`` in the environment, *ACTION* happens right
after the step *POINT* is written (or at a `Journal.fault` point of that
name, such as ``migrate-sent``):

- ``kill-controller``: this process SIGKILLs itself;
- ``kill-new`` / ``kill-old``: the new / old QEMU is SIGKILLed;
- ``stop-new``: the new QEMU is SIGSTOPped (a hang);
- ``cut-qmp``: every connection of this process to a socket in the run
  directory is shut down (the QMP connection cut mid-command);
- ``fill-disk``: a file ``fault-fill`` takes the run directory's free space.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import time
from typing import Any

from ..errors import InterruptedUpdateError, PreflightError, StateError
from ..plan import RunPaths

FAULT_ENV = "SEALVM_FAULT"
FAULT_ACTIONS = ("kill-controller", "kill-new", "kill-old", "stop-new", "cut-qmp", "fill-disk")

STEPS = ("begin", "migrate", "spawn", "spawned", "exec", "fallback", "loaded", "resuming",
         "resumed", "old-quit", "end")
#: steps inside the guest's pause: written, not fsync'd (see above)
IN_PAUSE = ("exec", "loaded", "resuming")


def _fsync_dir(path: os.PathLike[str] | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The journal of one update, in memory and on disk."""

    def __init__(self, paths: RunPaths, records: list[dict[str, Any]]) -> None:
        self.paths = paths
        self.records = records
        #: "old", "new" -> pid, for fault injection
        self.pids: dict[str, int] = {}

    @classmethod
    def begin(cls, paths: RunPaths, **data: Any) -> Journal:
        """Start the journal of a new update.

        :raise InterruptedUpdateError: when another update's journal is there.
        :raise PreflightError: when it cannot be written (a read-only or full
            file system): nothing was touched.
        """
        try:
            fd = os.open(paths.journal, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         0o600)
        except FileExistsError:
            raise InterruptedUpdateError(
                f"an update was interrupted ({paths.journal}); run `sealvm recover "
                f"{paths.root.name}` first") from None
        except OSError as exc:
            raise PreflightError([f"journal: cannot write {paths.journal}: "
                                  f"{exc.strerror}"]) from exc
        os.close(fd)
        self = cls(paths, [])
        try:
            _fsync_dir(paths.root)
            self.record("begin", **data)
        except OSError as exc:
            with contextlib.suppress(OSError):
                paths.journal.unlink()
            raise PreflightError([f"journal: cannot write {paths.journal}: "
                                  f"{exc.strerror}"]) from exc
        return self

    @classmethod
    def load(cls, paths: RunPaths) -> Journal | None:
        """The journal of an interrupted update, or None when there is none.

        A torn last line (the writer died inside ``write``) is ignored: its
        step had not started.

        :raise StateError: when the journal is unreadable (names the file).
        """
        try:
            text = paths.journal.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"{paths.journal}: unreadable ({exc})") from exc
        records = []
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                if i == len(lines) - 1:  # torn tail: not written, not acted on
                    break
                raise StateError(f"{paths.journal}: corrupt line {i + 1}") from None
            if not isinstance(rec, dict) or rec.get("step") not in STEPS:
                raise StateError(f"{paths.journal}: line {i + 1} is not a journal record")
            records.append(rec)
        if not records or records[0]["step"] != "begin":
            raise StateError(f"{paths.journal}: does not start with 'begin'")
        return cls(paths, records)

    # ----------------------------------------------------------------- reading

    @property
    def start(self) -> dict[str, Any]:
        return self.records[0]

    def has(self, step: str) -> bool:
        return any(r["step"] == step for r in self.records)

    def get(self, step: str) -> dict[str, Any]:
        """The last record of *step* (empty if none)."""
        for r in reversed(self.records):
            if r["step"] == step:
                return dict(r)
        return {}

    @property
    def last(self) -> str:
        return str(self.records[-1]["step"])

    # ----------------------------------------------------------------- writing

    def record(self, step: str, **data: Any) -> None:
        """Append *step*; before returning it is durable (fsync'd), or for a
        step inside the pause, in the page cache."""
        assert step in STEPS, step
        rec = {"step": step, "time": time.time(), **data}
        line = json.dumps(rec, default=str) + "\n"
        fd = os.open(self.paths.journal, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.write(fd, line.encode())
            if step not in IN_PAUSE:
                os.fsync(fd)
        finally:
            os.close(fd)
        self.records.append(rec)
        self.fault(step)

    def fault(self, point: str) -> None:
        """Inject the fault ``$SEALVM_FAULT`` names, if it names *point*."""
        action, _, at = os.environ.get(FAULT_ENV, "").partition("@")
        if at != point:
            return
        if action == "kill-controller":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action in ("kill-new", "kill-old", "stop-new"):
            pid = self.pids.get(action.split("-")[1])
            if pid is None:
                return
            if action == "stop-new":
                os.kill(pid, signal.SIGSTOP)
                return
            # a crash at this point, not some time later: wait until it is dead
            pidfd = os.pidfd_open(pid)
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                select.select([pidfd], [], [], 10.0)
            finally:
                os.close(pidfd)
        elif action == "cut-qmp":
            self._cut_connections()
        elif action == "fill-disk":
            fd = os.open(self.paths.root / "fault-fill", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
                         0o600)
            try:
                with contextlib.suppress(OSError):
                    os.posix_fallocate(fd, 0, os.statvfs(self.paths.root).f_bavail *
                                       os.statvfs(self.paths.root).f_frsize)
            finally:
                os.close(fd)
        else:
            raise ValueError(f"{FAULT_ENV}: unknown action {action!r} "
                             f"(one of {', '.join(FAULT_ACTIONS)})")

    def _cut_connections(self) -> None:
        root = str(self.paths.root)
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                    continue
                s = socket.socket(fileno=os.dup(int(name)))
                try:
                    peer = s.getpeername() if s.family == socket.AF_UNIX else ""
                    if isinstance(peer, str) and peer.startswith(root):
                        s.shutdown(socket.SHUT_RDWR)
                finally:
                    s.close()

    def end(self, outcome: str, **data: Any) -> None:
        """Record the outcome and retire the journal (``last-update.journal``)."""
        self.record("end", outcome=outcome, **data)
        os.replace(self.paths.journal, self.paths.last_journal)
        with contextlib.suppress(OSError):
            _fsync_dir(self.paths.root)
