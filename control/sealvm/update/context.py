"""What one update carries from step to step."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from ..machine import Machine
from .journal import Journal
from .report import Clock, UpdateReport


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
