"""
cpr-exec's way back: a keeper that holds the guest's fds across the exec.

Without it, cpr-exec is one-way: once the old image has exec()d, a new QEMU
that crashes, exits or hangs while loading takes the guest with it.  With
it, QEMU exec()s a small trampoline (`sealvm.trampoline`) first, which
hands a copy of every fd the old QEMU preserved for cpr-exec (guest-RAM
memfds, the CPR state memfd, the QMP listener, VFIO fds) to the keeper
over a unix socket (SCM_RIGHTS, with their numbers), then exec()s the new
QEMU.  The keeper, a process of its own that outlives the controller, can
then start the *previous* QEMU on the same fds, at the same numbers, with
the CPR state: it loads the device-state file and resumes the guest, which
never ran on the new QEMU (that one waits with ``-S``).

The keeper (`keeper`, a stdlib-only script) is started for each cpr-exec
before ``migrate``, answers before the update goes on, and is released when
the update ends (by the controller or by `recover`).  Protocol, one request
per connection, one line each::

    fds state=N A B C ...   (+ SCM_RIGHTS)  -> nothing (the trampoline
                                               does not wait)
    status                                  -> {"held": [A, B, ...], "state": N}
    fallback {"argv": [...], "log": PATH}   -> {"pid": P}
    release                                 -> "k", and the keeper exits
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from .. import procfs
from ..confine import Confinement, give
from ..errors import HostError, StateError
from ..machine import listen_unix
from ..plan import RunPaths
from ..process import QemuProcess

# ------------------------------------------------------------------ client


class Keeper:
    """The controller's handle on a keeper process."""

    def __init__(self, paths: RunPaths, pid: int, start_time: int) -> None:
        self.paths = paths
        self.pid = pid
        self.start_time = start_time

    @classmethod
    async def start(cls, paths: RunPaths, *, owner: Confinement | None = None,
                    timeout: float = 60.0) -> Keeper:
        """Start a keeper listening at ``paths.keeper_sock`` and wait until it
        answers, so that its start-up never falls inside the guest's pause.
        With *owner* (a confined VM), the socket belongs to the VM's user, so
        that the trampoline, which runs as that user, can hand its fds over;
        every other request is answered to root only (the keeper checks its
        peer's credentials).

        :raise HostError: when it cannot be started or does not answer.
        """
        listener = listen_unix(paths.keeper_sock)
        give(paths.keeper_sock, owner)
        try:
            # stdlib only, run by path in isolated mode: starts in tens of ms
            p = subprocess.Popen(
                [sys.executable, "-I", str(Path(__file__).with_name("keeper.py")),
                 "--fd", str(listener.fileno()), "--name", str(paths.root)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=[listener.fileno()], start_new_session=True)
        except OSError as exc:
            raise HostError(f"cannot start the cpr-exec keeper: {exc}") from exc
        finally:
            listener.close()
        self = cls(paths, p.pid, procfs.start_time(p.pid) or 0)
        try:
            await self.request("status", timeout=timeout)
        except StateError as exc:
            await self.release()
            raise HostError(f"the cpr-exec keeper does not answer: {exc}") from exc
        return self

    @classmethod
    def of(cls, paths: RunPaths, record: dict[str, Any]) -> Keeper | None:
        """The keeper a journal record names, if it is still alive."""
        if not record or not procfs.same_process(record["pid"], record["start_time"]):
            return None
        return cls(paths, int(record["pid"]), int(record["start_time"]))

    def record(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_time": self.start_time}

    def alive(self) -> bool:
        return procfs.same_process(self.pid, self.start_time)

    def _request(self, line: str, timeout: float) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.paths.keeper_sock))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    async def request(self, line: str, timeout: float = 10.0) -> bytes:
        """:raise StateError: when the keeper does not answer."""
        try:
            return await asyncio.to_thread(self._request, line, timeout)
        except OSError as exc:
            raise StateError(f"cpr-exec keeper (pid {self.pid}): {exc}") from exc

    async def held(self) -> list[int]:
        """The fd numbers (in QEMU) the keeper holds copies of."""
        reply = json.loads(await self.request("status"))
        return [int(n) for n in reply["held"]] if reply.get("state") is not None else []

    async def fall_back(self, argv: list[str], log: Path) -> int:
        """Start *argv* (the previous QEMU) on the fds held; returns its pid.

        :raise StateError: when the keeper holds nothing or cannot start it.
        """
        reply = json.loads(await self.request(
            "fallback " + json.dumps({"argv": argv, "log": str(log)})))
        if "pid" not in reply:
            raise StateError(f"cpr-exec keeper could not start {argv[0]}: "
                             f"{reply.get('error', reply)}")
        return int(reply["pid"])

    async def release(self) -> None:
        """Let the keeper close everything and exit (idempotent)."""
        if self.alive():
            proc = QemuProcess(self.pid)
            try:
                with contextlib.suppress(StateError):
                    await self.request("release", timeout=5.0)
                if not await proc.wait_exit(5.0):  # it exits right after answering
                    await proc.kill()
            finally:
                proc.close()
        with contextlib.suppress(FileNotFoundError):
            self.paths.keeper_sock.unlink()
