"""
Who may touch a VM: its run directory is 0700, its QMP socket and state
file 0600, and sealvm refuses a run root another user owns or may write
(whoever can write there can swap the socket or the state file, and the
state file names the pid sealvm signals).  A non-root user's default run
root is $XDG_RUNTIME_DIR/sealvm; without XDG_RUNTIME_DIR sealvm refuses
rather than guess a path under /tmp.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sealvm import Machine, StateError, live_update
from sealvm.spec import VmSpec

NOBODY = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def foreign_dir(run_root: Path) -> Iterator[Path]:
    """A directory owned by another user: chowned to nobody when we are
    root; otherwise / (root's) is one."""
    if os.geteuid() != 0:
        yield Path("/")
        return
    theirs = run_root / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    yield theirs


async def test_run_dir_socket_and_state_are_private(
    make_spec: Callable[..., VmSpec], run_root: Path
) -> None:
    fresh = run_root / "fresh"  # a run root sealvm creates itself
    vm = Machine(make_spec(), run_root=fresh)
    await vm.launch()
    try:
        assert mode(fresh) == 0o700 and mode(vm.paths.root) == 0o700
        assert stat.S_ISSOCK(os.lstat(vm.paths.qmp).st_mode) and mode(vm.paths.qmp) == 0o600
        assert mode(vm.paths.state) == 0o600
        await live_update(vm, mode="cpr-transfer")  # new sockets, state rewritten
        assert mode(vm.paths.qmp) == 0o600 and mode(vm.paths.state) == 0o600
        writable = [p for p in vm.paths.root.iterdir() if mode(p) & 0o022]
        assert not writable, f"group/world-writable in the run directory: {writable}"
    finally:
        await vm.shutdown()


async def test_run_root_of_another_user_is_refused(
    make_spec: Callable[..., VmSpec], foreign_dir: Path, run_root: Path
) -> None:
    owner = os.stat(foreign_dir).st_uid
    vm = Machine(make_spec(), run_root=foreign_dir)
    try:
        with pytest.raises(StateError, match=rf"run root {re.escape(str(foreign_dir))} is "
                           rf"owned by \S+ \(uid {owner}\), not by .*uid {os.geteuid()}"):
            await vm.launch()
    finally:
        await vm.shutdown()
    assert not (foreign_dir / "vm").exists()
    with pytest.raises(StateError, match="is owned by"):
        await Machine.attach("vm", run_root=foreign_dir)


@pytest.mark.parametrize("bits", [0o020, 0o002], ids=["group-writable", "world-writable"])
async def test_writable_run_root_is_refused(
    make_spec: Callable[..., VmSpec], run_root: Path, bits: int
) -> None:
    shared = run_root / "shared"
    shared.mkdir()
    shared.chmod(0o755 | bits)
    vm = Machine(make_spec(), run_root=shared)
    try:
        with pytest.raises(StateError, match=rf"run root {re.escape(str(shared))} .* has mode "
                           rf"{0o755 | bits:04o}: group/world-writable"):
            await vm.launch()
    finally:
        await vm.shutdown()
    assert list(shared.iterdir()) == []


async def test_symlink_of_another_user_is_refused(
    make_spec: Callable[..., VmSpec], run_root: Path
) -> None:
    """Their link to our own directory: they could re-point it later."""
    ours = run_root / "ours"
    ours.mkdir()
    link = run_root / "link"
    link.symlink_to(ours)
    if os.geteuid() == 0:
        os.lchown(link, NOBODY, NOBODY)
        vm = Machine(make_spec(), run_root=link)
        try:
            with pytest.raises(StateError,
                               match=rf"run root {re.escape(str(link))} is a symlink owned by"):
                await vm.launch()
        finally:
            await vm.shutdown()
    else:  # our own link to our own directory is fine
        Machine(make_spec(), run_root=link)._prepare_run_dir()
        (ours / "vm").rmdir()


# Run as nobody (when we are root) after importing sealvm: the non-root paths.
NON_ROOT = textwrap.dedent("""
    import json, os, sys, tempfile
    from pathlib import Path
    from sealvm import Machine, StateError, spec_from_dict
    from sealvm.runroot import default_run_root
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    out = {"uid": os.geteuid()}
    os.environ.pop("SEALVM_RUN_DIR", None)
    os.environ.pop("XDG_RUNTIME_DIR", None)
    try:
        out["no_xdg"] = str(default_run_root())
    except StateError as exc:
        out["no_xdg_error"] = str(exc)
    xdg = tempfile.mkdtemp(prefix="sealvm-xdg-")
    os.environ["XDG_RUNTIME_DIR"] = xdg
    out["xdg"] = xdg
    out["default"] = str(default_run_root())
    spec = spec_from_dict({"name": "vm", "qemu": "/q", "guest": {"kernel": "/k"},
                           "memory": {"size": "64M"}})
    Machine(spec)._prepare_run_dir()
    out["modes"] = [oct(os.stat(p).st_mode & 0o777) for p in (Path(xdg, "sealvm"),
                                                              Path(xdg, "sealvm", "vm"))]
    for d in (Path(xdg, "sealvm", "vm"), Path(xdg, "sealvm"), Path(xdg)):
        d.rmdir()
    try:
        Machine(spec, run_root=Path("/usr"))._prepare_run_dir()
    except Exception as exc:
        out["root_owned_error"] = f"{type(exc).__name__}: {exc}"
    from sealvm import confine
    try:
        confine.confinement(spec, Path(xdg, "sealvm", "vm"))
    except Exception as exc:
        out["confine_error"] = f"{type(exc).__name__}: {exc}"
    unconfined = spec_from_dict({**spec.to_dict(), "security": {"confine": False}})
    out["unconfined"] = confine.confinement(unconfined, Path(xdg, "sealvm", "vm"))
    print(json.dumps(out))
""").replace("NOBODY", str(NOBODY))


def test_non_root_default_run_root() -> None:
    p = subprocess.run([sys.executable, "-c", NON_ROOT], capture_output=True, text=True,
                       timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["uid"] != 0
    assert "no_xdg" not in out, f"guessed a run root: {out['no_xdg']}"
    assert "XDG_RUNTIME_DIR is unset" in out["no_xdg_error"]
    assert "SEALVM_RUN_DIR" in out["no_xdg_error"]
    assert out["default"] == f"{out['xdg']}/sealvm"
    assert out["modes"] == ["0o700", "0o700"]
    assert out["root_owned_error"].startswith(
        "StateError: run root /usr is owned by root (uid 0), not by ")
    assert not Path(out["xdg"]).exists()
    # confinement needs root: a typed error naming the fix, before anything starts
    assert out["confine_error"].startswith(
        "HostError: security.confine: sealvm starts QEMU as a user of its own"), out
    assert "set confine = false" in out["confine_error"]
    assert out["unconfined"] is None
