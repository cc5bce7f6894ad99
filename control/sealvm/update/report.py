"""What a live update reports: timings, RAM blocks before and after, checks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import procfs
from ..console import ConsoleLog
from ..errors import UpdateError


@dataclass(frozen=True)
class RamBlock:
    """One guest-RAM memfd a QEMU holds."""

    name: str
    inode: int
    size: int
    seals: list[str]

    @classmethod
    def of(cls, m: procfs.Memfd) -> RamBlock:
        """The block of a memfd read from /proc."""
        return cls(m.name, m.inode, m.size, m.seal_names)


def ram_blocks(pid: int) -> list[RamBlock]:
    """The guest-RAM memfds process *pid* holds."""
    return [RamBlock.of(m) for m in procfs.memfds(pid)]


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
    #: the guest's run state before the update, kept by it ("running"/"paused")
    guest_state: str = "running"
    #: STOP -> RESUME, from QEMU's QMP event timestamps (seconds); None for
    #: a paused guest (nothing to measure)
    pause_qmp: float | None = None
    #: QEMU's RESUME event timestamp (wall clock, seconds since the epoch);
    #: None when the guest was not resumed
    resumed_at: float | None = None
    #: largest heartbeat gap minus the heartbeat interval (seconds): the
    #: longest the guest saw no progress during the update, wherever it was
    pause_guest: float | None = None
    #: the heartbeat gap around QEMU's STOP -> RESUME, minus the heartbeat
    #: interval (seconds): the pause itself as the guest saw it
    pause_gap: float | None = None
    #: the largest heartbeat gap that ended before that one, minus the
    #: interval (seconds): a stall of the guest while the update was being
    #: prepared (the new QEMU starting beside it), part of `pause_guest`
    #: when it is the larger
    stall_before_stop: float | None = None
    #: the largest heartbeat gap that began after the controller saw QEMU
    #: resume the guest, minus the heartbeat interval (seconds): a stall of
    #: the running guest after the pause (the old QEMU's exit, the
    #: controller's hand-over), part of `pause_guest` when it is the larger
    stall_after_resume: float | None = None
    heartbeat_continuous: bool | None = None
    #: words the guest found changed: its own ``mism=`` counter, after a
    #: complete verified pass that began after the update
    mismatches: int | None = None
    #: phase -> seconds, in order (preflight, start, stop, save, exec, load, ...)
    phases: dict[str, float] = field(default_factory=dict)
    total: float = 0.0
    checks: list[str] = field(default_factory=list)
    #: assigned devices (spec ids) the new QEMU does not have
    devices_missing: list[str] = field(default_factory=list)

    @property
    def ram_inode_unchanged(self) -> bool:
        """True when every guest-RAM memfd is the same inode after as before
        (the guest kept its memory, not a copy)."""
        before = {b.name: b.inode for b in self.ram_before}
        after = {b.name: b.inode for b in self.ram_after}
        return bool(before) and before == after

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, with ``ram_inode_unchanged``."""
        d = asdict(self)
        d["ram_inode_unchanged"] = self.ram_inode_unchanged
        return d


Progress = Callable[[str, float], None]


class Clock:
    """Phase timings on the monotonic clock, reported as they end."""

    def __init__(self, progress: Progress | None) -> None:
        self.start = self.last = time.monotonic()
        self.phases: dict[str, float] = {}
        #: phase -> when it ended (monotonic)
        self.ended: dict[str, float] = {}
        self.progress = progress

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = now - self.last
        self.ended[phase] = now
        self.last = now
        if self.progress is not None:
            self.progress(phase, self.phases[phase])


def measure_gaps(report: UpdateReport, log: ConsoleLog, first: int, interval: float, *,
                 resumed: float | None) -> None:
    """The guest's pauses, from its heartbeats (from index *first*, every
    *interval* seconds): `pause_guest`, the largest gap; `stall_after_resume`,
    the largest that began after *resumed* (monotonic: when the controller
    saw QEMU resume the guest); `pause_gap`, the gap that the middle of QEMU's
    STOP -> RESUME falls in (its event timestamps, wall clock, moved onto the
    monotonic clock the heartbeats are stamped on), and `stall_before_stop`,
    the largest gap that ended before that one.  Each less one interval."""
    def less(gap: float) -> float:
        return max(0.0, gap - interval)

    report.pause_guest = less(log.largest_gap(first))
    if resumed is not None:
        report.stall_after_resume = less(log.largest_gap(first, after=resumed))
    if report.resumed_at is None or report.pause_qmp is None:
        return
    wall_to_mono = time.monotonic() - time.time()
    middle = report.resumed_at - report.pause_qmp / 2 + wall_to_mono
    around = log.gap_around(middle, first)
    if around is None:
        return
    begin, end = around
    report.pause_gap = less(end - begin)
    report.stall_before_stop = less(log.largest_gap(first, before=begin))


def verify(report: UpdateReport) -> None:
    """Post-update checks; the update is complete (the new QEMU has the guest),
    so a failure here is "completed with errors": the guest may be damaged.

    :raise UpdateError: (completed) naming every check that failed.
    """
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
        raise UpdateError("verification failed: " + "; ".join(problems),
                          rolled_back=False, completed=True)
