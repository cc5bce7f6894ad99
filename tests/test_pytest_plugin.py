"""
sealvm's pytest plugin (`sealvm.pytest_plugin`) as users run it: the
example in docs/ in pytest-asyncio's auto and strict modes, in a pytest of
its own; and each of its checks failing when it should (the leak check, the
guest check, the skip without a QEMU, --sealvm-update-to).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

import sealvm
from helpers import PYTHON_VIEW
from sealvm import Machine, procfs
from sealvm.pytest_plugin import GuestChecker, SealvmConfig

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "docs" / "examples" / "test_live_update_example.py"
CONTROL = Path(sealvm.__file__).resolve().parent.parent  # the sealvm under test
SEALVM_ENV = ("SEALVM_QEMU", "SEALVM_UPDATE_TO", "SEALVM_GUEST")


def plugin_installed() -> bool:
    """True when the package's pytest11 entry point is registered."""
    return any(ep.value == "sealvm.pytest_plugin"
               for ep in importlib.metadata.entry_points(group="pytest11"))


@dataclass
class Run:
    """A pytest run in a process of its own, and its junit counts."""

    returncode: int
    output: str
    tests: int
    failures: int
    errors: int
    skipped: int

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - self.skipped


def run_pytest(tmp: Path, *args: str, asyncio_mode: str = "strict",
               env: dict[str, str] | None = None, rootdir: Path | None = None) -> Run:
    """pytest on *args* as a user's suite runs it: its own ini (nothing of
    this project's configuration), the plugin through its entry point when
    sealvm is installed with it, else ``-p sealvm.pytest_plugin``."""
    ini = tmp / "pytest.ini"
    ini.write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    xml = tmp / "junit.xml"
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(CONTROL), *filter(None, [child_env.get("PYTHONPATH")])])
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA",
            "-o", f"asyncio_mode={asyncio_mode}", f"--junitxml={xml}",
            f"--basetemp={tmp / 'basetemp'}"]
    if rootdir is None:
        argv += ["-c", str(ini), "--rootdir", str(tmp)]
    if not plugin_installed():
        argv += ["-p", "sealvm.pytest_plugin"]
    p = subprocess.run([*argv, *args], cwd=rootdir or tmp, env=child_env, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    return Run(p.returncode, p.stdout, **counts)


def options(config: SealvmConfig) -> list[str]:
    return [f"--sealvm-qemu={config.require_qemu()}",
            f"--sealvm-update-to={config.require_update_to()}",
            f"--sealvm-guest={config.require_guest()}"]


@pytest.mark.parametrize("mode", ["auto", "strict"])
def test_example_passes(sealvm_config: SealvmConfig, tmp_path: Path, mode: str) -> None:
    run = run_pytest(tmp_path, str(EXAMPLE), *options(sealvm_config), asyncio_mode=mode)
    print(run.output)
    assert run.returncode == 0, run.output
    # every test passed, none skipped; nothing of its VMs was left (the
    # plugin's leak check would have errored the test)
    assert run.tests > 0 and run.passed == run.tests, run.output


def test_example_skips_without_a_qemu(tmp_path: Path) -> None:
    """Not configured: every test skips, naming the option to pass."""
    env = {k: v for k, v in os.environ.items() if k not in SEALVM_ENV}
    run = run_pytest(tmp_path, str(EXAMPLE), env=env)
    assert run.returncode == 0, run.output
    assert run.tests > 0 and run.skipped == run.tests, run.output
    assert "sealvm: no guest kernel configured (pass --sealvm-guest" in run.output
    # with a guest but no QEMU
    env["SEALVM_GUEST"] = os.environ.get("SEALVM_GUEST", "")
    run = run_pytest(tmp_path, str(EXAMPLE), env=env)
    assert run.returncode == 0 and 0 < run.skipped == run.tests, run.output
    assert "sealvm: no QEMU to start VMs with configured (pass --sealvm-qemu" in run.output


def test_project_suite_fails_such_a_skip(tmp_path: Path) -> None:
    """In this repository under SEALVM_STRICT_SKIPS=1 (`make test`), the
    plugin's skip is not a host fact: the run fails (tests/conftest.py)."""
    env = {k: v for k, v in os.environ.items() if k not in SEALVM_ENV}
    env["SEALVM_STRICT_SKIPS"] = "1"
    test = "tests/test_live_update.py::test_update_to_missing_binary_is_refused"
    run = run_pytest(tmp_path, test, env=env, rootdir=REPO, asyncio_mode="auto")
    assert run.returncode == 1 and run.skipped == 1, run.output
    assert "NOT ALLOWED" in run.output and "sealvm: no " in run.output, run.output


LEAKY = '''
import pytest
from sealvm import Machine

@pytest.mark.asyncio
async def test_leaves_its_vm(sealvm_spec, sealvm_run_root):
    vm = Machine(sealvm_spec(size="64M"), run_root=sealvm_run_root)
    await vm.launch()
    await vm.detach()  # QEMU, its QMP socket and its state file stay
'''


def test_leak_check_fails_a_test_that_leaves_its_vm(sealvm_config: SealvmConfig,
                                                     tmp_path: Path) -> None:
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    run = run_pytest(tmp_path, "test_leaky.py", *options(sealvm_config))
    print(run.output)
    assert run.returncode == 1 and run.errors == 1, run.output
    assert "sealvm: VMs not cleaned up: process " in run.output
    assert "(qemu-system-x86_64) still running, killed" in run.output
    assert "socket left behind: " in run.output and "qmp.sock" in run.output
    assert "state file left behind: " in run.output
    leaked = run.output.split("sealvm: VMs not cleaned up: process ", 1)[1].split()[0]
    assert not procfs.pid_alive(int(leaked)), "the leak check did not kill it"


def test_update_to_is_the_binary_installed(sealvm_config: SealvmConfig,
                                           tmp_path: Path) -> None:
    """--sealvm-update-to is what sealvm_update installs, in both modes: a
    wrapper that records each start and runs the real QEMU; a path that
    does not exist fails the test (not a skip)."""
    # a Python script, in QEMU's view (its directory, as the build under
    # test's; --sealvm-exec-path: its interpreter and the QEMU it runs); it
    # writes each start to its stderr, QEMU's log
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(mode=0o755)
    wrapper = bin_dir / "qemu-under-test"
    qemu = sealvm_config.require_qemu()
    wrapper.write_text(f"#!{sys.executable}\nimport os, sys\n"
                       "print('qemu-under-test:', *sys.argv[1:], file=sys.stderr, flush=True)\n"
                       f"os.execv({str(qemu)!r}, [{str(qemu)!r}, *sys.argv[1:]])\n")
    wrapper.chmod(0o755)
    args = [a for a in options(sealvm_config) if not a.startswith("--sealvm-update-to")]
    args += [f"--sealvm-exec-path={p}" for p in (*PYTHON_VIEW, qemu.parent)]
    run = run_pytest(tmp_path, f"{EXAMPLE}::test_update_keeps_the_guest",
                     *args, f"--sealvm-update-to={wrapper}")
    assert run.returncode == 0 and run.passed == 2, run.output
    started = [line for log in (tmp_path / "basetemp").rglob("qemu.log")
               for line in log.read_text().splitlines()
               if line.startswith("qemu-under-test:") and "-incoming" in line]
    assert len(started) == 2, f"the build under test started {len(started)} times, not 2"
    run = run_pytest(tmp_path, f"{EXAMPLE}::test_update_keeps_the_guest[cpr-exec]",
                     *args, f"--sealvm-update-to={tmp_path / 'no-such-qemu'}")
    assert run.returncode == 1 and run.failures == 1, run.output
    assert "no-such-qemu is not an executable file" in run.output, run.output


async def test_guest_check_fails_after_a_reboot(sealvm_launch: sealvm.pytest_plugin.VmLauncher,
                                                sealvm_check_guest: GuestChecker) -> None:
    """The one-call guest check fails when the guest is paused, and once it
    started over (its heartbeat counter reset)."""
    vm: Machine = await sealvm_launch(size="64M")
    first = await sealvm_check_guest(vm)
    assert first.reboots == 0 and first.verified_pass is not None
    await vm.pause()
    with pytest.raises(AssertionError, match="the guest of vm is paused; resume it"):
        await sealvm_check_guest(vm)
    await vm.resume()
    await vm.reset()
    await asyncio.sleep(0)
    with pytest.raises(AssertionError, match=r"the guest rebooted \(1 time\(s\)\); "
                       r"heartbeat counter reset or skipped: \d+ -> 0"):
        await sealvm_check_guest(vm)
