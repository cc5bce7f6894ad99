"""
sealvm's pytest plugin: fixtures for live-update tests on a real QEMU.

Registered through the ``pytest11`` entry point, so installing sealvm makes
it available to every pytest run; it adds options and fixtures, nothing
else (no autouse fixture, no hook that changes other tests).  In a checkout
without the package installed, load it with ``-p sealvm.pytest_plugin``.

Options (each with an environment default)::

    --sealvm-qemu PATH        the QEMU a VM starts with        ($SEALVM_QEMU)
    --sealvm-update-to PATH   the QEMU a live update installs  ($SEALVM_UPDATE_TO,
                              default: the --sealvm-qemu binary)
    --sealvm-guest PATH       the guest kernel of the default spec
                              (sealvm's test guest)            ($SEALVM_GUEST)
    --sealvm-exec-path DIR    more directories a confined QEMU may run a
                              cpr-exec target from (repeatable; the
                              --sealvm-update-to binary's is added anyway)
                                                  ($SEALVM_EXEC_PATHS, ':')

So "does this QEMU build live-update from the one in production, in both
modes?" is ``pytest --sealvm-qemu PROD --sealvm-update-to NEW``.

Fixtures (all function-scoped):

- `sealvm_launch`: ``vm = await sealvm_launch(spec)``, *spec* a spec file,
  a TOML-shaped dict, a `VmSpec` or nothing (the test guest); every VM it
  launched is shut down at teardown;
- `sealvm_vm`: one running test guest (``sealvm_launch()``);
- `sealvm_update`: ``report = await sealvm_update(vm, mode)``, a live update
  to ``--sealvm-update-to``, returning the `UpdateReport` (with the test
  guest it also measures the guest's pause and checks its memory);
- `sealvm_check_guest`: ``await sealvm_check_guest(vm)``, the guest check in
  one call: heartbeat counter continuous since boot, no reboot, zero
  mismatching words, and a complete verified pass of guest RAM that began
  after the call (`sealvm.console.check_guest_console`);
- `sealvm_spec`: builds `VmSpec` objects the way `sealvm_launch` does;
- `sealvm_run_root`: the VMs' private run root (a short path under /tmp,
  moved to ``tmp_path / "run"`` at teardown); at teardown nothing may be
  left of them: no process whose command line names it (QEMU, the script
  endpoint, the keeper), no socket, no state file (leftover processes are
  killed, then the test errors naming them);
- `sealvm_config`: the resolved option values (`SealvmConfig`).

The guest checks need sealvm's test guest (``images/guest``; ``make guest``
builds it) or any guest printing the same console format on its serial
port (``SEALVM-GUEST`` banner, ``HB``, ``PASS``, ``MISMATCH`` lines).

Fixtures that need a QEMU or the guest skip, saying which option to pass,
when it is not configured, and fail when the path configured does not
exist or cannot be run.  The async fixtures need pytest-asyncio; they
work in its ``auto`` and ``strict`` modes (in strict mode, mark the tests
``@pytest.mark.asyncio``) and run in the event loop of
``asyncio_default_fixture_loop_scope`` (``function`` unless configured),
which must be the loop the test runs in.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import tempfile
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from . import confine, procfs
from .console import GuestCheck, check_guest_console, heartbeat_interval
from .machine import Machine
from .spec import VmSpec, spec_from_dict
from .update import UpdateReport, live_update

#: The live-update modes that keep guest RAM in place (parametrize with it).
MODES = ("cpr-exec", "cpr-transfer")

#: The default spec's guest RAM and command line (the test guest).
DEFAULT_SIZE = "256M"
DEFAULT_CMDLINE = "hb_ms=10"

#: What a spec for `sealvm_launch` may be.
SpecSource = Path | str | Mapping[str, Any] | VmSpec | None

_AUTO: Any = object()


# ---------------------------------------------------------------- options


def pytest_addoption(parser: pytest.Parser) -> None:
    """The ``--sealvm-*`` options."""
    group = parser.getgroup("sealvm", "sealvm live-update tests (sealvm.pytest_plugin)")
    group.addoption("--sealvm-qemu", metavar="PATH", default=None,
                    help="QEMU binary the VMs start with (default: $SEALVM_QEMU)")
    group.addoption("--sealvm-update-to", metavar="PATH", default=None,
                    help="QEMU binary live updates install, the one under test "
                         "(default: $SEALVM_UPDATE_TO, else the --sealvm-qemu binary)")
    group.addoption("--sealvm-guest", metavar="PATH", default=None,
                    help="guest kernel of the default spec: sealvm's test guest or one "
                         "printing its console format (default: $SEALVM_GUEST)")
    group.addoption("--sealvm-exec-path", metavar="DIR", action="append", default=None,
                    help="a directory a confined QEMU may run a cpr-exec target from, "
                         "added to every spec's security.exec_paths (repeatable; default: "
                         "$SEALVM_EXEC_PATHS, ':'-separated)")


def _path_option(config: pytest.Config, option: str, env: str) -> Path | None:
    """*option*'s value, else $*env*, as an absolute path (a spec file's
    relative paths are its directory's; these are the invocation's)."""
    value = config.getoption(option) or os.environ.get(env)
    return Path(value).absolute() if value else None


@dataclass(frozen=True)
class SealvmConfig:
    """The plugin's options, resolved (None: not configured)."""

    qemu: Path | None
    update_to: Path | None
    guest: Path | None
    #: added to every spec's security.exec_paths, with update_to's directory
    exec_paths: tuple[Path, ...] = ()

    @classmethod
    def from_pytest(cls, config: pytest.Config) -> SealvmConfig:
        """Read ``--sealvm-*`` (or their environment defaults) from *config*."""
        qemu = _path_option(config, "--sealvm-qemu", "SEALVM_QEMU")
        update_to = _path_option(config, "--sealvm-update-to", "SEALVM_UPDATE_TO") or qemu
        paths = config.getoption("--sealvm-exec-path") or [
            p for p in os.environ.get("SEALVM_EXEC_PATHS", "").split(":") if p]
        return cls(qemu=qemu, update_to=update_to,
                   guest=_path_option(config, "--sealvm-guest", "SEALVM_GUEST"),
                   exec_paths=tuple(Path(p).absolute() for p in paths))

    def require_qemu(self) -> Path:
        """The QEMU VMs start with; skips the test when there is none
        configured, fails it when the one configured cannot be run."""
        return _require_binary(self.qemu, "QEMU to start VMs with",
                               "pass --sealvm-qemu PATH or set SEALVM_QEMU")

    def require_update_to(self) -> Path:
        """The QEMU updates install (as `require_qemu`)."""
        return _require_binary(self.update_to, "QEMU to update to",
                               "pass --sealvm-update-to PATH (or --sealvm-qemu) or set "
                               "SEALVM_UPDATE_TO")

    def require_guest(self) -> Path:
        """The guest kernel of the default spec; skips when there is none,
        fails when the one configured does not exist."""
        if self.guest is None:
            pytest.skip("sealvm: no guest kernel configured (pass --sealvm-guest PATH or set "
                        "SEALVM_GUEST; sealvm's test guest: `make guest`)")
        if not self.guest.is_file():
            pytest.fail(f"sealvm: guest kernel {self.guest} does not exist "
                        "(--sealvm-guest / SEALVM_GUEST)", pytrace=False)
        return self.guest


def _require_binary(path: Path | None, what: str, how: str) -> Path:
    """*path*; a skip when it is not configured, a failure when it is but
    cannot be run (a typo must not turn a suite into skips)."""
    if path is None:
        pytest.skip(f"sealvm: no {what} configured ({how})")
    if not os.access(path, os.X_OK):
        pytest.fail(f"sealvm: {what} {path} is not an executable file ({how})", pytrace=False)
    return path


@pytest.fixture(scope="session")
def sealvm_config(pytestconfig: pytest.Config) -> SealvmConfig:
    """The ``--sealvm-*`` options, resolved."""
    return SealvmConfig.from_pytest(pytestconfig)


# -------------------------------------------------------------- run root


def leftovers(root: Path, *, kill: bool = True) -> list[str]:
    """What remains of VMs under the run root *root*: processes whose
    command line names it (QEMU, the script endpoint, the cpr-exec keeper;
    killed with SIGKILL when *kill*), sockets, state files, uids still
    registered for its VMs (`sealvm.confine`; released when *kill*).
    Empty when everything was cleaned up."""
    found = []
    for pid in procfs.pids_mentioning(str(root)):
        argv = procfs.cmdline(pid) or ["?"]
        what = " ".join([Path(argv[0]).name, *argv[1:3]] if argv[1:2] == ["-m"] else
                        [Path(argv[0]).name])
        found.append(f"process {pid} ({what}) still running"
                     + (", killed" if kill else ""))
        if kill:  # report it, but do not leave it burning CPU
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    found += [f"socket left behind: {p}" for p in sorted(root.rglob("*")) if p.is_socket()]
    found += [f"state file left behind: {p}" for p in sorted(root.rglob("state.json"))]
    found += [f"uid {uid} still registered for {where}" + (", released" if kill else "")
              for uid, where in confine.registered_under(root, release=kill)]
    return found


def _short_dir() -> Path:
    """A new private directory with a short path: unix socket paths (QMP,
    CPR channel) must fit in 107 bytes, which a deep tmp_path may not."""
    base = "/tmp" if os.access("/tmp", os.W_OK | os.X_OK) else tempfile.gettempdir()
    return Path(tempfile.mkdtemp(prefix="sealvm-pytest-", dir=base))


@pytest.fixture
def sealvm_run_root(tmp_path: Path) -> Iterator[Path]:
    """A private run root for this test's VMs (a short path of its own);
    afterwards nothing of a VM may remain (`leftovers`): the test errors at
    teardown, naming it.  What the VMs leave for a post-mortem (QEMU's log,
    the serial log) is then moved to ``tmp_path / "run"``."""
    root = _short_dir()
    try:
        yield root
        left = leftovers(root)
        assert not left, "sealvm: VMs not cleaned up: " + "; ".join(left)
    finally:
        with contextlib.suppress(OSError):
            shutil.move(root, tmp_path / "run")


# ----------------------------------------------------------------- specs


class SpecFactory:
    """Builds a `VmSpec`: ``sealvm_spec(source, **overrides)``.

    *source* is a spec file (TOML), a TOML-shaped dict, a `VmSpec` (used as
    it is) or None (the test guest: ``--sealvm-guest``, 256 MiB of memfd RAM,
    ``hb_ms=10``).  Missing ``qemu`` is ``--sealvm-qemu``, missing ``name``
    "vm".  *overrides*: any top-level key of the spec (a table replaces
    the table), then ``size``, ``backend`` (memory), ``kernel``,
    ``cmdline`` (guest).
    """

    def __init__(self, config: SealvmConfig) -> None:
        self.config = config

    def __call__(self, source: SpecSource = None, /, **overrides: Any) -> VmSpec:
        """Build the spec (see the class)."""
        if isinstance(source, VmSpec):
            if overrides:
                raise TypeError("overrides do not apply to a VmSpec; pass a dict or a file")
            return source
        base = Path.cwd()
        if source is None:
            data: dict[str, Any] = {
                "memory": {"size": DEFAULT_SIZE, "backend": "memfd"},
                "guest": {"kernel": str(self.config.require_guest()), "cmdline": DEFAULT_CMDLINE},
            }
        elif isinstance(source, Mapping):
            data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in source.items()}
        else:
            path = Path(source)
            with open(path, "rb") as f:
                data = tomllib.load(f)
            base = path.resolve().parent
        shorthands = {k: overrides.pop(k) for k in ("size", "backend", "kernel", "cmdline")
                      if k in overrides}
        data.update(overrides)  # whole tables ("memory", "guest") first
        memory = dict(data.get("memory") or {})
        guest = dict(data.get("guest") or {})
        for key, table in (("size", memory), ("backend", memory), ("kernel", guest),
                           ("cmdline", guest)):
            if key in shorthands:
                table[key] = shorthands[key]
        data["memory"], data["guest"] = memory, guest
        data.setdefault("name", "vm")
        if "qemu" not in data:
            data["qemu"] = str(self.config.require_qemu())
        self._exec_view(data)
        return spec_from_dict(data, base=base)

    def _exec_view(self, data: dict[str, Any]) -> None:
        """A confined QEMU may cpr-exec the build under test and the
        ``--sealvm-exec-path`` directories (`sealvm.confine`)."""
        extra = [*self.config.exec_paths]
        if self.config.update_to is not None:
            extra.append(self.config.update_to.parent)
        security = dict(data.get("security") or {})
        have = list(security.get("exec_paths", []))
        security["exec_paths"] = have + [str(p) for p in extra if str(p) not in have]
        data["security"] = security


@pytest.fixture
def sealvm_spec(sealvm_config: SealvmConfig) -> SpecFactory:
    """``sealvm_spec(source=None, **overrides) -> VmSpec`` (`SpecFactory`)."""
    return SpecFactory(sealvm_config)


# --------------------------------------------------------------- launching


class VmLauncher:
    """Launches VMs in the test's run root: ``await sealvm_launch(source,
    **overrides)`` (*source* and *overrides* as for `SpecFactory`) returns
    a running `Machine`.  Every VM launched is shut down at teardown, even
    one the test already shut down or that an update left elsewhere."""

    def __init__(self, specs: SpecFactory, run_root: Path) -> None:
        self.specs = specs
        self.run_root = run_root
        #: every Machine launched, in order
        self.machines: list[Machine] = []

    async def __call__(self, source: SpecSource = None, /, **overrides: Any) -> Machine:
        """Launch one VM (see the class)."""
        if "name" not in overrides and not isinstance(source, VmSpec | str | Path) and (
                source is None or "name" not in source):
            overrides["name"] = "vm" if not self.machines else f"vm{len(self.machines) + 1}"
        machine = Machine(self.specs(source, **overrides), run_root=self.run_root)
        self.machines.append(machine)
        await machine.launch()
        return machine

    async def close(self) -> None:
        """Shut every launched VM down (idempotent)."""
        for machine in reversed(self.machines):
            await machine.shutdown()


_F = TypeVar("_F", bound=Callable[..., Any])


def _async_fixture(fn: _F) -> _F:
    """*fn* as a pytest-asyncio fixture (auto and strict mode alike); without
    pytest-asyncio, a fixture that fails the test saying so."""
    try:
        import pytest_asyncio
    except ImportError:  # pragma: no cover
        @functools.wraps(fn)
        def missing(*args: Any, **kwargs: Any) -> None:
            pytest.fail("sealvm's VM fixtures are async: install pytest-asyncio "
                        "(pip install 'sealvm[pytest]')", pytrace=False)

        return cast(_F, pytest.fixture(missing))
    return cast(_F, pytest_asyncio.fixture(fn))


@_async_fixture
async def sealvm_launch(sealvm_spec: SpecFactory,
                        sealvm_run_root: Path) -> AsyncIterator[VmLauncher]:
    """``await sealvm_launch(source=None, **overrides) -> Machine``
    (`VmLauncher`); every VM shut down at teardown, then the run root
    checked for leftovers."""
    launcher = VmLauncher(sealvm_spec, sealvm_run_root)
    try:
        yield launcher
    finally:
        await launcher.close()


@_async_fixture
async def sealvm_vm(sealvm_launch: VmLauncher) -> Machine:
    """A running test guest (the default spec), shut down at teardown."""
    return await sealvm_launch()


# ------------------------------------------------------- update and check


def serial_log(vm: Machine) -> Path:
    """The file *vm*'s serial console is logged to."""
    return vm.serial_log


class Updater:
    """Runs a live update: ``report = await sealvm_update(vm, mode="cpr-exec",
    qemu=None, **kwargs)``.

    *qemu* defaults to ``--sealvm-update-to``.  With sealvm's test guest
    (its banner on the console, or the spec's kernel is ``--sealvm-guest``)
    the guest is followed through the update:
    the report then has ``pause_guest``, ``heartbeat_continuous`` and
    ``mismatches`` (after a verified pass); pass ``heartbeat_interval=None``
    not to.  Other *kwargs* go to `sealvm.live_update`, which raises
    `PreflightError` / `UpdateError` on failure, including a completed
    update whose checks failed.
    """

    def __init__(self, config: SealvmConfig) -> None:
        self.config = config

    async def __call__(self, vm: Machine, mode: str = "cpr-exec", *,
                       qemu: Path | None = None, heartbeat_interval: float | None = _AUTO,
                       **kwargs: Any) -> UpdateReport:
        """Update *vm* (see the class)."""
        if qemu is None:
            qemu = self.config.require_update_to()
        if heartbeat_interval is _AUTO:
            heartbeat_interval = heartbeat_interval_of(vm)
            if heartbeat_interval is None and self.config.guest is not None and (
                    vm.spec.guest.kernel.resolve() == self.config.guest.resolve()):
                # the test guest, not booted far enough to print its banner
                hb_ms = re.search(r"(?:^|\s)hb_ms=(\d+)", vm.spec.guest.cmdline)
                heartbeat_interval = max(1, int(hb_ms[1]) if hb_ms else 10) / 1000
        return await live_update(vm, qemu=qemu, mode=mode,
                                 heartbeat_interval=heartbeat_interval, **kwargs)


def heartbeat_interval_of(vm: Machine) -> float | None:
    """The test guest's heartbeat interval from *vm*'s console banner, or
    None for another guest."""
    return heartbeat_interval(serial_log(vm))


@pytest.fixture
def sealvm_update(sealvm_config: SealvmConfig) -> Updater:
    """``await sealvm_update(vm, mode="cpr-exec", **kwargs) -> UpdateReport``
    (`Updater`), to ``--sealvm-update-to``."""
    return Updater(sealvm_config)


class GuestChecker:
    """Checks the test guest in one call: ``await sealvm_check_guest(vm,
    timeout=120)`` waits for a complete verified pass of guest RAM that
    began after the call, then fails the test (AssertionError naming every
    problem) unless: the guest never rebooted, its heartbeat counter never
    reset or skipped since boot, and no word of its RAM mismatched.  Returns
    the `GuestCheck`.  The guest must be running."""

    async def __call__(self, vm: Machine, *, timeout: float = 120.0) -> GuestCheck:
        """Check *vm*'s guest (see the class)."""
        status = await vm.status()
        if status != "running":
            raise AssertionError(f"sealvm: the guest of {vm.name} is {status}; "
                                 "resume it before checking it")
        result = await check_guest_console(serial_log(vm), timeout=timeout)
        if result.problems:
            raise AssertionError(f"sealvm: guest of {vm.name} not intact: "
                                 + "; ".join(result.problems))
        return result


@pytest.fixture
def sealvm_check_guest() -> GuestChecker:
    """``await sealvm_check_guest(vm) -> GuestCheck`` (`GuestChecker`)."""
    return GuestChecker()


__all__ = [
    "MODES",
    "GuestChecker",
    "SealvmConfig",
    "SpecFactory",
    "Updater",
    "VmLauncher",
    "heartbeat_interval_of",
    "leftovers",
    "serial_log",
]
