"""`make demo` part 2 end to end, small (one update): the Linux guest with
its TCP stream, UDP sequence and disk writer; the verdict line says OK."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu


def test_demo_part_two(qemu_binary: Path, linux_kernel: Path, linux_initrd: Path,
                       run_root: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip(reason="network namespaces and taps: needs root")
    tmpdir = tmp_path / "tmp"  # the demo's TMPDIR: empty again afterwards
    tmpdir.mkdir()
    p = subprocess.run(
        [sys.executable, "-m", "linux.demo", "--updates", "1", "--memory", "128M",
         "--qemu", str(qemu_binary), "--kernel", str(linux_kernel), "--initrd",
         str(linux_initrd), "--run-dir", str(run_root)],
        cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300,
        check=False, env={**os.environ, "TMPDIR": str(tmpdir)})
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[-1] == "demo: OK", p.stdout
    assert any(ln.split()[:2] == ["1", "cpr-exec"] for ln in lines), p.stdout
    assert "verified byte for byte, no reset" in p.stdout
    assert "1024 blocks re-read by the host, 0 bad" in p.stdout
    assert not list(tmpdir.iterdir()), "the demo left files in its TMPDIR"
