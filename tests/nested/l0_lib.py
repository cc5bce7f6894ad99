"""L0-side helpers of the nested tier (shared by conftest.py and the tests)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sealvm.nested import L1Result

UPDATES = 5


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
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"qemu-system" in cmd and text.encode() in cmd:
            found.append(int(entry))
    return found
