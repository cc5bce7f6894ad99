"""L0-side helpers of the nested tier (shared by conftest.py and the tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from helpers import qemus_mentioning

from .harness.l1 import L1Result

#: live updates per mode in each nested scenario: three still alternate and
#: repeat each mode; every one costs seconds of nested TCG in `make test`
#: (`make bench-nested` runs 20 per mode)
UPDATES = 3


@dataclass
class L1Outcome:
    result: L1Result
    share: Path
    results: dict[str, dict[str, Any]]
    logs: dict[str, str]
    qemu_left: list[int] = field(default_factory=list)

    def scenario(self, name: str) -> dict[str, Any]:
        if name not in self.results:
            log = self.logs.get(name, "(no log)")
            pytest.fail(f"scenario {name} wrote no result; its log:\n{log[-4000:]}\n"
                        f"L1 output:\n{self.result.output[-2000:]}")
        return self.results[name]


def l0_qemus_mentioning(text: str) -> list[int]:
    """QEMU processes on this machine (L0) whose command line has *text*."""
    return qemus_mentioning(text)
