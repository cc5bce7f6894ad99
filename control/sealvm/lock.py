"""
One VM, one controller at a time: a per-VM lock (``flock``).

Every verb that changes a VM (up, update, recover, pause, resume, down, qmp)
holds the VM's lock for as long as it runs.  The lock file sits beside the
run directory (``.NAME.lock``), so ``up`` can take it before the directory
exists.  It records who holds it (pid, verb, since when) so that a refusal
names the holder.  The kernel drops the lock when its holder dies: a killed
controller never leaves a stale lock behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import StateError
from .runroot import check_run_root


class VmLock:
    """The lock of one VM; reentrant within one holder object."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        self._fd = -1
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._depth > 0

    def holder(self) -> str:
        """Who holds (or last held) the lock, as a phrase."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "another sealvm process"
        if not isinstance(info, dict):
            return "another sealvm process"
        since = time.strftime("%H:%M:%S", time.localtime(float(info.get("since", 0))))
        return f"pid {info.get('pid', '?')} (sealvm {info.get('verb', '?')}, since {since})"

    def _open(self) -> int:
        """:raise StateError: when the run root is not safe (`check_run_root`)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_run_root(self.path.parent)
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _claimed(self, fd: int, verb: str) -> None:
        self._fd = fd
        self._depth = 1
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "verb": verb,
                                  "since": time.time()}).encode(), 0)

    def acquire(self, verb: str) -> None:
        """Take the lock now.

        :raise StateError: when another process holds it (names the holder).
        """
        if self._depth:
            self._depth += 1
            return
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno != errno.EWOULDBLOCK:
                raise
            raise StateError(f"VM {self.name} is busy: {self.holder()} holds its lock "
                             f"{self.path} (wait with --wait)") from None
        self._claimed(fd, verb)

    async def acquire_wait(self, verb: str, timeout: float | None = None) -> None:
        """Take the lock, waiting for the holder to let go.

        :raise StateError: when *timeout* passes first.
        """
        if self._depth:
            self._depth += 1
            return
        fd = self._open()
        try:
            async with asyncio.timeout(timeout):
                # flock() blocks, so a thread waits; if the wait is cancelled
                # the fd is closed and a lock the thread still gets dies with it.
                await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        except TimeoutError:
            os.close(fd)
            raise StateError(f"VM {self.name}: {self.holder()} still holds its lock "
                             f"after {timeout:.0f} s") from None
        except BaseException:
            os.close(fd)
            raise
        self._claimed(fd, verb)

    def release(self) -> None:
        if not self._depth:
            return
        self._depth -= 1
        if self._depth == 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # drops the flock
            self._fd = -1

    @contextlib.contextmanager
    def hold(self, verb: str) -> Iterator[None]:
        self.acquire(verb)
        try:
            yield
        finally:
            self.release()
