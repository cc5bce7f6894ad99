"""
The nested tier: one L1 boot runs every in-L1 scenario; tests assert on it.

L1 (nested.harness.l1) boots the test-bed kernel (``$SEALVM_HOST_KERNEL``, set by
``make test``) under our QEMU with an emulated intel-iommu and one edu device.
Inside, tests/nested/l1_run.py runs the scenarios one after the other and
each writes results/<name>.json to the share.  Booting costs seconds, so the
boot is session-scoped and shared by the tests of this directory.

Skips (with the reason) only when the kernel is not built or L1 cannot boot.
"""

from __future__ import annotations

import asyncio
import compileall
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness.l1 import L1BootError, edu_addresses, run_in_l1
from .l0_lib import UPDATES, L1Outcome, l0_qemus_mentioning
from .l1_mdma import summary_lines as mdma_summary_lines
from .l1_mtty import summary_lines as mtty_summary_lines

HERE = Path(__file__).resolve().parent
L1_TIMEOUT = 1800.0


_outcome: L1Outcome | None = None


@pytest.fixture(scope="session")
def host_kernel() -> Path:
    path = os.environ.get("SEALVM_HOST_KERNEL")
    if not path or not os.path.isfile(path):
        pytest.skip(reason="no L1 kernel: run `make test` (sets SEALVM_HOST_KERNEL) or "
                    "`make host-kernel`")
    return Path(path)


def scenario_commands(bdf: str) -> list[str]:
    return [
        "iommufd=l1_iommufd",
        f"vfio-iommufd=l1_vfio iommufd {bdf} --updates {UPDATES}",
        f"vfio-legacy=l1_vfio legacy {bdf} --updates {UPDATES}",
        f"mdma-iommufd=l1_mdma iommufd --updates {UPDATES}",
        f"mdma-legacy=l1_mdma legacy {bdf}",
        f"mtty=l1_mtty --updates {UPDATES}",
    ]


@pytest.fixture(scope="session")
def l1(host_kernel: Path, qemu_binary: Path, guest_image: Path,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[L1Outcome]:
    """One L1 boot running every scenario (session-scoped)."""
    global _outcome
    share = tmp_path_factory.mktemp("l1-share")
    bdf = edu_addresses(1)[0]
    # L1 reads the repository over 9p and never writes bytecode: compile here.
    for tree in (HERE.parents[1] / "control" / "sealvm", HERE):
        compileall.compile_dir(tree, quiet=1)
    command = [sys.executable, "-m", "nested.l1_run", *scenario_commands(bdf)]
    env = {"SEALVM_QEMU": str(qemu_binary), "SEALVM_GUEST": str(guest_image),
           "PYTHONPATH": str(HERE.parent),
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    try:
        result = asyncio.run(run_in_l1(
            command, kernel=host_kernel, qemu=qemu_binary, edu=1, timeout=L1_TIMEOUT,
            env=env, share=share, console_log=share.parent / "l1-console.log"))
    except L1BootError as exc:
        pytest.skip(reason=f"L1 cannot be booted: {exc}")
    results = {}
    logs = {}
    for name, data in result.files.items():
        path = Path(name)
        if path.parent.name != "results":
            continue
        if path.suffix == ".json":
            results[path.stem] = json.loads(data)
        elif path.suffix in (".log", ".txt"):
            logs[path.stem] = data.decode(errors="replace")
    _outcome = L1Outcome(result, share, results, logs, l0_qemus_mentioning(str(share)))
    yield _outcome


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The measured figures of the nested run, for the record."""
    if _outcome is None:
        return
    r = _outcome.result
    tr = terminalreporter
    tr.section("nested test bed figures")
    tr.write_line(f"L1: kernel start -> init {r.boot_time:.2f} s (L1 clock); "
                  f"L0 QEMU start -> init {r.start_to_init:.2f} s; "
                  f"L1 run {r.run_time:.1f} s; whole L1 wall {r.wall_time:.1f} s")
    l1 = _outcome.results.get("l1", {})
    for s in l1.get("scenarios", []):
        tr.write_line(f"  scenario {s['name']}: exit {s['status']} in {s['seconds']:.1f} s")
    for backend in ("iommufd", "legacy"):
        res = _outcome.results.get(f"vfio-{backend}")
        if not res:
            continue
        fig = res["figures"]
        tr.write_line(f"L2 {backend}: QMP up {fig.get('l2_start_qmp', -1):.2f} s, "
                      f"first DMA {fig.get('l2_start_first_dma', -1):.2f} s after launch")
        for u in fig.get("updates", []):
            pq = u["pause_qmp"] if u["pause_qmp"] is not None else -1
            pg = u["pause_guest"] if u["pause_guest"] is not None else -1
            tr.write_line(f"  update {u['update']}: pause QMP {pq * 1000:.0f} ms, "
                          f"pause guest {pg * 1000:.0f} ms, total {u['total']:.2f} s, "
                          f"dma {u['dma_before']} -> {u['dma_after']}")
    for line in mdma_summary_lines(_outcome.results):
        tr.write_line(line)
    for line in mtty_summary_lines(_outcome.results):
        tr.write_line(line)
