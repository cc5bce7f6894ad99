"""
Shared fixtures: the built QEMU and test guest, a private run directory,
and a leak check around every test (no QEMU, socket or run file left).

Capability gates skip with a reason; they never fail.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from helpers import qemus_mentioning
from sealvm import Machine, spec_from_dict
from sealvm.spec import VmSpec


@pytest.fixture
def run_root(tmp_path: Path) -> Iterator[Path]:
    """A private run directory; afterwards, nothing of a VM may remain."""
    root = tmp_path / "run"
    root.mkdir()
    yield root
    leaked = qemus_mentioning(str(root))
    for pid in leaked:  # report it, but do not leave it burning CPU
        os.kill(pid, signal.SIGKILL)
    sockets = [p for p in root.rglob("*") if p.is_socket()]
    states = list(root.rglob("state.json"))
    assert not leaked, f"QEMU processes left running: {leaked}"
    assert not sockets, f"sockets left behind: {sockets}"
    assert not states, f"state files left behind: {states}"


@pytest.fixture(scope="session")
def qemu_binary() -> Path:
    path = os.environ.get("SEALVM_QEMU")
    if not path or not os.access(path, os.X_OK):
        pytest.skip(reason="no built QEMU: run `make test` (sets SEALVM_QEMU) or `make qemu`")
    return Path(path)


@pytest.fixture(scope="session")
def guest_image() -> Path:
    path = os.environ.get("SEALVM_GUEST")
    if not path or not os.path.isfile(path):
        pytest.skip(reason="no test guest: run `make test` (sets SEALVM_GUEST) or `make guest`")
    return Path(path)


HB_MS = 10


@pytest.fixture
def make_spec(qemu_binary: Path, guest_image: Path) -> Callable[..., VmSpec]:
    """Build a spec for the test guest; keyword overrides go to the TOML dict."""

    def make(name: str = "vm", *, size: str = "256M", backend: str = "memfd",
             cmdline: str = f"hb_ms={HB_MS}", **extra: object) -> VmSpec:
        data: dict[str, object] = {
            "name": name,
            "qemu": str(qemu_binary),
            "memory": {"size": size, "backend": backend},
            "guest": {"kernel": str(guest_image), "cmdline": cmdline},
        }
        data.update(extra)
        return spec_from_dict(data)

    return make


@pytest.fixture
async def vm(make_spec: Callable[..., VmSpec], run_root: Path) -> AsyncIterator[Machine]:
    """A running test guest with 256 MiB of sealed memfd RAM."""
    machine = Machine(make_spec(), run_root=run_root)
    await machine.launch()
    try:
        yield machine
    finally:
        await machine.shutdown()


@pytest.fixture(scope="session")
def upstream_qemu() -> Path:
    """Pristine QEMU 10.2.2 (no sealvm series), for what upstream does."""
    path = os.environ.get("SEALVM_QEMU_UPSTREAM")
    if not path or not os.access(path, os.X_OK):
        pytest.skip(reason="no upstream QEMU: run `make test` (sets SEALVM_QEMU_UPSTREAM) "
                    "or `make qemu-upstream`")
    return Path(path)
