"""
The fault matrix, on the real QEMU: the controller (`sealvm update`, its own
process) is SIGKILLed at every step of each mode, the new and the old QEMU
are killed or hung at the steps that matter, the new binary crashes, exits
or hangs, the device-state file has no room.  Then `sealvm recover` runs (as
an operator would), and every case must end with exactly one QEMU running
the guest (paused if it was paused), its heartbeat never reset, a complete
verified pattern pass with zero mismatches, and nothing of the update left.

Faults are injected with ``SEALVM_FAULT=ACTION@STEP`` (sealvm.update.journal).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import PYTHON_VIEW, qemus_mentioning
from sealvm import procfs
from sealvm.console import ConsoleFollower, read_console
from sealvm.machine import read_state
from sealvm.plan import RunPaths
from sealvm.process import QemuProcess

from .conftest import ROWS

SEALVM = [sys.executable, "-m", "sealvm.cli"]
NAME = "fvm"


class Operator:
    """The CLI, one process per verb, as an operator runs it."""

    def __init__(self, run_root: Path) -> None:
        self.run_root = run_root
        self.paths = RunPaths(run_root / NAME)
        self.env = dict(os.environ, SEALVM_RUN_DIR=str(run_root))
        self.env.pop("SEALVM_FAULT", None)

    def run(self, *args: str, fault: str | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = dict(self.env, **({"SEALVM_FAULT": fault} if fault else {}))
        return subprocess.run([*SEALVM, *args], env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def json(self, *args: str, rc: int | None = 0, fault: str | None = None) -> Any:
        p = self.run(*args, "--json", fault=fault)
        if rc is not None:
            assert p.returncode == rc, f"{args}: rc {p.returncode}\n{p.stdout}\n{p.stderr}"
        return json.loads(p.stdout) if p.stdout.strip() else {"rc": p.returncode}

    def guest(self) -> str:
        return str(self.json("qmp", NAME, "query-status")["return"]["status"])


def spec_text(tmp_path: Path, qemu_binary: Path, guest_image: Path) -> str:
    """The VM's spec; the failing binaries (`bad_binary`, Python scripts in
    ``tmp_path / "bin"``) in QEMU's view."""
    (tmp_path / "bin").mkdir(mode=0o755, exist_ok=True)
    view = json.dumps([str(tmp_path / "bin"), *PYTHON_VIEW])
    return (f'name = "{NAME}"\nqemu = "{qemu_binary}"\n[memory]\nsize = "64M"\n'
            f'[guest]\nkernel = "{guest_image}"\ncmdline = "hb_ms=10"\n'
            f'[security]\nexec_paths = {view}\n')


@pytest.fixture
def op(run_root: Path, tmp_path: Path, qemu_binary: Path, guest_image: Path) -> Iterator[Operator]:
    spec = tmp_path / "fvm.toml"
    spec.write_text(spec_text(tmp_path, qemu_binary, guest_image))
    o = Operator(run_root)
    o.json("up", str(spec))
    yield o
    o.run("down", NAME)
    # a case that left a QEMU of this VM behind fails in run_root's teardown


async def holders_gone(pid: int) -> None:
    """cpr-exec's address-space holder (a CLONE_VM child of QEMU, patch 20)
    lives until the guest runs again, or 10 s when it stays paused."""
    for child in procfs.children(pid):
        if child.comm != "cpr-exec-hold":
            continue
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # gone meanwhile
            proc = QemuProcess(child.pid)
            assert await proc.wait_exit(15), f"holder {child.pid} of QEMU {pid} stays"
            proc.close()


def ram_inodes(pid: int) -> dict[str, int]:
    return {m.name: m.inode for m in procfs.memfds(pid)}


def leftovers(paths: RunPaths) -> list[str]:
    files = [paths.journal, paths.cpr_state, paths.cpr_sock, paths.main_sock,
             paths.keeper_sock, *paths.root.glob("qmp-next-*")]
    keepers = [f"keeper pid {p}" for p in procfs.pids_with_arg(paths.root.name)
               if any(a.endswith("/keeper.py") for a in procfs.cmdline(p) or [])]
    return [p.name for p in files if p.exists()] + keepers


async def verify(op: Operator, *, case: str, update: str, recover: str,
                 paused: bool = False) -> None:
    """Exactly one QEMU with the guest; its memory intact through a full pass."""
    state = read_state(op.paths)
    assert state is not None and state.alive(), "no live QEMU recorded for the VM"
    await holders_gone(state.pid)
    assert qemus_mentioning(str(op.run_root)) == [state.pid], "not exactly one QEMU"
    left = leftovers(op.paths)
    guest = op.guest()
    assert guest == ("paused" if paused else "running"), f"guest is {guest}"
    if paused:
        assert op.json("resume", NAME)["status"] == "running"
    async with ConsoleFollower(op.paths.serial) as con:
        await con.wait_heartbeats(2, 60)
        gen = con.log.heartbeats[-1].int("gen")
        await con.wait_for(lambda log: any(p.gen > gen for p in log.passes), 120)
        passed = [p for p in con.log.passes if p.gen > gen]
    log = read_console(op.paths.serial)
    assert log.reboots == 0, "the guest rebooted"
    assert log.counter_continuous(), "heartbeat counter reset or skipped"
    assert not log.mismatches and passed[0].mismatches == 0, "guest memory damaged"
    assert log.heartbeats[-1].int("mism") == 0
    ROWS.append({"case": case, "update": update, "recover": recover,
                 "guest": f"{'paused, ' if paused else ''}pass {passed[0].gen} ok",
                 "leftovers": ", ".join(left)})
    assert not left, f"left behind: {left}"
    # and the VM still updates, in both modes
    for mode in ("exec", "transfer"):
        assert op.json("update", NAME, "--mode", mode)["ram_inode_unchanged"]


def outcome_of(p: Any) -> str:
    if p.get("rc") == -signal.SIGKILL:
        return "controller killed"
    return str(p.get("outcome") or p.get("error") or "ok")


async def run_case(op: Operator, *, mode: str, fault: str, expect_update: str,
                   expect_recover: str, paused: bool = False, case: str = "") -> None:
    if paused:
        assert op.json("pause", NAME)["status"] == "paused"
    p = op.run("update", NAME, "--mode", mode, "--json", "--timeout", "20", fault=fault)
    if p.returncode == -signal.SIGKILL:
        upd = "controller killed"
    else:
        out = json.loads(p.stdout)
        upd = str(out.get("outcome") or ("completed" if p.returncode == 0 else out["error"]))
    assert upd == expect_update, f"update: {upd}\n{p.stdout}\n{p.stderr}"
    st = op.run("status", NAME, "--json")
    assert st.returncode == 0, st.stderr
    interrupted = json.loads(st.stdout).get("interrupted_update")
    assert bool(interrupted) == (upd == "controller killed" or expect_recover != "none"), \
        interrupted
    rec = op.json("recover", NAME, rc=None)
    assert rec.get("outcome") == expect_recover, rec
    await verify(op, case=case or f"{mode} {fault}", update=upd, recover=rec["outcome"],
                 paused=paused)


# ----------------------------------------------- the controller dies at every step

EXEC_STEPS = [("begin", "rolled-back"), ("migrate", "rolled-back"),
              ("migrate-sent", None), ("exec", "completed"), ("loaded", "completed"),
              ("resumed", "completed")]
TRANSFER_STEPS = [("begin", "rolled-back"), ("spawn", "rolled-back"),
                  ("spawned", "rolled-back"), ("migrate", "rolled-back"),
                  ("migrate-sent", None), ("loaded", "completed"),
                  ("resumed", "completed"), ("old-quit", "completed")]


@pytest.mark.parametrize(("mode", "step", "expect"),
                         [("exec", s, e) for s, e in EXEC_STEPS] +
                         [("transfer", s, e) for s, e in TRANSFER_STEPS],
                         ids=[f"exec-{s}" for s, _ in EXEC_STEPS] +
                         [f"transfer-{s}" for s, _ in TRANSFER_STEPS])
async def test_controller_killed(op: Operator, mode: str, step: str,
                                 expect: str | None) -> None:
    """SIGKILL of `sealvm update` right after *step*; `recover` finishes or
    rolls back.  *expect* None: either, depending on how far QEMU got (the
    command was sent, the reply not awaited)."""
    fault = f"kill-controller@{step}"
    if expect is None:
        p = op.run("update", NAME, "--mode", mode, "--json", fault=fault)
        assert p.returncode == -signal.SIGKILL, p.stderr
        rec = op.json("recover", NAME, rc=None)
        assert rec.get("outcome") in ("completed", "rolled-back"), rec
        await verify(op, case=f"{mode} {fault}", update="controller killed",
                     recover=rec["outcome"])
        return
    await run_case(op, mode=mode, fault=fault, expect_update="controller killed",
                   expect_recover=expect)


async def test_new_qemu_dies_while_recover_probes_it(op: Operator) -> None:
    """The controller dies with the migration sent; the new QEMU then dies
    while `recover` asks it whether it loaded the guest: it never ran it,
    so the old QEMU takes the guest back (not an error, not lost)."""
    p = op.run("update", NAME, "--mode", "transfer", "--json",
               fault="kill-controller@migrate-sent")
    assert p.returncode == -signal.SIGKILL, p.stderr
    rec = op.json("recover", NAME, rc=None, fault="kill-new@recover-probe")
    assert rec.get("outcome") == "rolled-back", rec
    assert any("monitor failed" in a for a in rec["actions"]), rec
    await verify(op, case="transfer kill-controller@migrate-sent, new dies in recover",
                 update="controller killed", recover=rec["outcome"])


# --------------------------------------------------- the QEMUs die or hang

@pytest.mark.parametrize(("mode", "fault", "expect"), [
    ("transfer", "kill-new@spawned", "rolled-back"),      # before the load
    ("transfer", "kill-new@migrate-sent", "rolled-back"),  # during the load
    ("transfer", "kill-new@loaded", "rolled-back"),        # loaded, not yet resumed
    ("transfer", "stop-new@migrate-sent", "rolled-back"),  # hangs during the load
    ("transfer", "kill-old@loaded", "completed"),          # after the switchover
    # cpr-exec: the new image is the same process; the way back is the keeper
    ("exec", "kill-new@exec", "rolled-back"),              # before the load
    ("exec", "stop-new@exec", "rolled-back"),              # hangs in the load
    ("exec", "kill-new@loaded", "rolled-back"),            # loaded, not yet resumed
])
async def test_qemu_dies(op: Operator, mode: str, fault: str, expect: str) -> None:
    await run_case(op, mode=mode, fault=fault, expect_update=expect, expect_recover="none")


@pytest.mark.parametrize("step", ["exec", "loaded"])
async def test_controller_and_new_qemu_die(op: Operator, step: str) -> None:
    """cpr-exec: the controller dies, then the new image too, before the guest
    ran there: `recover` starts the previous QEMU through the keeper."""
    p = op.run("update", NAME, "--mode", "exec", "--json",
               fault=f"kill-controller@{step}")
    assert p.returncode == -signal.SIGKILL, p.stderr
    pid = json.loads(op.paths.journal.read_text().splitlines()[0])["old_pid"]
    os.kill(pid, signal.SIGKILL)
    rec = op.json("recover", NAME, rc=5)
    assert rec["outcome"] == "rolled-back", rec
    await verify(op, case=f"exec kill-controller@{step} + kill-new", update="controller killed",
                 recover=rec["outcome"])


def bad_binary(tmp: Path, real: Path, how: str) -> Path:
    """A 'new QEMU' that answers preflight like *real*, then crashes, exits
    or hangs when started for the update."""
    script = tmp / f"qemu-{how}"
    script.write_text(f"""#!{sys.executable}
import os, signal, sys
args = sys.argv[1:]
if args[:1] not in (["--version"], ["-machine"]):
    if {how!r} == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if {how!r} == "exit":
        sys.exit(1)
    if {how!r} == "hang":
        os.kill(os.getpid(), signal.SIGSTOP)
os.execv({str(real)!r}, [{str(real)!r}] + args)
""")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("mode", ["exec", "transfer"])
@pytest.mark.parametrize("how", ["segv", "exit", "hang"])
async def test_new_binary_fails(op: Operator, tmp_path: Path, qemu_binary: Path,
                                how: str, mode: str) -> None:
    """cpr-transfer: the old QEMU resumes.  cpr-exec: the previous binary is
    started on the same memory and device state (the way back)."""
    bad = bad_binary(tmp_path / "bin", qemu_binary, how)
    before = read_state(op.paths)
    assert before is not None
    pid, inodes = before.pid, ram_inodes(before.pid)
    p = op.run("update", NAME, "--mode", mode, "--qemu", str(bad), "--json",
               "--timeout", "15")
    out = json.loads(p.stdout)
    assert p.returncode == 5 and out["outcome"] == "rolled-back", p.stdout + p.stderr
    state = read_state(op.paths)
    assert state is not None and state.argv[0] == str(qemu_binary)
    assert (state.pid == pid) == (mode == "transfer")  # exec: the way back is a new process
    assert ram_inodes(state.pid) == inodes, "the guest's RAM is not the same memory"
    await verify(op, case=f"{mode} new binary {how}s", update="rolled-back", recover="none")


# --------------------------------------------------------- the guest's run state

@pytest.mark.parametrize("mode", ["exec", "transfer"])
async def test_paused_guest_stays_paused(op: Operator, mode: str) -> None:
    await run_case(op, mode=mode, fault="", expect_update="completed", expect_recover="none",
                   paused=True, case=f"{mode} of a paused guest")


@pytest.mark.parametrize("mode", ["exec", "transfer"])
async def test_paused_guest_controller_killed_after_load(op: Operator, mode: str) -> None:
    await run_case(op, mode=mode, fault="kill-controller@loaded",
                   expect_update="controller killed", expect_recover="completed", paused=True)


# ------------------------------------------------------------- one VM, one controller

def test_second_update_is_refused_or_waits(op: Operator) -> None:
    """While one controller holds the VM, a second fails at once naming it
    (exit 7), or waits with --wait and then succeeds."""
    hold = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from sealvm.lock import VmLock\n"
         "l = VmLock(__import__('pathlib').Path(sys.argv[1]), 'fvm'); l.acquire('test')\n"
         "print('held', flush=True); sys.stdin.readline()",
         str(op.paths.lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert hold.stdout is not None and hold.stdout.readline() == "held\n"
        busy = op.json("update", NAME, rc=7)
        assert busy["error"] == "StateError" and f"pid {hold.pid}" in busy["message"]
        waiter = subprocess.Popen([*SEALVM, "update", NAME, "--wait", "--json"], env=op.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert hold.stdin is not None
        hold.stdin.write("\n")
        hold.stdin.flush()
        out, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 0, err
        assert json.loads(out)["ram_inode_unchanged"]
    finally:
        hold.kill()
        hold.wait()


def test_corrupt_state_file_is_named_and_kept(op: Operator, tmp_path: Path) -> None:
    good = op.paths.state.read_bytes()
    pid = json.loads(good)["pid"]
    op.paths.state.write_text("{ not json")
    try:
        spec = tmp_path / "fvm.toml"
        out = op.json("up", str(spec), rc=7)
        assert str(op.paths.state) in out["message"]
        assert op.paths.qmp.is_socket() and procfs.pid_alive(pid)
        assert op.json("status", NAME, rc=7)["error"] == "StateError"
    finally:
        op.paths.state.write_bytes(good)
    assert op.guest() == "running"


# --------------------------------------------------- the file system says no

@pytest.fixture
def small_op(tmp_path: Path, qemu_binary: Path, guest_image: Path) -> Iterator[Operator]:
    """The VM with its run root on a 96 MiB tmpfs of its own."""
    root = tmp_path / "small"
    root.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m,mode=0700", "tmpfs", str(root)],
                   check=True)
    spec = tmp_path / "fvm.toml"
    spec.write_text(spec_text(tmp_path, qemu_binary, guest_image))
    o = Operator(root)
    try:
        o.json("up", str(spec))
        yield o
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(root)], check=False)
        with contextlib.suppress(FileNotFoundError):
            (o.paths.root / "fault-fill").unlink()
        o.run("down", NAME)
        leaked = qemus_mentioning(str(root))
        for pid in leaked:
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["umount", "--lazy", str(root)], check=True)
        assert not leaked, f"QEMU left running: {leaked}"


@pytest.mark.parametrize("mode", ["exec", "transfer"])
async def test_disk_full_during_update(small_op: Operator, mode: str) -> None:
    """The run directory's file system fills up after preflight: cpr-exec's
    device-state file cannot be written, QEMU resumes the guest."""
    op = small_op
    p = op.run("update", NAME, "--mode", mode, "--json", "--timeout", "20",
               fault="fill-disk@migrate")
    (op.paths.root / "fault-fill").unlink()
    out = json.loads(p.stdout) if p.stdout.strip() else {}
    got = out.get("outcome") or ("completed" if p.returncode == 0 else out.get("error"))
    assert got in ("rolled-back", "completed", "completed-with-errors"), p.stdout + p.stderr
    rec = "none"
    if op.paths.journal.exists():  # state.json could not be written: recover does it
        rec = op.json("recover", NAME, rc=None)["outcome"]
        assert rec in ("completed", "rolled-back"), rec
    await verify(op, case=f"{mode} disk full at migrate", update=str(got), recover=rec)


async def test_unwritable_run_dir_is_refused(op: Operator) -> None:
    """No journal (nor device-state file) can be written in the run
    directory (immutable, which binds root too): refused before the pause."""
    subprocess.run(["chattr", "+i", str(op.paths.root)], check=True)
    try:
        out = op.json("update", NAME, rc=4)
        assert out["error"] == "PreflightError" and "journal" in out["reasons"][0], out
    finally:
        subprocess.run(["chattr", "-i", str(op.paths.root)], check=True)
    await verify(op, case="exec, run directory unwritable", update="refused", recover="none")


@pytest.mark.parametrize("mode", ["exec", "transfer"])
async def test_qmp_connection_cut(op: Operator, mode: str) -> None:
    """The controller's QMP connection is cut right after `migrate` went out."""
    p = op.run("update", NAME, "--mode", mode, "--json", "--timeout", "20",
               fault="cut-qmp@migrate-sent")
    out = json.loads(p.stdout) if p.stdout.strip() else {}
    got = out.get("outcome") or ("completed" if p.returncode == 0 else out.get("error"))
    rec = "none"
    if op.paths.journal.exists():
        rec = op.json("recover", NAME, rc=None)["outcome"]
    assert got in ("rolled-back", "completed", "not-resumed"), p.stdout + p.stderr
    assert rec in ("none", "completed", "rolled-back")
    await verify(op, case=f"{mode} QMP cut after migrate", update=str(got), recover=rec)


async def test_old_qemu_killed_before_switchover(op: Operator) -> None:
    """cpr-transfer: the old QEMU, which still runs the guest (or holds its
    only CPU state), is SIGKILLed before it sent the device state.  That is a
    crash of the running VM, not something an update can undo: recover says
    *lost* (exit 6), kills the successor and leaves nothing behind."""
    p = op.run("update", NAME, "--mode", "transfer", "--json", "--timeout", "15",
               fault="kill-old@migrate-sent")
    out = json.loads(p.stdout) if p.stdout.strip() else {}
    if op.paths.journal.exists():
        rec = op.json("recover", NAME, rc=6)
        assert rec["outcome"] == "lost", rec
    else:
        assert out.get("outcome") in ("not-resumed", None), p.stdout + p.stderr
    assert qemus_mentioning(str(op.run_root)) == [], "a QEMU of the lost VM is left"
    assert leftovers(op.paths) == []
    ROWS.append({"case": "transfer kill-old@migrate-sent", "update": str(out.get("outcome")),
                 "recover": "lost", "guest": "lost: its QEMU was killed", "leftovers": ""})


def test_guest_neither_running_nor_paused_is_refused(op: Operator, tmp_path: Path) -> None:
    """A guest in another run state (here postmigrate, after a migration of
    the paused guest to a file) is refused at once, naming the state; nothing
    is touched."""
    out = op.paths.qemu_dir / "migrated"  # QEMU writes it: in its own directory
    assert op.json("pause", NAME)["status"] == "paused"  # else the copy never converges
    op.json("qmp", NAME, "migrate", json.dumps({"uri": f"file:{out}"}))
    for _ in range(600):  # a paused 64 MiB guest is copied to a file in about a second
        if op.json("qmp", NAME, "query-migrate")["return"].get("status") == "completed":
            break
    assert op.guest() == "postmigrate"
    refused = op.json("update", NAME, rc=7)
    assert refused["error"] == "StateError" and "postmigrate" in refused["message"], refused
    assert not op.paths.journal.exists()
    assert op.json("resume", NAME)["status"] == "running"
    ROWS.append({"case": "guest postmigrate: update refused", "update": "refused (exit 7)",
                 "recover": "none", "guest": "resumed by the operator", "leftovers": ""})


@pytest.mark.parametrize("mode", ["exec", "transfer"])
def test_down_always_stops_the_vm(op: Operator, mode: str) -> None:
    """The controller dies right before `cont`, then the new QEMU hangs: the
    guest may have run there, so recover refuses to guess (exit 7, journal
    kept); `sealvm down` still stops every process of the VM and cleans up."""
    p = op.run("update", NAME, "--mode", mode, "--json", fault="kill-controller@resuming")
    assert p.returncode == -signal.SIGKILL, p.stderr
    journal = [json.loads(line) for line in op.paths.journal.read_text().splitlines()]
    new = next((r["pid"] for r in journal if r["step"] == "spawned"), journal[0]["old_pid"])
    os.kill(new, signal.SIGSTOP)
    rec = op.json("recover", NAME, "--timeout", "10", rc=7)
    assert "does not answer" in rec["message"] and op.paths.journal.exists(), rec
    down = op.json("down", NAME)
    assert down["status"] == "down" and new in down["killed"], down
    assert qemus_mentioning(str(op.run_root)) == [] and leftovers(op.paths) == []
    ROWS.append({"case": f"{mode} kill-controller@resuming + new hangs", "update":
                 "controller killed", "recover": "refused", "guest": "stopped by down",
                 "leftovers": ""})
