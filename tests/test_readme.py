"""
The README's Python example runs as written, against the real QEMU: its
code block and its spec (TOML) block are taken from README.md, only the
documented placeholders substituted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import sealvm
from sealvm.pytest_plugin import SealvmConfig

REPO = Path(__file__).resolve().parent.parent
CONTROL = Path(sealvm.__file__).resolve().parent.parent


def blocks(text: str, lang: str) -> list[str]:
    """The fenced code blocks of *lang* in a Markdown *text*."""
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, flags=re.M | re.S)


def substitute(text: str, old: str, new: str) -> str:
    assert old in text, f"README no longer has {old!r}: update this test with it"
    return text.replace(old, new)


def readme_example() -> tuple[str, str]:
    """(the Python example, the spec) from README.md."""
    readme = (REPO / "README.md").read_text()
    code = [b for b in blocks(readme, "python") if "from sealvm import" in b]
    specs = [b for b in blocks(readme, "toml") if "[memory]" in b and "[guest]" in b]
    assert len(code) == 1, f"expected one Python example in README.md, found {len(code)}"
    assert len(specs) == 1, f"expected one spec in README.md, found {len(specs)}"
    return code[0], specs[0]


def test_readme_example_runs(sealvm_config: SealvmConfig, run_root: Path,
                             tmp_path: Path) -> None:
    code, spec = readme_example()
    qemu = sealvm_config.require_qemu()
    work = tmp_path / "work"
    work.mkdir()
    (work / "guest.bin").symlink_to(sealvm_config.require_guest())  # kernel = "guest.bin"
    spec = substitute(spec, '"/path/to/qemu-system-x86_64"', f'"{qemu}"')
    spec = substitute(spec, 'size = "1G"', 'size = "128M"')  # a small VM on a shared machine
    spec = spec[:spec.index("[[vfio]]")]  # optional, and this host has no device to assign
    (work / "vm.toml").write_text(spec)
    script = substitute(code, '"/path/to/new/qemu-system-x86_64"',
                        f'"{sealvm_config.require_update_to()}"')
    (work / "example.py").write_text(script)
    env = dict(os.environ, SEALVM_RUN_DIR=str(run_root),
               PYTHONPATH=os.pathsep.join([str(CONTROL), *filter(None, [
                   os.environ.get("PYTHONPATH")])]))
    p = subprocess.run([sys.executable, "example.py"], cwd=work, env=env, text=True,
                       capture_output=True, timeout=300)
    assert p.returncode == 0, f"README example failed:\n{p.stdout}\n{p.stderr}"
    # it printed report.pause_qmp and report.phases
    pause, phases = p.stdout.strip().split(" ", 1)
    assert 0 < float(pause) < 10, p.stdout
    assert "'preflight':" in phases and "'exec':" in phases, p.stdout
    # and the VM ran where the script said, and was shut down (run_root's
    # leak check: no QEMU, socket or state file left)
    assert (run_root / "demo" / "qemu" / "serial.log").stat().st_size > 0
