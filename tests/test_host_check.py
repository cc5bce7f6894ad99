"""host-check's probes for an unprivileged, sandboxed QEMU (issue 18), on
this host: each probe's verdict is cross-checked against the kernel or
util-linux doing the same thing, and each has a failing case."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sealvm.host import _new_mount_namespace, in_child, probe_mountns, probe_vm_user

SEALVM = [sys.executable, "-m", "sealvm.cli"]
NOBODY = "65534:65534"


def host_check(*args: str, rc: int = 0) -> dict[str, Any]:
    p = subprocess.run([*SEALVM, "host-check", "--json", *args], capture_output=True,
                       text=True, timeout=120, check=False)
    assert p.returncode == rc, f"rc {p.returncode}\n{p.stdout}\n{p.stderr}"
    out: dict[str, Any] = json.loads(p.stdout)
    return out


def by_name(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in out["probes"]}


def works(*argv: str) -> bool:
    return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0


@pytest.fixture
def public_qemu(qemu_binary: Path) -> Iterator[Path]:
    """The QEMU binary, linked into a directory every user may enter (a
    pytest tmp_path is not: its parents are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="sealvm-public-"))
    try:
        os.chmod(d, 0o755)
        path = d / qemu_binary.name
        try:
            os.link(qemu_binary, path)
        except OSError:  # another filesystem
            shutil.copy2(qemu_binary, path)
        yield path
    finally:
        shutil.rmtree(d)
    assert not d.exists()


def test_host_check_for_an_unprivileged_qemu(public_qemu: Path) -> None:
    out = host_check("--qemu", str(public_qemu), "--vm-user", NOBODY,
                     "--require", "seccomp,mountns,qemu-sandbox,vm-user")
    probes = by_name(out)
    assert out["missing"] == []
    assert probes["seccomp"]["ok"]
    assert "filter mode, actions: " in probes["seccomp"]["detail"]
    # the same verdicts as util-linux's unshare(1) on this host
    assert probes["mountns"]["ok"] == works("unshare", "--mount", "true")
    assert probes["userns"]["ok"] == works("unshare", "--user", "true")
    assert "user.max_user_namespaces " in probes["userns"]["detail"]
    # QEMU ran under its filter: /proc said filter mode
    assert probes["qemu-sandbox"]["detail"].startswith("QEMU ran with -sandbox on,")
    assert "Seccomp 2" in probes["qemu-sandbox"]["detail"]
    assert probes["vm-user"]["detail"] == (
        f"{NOBODY}: uid 65534, gid nogroup (65534): can read and execute {public_qemu}")


def test_vm_user_that_cannot_reach_the_binary(public_qemu: Path) -> None:
    os.chmod(public_qemu.parent, 0o700)
    out = host_check("--qemu", str(public_qemu), "--vm-user", NOBODY,
                     "--require", "vm-user", rc=10)
    assert out["missing"] == ["vm-user"]
    assert "cannot read and execute" in by_name(out)["vm-user"]["detail"]
    assert "EACCES" in by_name(out)["vm-user"]["detail"]
    assert not probe_vm_user("65534:65534", qemu=public_qemu).ok


def test_mountns_refused_to_an_unprivileged_user() -> None:
    def as_nobody() -> int:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        return _new_mount_namespace()

    p = probe_mountns(try_it=lambda: in_child(as_nobody))
    assert not p.ok and "EPERM" in p.detail
    assert in_child(as_nobody) == errno.EPERM


def test_parametric_probes_need_their_argument() -> None:
    for args in (["--require", "qemu-sandbox"], ["--require", "vm-user"]):
        p = subprocess.run([*SEALVM, "host-check", *args], capture_output=True, text=True,
                           timeout=60, check=False)
        assert p.returncode == 2 and "needs --" in p.stderr
