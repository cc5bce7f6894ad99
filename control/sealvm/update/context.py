"""What one update carries from step to step."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from ..machine import Machine
from .journal import Journal
from .report import Clock, UpdateReport

#: Once the guest runs again, the controller leaves the CPUs to it this long
#: (seconds) before its own work: releasing the keeper, re-arming the
#: migration parameters, letting the old QEMU go, checking the new one.  The
#: new image's first milliseconds are its slowest (nothing translated or
#: cached yet); on a host with few CPUs the controller's work (and the exit of
#: its keeper) then showed as time the guest saw beyond STOP->RESUME.
SETTLE_AFTER_RESUME = 0.05


@dataclass
class UpdateContext:
    vm: Machine
    qemu: Path
    clock: Clock
    report: UpdateReport
    journal: Journal
    #: loop time by which the update must be done
    deadline: float
    timeout: float
    #: the guest was running (else paused: it stays paused)
    was_running: bool
    #: the argument that names the new QEMU (``-name …,process=MARKER``)
    marker: str
    #: cpr-exec: hand the fds to a keeper across the exec (`wayback`)
    way_back: bool = True
    #: cpr-exec: bytes per CPU warmed for the new image before the pause (`warm`)
    warm_pages: int = 0


def remove(*paths: Path) -> None:
    """Remove files an update made (absent ones are fine)."""
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
