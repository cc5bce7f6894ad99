"""
`make demo` end to end, small (256 MiB, one update): it passes on sealvm's
QEMU and fails on stock QEMU, naming the columns that are off (stock QEMU
creates the guest-RAM memfd executable and without F_SEAL_EXEC).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEMO = [sys.executable, "-m", "sealvm.demo", "--memory", "256M", "--updates", "1"]


def demo(qemu: Path, guest: Path, run_root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DEMO, "--qemu", str(qemu), "--guest", str(guest),
                           "--run-dir", str(run_root), *extra],
                          capture_output=True, text=True, timeout=300, check=False)


def test_demo_passes_on_sealvm_qemu(qemu_binary: Path, guest_image: Path,
                                    run_root: Path) -> None:
    p = demo(qemu_binary, guest_image, run_root)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.rstrip().endswith("demo: OK")
    assert "SEAL|SHRINK|GROW|EXEC False" in p.stdout


def test_demo_fails_on_stock_qemu_naming_the_columns(upstream_qemu: Path, guest_image: Path,
                                                     run_root: Path) -> None:
    # preflight lets the unsealed aux RAM pass (a warning): the rows must catch it
    p = demo(upstream_qemu, guest_image, run_root, "--no-require-sealed")
    assert p.returncode == 1, p.stdout + p.stderr
    verdict = p.stdout.split("demo: FAILED\n", 1)[1].splitlines()
    assert verdict == ["  update 1: seals: EXEC missing",
                       "  update 1: exec: the guest-RAM memfd is executable"], p.stdout
    # preflight does not refuse it by default either: its unsealed aux RAM is
    # a warning (the way into sealvm is an update from stock QEMU)
    p = demo(upstream_qemu, guest_image, run_root)
    assert p.returncode == 1 and "PreflightError" not in p.stderr, p.stdout + p.stderr
    assert "  update 1: seals: EXEC missing" in p.stdout.splitlines(), p.stdout
