"""
The Ansible collection sealvm.fleet (control/ansible_collections/sealvm/fleet)
against real QEMU VMs: three "hosts" of this machine (connection local, one
run root each) with two VMs each, driven by its playbooks.

- host1: a, b -- updated to a new QEMU binary (a copy of ours) by cpr-transfer;
- host2: c, d -- c has RAM that is not a shared memfd: preflight refuses it;
- host3: e, f -- its "new QEMU" answers preflight, then exits at start: the
  update of e rolls back (cpr-exec's way back).

Runs: vms.yml up; the roll in check mode (the precheck gate stops it, nothing
changes); the roll for real (batches [host1], [host2, host3]: a and b
updated, c refused, e rolled back, d and f never started); the roll again
in batches [host1, host2], [host3] with max_fail_percentage 100 (a already
on the target: ok, not changed; c refused again stops the roll: b is not
started, host3's batch ends at once); vms.yml down,
twice (idempotent).  Every check reads the VMs through the sealvm CLI, not
through the playbook's own account.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import PYTHON_VIEW, failing_qemu, qemus_mentioning

REPO = Path(__file__).resolve().parents[1]
CONTROL = REPO / "control"
COLLECTION = CONTROL / "ansible_collections" / "sealvm" / "fleet"
PLAYBOOKS = COLLECTION / "playbooks"
BIN = Path(sys.executable).parent
MODULES = ("sealvm_update", "sealvm_facts", "sealvm_vm", "sealvm_roll_summary")

#: host -> VM -> memory backend ("ram": preflight refuses the update)
LAYOUT = {"host1": {"a": "memfd", "b": "memfd"},
          "host2": {"c": "ram", "d": "memfd"},
          "host3": {"e": "memfd", "f": "memfd"}}

#: VMs paused after boot (see test_rolling_update_3x2)
PAUSED = (("host2", "c"), ("host2", "d"), ("host3", "f"))


def ansible_env(home: Path) -> dict[str, str]:
    """Ansible isolated in *home*: no user or system configuration."""
    home.mkdir(exist_ok=True)
    return dict(os.environ,
                ANSIBLE_CONFIG=str(home / "none.cfg"), ANSIBLE_HOME=str(home),
                ANSIBLE_LOCAL_TEMP=str(home / "tmp"), ANSIBLE_REMOTE_TEMP=str(home / "remote"),
                ANSIBLE_COLLECTIONS_PATH=str(CONTROL), ANSIBLE_PIPELINING="1",
                ANSIBLE_NOCOLOR="1", ANSIBLE_RETRY_FILES_ENABLED="0",
                ANSIBLE_DEPRECATION_WARNINGS="0", ANSIBLE_FORKS="6")


@dataclass
class Run:
    rc: int
    out: str

    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP: host -> counter -> value."""
        return {m[1]: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m[2])}
                for m in re.finditer(r"^(host\d)\s+:\s+(.*)$", self.out, re.M)}


@dataclass
class Fleet:
    dir: Path
    env: dict[str, str]
    inventory: Path
    roots: dict[str, Path]
    original: Path
    target: Path
    bad: Path

    def playbook(self, name: str, *args: str) -> Run:
        start = time.monotonic()
        p = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(self.inventory),
                            str(PLAYBOOKS / name), *args],
                           cwd=self.dir, env=self.env, capture_output=True, text=True,
                           timeout=600, check=False)
        print(p.stdout[-20000:], p.stderr[-5000:], sep="\n")
        print(f"ansible-playbook {name} {' '.join(args)}: rc {p.returncode}, "
              f"{time.monotonic() - start:.1f} s")
        return Run(p.returncode, p.stdout + p.stderr)

    def facts(self) -> dict[str, dict[str, Any]]:
        """host -> ansible_facts.sealvm, from sealvm_facts run ad hoc on every host."""
        p = subprocess.run([str(BIN / "ansible"), "-i", str(self.inventory), "all",
                            "-m", "sealvm.fleet.sealvm_facts", "-a",
                            '{"details": true, "run_dir": "{{ sealvm_run_dir }}", '
                            '"python": "{{ sealvm_python }}"}'],
                           cwd=self.dir, env=self.env, capture_output=True, text=True,
                           timeout=300, check=False)
        assert p.returncode == 0, p.stdout + p.stderr
        parts = re.split(r"^(host\d) \| SUCCESS => ", p.stdout, flags=re.M)[1:]
        found = {host: json.loads(blob)["ansible_facts"]["sealvm"]
                 for host, blob in zip(parts[::2], parts[1::2], strict=True)}
        assert sorted(found) == sorted(LAYOUT), p.stdout
        return found

    def roll(self, *args: str, summary: str) -> tuple[Run, dict[str, Any]]:
        run = self.playbook("rolling-update.yml", "-e",
                            f"sealvm_summary_file={self.dir / summary}", *args)
        return run, json.loads((self.dir / summary).read_text())

    def sealvm(self, host: str, *args: str) -> tuple[int, Any]:
        p = subprocess.run([sys.executable, "-m", "sealvm.cli", "--run-dir",
                            str(self.roots[host]), "--json", *args],
                           env=self.env, capture_output=True, text=True, timeout=120,
                           check=False)
        return p.returncode, json.loads(p.stdout) if p.stdout.strip() else None

    def vms(self) -> dict[str, dict[str, Any]]:
        """VM -> pid, status, qemu, generation, as `sealvm status VM` says."""
        pairs = [(host, vm) for host, vms in LAYOUT.items() for vm in vms]
        with ThreadPoolExecutor(len(pairs)) as pool:  # six CLI processes side by side
            answers = list(pool.map(lambda hv: self.sealvm(hv[0], "status", hv[1]), pairs))
        found = {}
        for (host, vm), (rc, info) in zip(pairs, answers, strict=True):
            assert rc == 0, (host, vm, rc, info)
            found[vm] = {k: info[k] for k in ("pid", "status", "qemu", "generation")}
        return found

    def state_files(self) -> list[Path]:
        return sorted(p for root in self.roots.values() for p in root.glob("*/state.json"))


@pytest.fixture
def fleet(tmp_path: Path, qemu_binary: Path, guest_image: Path) -> Iterator[Fleet]:
    """Three run roots standing for hosts, a spec per VM, the target binary
    (a copy of our QEMU: another file, so an update really changes it) and a
    broken one; afterwards no VM, socket or state file may remain."""
    roots = {}
    inventory: dict[str, Any] = {"all": {"vars": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        "sealvm_python": sys.executable}, "hosts": {}}}
    new = tmp_path / "new"
    new.mkdir()
    target = new / "qemu-system-x86_64"
    shutil.copy2(qemu_binary, target)
    (tmp_path / "bad").mkdir(mode=0o755)
    bad = failing_qemu(tmp_path / "bad", qemu_binary, "start")
    # both targets in the VMs' view, for cpr-exec (bad is a Python script)
    view = json.dumps([str(new), str(bad.parent), *PYTHON_VIEW])
    inventory["all"]["vars"]["sealvm_target_qemu"] = str(target)
    for host, vms in LAYOUT.items():
        root = roots[host] = tmp_path / host / "run"
        root.mkdir(parents=True, mode=0o700)
        specs = []
        for vm, backend in vms.items():
            spec = tmp_path / host / f"{vm}.toml"
            spec.write_text(f'name = "{vm}"\nqemu = "{qemu_binary}"\n'
                            f'[memory]\nsize = "64M"\nbackend = "{backend}"\n'
                            f'[guest]\nkernel = "{guest_image}"\ncmdline = "hb_ms=10"\n'
                            f'[security]\nexec_paths = {view}\n')
            specs.append(str(spec))
        inventory["all"]["hosts"][host] = {"sealvm_run_dir": str(root), "sealvm_specs": specs}
    inventory["all"]["hosts"]["host1"]["sealvm_mode"] = "transfer"
    inventory["all"]["hosts"]["host3"]["sealvm_target_qemu"] = str(bad)
    inv = tmp_path / "inventory.json"  # YAML inventory plugin, JSON is YAML
    inv.write_text(json.dumps(inventory, indent=1))
    f = Fleet(tmp_path, ansible_env(tmp_path / "ansible"), inv, roots, qemu_binary, target, bad)
    try:
        yield f
    finally:
        for state in f.state_files():  # never leave a VM behind, whatever failed
            host = next(h for h, r in roots.items() if state.is_relative_to(r))
            f.sealvm(host, "down", state.parent.name)
        leaked = qemus_mentioning(str(tmp_path))
        states = f.state_files()
        sockets = [p for r in roots.values() for p in r.rglob("*") if p.is_socket()]
        for root in roots.values():
            shutil.rmtree(root)
        assert not leaked, f"QEMU processes left running: {leaked}"
        assert not states, f"state files left behind: {states}"
        assert not sockets, f"sockets left behind: {sockets}"
        assert not any(r.exists() for r in roots.values())


def rows_by_vm(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["vm"]: r for r in summary["rows"]}


def test_rolling_update_3x2(fleet: Fleet) -> None:
    # --- up, and up again: nothing to do
    up = fleet.playbook("vms.yml")
    assert up.rc == 0 and all(c["changed"] == 1 for c in up.recap().values()), up.recap()
    assert len(re.findall(r"^changed: \[host\d\] => \(item=", up.out, re.M)) == 6
    again = fleet.playbook("vms.yml")
    assert again.rc == 0 and all(c["changed"] == 0 for c in again.recap().values())
    assert len(re.findall(r"^ok: \[host\d\] => \(item=", again.out, re.M)) == 6
    # The test guest busy-waits, and this machine has 2 shared cores: the VMs
    # whose guest does not matter to what is checked (c refused, d and f never
    # reached) are paused, so the six guests do not starve the control plane.
    # sealvm updates a paused guest too; nothing in the roll depends on it.
    for host, vm in PAUSED:
        rc, info = fleet.sealvm(host, "pause", vm)
        assert rc == 0 and info["status"] == "paused", info
    before = fleet.vms()
    assert all(v["generation"] == 0 for v in before.values())
    assert {vm for vm, v in before.items() if v["status"] == "running"} == {"a", "b", "e"}

    # --- check mode: the precheck refuses c, the gate stops the roll; nothing
    # changes.  Required capabilities: one this machine lacks, if it lacks any
    # (no /dev/iommu here), is reported per host too
    rc, probes = fleet.sealvm("host1", "host-check")
    assert rc == 0, probes
    lacking = [p["name"] for p in probes["probes"] if not p["ok"]][:1]
    check, summary = fleet.roll("--check", "-e", json.dumps(
        {"sealvm_require": ["memfd-seals", *lacking]}), summary="check.json")
    assert check.rc != 0
    gate = re.search(r"roll not started: the precheck failed for (.*)", check.out)
    assert gate and "host2/c: refused (exit 4): sealvm update c --dry-run" in gate[1], check.out
    host_rows = [r for r in summary["rows"] if r["vm"] == "(host)"]
    assert [(r["host"], r["result"], r["msg"]) for r in host_rows] == [
        (host, "host-lacks", f"host-check: missing {lacking[0]}") for host in LAYOUT
    ] if lacking else not host_rows
    summary["rows"] = [r for r in summary["rows"] if r["vm"] != "(host)"]
    rows = rows_by_vm(summary)
    assert summary["check_mode"] is True and summary["after"] == "precheck"
    assert rows["c"]["result"] == "refused" and rows["c"]["stage"] == "precheck"
    assert "memory-backend-ram, not a shared memfd" in rows["c"]["msg"]
    assert {vm: r["result"] for vm, r in rows.items() if vm != "c"} == dict.fromkeys(
        "abdef", "not-attempted")
    assert "Sealvm update of VM" not in check.out  # the roll play never ran
    assert fleet.vms() == before

    # --- the roll: [host1] then [host2, host3]
    roll, summary = fleet.roll("-e", "sealvm_stop_on_precheck_failure=false",
                               "-e", '{"sealvm_serial": [1, 2]}', summary="roll.json")
    print("\n".join(table(summary)))
    assert roll.rc != 0
    rows = rows_by_vm(summary)
    assert summary["stopped"] is True and summary["after"] == "batch host2,host3"
    assert {vm: r["result"] for vm, r in rows.items()} == {
        "a": "updated", "b": "updated", "c": "refused", "d": "not-attempted",
        "e": "rolled-back", "f": "not-attempted"}
    assert rows["c"]["stage"] == rows["e"]["stage"] == "roll"  # real updates, not dry runs
    assert (rows["c"]["exit_code"], rows["e"]["exit_code"]) == (4, 5)
    after = fleet.vms()
    for vm in "ab":
        assert rows[vm]["mode"] == "cpr-transfer" and rows[vm]["pause_ms"] > 0
        assert after[vm]["qemu"] == str(fleet.target) and after[vm]["generation"] == 1
        assert after[vm]["pid"] != before[vm]["pid"] and after[vm]["status"] == "running"
    assert [after[vm]["status"] for vm in "cdf"] == ["paused"] * 3
    for vm in "cdf":  # untouched: refused, or never started
        assert after[vm] == before[vm], vm
    # rolled back: the previous binary runs the guest again, no update counted
    assert after["e"]["qemu"] == str(fleet.original) and after["e"]["generation"] == 0
    assert after["e"]["status"] == "running"
    assert rows["e"]["mode"] == "cpr-exec" and "exited before its monitor answered" in (
        rows["e"]["msg"])
    facts = fleet.facts()  # what sealvm_facts says agrees
    assert facts["host1"]["binaries"] == {str(fleet.target): ["a", "b"]}
    assert facts["host3"]["binaries"] == {str(fleet.original): ["e", "f"]}
    for host, vms in LAYOUT.items():
        assert facts[host]["vm_names"] == sorted(vms)
        for vm in vms:
            got = facts[host]["vms"][vm]
            assert {k: got[k] for k in ("pid", "status", "qemu", "generation")} == after[vm]
        probes = {p["name"]: p["ok"] for p in facts[host]["host_check"]["probes"]}
        assert probes["memfd-seals"] and facts[host]["host_check"]["missing"] == []
    recap = roll.recap()
    assert recap["host1"]["failed"] == 0
    assert recap["host2"]["failed"] == recap["host3"]["failed"] == 1

    # --- again, batches [host1, host2], [host3], max_fail_percentage 100: a is
    # already on the target (ok, not changed); c, refused again beside it,
    # stops the roll: host1 does not start b, and host3's batch, which
    # max_fail_percentage lets start, ends at once
    again, summary = fleet.roll("-e", "sealvm_stop_on_precheck_failure=false",
                                "-e", '{"sealvm_serial": [2, 1]}',
                                "-e", "sealvm_max_fail_percentage=100", summary="again.json")
    print("\n".join(table(summary)))
    assert again.rc != 0
    rows = rows_by_vm(summary)
    assert summary["after"] == "batch host1,host2"
    assert {vm: r["result"] for vm, r in rows.items()} == {
        "a": "unchanged", "b": "not-attempted", "c": "refused", "d": "not-attempted",
        "e": "not-attempted", "f": "not-attempted"}
    assert rows["a"]["stage"] == "roll" and rows["a"]["changed"] is False
    batches = again.out.split("PLAY [Roll, batch after batch")[1:]
    assert len(batches) == 2, "max_fail_percentage 100 must let the second batch start"
    assert "[host3]" not in batches[1].split("PLAY RECAP")[0], batches[1]
    assert fleet.vms() == after

    # --- down, and down again: nothing to do
    down = fleet.playbook("vms.yml", "-e", "sealvm_vm_state=down")
    assert down.rc == 0 and all(c["changed"] == 1 for c in down.recap().values())
    assert not fleet.state_files() and not qemus_mentioning(str(fleet.dir))
    down2 = fleet.playbook("vms.yml", "-e", "sealvm_vm_state=down")
    assert down2.rc == 0 and all(c["changed"] == 0 for c in down2.recap().values())


def table(summary: dict[str, Any]) -> list[str]:
    """The summary rows as the playbook prints them (its own filter)."""
    lines: list[str] = _collection("filter.roll").sealvm_roll_table(summary["rows"])
    return [f"after {summary['after']}", *lines]


def test_module_docs_match_argument_specs(tmp_path: Path) -> None:
    """ansible-doc parses each module's DOCUMENTATION (with the doc fragment),
    EXAMPLES and RETURN, and the options it documents are the module's
    argument spec: names, types, defaults, choices, required.  The collection
    builds (galaxy.yml); the playbooks pass ansible-playbook --syntax-check."""
    env = ansible_env(tmp_path / "ansible")
    p = subprocess.run([str(BIN / "ansible-doc"), "--json",
                        *(f"sealvm.fleet.{name}" for name in MODULES)],
                       env=env, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    docs = json.loads(p.stdout)
    for name in MODULES:
        doc = docs[f"sealvm.fleet.{name}"]
        assert doc["examples"].strip() and doc["return"], name
        options = doc["doc"]["options"]
        spec = _collection(f"modules.{name}").ARGUMENT_SPEC
        assert sorted(options) == sorted(spec), name
        for opt, arg in spec.items():
            d = options[opt]
            assert d["type"] == arg.get("type", "str"), (name, opt)
            assert d.get("default") == arg.get("default"), (name, opt)
            assert d.get("choices") == arg.get("choices"), (name, opt)
            assert bool(d.get("required")) == bool(arg.get("required")), (name, opt)
            assert d.get("elements") == arg.get("elements"), (name, opt)
        assert doc["doc"]["attributes"]["check_mode"]["support"] == "full", name
    build = subprocess.run([str(BIN / "ansible-galaxy"), "collection", "build", str(COLLECTION),
                            "--output-path", str(tmp_path)], env=env, capture_output=True,
                           text=True, timeout=120, check=False)
    assert build.returncode == 0, build.stdout + build.stderr  # galaxy.yml, meta/runtime.yml
    assert (tmp_path / "sealvm-fleet-0.1.0.tar.gz").is_file()
    for book in ("rolling-update.yml", "vms.yml"):
        p = subprocess.run([str(BIN / "ansible-playbook"), "--syntax-check", "-i", "localhost,",
                            str(PLAYBOOKS / book)], env=env, capture_output=True, text=True,
                           timeout=120, check=False)
        assert p.returncode == 0, (book, p.stdout, p.stderr)


def _collection(module: str) -> Any:
    sys.path.insert(0, str(CONTROL))
    try:
        return importlib.import_module(f"ansible_collections.sealvm.fleet.plugins.{module}")
    finally:
        sys.path.remove(str(CONTROL))


def test_exit_codes_and_what_stops_the_roll() -> None:
    """The modules name every exit code the CLI documents, with its meaning;
    exactly refused (4), rolled back (5), lost (6) and completed with errors
    (11) stop the roll; other failures only fail their host."""
    cli_doc = importlib.import_module("sealvm.cli").__doc__
    assert cli_doc is not None
    documented = {int(m[1]): m[2] for m in re.finditer(r"^    (\d+)\s+(\S.*)$", cli_doc, re.M)}
    codes = _collection("module_utils.sealvm_cli").EXIT_CODES
    assert sorted(codes) == sorted(documented) == list(range(12))
    roll = _collection("filter.roll")
    stops = set()
    for rc, (name, meaning) in codes.items():
        assert meaning and name
        record = roll.sealvm_record({"failed": rc != 0, "result": name, "exit_code": rc,
                                     "msg": meaning}, "vm")
        assert record["failed"] == (rc != 0) and record["exit_code"] == rc
        if record["stop"]:
            stops.add(rc)
    assert stops == {4, 5, 6, 11}
    # a task that failed without a sealvm result (the module could not run)
    crashed = roll.sealvm_record({"failed": True, "msg": "MODULE FAILURE"}, "vm")
    assert crashed["result"] == "error" and not crashed["stop"]
