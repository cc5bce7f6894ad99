"""Pure logic of `sealvm.confine` and the spec's ``[security]`` table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from sealvm import SpecError, confine, spec_from_dict
from sealvm.plan import FdPlan, RunPaths, qemu_argv
from sealvm.spec import VmSpec


def spec(**extra: Any) -> VmSpec:
    data: dict[str, Any] = {"name": "t", "qemu": "/opt/q/bin/qemu-system-x86_64",
                            "memory": {"size": "64M"}, "guest": {"kernel": "/k/guest.bin"}}
    data.update(extra)
    return spec_from_dict(data)


def test_security_defaults_and_round_trip() -> None:
    s = spec()
    assert (s.security.confine, s.security.user, s.security.seccomp, s.security.cpr_exec) == (
        True, "auto", True, True)
    assert spec_from_dict(s.to_dict()) == s
    t = spec(security={"confine": False, "paths": ["/a"], "exec_paths": ["/b"]})
    assert spec_from_dict(t.to_dict()) == t


@pytest.mark.parametrize("security, field, message", [
    ({"user": "0:5"}, "security.user", "root"),
    ({"user": "root"}, "security.user", "is root"),
    ({"user": "no-such-user-here"}, "security.user", "no user named"),
    ({"paths": [""]}, "security.paths", "list of paths"),
    ({"exec_paths": "/x"}, "security.exec_paths", "expected list"),
    ({"confines": True}, "security.confines", "did you mean 'confine'"),
])
def test_bad_security_is_a_spec_error(security: dict[str, Any], field: str,
                                      message: str) -> None:
    with pytest.raises(SpecError, match=message) as err:
        spec(security=security)
    assert err.value.field == field


def test_legacy_vfio_needs_confinement_off() -> None:
    legacy = [{"sysfsdev": "/sys/bus/mdev/devices/u", "backend": "legacy"}]
    with pytest.raises(SpecError, match="legacy .type1. backend") as err:
        spec(vfio=legacy)
    assert err.value.field == "security.confine"
    assert spec(vfio=legacy, security={"confine": False}).vfio[0].backend == "legacy"


def test_sandbox_follows_the_spec() -> None:
    argv = qemu_argv(spec(), RunPaths(Path("/run/t")), FdPlan(qmp_listen=3))
    assert argv[argv.index("-sandbox") + 1] == confine.SANDBOX
    argv = qemu_argv(spec(security={"cpr_exec": False}), RunPaths(Path("/run/t")),
                     FdPlan(qmp_listen=3))
    assert argv[argv.index("-sandbox") + 1] == confine.SANDBOX + ",spawn=deny"
    argv = qemu_argv(spec(security={"seccomp": False}), RunPaths(Path("/run/t")),
                     FdPlan(qmp_listen=3))
    assert "-sandbox" not in argv


def test_strip_sandbox_removes_every_sandbox_and_nothing_else() -> None:
    argv = ["q", "-sandbox", "on", "-name", "x", "-sandbox", "on,spawn=deny", "-S"]
    assert confine.strip_sandbox(argv) == ["q", "-name", "x", "-S"]
    assert confine.strip_sandbox(["q", "-name", "-sandbox"]) == ["q", "-name"]


def test_view_shows_what_the_vm_needs_and_how(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"")
    ro = tmp_path / "ro.img"
    ro.write_bytes(b"")
    s = spec(disk=[{"id": "d0", "path": str(disk)}, {"id": "d1", "path": str(ro),
                                                      "readonly": True}],
             security={"exec_paths": ["/opt/next"], "paths": ["/"]},
             serial_log=str(tmp_path / "serial.log"))
    binds = {path: mode for path, mode in confine.view(
        s, Path("/run/t/qemu"), trampoline=Path("/c/tr/sealvm-exec-trampoline"))}
    assert binds["/usr"] == "ro"
    assert all(binds[d] == "rx" for d in confine.LIB_DIRS if d in binds)
    assert binds["/opt/q/bin"] == "ro" and binds["/opt/q/bin/qemu-system-x86_64"] == "rx"
    assert binds["/opt/next"] == "rx"
    assert binds["/c/tr/sealvm-exec-trampoline"] == "rx"
    assert binds[str(disk)] == "rw" and binds[str(ro)] == "ro"
    assert binds[str(tmp_path / "serial.log")] == "rw"
    assert binds["/run/t/qemu"] == "rw" and binds["/"] == "ro"
    assert "/k/guest.bin" not in binds  # does not exist: nothing to show
    assert "/sys" not in binds  # no VFIO device
    no_exec = confine.view(spec(security={"cpr_exec": False}), Path("/q"),
                           trampoline=Path("/c/tr/t"))
    assert ["/c/tr/t", "rx"] not in no_exec


def test_jail_plan_and_argv() -> None:
    conf = confine.Confinement(uid=0x70000001, gid=0x70000001, seccomp=True, cpr_exec=True)
    plan = confine.jail_plan(spec(accel="kvm"), conf, Path("/run/t/qemu"), Path("/run/t/.jail"))
    assert (plan["uid"], plan["gid"], plan["root"]) == (conf.uid, conf.gid, "/run/t/.jail")
    assert "/dev/kvm" in plan["dev"] and "/dev/null" in plan["dev"]
    argv = confine.wrap(["/opt/q/bin/qemu-system-x86_64", "-S"], plan)
    assert argv[1:4] == ["-I", "-S", str(confine.JAIL)]
    assert json.loads(argv[4]) == plan and argv[5:] == ["--", "/opt/q/bin/qemu-system-x86_64",
                                                         "-S"]


def test_confinement_state_round_trip() -> None:
    conf = confine.Confinement(uid=5, gid=6, seccomp=False, cpr_exec=True, leased=True,
                               disks=(("/d", 0, 0),))
    assert confine.Confinement.from_state(json.loads(json.dumps(conf.to_state()))) == conf
    assert confine.Confinement.from_state({}) is None


def test_can_execute_reads_the_mode_bits(tmp_path: Path) -> None:
    f = tmp_path / "q"
    f.write_bytes(b"")
    os.chown(f, 0, 0)
    for mode, other in ((0o700, False), (0o750, False), (0o755, True), (0o701, False)):
        os.chmod(f, mode)
        assert confine.can_execute(f, 4242, 4242) is other, oct(mode)
    os.chown(f, 4242, 0)
    os.chmod(f, 0o500)
    assert confine.can_execute(f, 4242, 1)
    assert not confine.can_execute(tmp_path / "missing", 4242, 4242)
