"""
The test guest's serial console: parsing and a timestamping follower.

The guest (images/guest) prints one line per event::

    SEALVM-GUEST v1 ram=... hb_ms=10 ...
    HB <seq> t=<guest ms> gen=<g> mism=<n> [k=v ...]
    PASS gen=<g> mism=<n> ms=<t>
    MISMATCH gen=<g> addr=0x<a> words=<n> expected=0x<e> got=0x<v>

The guest's clock stops while QEMU is paused, so a pause can only be seen
from the host: `ConsoleFollower` timestamps each line when it reaches the
serial log (inotify, no polling), and the largest gap between consecutive
heartbeats, minus the interval, is the pause the guest went through.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from . import _ffi

_KV = re.compile(r"(\w+)=(\S+)")


@dataclass(frozen=True)
class Heartbeat:
    """One ``HB`` line: sequence number, guest time, its other fields."""

    seq: int
    guest_ms: int
    values: dict[str, str]
    host_time: float = 0.0  # time.monotonic() when the line arrived

    def int(self, key: str, default: int = 0) -> int:
        """Field *key* as an integer (decimal or 0x), *default* if absent."""
        value = self.values.get(key)
        return default if value is None else int(value, 0)


@dataclass(frozen=True)
class Mismatch:
    """One ``MISMATCH`` line: words of guest RAM found changed at *addr*."""

    gen: int
    addr: int
    words: int
    expected: int
    got: int


@dataclass(frozen=True)
class Pass:
    """One ``PASS`` line: the guest verified all of its RAM (generation *gen*)."""

    gen: int
    mismatches: int
    ms: int


Event = Heartbeat | Mismatch | Pass


def parse_line(line: str, host_time: float = 0.0) -> Event | None:
    """Parse one console line; None for lines that are not events."""
    if line.startswith("HB "):
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[1].isdigit():
            return None
        values = dict(_KV.findall(parts[2] if len(parts) > 2 else ""))
        try:
            guest_ms = int(values.pop("t"))
        except (KeyError, ValueError):
            return None
        return Heartbeat(int(parts[1]), guest_ms, values, host_time)
    if line.startswith("MISMATCH "):
        kv = dict(_KV.findall(line))
        try:
            return Mismatch(
                gen=int(kv["gen"]),
                addr=int(kv["addr"], 16),
                words=int(kv["words"]),
                expected=int(kv["expected"], 16),
                got=int(kv["got"], 16),
            )
        except (KeyError, ValueError):
            return None
    if line.startswith("PASS "):
        kv = dict(_KV.findall(line))
        try:
            return Pass(int(kv["gen"]), int(kv["mism"]), int(kv["ms"]))
        except (KeyError, ValueError):
            return None
    return None


@dataclass
class ConsoleLog:
    """Everything parsed from a console log, in order."""

    heartbeats: list[Heartbeat] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    passes: list[Pass] = field(default_factory=list)
    banners: int = 0
    #: banners after a heartbeat: the guest started over
    reboots: int = 0
    #: the key=value fields of the first banner (``ram``, ``hb_ms``,
    #: ``pattern``, ...); None until one was seen
    banner: dict[str, str] | None = None

    def add(self, line: str, host_time: float = 0.0) -> Event | None:
        """Parse one line into the log; the event it was, if any."""
        if line.startswith("SEALVM-GUEST "):
            self.banners += 1
            if self.banner is None:
                self.banner = dict(_KV.findall(line.split('cmdline="', 1)[0]))
            if self.heartbeats:
                self.reboots += 1
        ev = parse_line(line, host_time)
        if isinstance(ev, Heartbeat):
            self.heartbeats.append(ev)
        elif isinstance(ev, Mismatch):
            self.mismatches.append(ev)
        elif isinstance(ev, Pass):
            self.passes.append(ev)
        return ev

    @property
    def mismatched_words(self) -> int:
        """Words reported by the MISMATCH lines in the log."""
        return sum(m.words for m in self.mismatches)

    def mismatch_counter(self) -> int | None:
        """The guest's own count of mismatching words since it booted (the
        latest heartbeat's ``mism=``); None before a heartbeat carried one.

        Unlike `mismatches` it does not depend on every MISMATCH line having
        reached the log: a guest that found damage says so in its next
        heartbeat.
        """
        for hb in reversed(self.heartbeats):
            if "mism" in hb.values:
                return hb.int("mism")
        return None

    def counter_continuous(self) -> bool:
        """True when heartbeat sequence numbers never reset or skip."""
        seqs = [hb.seq for hb in self.heartbeats]
        return all(b == a + 1 for a, b in zip(seqs, seqs[1:], strict=False))

    def largest_gap(self, start: int = 0, *, after: float | None = None,
                    before: float | None = None) -> float:
        """Largest host-time gap between consecutive heartbeats from index
        *start* on (seconds); with *after* (monotonic), only the gaps that
        began at or after it; with *before*, only those that ended at or
        before it."""
        times = [hb.host_time for hb in self.heartbeats[start:]]
        return max((b - a for a, b in zip(times, times[1:], strict=False)
                    if (after is None or a >= after) and (before is None or b <= before)),
                   default=0.0)

    def gap_around(self, when: float, start: int = 0) -> tuple[float, float] | None:
        """The gap between consecutive heartbeats (from index *start* on)
        that *when* (monotonic) falls in: its (begin, end) host times; None
        when no heartbeat came before or after *when*."""
        times = [hb.host_time for hb in self.heartbeats[start:]]
        for a, b in zip(times, times[1:], strict=False):
            if a <= when < b:
                return a, b
        return None


def read_console(path: Path) -> ConsoleLog:
    """Parse a whole console log (no timestamps)."""
    log = ConsoleLog()
    with open(path, errors="replace") as f:
        for line in f:
            log.add(line.rstrip("\r\n"))
    return log


class ConsoleFollower:
    """Follow a growing console log, timestamping each complete line.

    Use as an async context manager; it starts at the current end of the
    file.  A thread of its own blocks on inotify and stamps each line the
    moment it reaches the file, so a busy event loop (the controller doing
    its own work right after a resume) cannot delay the stamps and inflate
    the pause it measures.  `wait_for` waits (without polling) until a
    parsed event satisfies a predicate; `wait_full_pass` until every word
    of guest RAM written so far has been verified.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.log = ConsoleLog()
        self._fd = -1
        self._ifd = -1
        self._stop_r = self._stop_w = -1
        self._partial = b""
        self._lock = threading.Lock()
        self._changed = asyncio.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> ConsoleFollower:
        self._loop = asyncio.get_running_loop()
        try:
            self._ifd = _ffi.inotify_init1(_ffi.IN_CLOEXEC)
            _ffi.inotify_add_watch(self._ifd, str(self.path), _ffi.IN_MODIFY)
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            os.lseek(self._fd, 0, os.SEEK_END)
            self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._follow, name=f"console:{self.path.name}",
                                        daemon=True)
        self._thread.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop following (idempotent; `__aexit__` calls it)."""
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join()
            self._thread = None
        for name in ("_ifd", "_fd", "_stop_r", "_stop_w"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def _follow(self) -> None:
        """Thread: stamp lines as inotify reports the file grew."""
        assert self._loop is not None
        while True:
            ready, _, _ = select.select([self._ifd, self._stop_r], [], [])
            now = time.monotonic()
            if self._stop_r in ready:
                return
            os.read(self._ifd, 65536)
            with self._lock:
                self._drain(now)
            try:
                self._loop.call_soon_threadsafe(self._changed.set)
            except RuntimeError:  # the loop is closed: nobody is waiting
                return

    def _drain(self, now: float) -> None:
        while True:
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                break
            data = self._partial + chunk
            *lines, self._partial = data.split(b"\n")
            for raw in lines:
                self.log.add(raw.decode(errors="replace").rstrip("\r"), now)

    async def wait_for(self, predicate: Callable[[ConsoleLog], bool], timeout: float) -> None:
        """Wait until *predicate(log)* holds.

        :raise TimeoutError: when it does not hold within *timeout* seconds.
        """
        async with asyncio.timeout(timeout):
            while True:
                self._changed.clear()
                with self._lock:
                    if predicate(self.log):
                        return
                await self._changed.wait()  # set by the follower thread

    async def wait_full_pass(self, timeout: float = 60.0) -> Pass:
        """Wait until the guest has completed a pattern pass that started
        after now, so every word written before now has been verified.

        :return: that pass (its generation and the mismatches it found).
        :raise TimeoutError: when no such pass completes within *timeout*.
        """
        with self._lock:
            gen_now = self.log.heartbeats[-1].int("gen") if self.log.heartbeats else 0
        await self.wait_for(lambda log: any(p.gen > gen_now for p in log.passes), timeout)
        with self._lock:
            return next(p for p in self.log.passes if p.gen > gen_now)

    async def wait_heartbeats(self, count: int, timeout: float) -> None:
        """Wait until *count* more heartbeats than now have arrived."""
        with self._lock:
            target = len(self.log.heartbeats) + count
        await self.wait_for(lambda log: len(log.heartbeats) >= target, timeout)


def _interval(banner: dict[str, str] | None) -> float | None:
    value = (banner or {}).get("hb_ms", "")
    return int(value) / 1000 if value.isdigit() and int(value) > 0 else None


def heartbeat_interval(path: Path) -> float | None:
    """The heartbeat interval (seconds) the test guest announced in its
    banner on the console log *path*; None when the log has no banner (not
    sealvm's test guest, or a guest that does not print its format)."""
    try:
        return _interval(read_console(path).banner)
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class GuestCheck:
    """What `check_guest_console` found; the guest is intact when
    `problems` is empty (`ok`)."""

    #: heartbeats in the whole log, first and last sequence numbers
    heartbeats: int
    first_seq: int | None
    last_seq: int | None
    #: the pattern pass that began after the check started and completed
    #: (None when none did)
    verified_pass: Pass | None
    #: words named by MISMATCH lines; the guest's own counter (``mism=``)
    mismatched_words: int
    mismatch_counter: int | None
    reboots: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


async def check_guest_console(path: Path, *, timeout: float = 120.0) -> GuestCheck:
    """Check the test guest through its console log *path*, in one call.

    Waits (up to *timeout* seconds, without polling) for heartbeats and for
    a complete pattern pass that *began after this call*, so every word of
    guest RAM written before the call has been verified since; then reads
    the whole log from boot: no reboot, the heartbeat counter never reset
    or skipped, no MISMATCH line, zero mismatches in that pass and in the
    guest's own counter.  Works with sealvm's test guest (images/guest) or
    any guest printing the same console format (banner, HB, PASS, MISMATCH);
    a log without that banner, or with the pattern off, is a problem, not a
    pass.  The guest must be running: a paused guest times out.

    :return: the findings; nothing is raised for a damaged guest (look at
        `GuestCheck.problems`).
    :raise FileNotFoundError: when *path* does not exist.
    """
    problems: list[str] = []
    passed: Pass | None = None
    async with ConsoleFollower(path) as con:  # from the end, before reading
        banner = read_console(path).banner
        if banner is None:  # just booted: wait for it
            with contextlib.suppress(TimeoutError):
                await con.wait_for(lambda log: log.banner is not None, timeout)
            banner = con.log.banner
        if banner is None:
            problems.append(f"{path}: no SEALVM-GUEST banner within {timeout:.0f} s: not "
                            "sealvm's test guest (or a guest printing its console format)")
        elif banner.get("pattern") != "on":
            problems.append(f"the guest's memory pattern is {banner.get('pattern')!r}, not "
                            "on: its RAM is not verified")
        else:
            try:
                await con.wait_heartbeats(2, timeout)
            except TimeoutError:
                problems.append(f"no heartbeat within {timeout:.0f} s "
                                "(is the guest paused, hung or dead?)")
            else:
                with con._lock:
                    gen = con.log.heartbeats[-1].int("gen")
                try:
                    await con.wait_for(lambda log: any(p.gen > gen for p in log.passes),
                                       timeout)
                    passed = next(p for p in con.log.passes if p.gen > gen)
                except TimeoutError:
                    problems.append(f"no complete pattern pass within {timeout:.0f} s")
    log = read_console(path)
    if log.reboots:
        problems.append(f"the guest rebooted ({log.reboots} time(s))")
    if not log.heartbeats:
        problems.append("no heartbeat in the log")
    elif not log.counter_continuous():
        seqs = [hb.seq for hb in log.heartbeats]
        at = next(i for i, (a, b) in enumerate(zip(seqs, seqs[1:], strict=False), 1)
                  if b != a + 1)
        problems.append(f"heartbeat counter reset or skipped: {seqs[at - 1]} -> {seqs[at]}")
    if log.mismatches:
        first = log.mismatches[0]
        problems.append(f"{log.mismatched_words} mismatching word(s) of guest RAM, first at "
                        f"{first.addr:#x}: expected {first.expected:#x}, got {first.got:#x}")
    if passed is not None and passed.mismatches:
        problems.append(f"the verified pass (gen {passed.gen}) found {passed.mismatches} "
                        "mismatch(es)")
    counter = log.mismatch_counter()
    if counter:
        problems.append(f"the guest counted {counter} mismatching word(s)")
    return GuestCheck(
        heartbeats=len(log.heartbeats),
        first_seq=log.heartbeats[0].seq if log.heartbeats else None,
        last_seq=log.heartbeats[-1].seq if log.heartbeats else None,
        verified_pass=passed,
        mismatched_words=log.mismatched_words,
        mismatch_counter=counter,
        reboots=log.reboots,
        problems=tuple(problems),
    )
