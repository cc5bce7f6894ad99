"""
One QEMU process, watched through a pidfd.

Works the same for a process this controller spawned (it is reaped here)
and for one another controller spawned (attach): a pidfd never refers to a
recycled pid, and becomes readable when the process exits.  The pid survives
cpr-exec (same process, new image).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from pathlib import Path

from . import procfs


class QemuProcess:
    """A running (or exited) QEMU process."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None,
                 *, logger: logging.Logger | None = None) -> None:
        self.pid = pid
        self.logger = logger or logging.getLogger("sealvm.process")
        self._popen = popen
        self._exited = asyncio.Event()
        self._pidfd = -1
        self.exitcode: int | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._on_exit()
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_exit)

    @classmethod
    def spawn(cls, argv: list[str], *, pass_fds: list[int], log_path: Path,
              logger: logging.Logger | None = None) -> QemuProcess:
        """Start *argv* in its own session (it outlives this controller),
        stdout and stderr appended to *log_path*, umask 077.

        :raise OSError: when it cannot be executed.
        """
        logf = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                pass_fds=pass_fds,
                start_new_session=True,
                umask=0o077,
            )
        finally:
            os.close(logf)
        return cls(popen.pid, popen, logger=logger)

    def __repr__(self) -> str:
        return f"<QemuProcess pid={self.pid} exitcode={self.exitcode}>"

    def _on_exit(self) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._pidfd)
        if self._popen is not None:
            self.exitcode = self._popen.poll()
        self._exited.set()

    @property
    def exited(self) -> asyncio.Event:
        return self._exited

    def alive(self) -> bool:
        return not self._exited.is_set() and procfs.pid_alive(self.pid)

    async def wait_exit(self, timeout: float | None = None) -> bool:
        """Wait for the process to exit; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._exited.wait()
        except TimeoutError:
            return not procfs.pid_alive(self.pid)
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.exitcode = self._popen.wait(timeout=1)
        return True

    def send_signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self._pidfd >= 0:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.pid, sig)

    async def kill(self, *, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL; returns once the process is gone."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self.alive():
                break
            self.logger.debug("pid %d: sending %s", self.pid, sig.name)
            self.send_signal(sig)
            await self.wait_exit(timeout)
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.exitcode = self._popen.wait(timeout=timeout)

    @property
    def watching(self) -> bool:
        return self._pidfd >= 0

    def close(self) -> None:
        """Stop watching (the process itself is not touched)."""
        if self._pidfd >= 0:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
