"""
Shared fixtures: the built QEMU and test guest, a private run directory,
and a leak check around every test (no QEMU, socket or run file left), all
from sealvm's own pytest plugin (`sealvm.pytest_plugin`).

Capability gates skip with a reason; they never fail.  But under
``SEALVM_STRICT_SKIPS=1`` (``make test`` sets it) a skip is allowed only for
a host fact outside the project's control (`ALLOWED_SKIPS`); any other skip
-- a missing build of ours, an L1 that does not boot -- fails the run, and
so does a run that collected no tests.  The session ends with every skip,
its reason and whether it is allowed, and the allow-list itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from sealvm import Machine
from sealvm.spec import VmSpec

if TYPE_CHECKING:  # imported by pytest_plugins below, with its asserts rewritten
    from sealvm.pytest_plugin import SealvmConfig, SpecFactory

#: The project's own tests use sealvm's pytest plugin (VM fixtures, the
#: leak check); registered here too for a checkout that is not installed.
pytest_plugins = ["sealvm.pytest_plugin"]


@pytest.fixture
def run_root(sealvm_run_root: Path) -> Path:
    """A private run directory; afterwards, nothing of a VM may remain (the
    plugin's leak check: no process naming it, no socket, no state file)."""
    return sealvm_run_root


@pytest.fixture(scope="session")
def qemu_binary(sealvm_config: SealvmConfig) -> Path:
    """The QEMU under test (``--sealvm-qemu`` / $SEALVM_QEMU)."""
    return sealvm_config.require_qemu()


@pytest.fixture(scope="session")
def guest_image(sealvm_config: SealvmConfig) -> Path:
    """The test guest (``--sealvm-guest`` / $SEALVM_GUEST)."""
    return sealvm_config.require_guest()


HB_MS = 10


@pytest.fixture
def make_spec(sealvm_spec: SpecFactory, guest_image: Path) -> Callable[..., VmSpec]:
    """Build a spec for the test guest; keyword overrides go to the TOML dict
    (the plugin's `SpecFactory` fills in the QEMU)."""

    def make(name: str = "vm", *, size: str = "256M", backend: str = "memfd",
             cmdline: str = f"hb_ms={HB_MS}", **extra: object) -> VmSpec:
        data: dict[str, object] = {
            "name": name,
            "memory": {"size": size, "backend": backend},
            "guest": {"kernel": str(guest_image), "cmdline": cmdline},
        }
        data.update(extra)
        return sealvm_spec(data)

    return make


@pytest.fixture
def vm(sealvm_vm: Machine) -> Machine:
    """A running test guest with 256 MiB of sealed memfd RAM (the plugin's)."""
    return sealvm_vm


@pytest.fixture(scope="session")
def upstream_qemu() -> Path:
    """Pristine QEMU 10.2.2 (no sealvm series), for what upstream does."""
    path = os.environ.get("SEALVM_QEMU_UPSTREAM")
    if not path or not os.access(path, os.X_OK):
        pytest.skip(reason="no upstream QEMU: run `make test` (sets SEALVM_QEMU_UPSTREAM) "
                    "or `make qemu-upstream`")
    return Path(path)


# ------------------------------------------------------------ figures

_figures: dict[str, list[str]] = {}


@pytest.fixture
def figures() -> Callable[[str, str], None]:
    """``figures(section, line)``: a line printed in the session's summary
    (what a scenario measured; tests assert behaviour, not these)."""

    def add(section: str, line: str) -> None:
        _figures.setdefault(section, []).append(line)

    return add


# ------------------------------------------------------------ strict skips

#: The only skip reasons `make test` accepts: facts about the host, outside
#: the project's control.  Whatever the project builds or boots itself (our
#: QEMU, the test guest, the L1 kernel, L1) is never one.
ALLOWED_SKIPS: dict[str, re.Pattern[str]] = {
    "no free huge pages": re.compile(r"huge ?pages?", re.I),
    "no usable KVM": re.compile(r"\bKVM\b"),
    "not running as root": re.compile(r"\bneeds root\b"),
    "kernel before Linux 6.3 (no vm.memfd_noexec)": re.compile(r"\bvm\.memfd_noexec\b"),
}

STRICT_SKIPS = os.environ.get("SEALVM_STRICT_SKIPS") == "1"
_skips: list[tuple[str, str]] = []  # (test or collector id, reason)


def allowed_skip(reason: str) -> str | None:
    """The allow-list entry *reason* matches, or None."""
    return next((name for name, rx in ALLOWED_SKIPS.items() if rx.search(reason)), None)


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skips.append((report.nodeid, _skip_reason(report)))


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:
        _skips.append((report.nodeid or "(collection)", _skip_reason(report)))


def _disallowed() -> list[tuple[str, str]]:
    return [(node, reason) for node, reason in _skips if allowed_skip(reason) is None]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not STRICT_SKIPS:
        return
    if exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED) and (
            _disallowed() or exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            exitstatus: int) -> Generator[None, None, None]:
    """Last, after pytest's own summaries: every skip and the allow-list."""
    yield
    tr = terminalreporter
    for section, lines in _figures.items():
        tr.section(section)
        for line in lines:
            tr.write_line(line)
    if not STRICT_SKIPS:
        return
    tr.section("skips (SEALVM_STRICT_SKIPS=1)")
    for node, reason in _skips:
        entry = allowed_skip(reason)
        tr.line(f"{'allowed' if entry else 'NOT ALLOWED'}  {node}: {reason}"
                + (f"  [{entry}]" if entry else ""), red=entry is None)
    if not _skips:
        tr.line("no test skipped")
    tr.line("skips allowed only for these host facts: " + "; ".join(ALLOWED_SKIPS))
    bad = _disallowed()
    if bad:
        tr.line(f"strict skips: FAILING the run: {len(bad)} skip(s) for a reason that is not "
                "a host fact (see tests/conftest.py ALLOWED_SKIPS)", red=True, bold=True)
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        tr.line("strict skips: FAILING the run: no tests were collected", red=True, bold=True)
