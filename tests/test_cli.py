"""
Every CLI verb, each run as its own process against the real QEMU: `up`
returns while the VM keeps running, later commands attach to it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns

from sealvm import procfs
from sealvm.update import warm

SEALVM = [sys.executable, "-m", "sealvm.cli"]


class Cli:
    def __init__(self, run_root: Path) -> None:
        self.env = dict(os.environ, SEALVM_RUN_DIR=str(run_root))

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*SEALVM, *args], env=self.env, capture_output=True, text=True,
                              timeout=120, check=False)

    def json(self, *args: str, rc: int = 0) -> Any:
        p = self.run(*args, "--json")
        assert p.returncode == rc, f"{args}: rc {p.returncode}\n{p.stdout}\n{p.stderr}"
        return json.loads(p.stdout)


@pytest.fixture
def cli(run_root: Path) -> Iterator[Cli]:
    c = Cli(run_root)
    yield c
    for state in run_root.glob("*/state.json"):  # never leave a VM behind
        c.run("down", state.parent.name)


@pytest.fixture
def spec_file(tmp_path: Path, qemu_binary: Path, guest_image: Path) -> Path:
    f = tmp_path / "vm.toml"
    f.write_text(f'name = "clivm"\nqemu = "{qemu_binary}"\n[memory]\nsize = "256M"\n'
                 f'[guest]\nkernel = "{guest_image}"\ncmdline = "hb_ms=10"\n')
    return f


def test_every_verb(cli: Cli, spec_file: Path, tmp_path: Path) -> None:
    up = cli.json("up", str(spec_file))
    pid = up["pid"]
    assert up["status"] == "running" and procfs.pid_alive(pid)
    ram = [m for m in up["memfds"] if m["name"] == "memory-backend-memfd"][0]
    assert {"GROW", "SHRINK", "SEAL"} <= set(ram["seal_names"])

    assert cli.json("up", str(spec_file), rc=7)["error"] == "StateError"
    listed = cli.json("status")["vms"]
    assert [v["name"] for v in listed] == ["clivm"] and listed[0]["qemu"] == up["qemu"]
    assert cli.json("status", "clivm")["pid"] == pid

    exe = cli.json("update", "clivm", "--mode", "exec", "--heartbeat-ms", "10")
    assert exe["pid_before"] == exe["pid_after"] == pid
    assert exe["ram_inode_unchanged"] and exe["mismatches"] == 0
    assert exe["pause_qmp"] > 0 and exe["pause_guest"] is not None

    tr = cli.json("update", "clivm", "--mode", "transfer", "--heartbeat-ms", "10")
    assert tr["pid_before"] == pid and tr["pid_after"] != pid
    assert tr["ram_inode_unchanged"] and tr["mismatches"] == 0
    assert not procfs.pid_alive(pid)
    status = cli.json("status", "clivm")
    assert status["pid"] == tr["pid_after"] and status["generation"] == 2

    assert cli.json("pause", "clivm")["status"] == "paused"
    assert cli.json("qmp", "clivm", "query-status")["return"]["running"] is False
    assert cli.json("resume", "clivm")["status"] == "running"
    plain = cli.run("qmp", "clivm", "qom-get", '{"path": "/machine", "property": "aux-ram-share"}')
    assert plain.returncode == 0 and json.loads(plain.stdout) is True

    assert cli.json("qmp", "clivm", "no-such-command", rc=8)["error"] == "QMPReplyError"
    for bad in ("{bad", "[1]"):  # a usage error, told before attaching to the VM
        usage = cli.run("qmp", "clivm", "query-status", bad, "--json")
        assert usage.returncode == 2 and "JSON-ARGS" in usage.stderr, usage.stderr
    dry = cli.json("update", "clivm", "--dry-run")
    assert dry["ok"] and {"ram", "ram-seals", "new-binary", "qemu-blockers"} <= {
        c["name"] for c in dry["checks"]}
    assert cli.json("update", "clivm", "--dry-run", "--qemu", str(tmp_path / "missing"),
                    rc=4)["ok"] is False
    refused = cli.json("update", "clivm", "--qemu", str(tmp_path / "missing"), rc=4)
    assert refused["error"] == "PreflightError" and "does not exist" in refused["reasons"][0]
    assert cli.json("status", "clivm")["status"] == "running"

    progress = cli.run("update", "clivm")  # human output, progress on stderr
    assert progress.returncode == 0, progress.stderr
    assert "preflight" in progress.stderr and "cpr-exec done" in progress.stdout
    warmed = cli.run("update", "clivm", "--warm", "8M")  # pages warmed for the new image
    assert warmed.returncode == 0 and "warm" in warmed.stderr, warmed.stderr
    cold = cli.run("update", "clivm", "--warm", "0")
    assert cold.returncode == 0 and "warm" not in cold.stderr, cold.stderr
    auto = cli.run("update", "clivm", "--warm", "auto")  # the default: where a balloon reports
    assert auto.returncode == 0 and ("warm" in auto.stderr) == (warm.auto_size() > 0)
    for bad in ("1T", "lots", "-4M"):  # usage errors, the VM untouched
        usage = cli.run("update", "clivm", "--warm", bad)
        assert usage.returncode == 2 and "--warm" in usage.stderr, usage.stderr

    down = cli.json("down", "clivm")
    assert down["status"] == "down"
    assert not procfs.pid_alive(tr["pid_after"])
    assert cli.json("status", "clivm", rc=7)["error"] == "StateError"


def test_down_after_qemu_died(cli: Cli, spec_file: Path, run_root: Path) -> None:
    """QEMU killed behind sealvm's back (a crash, the OOM killer): `down`
    still works and leaves nothing (run files, the script endpoint)."""
    up = cli.json("up", str(spec_file))
    endpoint = cli.json("status", "clivm")["scripts"]["endpoint_pid"]
    assert procfs.pid_alive(endpoint)
    os.kill(up["pid"], signal.SIGKILL)
    for _ in range(100):
        if not procfs.pid_alive(up["pid"]):
            break
        time.sleep(0.05)
    down = cli.json("down", "clivm")
    assert down["already_exited"] and down["pid"] == up["pid"]
    assert not procfs.pid_alive(endpoint)
    assert not (run_root / "clivm" / "state.json").exists()
    assert not [p for p in (run_root / "clivm").iterdir() if p.is_socket()]
    assert cli.json("status", "clivm", rc=7)["error"] == "StateError"


def test_nic_and_disk_through_the_cli(cli: Cli, tmp_path: Path, qemu_binary: Path,
                                      guest_image: Path) -> None:
    """`status` shows the VM's NICs and disks; `down` removes the tap and the
    namespace sealvm created."""
    ns = f"sealvm-clit-{os.getpid()}"
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * (1 << 20))
    spec = tmp_path / "nd.toml"
    spec.write_text(f'name = "ndvm"\nqemu = "{qemu_binary}"\n[memory]\nsize = "64M"\n'
                    f'[guest]\nkernel = "{guest_image}"\n'
                    f'[[net]]\nnetns = "{ns}"\naddress = "192.0.2.1/24"\n'
                    f'[[disk]]\npath = "{disk}"\n')
    cli.json("up", str(spec))
    try:
        st = cli.json("status", "ndvm")
        assert [n["netns"] for n in st["net"]] == [ns] and st["net"][0]["tap"]
        assert [d["path"] for d in st["disks"]] == [str(disk)]
        text = cli.run("status", "ndvm").stdout
        assert f"namespace {ns}" in text and f"{disk} (raw" in text
        assert ns in netns.listnetns()
        assert cli.json("update", "ndvm", "--mode", "transfer")["ram_inode_unchanged"]
    finally:
        cli.run("down", "ndvm")
    assert ns not in netns.listnetns(), "down left the namespace it created"


def test_spec_errors_name_the_field(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nqemu = "/q"\n[memory]\nsize = "lots"\n[guest]\nkernel = "/k"\n')
    out = cli.json("up", str(bad), rc=3)
    assert out["error"] == "SpecError" and out["message"].startswith("memory.size:")
    assert cli.run("up").returncode == 2  # usage


def test_host_check(cli: Cli) -> None:
    probes = {p["name"]: p for p in cli.json("host-check")["probes"]}
    assert {"memfd-noexec-seal", "vm.memfd_noexec", "memfd-seals", "iommufd",
            "vfio-type1-vaddr"} <= set(probes)
    assert probes["memfd-seals"]["ok"]
    ok = [name for name, p in probes.items() if p["ok"]]
    assert cli.json("host-check", "--require", ",".join(ok))["missing"] == []
    missing = [name for name, p in probes.items() if not p["ok"]]
    if missing:  # this machine has no IOMMU: /dev/iommu is missing
        out = cli.json("host-check", "--require", f"memfd-seals,{missing[0]}", rc=10)
        assert out["missing"] == [missing[0]]
        text = cli.run("host-check", "--require", missing[0])
        assert text.returncode == 10 and f"lacks {missing[0]}" in text.stdout


def test_host_check_unknown_capability_is_a_usage_error(cli: Cli) -> None:
    p = cli.run("host-check", "--require", "memfd-seals,warp-drive")
    assert p.returncode == 2
    assert "warp-drive" in p.stderr and "valid names: memfd-noexec-seal" in p.stderr


def test_update_several_vms_at_once(cli: Cli, tmp_path: Path, qemu_binary: Path,
                                    guest_image: Path) -> None:
    """`sealvm update A B C` updates each as `update A` would, at once; a VM
    that cannot be updated (here: no such VM) fails alone, and the exit code
    is the most severe of theirs."""
    pids = {}
    for name in ("fleet-a", "fleet-b"):
        spec = tmp_path / f"{name}.toml"
        spec.write_text(f'name = "{name}"\nqemu = "{qemu_binary}"\n[memory]\nsize = "256M"\n'
                        f'[guest]\nkernel = "{guest_image}"\ncmdline = "hb_ms=10"\n')
        pids[name] = cli.json("up", str(spec))["pid"]
    both = cli.json("update", "fleet-a", "fleet-b", "--heartbeat-ms", "10", "--parallel", "2")
    assert both["exit_code"] == 0 and both["wall"] > 0 and both["parallel"] == 2
    assert [u["vm"] for u in both["updates"]] == ["fleet-a", "fleet-b"]
    for u in both["updates"]:
        assert u["exit_code"] == 0 and u["pid_before"] == u["pid_after"] == pids[u["vm"]]
        assert u["ram_inode_unchanged"] and u["mismatches"] == 0
    for name in pids:
        assert cli.json("status", name)["generation"] == 1

    mixed = cli.json("update", "fleet-a", "no-such-vm", "--mode", "transfer", rc=7)
    a, missing = mixed["updates"]
    assert a["exit_code"] == 0 and a["pid_after"] != pids["fleet-a"]
    assert missing["error"] == "StateError" and missing["exit_code"] == 7
    assert cli.json("status", "fleet-a")["generation"] == 2
    assert cli.json("status", "fleet-b")["generation"] == 1  # not named: untouched

    text = cli.run("update", "fleet-a", "fleet-b")  # human output: a line per VM
    assert text.returncode == 0, text.stderr
    assert "fleet-a: cpr-exec done" in text.stdout and "fleet-b: cpr-exec done" in text.stdout
    assert "2 VMs in " in text.stdout
    # progress on stderr names the VM on every line
    for name in ("fleet-a", "fleet-b"):
        assert f"sealvm: {name}: preflight" in text.stderr, text.stderr
    assert cli.run("update", "fleet-a", "fleet-a").returncode == 2  # named twice
    for bad in ("0", "-1", "all"):
        usage = cli.run("update", "fleet-a", "fleet-b", "--parallel", bad)
        assert usage.returncode == 2 and "--parallel" in usage.stderr, usage.stderr
