"""The demo's verdict: every column it prints is checked."""

from __future__ import annotations

import dataclasses

import pytest

from sealvm.demo import Row

GOOD = Row(n=1, pause_qmp=0.03, pause_guest=0.04, pid_before=7, pid_after=7, inode=42,
           inode_unchanged=True, seals=("SEAL", "SHRINK", "GROW", "EXEC"), executable=False,
           mismatches=0, heartbeat_continuous=True)


def test_a_good_row_has_no_problems() -> None:
    assert GOOD.problems() == []
    assert "FAILED" not in GOOD.line()


@pytest.mark.parametrize(("change", "column"), [
    ({"pause_qmp": None}, "pause QMP"),
    ({"pause_guest": None}, "pause guest"),
    ({"pid_after": 8}, "pid"),
    ({"inode": None}, "RAM inode"),
    ({"inode_unchanged": False}, "unchanged"),
    ({"seals": ("SEAL", "SHRINK", "GROW")}, "seals"),
    ({"executable": True}, "exec"),
    ({"executable": None}, "exec"),
    ({"mismatches": 3}, "mismatches"),
    ({"mismatches": None}, "mismatches"),
    ({"heartbeat_continuous": False}, "heartbeat"),
], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_each_column_off_is_named(change: dict[str, object], column: str) -> None:
    row = dataclasses.replace(GOOD, **change)  # type: ignore[arg-type]
    problems = row.problems()
    assert [p.split(":")[0] for p in problems] == [column]
    assert f"FAILED: {column}:" in row.line()
