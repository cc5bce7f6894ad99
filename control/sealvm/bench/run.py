"""
Running the bench: the VMs, the rounds, and what is measured around each
update besides sealvm's `UpdateReport`.

Rounds, not blocks: for each size, round r performs one update of every
mode, in an order rotated by one mode per round, so that a slow minute of
the machine (another job, a cache flush) falls on every mode alike.  Two
ways to keep the VMs (``--vms``):

- together: one VM per mode, launched once and kept for all the rounds of
  the size; the VMs whose turn it is not are paused (QMP ``stop``), so only
  one guest runs at a time (a guest rewriting its RAM takes a whole core
  under TCG: three of them would share the 2 cores with the update being
  measured).  A VM whose update failed is shut down and a fresh one is
  launched at its next turn.
- one-at-a-time: each round launches each mode's VM in turn, performs one
  update and shuts it down; for sizes where the VMs of all modes do not fit
  in memory together (8 GiB each on this 23 GiB machine).  Every update is
  then the first of its VM.

Per update, besides the report: the guest RAM the QEMU being replaced has
touched (`ram_touched`) and, for sealvm's cpr-exec, the old address space's
teardown (`HolderWatch`).
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import procfs
from ..console import ConsoleFollower, ConsoleLog
from ..errors import SealvmError
from ..machine import Machine
from ..spec import spec_from_dict
from ..update import UpdateReport, live_update
from .args import MODES, Config, is_hugetlb
from .history import mem_available

HB_MS = 10
HUGEPAGE = 2 << 20
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
#: kept free for the rest of the machine when deciding --vms auto
MEM_RESERVE = 2 << 30
#: patch 20's holder gives up after 10 s on its own
HOLD_MAX = 15.0
HOLDER_COMM = "cpr-exec-hold"
WAIT = 900.0

#: how a mode's old address space goes away, and where that time is counted
TEARDOWN_HOLDER = "holder"      # sealvm cpr-exec: patch 20's holder exits after RESUME
TEARDOWN_IN_EXEC = "in exec"    # stock cpr-exec: exec() unmaps it, inside the pause
TEARDOWN_IN_TOTAL = "in total"  # transfer, classic: the old QEMU's exit, in "handover"


def teardown_kind(mode: str) -> str:
    which, live_mode = MODES[mode]
    if live_mode != "cpr-exec":
        return TEARDOWN_IN_TOTAL
    return TEARDOWN_HOLDER if which == "sealvm" else TEARDOWN_IN_EXEC


def reserve_hugepages(size: int) -> str | None:
    """Make *size* bytes of 2 MiB pages free; None if done, else why not."""
    try:
        total = int(NR_HUGEPAGES.read_text())
        free = int(Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
                   .read_text())
    except OSError as exc:
        return f"cannot read huge page counters: {exc}"
    need = size // HUGEPAGE - free
    if need <= 0:
        return None
    try:
        NR_HUGEPAGES.write_text(str(total + need))
    except OSError as exc:
        return f"cannot reserve {need} huge pages: {exc.strerror}"
    got = int(NR_HUGEPAGES.read_text()) - total
    if got < need:
        NR_HUGEPAGES.write_text(str(total))
        return f"the kernel gave {got} of {need} huge pages (memory fragmented or short)"
    return None


_VMA = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ (\d+)")
_MAPPED_KEYS = ("Rss", "Shared_Hugetlb", "Private_Hugetlb")


def ram_touched(pid: int) -> tuple[int, int]:
    """(resident, mapped) bytes of guest RAM (the memory-backend memfds) of
    QEMU *pid*.

    resident: the memfds' ``st_blocks``: the pages the memfd holds, every
    page the guest ever touched (tmpfs and hugetlbfs count a page from its
    first fault, read or write; this machine has no swap, so held is
    resident).  It says what the guest touched since boot, not what the
    QEMU about to be replaced has mapped: after a cpr-exec the new image
    maps the same memfd with no page table entries yet.
    mapped: the Rss (or hugetlb) of those memfds' mappings in QEMU
    (/proc/PID/smaps): what an exec() or exit of this QEMU has to unmap, the
    work of the teardown.
    """
    blocks = [m for m in procfs.memfds(pid) if m.is_backend]
    resident = sum(os.stat(f"/proc/{pid}/fd/{m.fd}").st_blocks * 512 for m in blocks)
    inodes = {m.inode for m in blocks}
    mapped = 0
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if (vma := _VMA.match(line)) is not None:
                inside = int(vma.group(1)) in inodes
            elif inside:
                key, _, rest = line.partition(":")
                if key in _MAPPED_KEYS:
                    mapped += int(rest.split()[0]) * 1024
    return resident, mapped


def holder_of(pid: int) -> int | None:
    """The pid of patch 20's address-space holder, a child of QEMU *pid*
    named ``cpr-exec-hold``; the newest if there are several."""
    found = [(procfs.start_time(c.pid) or 0, c.pid) for c in procfs.children(pid)
             if c.comm == HOLDER_COMM]
    return max(found)[1] if found else None


class HolderWatch:
    """The old address space's teardown in sealvm's cpr-exec: from QEMU's
    RESUME to the exit of patch 20's holder, whose exit unmaps it.

    Passed as `live_update`'s *progress*: at the first phase it notes when
    the update began (the clock `UpdateReport.total` starts from); at the
    ``exec`` phase (the new image answers QMP, the guest is still paused,
    the holder waits for RESUME) it finds the holder among QEMU's children
    and opens a pidfd on it (about 0.2 ms, inside the pause).
    A thread blocks on the pidfd and stamps the exit: the pidfd turns
    readable once the holder has exited, and its exit dropped the last user
    of the old address space, so the teardown is over (a zombie holds no
    memory).  The stamp is late by the time the thread takes to get the
    GIL back (at most Python's switch interval, 5 ms, with the controller
    busy; well under a millisecond with it waiting on QMP).  Checked against
    polling /proc/PID/stat every 0.2 ms for the zombie: the two stamps agreed
    within 1.2 ms over 6 updates of a 512 MiB guest (35-87 ms teardowns).
    """

    def __init__(self, vm: Machine) -> None:
        self.vm = vm
        self.start: float | None = None  # monotonic, the update's clock start
        self.holder: int | None = None
        self.exit_wall: float | None = None
        self.exit_mono: float | None = None
        self._thread: threading.Thread | None = None

    def progress(self, phase: str, seconds: float) -> None:
        now = time.monotonic()
        if self.start is None:
            self.start = now - seconds
        if phase == "exec" and self.vm.pid is not None:
            self._watch(self.vm.pid)

    def _watch(self, pid: int) -> None:
        holder = holder_of(pid)
        if holder is None:
            return
        try:
            pidfd = os.pidfd_open(holder)
        except ProcessLookupError:
            return
        self.holder = holder
        self._thread = threading.Thread(target=self._wait, args=(pidfd,),
                                        name=f"holder:{holder}", daemon=True)
        self._thread.start()

    def _wait(self, pidfd: int) -> None:
        try:
            ready, _, _ = select.select([pidfd], [], [], HOLD_MAX)
            if ready:
                self.exit_wall, self.exit_mono = time.time(), time.monotonic()
        finally:
            os.close(pidfd)

    async def wait(self) -> None:
        """Until the holder has exited (or HOLD_MAX passed)."""
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, HOLD_MAX + 1)


@dataclass
class Sample:
    """One update of one mode: its report, or why there is none."""

    round: int
    report: UpdateReport | None = None
    error: str | None = None
    resident: int | None = None
    mapped: int | None = None
    #: RESUME -> the holder's exit (sealvm cpr-exec only)
    teardown: float | None = None
    #: the update's total, up to the old address space gone (like with like)
    total: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "error": self.error, "resident": self.resident,
                "mapped": self.mapped, "teardown": self.teardown, "total": self.total,
                "report": None if self.report is None else self.report.to_dict()}


@dataclass
class Point:
    """Every update of one mode at one guest RAM size."""

    mode: str
    size: int
    vms: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def teardown_kind(self) -> str:
        return teardown_kind(self.mode)


class Slot:
    """One mode's VM at one size, with its console followed from launch."""

    def __init__(self, vm: Machine, con: ConsoleFollower) -> None:
        self.vm = vm
        self.con = con

    @classmethod
    async def launch(cls, mode: str, size: int, *, qemu: Path, guest: Path,
                     run_root: Path, name: str | None = None) -> Slot:
        _, live_mode = MODES[mode]
        passes = " pattern_passes=1" if live_mode == "migrate" else ""
        spec = spec_from_dict({
            "name": name or f"bench-{mode}-{size >> 20}m",
            "qemu": str(qemu),
            "memory": {"size": size, "hugetlb": is_hugetlb(mode)},
            "guest": {"kernel": str(guest), "cmdline": f"hb_ms={HB_MS}{passes}"},
        })
        vm = Machine(spec, run_root=run_root)
        try:
            await vm.launch()
            con = ConsoleFollower(vm.serial_log)
            await con.__aenter__()
        except BaseException:
            await vm.shutdown()
            raise
        return cls(vm, con)

    async def wait_whole_pass(self) -> None:
        """Until the guest has made a whole pass over its RAM begun after
        now: then all of it is mapped in the QEMU about to be replaced."""
        await self.con.wait_for(passes_at_least(len(self.con.log.passes) + 2), WAIT)

    async def close(self) -> None:
        """Shut the VM down (idempotent)."""
        self.con.close()
        await self.vm.shutdown()


def passes_at_least(n: int) -> Callable[[ConsoleLog], bool]:
    return lambda log: len(log.passes) >= n


async def update_once(slot: Slot, mode: str, *, qemu: Path, rnd: int) -> Sample:
    """Warm the guest up, measure what it touched, update it once.

    :raise SealvmError: the update failed (the caller shuts the VM down).
    """
    vm, con = slot.vm, slot.con
    _, live_mode = MODES[mode]
    if live_mode == "migrate":
        # classic: one pass writes all RAM, then the guest idles
        await con.wait_for(passes_at_least(1), WAIT)
    else:
        await slot.wait_whole_pass()
    sample = Sample(rnd)
    assert vm.pid is not None
    sample.resident, sample.mapped = ram_touched(vm.pid)
    watch = HolderWatch(vm)
    report = await live_update(vm, qemu=qemu, mode=live_mode,
                               heartbeat_interval=HB_MS / 1000, timeout=WAIT,
                               require_sealed=not mode.startswith("upstream"),
                               verify_pass=False, way_back=not mode.endswith("-oneway"),
                               warm_pages=0 if mode.endswith("-cold") else None,
                               progress=watch.progress)
    await watch.wait()
    sample.report = report
    if report.mismatches:
        raise SealvmError(f"guest memory mismatches: {report.mismatches}")
    if teardown_kind(mode) != TEARDOWN_HOLDER:
        sample.total = report.total
    elif (watch.exit_wall is not None and watch.exit_mono is not None
          and report.resumed_at is not None and watch.start is not None):
        sample.teardown = max(0.0, watch.exit_wall - report.resumed_at)
        sample.total = max(report.total, watch.exit_mono - watch.start)
    # else: no holder seen or no exit (a QEMU without patch 20?): missing
    return sample


def fits_together(modes: list[str], size: int) -> tuple[bool, str]:
    """Whether one VM per mode of *size* fits in memory at once, and why."""
    need = size * len(modes) + (size if "classic" in modes else 0)  # classic: 2 QEMUs
    avail = mem_available()
    if avail is None:
        return False, "MemAvailable unknown"
    room = avail - MEM_RESERVE
    why = f"{len(modes)} VMs need {need >> 20} MiB, {max(room, 0) >> 20} MiB available"
    return need <= room, why


def _rotated(modes: list[str], rnd: int) -> list[str]:
    k = rnd % len(modes)
    return modes[k:] + modes[:k]


def say(text: str) -> None:
    print(f"bench: {text}", flush=True)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.1f}"


async def run_size(cfg: Config, size: int, modes: list[str], *, vms: str,
                   binaries: dict[str, Path], run_root: Path,
                   failed: list[str]) -> list[Point]:
    """All the rounds of one size."""
    assert cfg.guest is not None
    points = {m: Point(m, size, vms) for m in modes}
    slots: dict[str, Slot] = {}
    try:
        for rnd in range(cfg.updates):
            for mode in _rotated(modes, rnd):
                qemu = binaries[MODES[mode][0]]
                where = f"{mode} {size >> 20} MiB round {rnd + 1}/{cfg.updates}"
                sample = Sample(rnd)
                try:
                    slot = slots.get(mode)
                    if slot is None:
                        slot = slots[mode] = await Slot.launch(
                            mode, size, qemu=qemu, guest=cfg.guest, run_root=run_root)
                    elif vms == "together":
                        await slot.vm.resume()
                    sample = await update_once(slot, mode, qemu=qemu, rnd=rnd)
                    if vms == "together":
                        await slot.vm.pause()
                    else:
                        await slots.pop(mode).close()
                except (SealvmError, TimeoutError, OSError) as exc:
                    sample.error = f"{type(exc).__name__}: {exc}"
                    failed.append(f"{where}: {sample.error}")
                    say(f"FAILED {failed[-1]}")
                    if (broken := slots.pop(mode, None)) is not None:
                        await broken.close()
                points[mode].samples.append(sample)
                r = sample.report
                if r is not None:
                    teardown = ("" if sample.teardown is None
                                else f", teardown {_ms(sample.teardown)} ms")
                    say(f"{where}: guest {_ms(r.pause_guest)} ms, QMP {_ms(r.pause_qmp)} ms"
                         f"{teardown}, total {_ms(sample.total)} ms")
    finally:
        for slot in slots.values():
            await slot.close()
    return list(points.values())


async def run_all(cfg: Config, skipped: list[str], failed: list[str]) -> list[Point]:
    """Every size, smallest first; returns the points measured."""
    assert cfg.qemu is not None
    binaries = {"sealvm": cfg.qemu}
    if cfg.qemu_upstream is not None:
        binaries["upstream"] = cfg.qemu_upstream
    points: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="sealvm-bench-") as tmp:
        for size in cfg.all_sizes():
            modes = cfg.modes_at(size)
            together, why = fits_together(modes, size)
            vms = cfg.vms if cfg.vms != "auto" else (
                "together" if together else "one-at-a-time")
            huge = [m for m in modes if is_hugetlb(m)]
            if huge:
                reason = reserve_hugepages(size * (len(huge) if vms == "together" else 1))
                if reason is not None:
                    for mode in huge:
                        skipped.append(f"{mode} {size >> 20} MiB: {reason}")
                        say(f"skip {skipped[-1]}")
                    modes = [m for m in modes if m not in huge]
                    if not modes:
                        continue
            say(f"{size >> 20} MiB: {', '.join(modes)}, {cfg.updates} rounds, VMs {vms} "
                 f"({why})")
            start = time.monotonic()
            points += await run_size(cfg, size, modes, vms=vms, binaries=binaries,
                                     run_root=Path(tmp), failed=failed)
            say(f"{size >> 20} MiB done in {time.monotonic() - start:.0f} s")
    return points


def restore_hugepages(before: str | None) -> None:
    if before is not None:
        try:
            NR_HUGEPAGES.write_text(before)
        except OSError as exc:
            print(f"bench: cannot restore vm.nr_hugepages={before.strip()}: {exc}",
                  file=sys.stderr)
