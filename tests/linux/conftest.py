"""
The Linux test guest (images/linux-guest) on the L1 kernel: fixtures, and
the per-update table printed at the end of the run (pause, UDP lost, TCP
stall), like the fault matrix's.
"""

from __future__ import annotations

import os
import secrets
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns

ROWS: list[dict[str, Any]] = []


@pytest.fixture(scope="session")
def linux_kernel() -> Path:
    path = os.environ.get("SEALVM_HOST_KERNEL")
    if not path or not os.path.isfile(path):
        pytest.skip(reason="no L1 kernel: run `make test` (sets SEALVM_HOST_KERNEL) or "
                    "`make host-kernel`")
    return Path(path)


@pytest.fixture(scope="session")
def linux_initrd() -> Path:
    path = os.environ.get("SEALVM_LINUX_GUEST")
    if not path or not os.path.isfile(path):
        pytest.skip(reason="no Linux guest initramfs: run `make test` (sets "
                    "SEALVM_LINUX_GUEST) or `make linux-guest`")
    return Path(path)


@pytest.fixture
def test_netns() -> Iterator[str]:
    """A network namespace of the test's own (all traffic stays in it);
    removed afterwards, and checked gone."""
    if os.geteuid() != 0:
        pytest.skip(reason="network namespaces and taps: needs root")
    name = f"svtest-{secrets.token_hex(4)}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.remove(name)
        assert name not in netns.listnetns(), f"namespace {name} left behind"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}ms"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    tr = terminalreporter
    tr.section("Linux guest through live updates (net + disk)")
    tr.write_line(f"{'#':>3} {'mode':<13} {'pause QMP':>10} {'pause guest':>12} "
                  f"{'UDP lost/sent':>14} {'TCP stall':>10}")
    for r in ROWS:
        tr.write_line(f"{r['n']:>3} {r['mode']:<13} {_fmt(r['pause_qmp']):>10} "
                      f"{_fmt(r['pause_guest']):>12} "
                      f"{str(r['udp_lost']) + '/' + str(r['udp_sent']):>14} "
                      f"{_fmt(r['tcp_stall']):>10}")
    for mode in sorted({r["mode"] for r in ROWS}):
        rows = [r for r in ROWS if r["mode"] == mode]
        parts = []
        for key in ("pause_qmp", "pause_guest", "tcp_stall"):
            vals = [r[key] for r in rows if r[key] is not None]
            if vals:
                parts.append(f"{key} median {_fmt(statistics.median(vals))} "
                             f"max {_fmt(max(vals))}")
        lost = [r["udp_lost"] for r in rows]
        parts.append(f"udp_lost median {statistics.median(lost):g} max {max(lost)}")
        tr.write_line(f"{mode} (n={len(rows)}): " + "; ".join(parts))
