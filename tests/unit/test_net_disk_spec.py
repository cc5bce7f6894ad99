"""[[net]] and [[disk]]: validation (every error names the field) and the
QEMU arguments they become."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sealvm.errors import SpecError
from sealvm.plan import FdPlan, RunPaths, qemu_argv
from sealvm.spec import spec_from_dict

BASE: dict[str, object] = {
    "name": "t",
    "qemu": "/q",
    "memory": {"size": "1G"},
    "guest": {"kernel": "/g", "initrd": "/i"},
}


def with_(**over: object) -> dict[str, object]:
    return {**BASE, **over}


@pytest.mark.parametrize(
    ("net", "field", "text"),
    [
        ({"mac": "52:54:00:12:34"}, "net[0].mac", "not a MAC"),
        ({"mac": "53:54:00:12:34:56"}, "net[0].mac", "multicast"),
        ({"tap": "a-very-long-tap-name"}, "net[0].tap", "not a valid interface"),
        ({"tap": "a/b"}, "net[0].tap", "not a valid interface"),
        ({"netns": "../x"}, "net[0].netns", "not a valid namespace"),
        ({"address": "192.0.2.1"}, "net[0].address", "no prefix"),
        ({"address": "300.0.2.1/24"}, "net[0].address", "not an address"),
        ({"address": "192.0.2.1/24", "bridge": "br0"}, "net[0].address", "bridge"),
        ({"vhost": "yes"}, "net[0].vhost", "expected bool"),
        ({"mtu": 1500}, "net[0].mtu", "unknown field"),
    ],
)
def test_bad_net_is_refused_naming_the_field(net: dict[str, object], field: str,
                                             text: str) -> None:
    with pytest.raises(SpecError, match=text) as ei:
        spec_from_dict(with_(net=[net]))
    assert ei.value.field == field


@pytest.mark.parametrize(
    ("disk", "field", "text"),
    [
        ({}, "disk[0].path", "missing"),
        ({"path": "/d", "format": "vmdk"}, "disk[0].format", "not one of"),
        ({"path": "/d", "cache": "fast"}, "disk[0].cache", "not one of"),
        ({"path": "/d", "readonly": 1}, "disk[0].readonly", "expected bool"),
    ],
)
def test_bad_disk_is_refused_naming_the_field(disk: dict[str, object], field: str,
                                              text: str) -> None:
    with pytest.raises(SpecError, match=text) as ei:
        spec_from_dict(with_(disk=[disk]))
    assert ei.value.field == field


def test_duplicates_are_refused() -> None:
    with pytest.raises(SpecError, match="tap 'x' is used twice"):
        spec_from_dict(with_(net=[{"tap": "x"}, {"tap": "x", "id": "n1"}]))
    with pytest.raises(SpecError, match="mac"):
        spec_from_dict(with_(net=[{"mac": "52:54:00:00:00:01"},
                                  {"mac": "52:54:00:00:00:01"}]))
    with pytest.raises(SpecError, match="path '/d' is used twice"):
        spec_from_dict(with_(disk=[{"path": "/d"}, {"path": "/d"}]))
    with pytest.raises(SpecError, match="'x' names two devices"):
        spec_from_dict(with_(net=[{"id": "x"}], disk=[{"id": "x", "path": "/d"}]))


def test_defaults_are_stable_and_round_trip() -> None:
    a = spec_from_dict(with_(net=[{"netns": "ns"}], disk=[{"path": "/d"}]))
    b = spec_from_dict(with_(net=[{"netns": "ns"}], disk=[{"path": "/d"}]))
    assert a.net[0].mac == b.net[0].mac and a.net[0].tap == b.net[0].tap
    assert len(a.net[0].tap) <= 15 and not int(a.net[0].mac[:2], 16) & 1
    assert spec_from_dict(a.to_dict()) == a
    assert a.guest.initrd is not None and a.guest.initrd.name == "i"


def test_nics_use_passed_tap_fds_and_disks_lock() -> None:
    spec = spec_from_dict(with_(
        net=[{"id": "n0", "mac": "52:54:00:00:00:01"}],
        disk=[{"id": "d0", "path": "/img,1", "cache": "none", "readonly": True},
              {"id": "d1", "path": "/q.qcow2", "format": "qcow2", "cache": "writethrough"}]))
    argv = qemu_argv(spec, RunPaths(Path("/r")), FdPlan(qmp_listen=3, taps={"n0": 9}))
    assert argv[argv.index("-initrd") + 1] == "/i"
    assert argv[argv.index("-netdev") + 1] == "tap,id=n0,fd=9"  # never by name
    assert "virtio-net-pci,id=n0,netdev=n0,mac=52:54:00:00:00:01,romfile=" in argv
    nodes = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    assert nodes[0] == {"driver": "file", "node-name": "d0-file", "filename": "/img,1",
                        "cache": {"direct": True, "no-flush": False}, "read-only": True,
                        "locking": "on"}
    assert nodes[1]["driver"] == "raw" and nodes[1]["file"] == "d0-file"
    assert nodes[3]["driver"] == "qcow2" and nodes[2]["locking"] == "on"
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert "virtio-blk-pci,id=d0,drive=d0,write-cache=on" in devices
    assert "virtio-blk-pci,id=d1,drive=d1,write-cache=off" in devices
    with pytest.raises(ValueError, match="taps"):
        qemu_argv(spec, RunPaths(Path("/r")), FdPlan(qmp_listen=3))


def test_fd_plan_state_round_trip() -> None:
    plan = FdPlan(qmp_listen=3, iommufd=4, vfio={"v": 5}, taps={"n0": 6})
    assert FdPlan.from_state(json.loads(json.dumps(plan.to_state()))) == plan
    # a state file from before [[net]] has no taps
    assert FdPlan.from_state({"qmp_listen": 3, "iommufd": None, "vfio": {}}).taps == {}
