"""
The nested tier: one L1 boot runs every in-L1 scenario; tests assert on it.

L1 (nested.harness.l1) boots the test-bed kernel (``$SEALVM_HOST_KERNEL``, set by
``make test``) under our QEMU with an emulated intel-iommu and one edu device.
Inside, tests/nested/l1_run.py runs the scenarios one after the other and
each writes results/<name>.json to the share.  Booting costs seconds, so the
boot is session-scoped and shared by the tests of this directory.

What the project builds and boots itself is never a skip reason: an L1 that
does not boot, or one that ends without the command's status, fails every
test of the tier with L0's and L1's output attached.  A missing L1 kernel
skips (saying so) only outside `make test`: with ``SEALVM_STRICT_SKIPS=1``
(set by `make test`) it fails too.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from sealvm.trampoline import trampoline

from .harness.l1 import BOOT_PANICS_SEEN, NestedError, edu_addresses, run_in_l1, tree_python_env
from .l0_lib import UPDATES, L1Outcome, l0_qemus_mentioning
from .l1_mdma import summary_lines as mdma_summary_lines
from .l1_mtty import summary_lines as mtty_summary_lines
from .l1_vhost import summary_lines as vhost_summary_lines

HERE = Path(__file__).resolve().parent
L1_TIMEOUT = 1800.0
#: lines of L1's console (with L0 QEMU's output) attached to a failure
FAILURE_TAIL = 80


_outcome: L1Outcome | None = None


def strict_skips() -> bool:
    """Under `make test` a missing build is a failure, not a skip."""
    return os.environ.get("SEALVM_STRICT_SKIPS") == "1"


def missing_build(reason: str) -> NoReturn:
    if strict_skips():
        pytest.fail(f"{reason} (SEALVM_STRICT_SKIPS=1: a missing build fails)",
                    pytrace=False)
    pytest.skip(reason=reason)


@pytest.fixture(scope="session")
def host_kernel() -> Path:
    path = os.environ.get("SEALVM_HOST_KERNEL")
    if not path or not os.path.isfile(path):
        missing_build(f"no L1 kernel (SEALVM_HOST_KERNEL={path!r}): run `make test` "
                      "(sets it) or `make host-kernel`")
    return Path(path)


def nested_failure(exc: NestedError, console_log: Path) -> str:
    """What went wrong with L1, with L0's and L1's own output."""
    tail = "\n".join(exc.console.splitlines()[-FAILURE_TAIL:]) or "(no output at all)"
    status = "still running (killed)" if exc.qemu_status is None else exc.qemu_status
    text = (f"{type(exc).__name__}: {str(exc).splitlines()[0]}\n"
            f"L0 QEMU exit status: {status}\n"
            f"L0 QEMU command: {shlex.join(exc.argv) if exc.argv else '(not started)'}\n"
            f"--- L0 QEMU output and L1 serial console, last {FAILURE_TAIL} lines "
            f"(whole log: {console_log}) ---\n{tail}")
    if exc.output:
        text += f"\n--- the command's output in L1 (tail) ---\n{exc.output[-3000:]}"
    return text


def scenario_commands(bdf: str) -> list[str]:
    """Every scenario, or those ``$SEALVM_NESTED_SCENARIOS`` names
    (comma-separated, e.g. ``vhost,mtty``: the other scenarios' tests then
    fail for want of a result; run only the tests of those named)."""
    commands = [
        "iommufd=l1_iommufd",
        f"vfio-iommufd=l1_vfio iommufd {bdf} --updates {UPDATES}",
        f"vfio-legacy=l1_vfio legacy {bdf} --updates {UPDATES}",
        f"mdma-iommufd=l1_mdma iommufd --updates {UPDATES}",
        f"mdma-legacy=l1_mdma legacy {bdf}",
        f"mtty=l1_mtty --updates {UPDATES}",
        "vhost=l1_vhost",
    ]
    only = os.environ.get("SEALVM_NESTED_SCENARIOS")
    if not only:
        return commands
    names = set(only.split(","))
    chosen = [c for c in commands if c.partition("=")[0] in names]
    unknown = names - {c.partition("=")[0] for c in commands}
    if unknown:
        raise ValueError(f"SEALVM_NESTED_SCENARIOS: no scenario {', '.join(sorted(unknown))}")
    return chosen


@pytest.fixture(scope="session")
def l1(host_kernel: Path, qemu_binary: Path, guest_image: Path,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[L1Outcome]:
    """One L1 boot running every scenario (session-scoped)."""
    global _outcome
    share = tmp_path_factory.mktemp("l1-share")
    bdf = edu_addresses(1)[0]
    command = [sys.executable, "-m", "nested.l1_run", *scenario_commands(bdf)]
    env = {"SEALVM_QEMU": str(qemu_binary), "SEALVM_GUEST": str(guest_image),
           # cpr-exec's trampoline, built here: L1 sees this root read-only
           "SEALVM_TRAMPOLINE": str(trampoline()),
           **tree_python_env()}
    console_log = share.parent / "l1-console.log"
    failure: str | None = None
    try:
        result = asyncio.run(run_in_l1(
            command, kernel=host_kernel, qemu=qemu_binary, edu=1, timeout=L1_TIMEOUT,
            env=env, share=share, console_log=console_log))
    except NestedError as exc:
        failure = nested_failure(exc, console_log)
    if failure is not None:
        # L1 is ours (kernel, init, QEMU): failing to boot or to report is a failure.
        pytest.fail(failure, pytrace=False)
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
    tr.write_line(f"L1 boots retried after a kernel panic before init: {len(BOOT_PANICS_SEEN)}"
                  + "".join(f"\n  {summary}" for summary in BOOT_PANICS_SEEN))
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
    for line in vhost_summary_lines(_outcome.results):
        tr.write_line(line)
