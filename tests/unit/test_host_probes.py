"""host-check's probes for an unprivileged QEMU: parsing and verdicts, on
fake /proc trees and injected unshare(2) results (the negative controls
this host cannot produce for real)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from sealvm.host import (
    probe_mountns,
    probe_seccomp,
    probe_userns,
    probe_vm_user,
    resolve_user,
    sandbox_verdict,
)
from sealvm.procfs import parse_status

STATUS = ("Name:\tpython3\nUid:\t0\t0\t0\t0\nNoNewPrivs:\t0\n"
          "Seccomp:\t{mode}\nSeccomp_filters:\t{n}\n")
ACTIONS = "kill_process kill_thread trap errno user_notif trace log allow"


def fake_proc(tmp_path: Path, *, status: str | None = None, actions: str | None = ACTIONS,
              sysctls: dict[str, str] | None = None) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "status").write_text(
        STATUS.format(mode=0, n=0) if status is None else status)
    if actions is not None:
        (proc / "sys" / "kernel" / "seccomp").mkdir(parents=True)
        (proc / "sys" / "kernel" / "seccomp" / "actions_avail").write_text(actions + "\n")
    for name, value in (sysctls or {}).items():
        path = proc / "sys" / Path(*name.split("."))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    return proc


def test_parse_status() -> None:
    fields = parse_status(STATUS.format(mode=2, n=3))
    assert fields["Seccomp"] == "2" and fields["Seccomp_filters"] == "3"
    assert fields["Uid"] == "0 0 0 0" and fields["Name"] == "python3"


def test_seccomp_filter_mode(tmp_path: Path) -> None:
    p = probe_seccomp(fake_proc(tmp_path, status=STATUS.format(mode=2, n=3)))
    assert p.ok and p.name == "seccomp"
    assert "sealvm runs under mode 2 (filter, 3 filter(s))" in p.detail


def test_seccomp_without_config_seccomp(tmp_path: Path) -> None:
    p = probe_seccomp(fake_proc(tmp_path, status="Name:\tx\nUid:\t0\t0\t0\t0\n"))
    assert not p.ok and "CONFIG_SECCOMP " in p.detail


def test_seccomp_without_filter_support(tmp_path: Path) -> None:
    p = probe_seccomp(fake_proc(tmp_path, actions=None))
    assert not p.ok and "CONFIG_SECCOMP_FILTER" in p.detail


def test_seccomp_without_an_action_qemu_uses(tmp_path: Path) -> None:
    p = probe_seccomp(fake_proc(tmp_path, actions="kill_thread trap errno allow"))
    assert not p.ok and "without action(s) kill_process" in p.detail


def test_userns_reports_the_sysctls(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, sysctls={"user.max_user_namespaces": "0",
                                        "kernel.unprivileged_userns_clone": "0"})
    p = probe_userns(proc, try_it=lambda: errno.ENOSPC)
    assert not p.ok
    assert p.detail.startswith("unshare(CLONE_NEWUSER) as uid ")
    assert "ENOSPC" in p.detail and "user.max_user_namespaces 0" in p.detail
    assert "kernel.unprivileged_userns_clone 0" in p.detail
    ok = probe_userns(fake_proc(tmp_path / "b"), try_it=lambda: 0)
    assert ok.ok and "user.max_user_namespaces absent" in ok.detail


def test_mountns_refused() -> None:
    p = probe_mountns(try_it=lambda: errno.EPERM)
    assert not p.ok and "EPERM" in p.detail
    assert probe_mountns(try_it=lambda: 0).ok


@pytest.mark.parametrize("stderr", [
    "qemu-system-x86_64: -sandbox on: There is no option group 'sandbox'\n"
    "qemu-system-x86_64: -sandbox on: -sandbox support is not enabled in this QEMU binary\n",
])
def test_sandbox_verdict_without_seccomp(stderr: str) -> None:
    p = sandbox_verdict(returncode=1, stderr=stderr, seccomp=None)
    assert not p.ok and "built without seccomp" in p.detail


def test_sandbox_verdict() -> None:
    assert sandbox_verdict(returncode=0, stderr="", seccomp="2, 1 filter(s)").ok
    died = sandbox_verdict(returncode=-31, stderr="", seccomp=None)
    assert not died.ok and "status -31" in died.detail
    unfiltered = sandbox_verdict(returncode=0, stderr="", seccomp="0, 0 filter(s)")
    assert not unfiltered.ok and "Seccomp 0" in unfiltered.detail


def test_resolve_user() -> None:
    assert resolve_user("1234:5678") == (1234, 5678, [5678])
    assert resolve_user("root")[:2] == (0, 0)
    with pytest.raises(ValueError):
        resolve_user("12:x")
    with pytest.raises(KeyError):
        resolve_user("no-such-sealvm-user")


def test_vm_user_refuses_root_and_unknown_users() -> None:
    root = probe_vm_user("0:0")
    assert not root.ok and "root is not an unprivileged user" in root.detail
    unknown = probe_vm_user("no-such-sealvm-user")
    assert not unknown.ok and "no such user" in unknown.detail
    assert not probe_vm_user("1:x").ok
    named = probe_vm_user("65534:65534")
    assert named.ok and "binary access not checked" in named.detail
