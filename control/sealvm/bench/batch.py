"""
Several VMs updated at once (``--at-once 1,4,8``): what `sealvm update A B
C` does, one `live_update` per VM under asyncio, against one VM alone.

For each count, that many sealvm test guests of one size are launched and
kept running (all of them: an operator updates running VMs); each round
waits until every guest has made a complete pass over its RAM since the
previous round, then updates them all with cpr-exec at once.  The round's
wall time runs from the first update's start to the last one's end; each
VM's guest-seen and QMP pauses are kept too.  A count whose VMs do not fit
in memory is skipped, saying why.

For a count above one, as many rounds again update only the first of the
VMs while the others keep running (`alone`): the wall time the running
guests alone cost an update (each TCG vCPU wants a whole core), apart from
what updating them all at once adds.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SealvmError
from ..update import UpdateReport, live_update
from .args import Config
from .history import mem_available
from .run import HB_MS, MEM_RESERVE, WAIT, Slot, say

MODE = "sealvm-exec"


@dataclass
class BatchRound:
    """One round: every VM updated at once."""

    round: int
    wall: float | None = None
    reports: list[UpdateReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "wall": self.wall, "errors": self.errors,
                "reports": [r.to_dict() for r in self.reports]}


@dataclass
class Batch:
    """Every round of *count* VMs of *size* updated at once."""

    count: int
    size: int
    rounds: list[BatchRound] = field(default_factory=list)
    skipped: str | None = None
    #: count > 1: rounds updating only the first VM, the others running
    alone: list[BatchRound] = field(default_factory=list)


async def _round(slots: list[Slot], qemu: Path, rnd: int) -> BatchRound:
    for slot in slots:
        await slot.wait_whole_pass()
    out = BatchRound(rnd)
    start = time.monotonic()
    results = await asyncio.gather(
        *(live_update(s.vm, qemu=qemu, mode="cpr-exec", heartbeat_interval=HB_MS / 1000,
                      timeout=WAIT, verify_pass=False)
          for s in slots), return_exceptions=True)
    wall = time.monotonic() - start
    for s, r in zip(slots, results, strict=True):
        if isinstance(r, UpdateReport):
            out.reports.append(r)
        elif isinstance(r, (SealvmError, TimeoutError, OSError)):
            out.errors.append(f"{s.vm.name}: {type(r).__name__}: {r}")
        else:
            raise r
    out.wall = wall if not out.errors else None
    return out


async def _rounds(slots: list[Slot], qemu: Path, n: int, label: str,
                  into: list[BatchRound], failed: list[str]) -> bool:
    """*n* rounds updating *slots* at once, appended to *into*; False when a
    round failed (a VM that failed is gone or rolled back: no more rounds)."""
    for rnd in range(n):
        r = await _round(slots, qemu, rnd)
        into.append(r)
        where = f"{label} round {rnd + 1}/{n}"
        if r.errors:
            failed += [f"{where}: {e}" for e in r.errors]
            say(f"FAILED {where}: {'; '.join(r.errors)}")
            return False
        say(f"{where}: wall {1000 * (r.wall or 0):.1f} ms")
    return True


async def run_batch(cfg: Config, count: int, *, qemu: Path, run_root: Path,
                    failed: list[str]) -> Batch:
    """All the rounds of *count* VMs at once."""
    assert cfg.guest is not None
    size = cfg.at_once_size
    batch = Batch(count, size)
    avail = mem_available()
    if avail is None or count * size > avail - MEM_RESERVE:
        batch.skipped = (f"{count} VMs of {size >> 20} MiB need {count * size >> 20} MiB, "
                         f"{max((avail or 0) - MEM_RESERVE, 0) >> 20} MiB available")
        say(f"skip at once x{count}: {batch.skipped}")
        return batch
    slots: list[Slot] = []
    try:
        for i in range(count):
            try:
                slots.append(await Slot.launch(MODE, size, qemu=qemu, guest=cfg.guest,
                                               run_root=run_root, name=f"bench-at-once-{i}"))
            except (SealvmError, TimeoutError, OSError) as exc:
                # the rest of the bench still reports: this count is FAILED
                failed.append(f"at once x{count}: launching VM {i}: "
                              f"{type(exc).__name__}: {exc}")
                say(f"FAILED {failed[-1]}")
                return batch
        ok = await _rounds(slots, qemu, cfg.at_once_rounds, f"at once x{count}",
                           batch.rounds, failed)
        if ok and count > 1:
            await _rounds(slots[:1], qemu, cfg.at_once_rounds, f"one of {count} alone",
                          batch.alone, failed)
    finally:
        for slot in slots:
            await slot.close()
    return batch


async def run_batches(cfg: Config, *, qemu: Path, run_root: Path,
                      failed: list[str]) -> list[Batch]:
    return [await run_batch(cfg, count, qemu=qemu, run_root=run_root, failed=failed)
            for count in cfg.at_once]
