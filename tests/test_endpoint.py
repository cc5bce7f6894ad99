"""
The QMP endpoint for scripts, on the real QEMU: several clients at once
(two qemu.qmp clients and a raw socket, as socat would be), connected
through live updates of both modes; commands sent during the pause are
answered by the new QEMU once the guest runs; events arrive in order; the
policy refuses what would break sealvm's control; sealvm's own verbs never
wait for a script; a dead endpoint or a dead controller loses no command
silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient, QMPError, Runstate
from qemu.qmp.qmp_client import ExecuteError

from helpers import processes_mentioning
from sealvm import Machine, live_update, script_socket
from sealvm.endpoint import pid_of
from sealvm.plan import RunPaths
from sealvm.spec import VmSpec

SEALVM = [sys.executable, "-m", "sealvm.cli"]
UPDATES = 10  # per mode

#: per update: mode, pause (QMP), pause (guest), for the summary
ROWS: list[tuple[str, float, float]] = []


class Timeline:
    """What one script saw, in order: events and replies."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []
        self.changed = asyncio.Event()

    def add(self, kind: str, value: Any) -> None:
        self.items.append((kind, value))
        self.changed.set()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [v for k, v in self.items if k == "event" and (name is None or v["event"] == name)]

    async def wait_for(self, pred: Callable[[], bool], timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                self.changed.clear()
                await self.changed.wait()



def _count_above(t: Timeline, event: str, n: int) -> Callable[[], bool]:
    return lambda: len(t.events(event)) > n


class LibClient:
    """A script using qemu.qmp."""

    def __init__(self, name: str) -> None:
        self.qmp = QMPClient(name)
        self.seen = Timeline()
        self._pump: asyncio.Task[None] | None = None

    async def connect(self, path: Path) -> None:
        await self.qmp.connect(str(path))
        self._pump = asyncio.ensure_future(self._events())

    async def _events(self) -> None:
        async for ev in self.qmp.events:
            self.seen.add("event", dict(ev))

    async def call(self, cmd: str, args: dict[str, object] | None = None) -> Any:
        reply = await self.qmp.execute(cmd, args)
        self.seen.add("reply", (cmd, reply))
        return reply

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        with contextlib.suppress(EOFError, OSError, QMPError):
            await self.qmp.disconnect()

    async def wait_disconnected(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while self.qmp.runstate is Runstate.RUNNING:
                await self.qmp.runstate_changed()


class RawClient:
    """A script speaking QMP over a bare socket, as socat or nc would."""

    def __init__(self) -> None:
        self.seen = Timeline()
        self.replies: dict[str, dict[str, Any]] = {}
        self.unnamed: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}
        self._pump: asyncio.Task[None] | None = None

    async def connect(self, path: Path) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(str(path))
        self.greeting = json.loads(await self.reader.readline())
        self._pump = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while line := await self.reader.readline():
            msg = json.loads(line)
            if "event" in msg:
                self.seen.add("event", msg)
            elif "id" in msg:
                self.replies[msg["id"]] = msg
                self.seen.add("reply", msg)
            else:
                self.unnamed.append(msg)
                self.seen.add("reply", msg)

    def send(self, text: str) -> None:
        self.writer.write(text.encode())

    async def call(self, cmd: str, ident: str, args: dict[str, Any] | None = None,
                   timeout: float = 60.0) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": cmd, "id": ident}
        if args:
            msg["arguments"] = args
        self.send(json.dumps(msg) + "\n")
        await self.seen.wait_for(lambda: ident in self.replies, timeout)
        return self.replies[ident]

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        self.writer.close()


@pytest.fixture
async def vm(make_spec: Callable[..., VmSpec], run_root: Path) -> AsyncIterator[Machine]:
    machine = Machine(make_spec(size="64M"), run_root=run_root)
    await machine.launch()
    try:
        yield machine
    finally:
        await machine.shutdown()
    assert not processes_mentioning(str(run_root)), "the endpoint outlived its VM"


async def test_scripts_stay_connected_through_updates(
        vm: Machine, figures: Callable[[str, str], None]) -> None:
    path = vm.script_socket
    assert path is not None and path == script_socket(vm.name, vm.paths.root.parent)
    assert path.stat().st_mode & 0o777 == 0o600
    a, b, raw = LibClient("script-a"), LibClient("script-b"), RawClient()
    await a.connect(path)
    await b.connect(path)
    await raw.connect(path)
    assert raw.greeting["QMP"]["version"]["qemu"]["major"] >= 10
    assert raw.greeting["QMP"]["capabilities"] == []  # no OOB through the endpoint
    # the raw client must negotiate first, like with QEMU itself
    before = await raw.call("query-status", "early")
    assert before["error"]["class"] == "CommandNotFound", before
    assert (await raw.call("qmp_capabilities", "caps")) == {"return": {}, "id": "caps"}
    # each client has its own ids: the same id from two clients is no clash
    assert (await raw.call("query-status", "same"))["return"]["status"] == "running"

    # a command that would take the VM from sealvm is refused, naming the verb
    with pytest.raises(ExecuteError, match="sealvm down"):
        await a.call("quit")
    with pytest.raises(ExecuteError, match="sealvm update"):
        await b.call("migrate", {"uri": "exec:true"})
    assert (await raw.call("migrate-set-parameters", "mp",
                           {"mode": "normal"}))["error"]["desc"].startswith("sealvm:")
    assert await vm.status() == "running"

    modes = ["cpr-exec", "cpr-transfer"] * UPDATES
    for n, mode in enumerate(modes, 1):
        seen = len(a.seen.events("SEALVM_UPDATE_START"))
        update = asyncio.ensure_future(live_update(vm, mode=mode, heartbeat_interval=0.01,
                                                   verify_pass=False))
        # once the update has started, every client sends a command: it is
        # held, then answered by the QEMU that runs the guest afterwards
        for t in (a.seen, b.seen, raw.seen):
            await t.wait_for(_count_above(t, "SEALVM_UPDATE_START", seen))
        calls = [asyncio.ensure_future(a.call("query-status")),
                 asyncio.ensure_future(b.call("query-name")),
                 asyncio.ensure_future(raw.call("query-status", f"during-{n}"))]
        report = await update
        got = await asyncio.gather(*calls)
        ROWS.append((mode, report.pause_qmp or -1, report.pause_guest or -1))
        assert got[0]["status"] == "running" and got[1]["name"] == vm.name
        assert got[2]["return"]["status"] == "running" and got[2]["id"] == f"during-{n}"
        # on the wire (the raw client sees it as sent): the held command's
        # reply comes after the update's end
        end = [i for i, (k, v) in enumerate(raw.seen.items)
               if k == "event" and v["event"] == "SEALVM_UPDATE_END"][n - 1]
        reply = next(i for i, (k, v) in enumerate(raw.seen.items)
                     if k == "reply" and v.get("id") == f"during-{n}")
        assert reply > end, f"update {n}: a held command was answered before the update ended"

    for t in (a.seen, b.seen, raw.seen):
        starts = t.events("SEALVM_UPDATE_START")
        ends = t.events("SEALVM_UPDATE_END")
        assert [e["data"]["mode"] for e in starts] == modes
        assert [e["data"]["mode"] for e in ends] == modes
        assert all(e["data"]["result"] == "completed" for e in ends)
        # events in order: each update's START, then its END, then the next
        names = [e["event"] for e in t.events()
                 if e["event"] in ("SEALVM_UPDATE_START", "SEALVM_UPDATE_END")]
        assert names == ["SEALVM_UPDATE_START", "SEALVM_UPDATE_END"] * len(modes)
        # (the switchover's own RESUME reaches the scripts only if the endpoint
        # has negotiated with the new QEMU by then: QEMU sends no event to a
        # monitor before; sealvm does not make the update wait for it)
        # sealvm's own quit of the old QEMU is not the VM shutting down
        assert not t.events("SHUTDOWN")
    assert ends[-1]["data"]["pid"] == vm.pid
    for mode in ("cpr-exec", "cpr-transfer"):
        qmp = sorted(r[1] * 1000 for r in ROWS if r[0] == mode)
        guest = sorted(r[2] * 1000 for r in ROWS if r[0] == mode)
        figures("script endpoint: pause with 3 scripts connected",
                f"{mode:<13} n={len(qmp)}  QMP p50 {qmp[len(qmp) // 2]:6.1f} max "
                f"{qmp[-1]:6.1f} ms   guest p50 {guest[len(guest) // 2]:6.1f} max "
                f"{guest[-1]:6.1f} ms")
    for c in (a, b):
        assert c.qmp.runstate is Runstate.RUNNING
        assert (await c.call("query-status"))["status"] == "running"
    # events of the QEMU that runs the guest now reach every script
    resumes = [len(t.events("RESUME")) for t in (a.seen, b.seen, raw.seen)]
    await a.call("stop")
    await b.call("cont")
    for t, k in zip((a.seen, b.seen, raw.seen), resumes, strict=True):
        await t.wait_for(_count_above(t, "RESUME", k))
        assert [e["event"] for e in t.events()[-2:]] == ["STOP", "RESUME"]
    for c2 in (a, b, raw):
        await c2.close()


# ------------------------------------------------------------- through the CLI


class Cli:
    def __init__(self, run_root: Path) -> None:
        self.run_root = run_root
        self.env = dict(os.environ, SEALVM_RUN_DIR=str(run_root))
        self.env.pop("SEALVM_FAULT", None)

    def run(self, *args: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(self.env, **({"SEALVM_FAULT": fault} if fault else {}))
        return subprocess.run([*SEALVM, *args, "--json"], env=env, capture_output=True,
                              text=True, timeout=120, check=False)

    def json(self, *args: str, rc: int = 0) -> Any:
        p = self.run(*args)
        assert p.returncode == rc, f"{args}: rc {p.returncode}\n{p.stdout}\n{p.stderr}"
        return json.loads(p.stdout)


@pytest.fixture
def cli(run_root: Path, tmp_path: Path, qemu_binary: Path,
        guest_image: Path) -> Iterator[tuple[Cli, Path]]:
    spec = tmp_path / "evm.toml"
    spec.write_text(f'name = "evm"\nqemu = "{qemu_binary}"\n[memory]\nsize = "64M"\n'
                    f'[guest]\nkernel = "{guest_image}"\ncmdline = "hb_ms=10"\n'
                    '[scripts]\ndeny = ["query-kvm"]\nallow = ["human-monitor-command"]\n')
    c = Cli(run_root)
    yield c, spec
    c.run("down", "evm")


async def test_a_script_never_makes_sealvm_wait(cli: tuple[Cli, Path]) -> None:
    """An idle script holds QEMU's own monitor today's way (one client at a
    time): through the endpoint, `update` and `down` do not wait for it."""
    c, spec = cli
    up = c.json("up", str(spec))
    status = c.json("status", "evm")
    assert status["scripts"]["socket"] == str(c.run_root / "evm" / "qmp-scripts.sock")
    script = LibClient("idle")
    await script.connect(Path(status["scripts"]["socket"]))
    # the spec's policy: query-kvm denied, HMP allowed
    with pytest.raises(ExecuteError, match=r"\[scripts\] deny"):
        await script.call("query-kvm")
    assert "running" in await script.call("human-monitor-command",
                                          {"command-line": "info status"})
    t0 = time.monotonic()
    for mode in ("exec", "transfer"):
        assert c.json("update", "evm", "--mode", mode)["ram_inode_unchanged"]
    assert time.monotonic() - t0 < 60
    assert (await script.call("query-status"))["status"] == "running"
    assert c.json("down", "evm")["pid"] != up["pid"]
    await script.wait_disconnected(10)  # the endpoint went with the VM
    await script.close()


async def test_controller_killed_mid_update(cli: tuple[Cli, Path]) -> None:
    """The controller dies in the pause: a script's held command is answered
    once `recover` has finished the update, not lost or sent to a QEMU in
    the middle of an update."""
    c, spec = cli
    c.json("up", str(spec))
    script = LibClient("waiting")
    await script.connect(c.run_root / "evm" / "qmp-scripts.sock")
    p = await asyncio.to_thread(c.run, "update", "evm", "--mode", "exec",
                                fault="kill-controller@exec")
    assert p.returncode == -signal.SIGKILL, p.stderr
    await script.seen.wait_for(lambda: bool(script.seen.events("SEALVM_UPDATE_START")))
    held = asyncio.ensure_future(script.call("query-status"))
    await asyncio.sleep(0.5)
    assert not held.done(), "a command went to QEMU in the middle of an update"
    rec = await asyncio.to_thread(c.json, "recover", "evm")
    assert rec["outcome"] == "completed"
    assert (await asyncio.wait_for(held, 30))["status"] == "running"
    end = script.seen.events("SEALVM_UPDATE_END")
    assert end and end[-1]["data"]["result"] == "completed" and end[-1]["data"]["by"] == "recover"
    await script.close()


async def test_endpoint_death_is_not_the_vms(cli: tuple[Cli, Path]) -> None:
    c, spec = cli
    c.json("up", str(spec))
    paths = RunPaths(c.run_root / "evm")
    pid = pid_of(paths)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if pid_of(paths) is None:
            break
        await asyncio.sleep(0.05)
    assert c.json("update", "evm", "--mode", "transfer")["ram_inode_unchanged"]
    assert c.json("status", "evm")["scripts"]["endpoint_pid"] is None
    again = c.json("endpoint", "evm")
    assert again["started"] and again["endpoint_pid"] != pid
    assert not c.json("endpoint", "evm")["started"]  # idempotent
    script = LibClient("after")
    await script.connect(paths.scripts)
    # QEMU reconnects to the new endpoint by itself
    assert (await asyncio.wait_for(script.call("query-status"), 15))["status"] == "running"
    await script.close()


async def test_protocol_errors_keep_the_connection(vm: Machine) -> None:
    assert vm.script_socket is not None
    raw = RawClient()
    await raw.connect(vm.script_socket)
    raw.send("{not json}\n")
    await raw.seen.wait_for(lambda: bool(raw.unnamed))
    assert raw.unnamed[0]["error"]["desc"] == "JSON parse error"
    assert (await raw.call("qmp_capabilities", "c", {"enable": ["oob"]}))["error"]
    assert "return" in await raw.call("qmp_capabilities", "c2")
    again = await raw.call("qmp_capabilities", "c3")
    assert again["error"]["class"] == "CommandNotFound"
    oob = json.dumps({"exec-oob": "query-status", "id": "o"}) + "\n"
    raw.send(oob)
    await raw.seen.wait_for(lambda: "o" in raw.replies)
    assert "out-of-band" in raw.replies["o"]["error"]["desc"]
    # a command split across writes, and two in one write
    raw.send('{"execute": "query-')
    await asyncio.sleep(0.1)
    raw.send('status", "id": "split"}{"execute": "query-name", "id": "two"}\n')
    await raw.seen.wait_for(lambda: "split" in raw.replies and "two" in raw.replies)
    assert raw.replies["split"]["return"]["status"] == "running"
    assert raw.replies["two"]["return"]["name"] == vm.name
    # QEMU's own errors come back as QEMU sent them
    nope = await raw.call("no-such-command", "n")
    assert nope["error"]["class"] == "CommandNotFound"
    await raw.close()




# --------------------------------------------------------------- group access

PROBE = """
import os, socket, sys
os.setgroups([int(g) for g in sys.argv[2].split(",") if g])
os.setgid(65534)
os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    print(s.recv(4096).decode().split(",")[0])
except OSError as e:
    print(type(e).__name__)
"""


async def test_a_group_named_in_the_spec_may_connect(
        make_spec: Callable[..., VmSpec]) -> None:
    """[scripts] group: its members connect, nobody else does (the run
    directory is 0710 to that group, the socket 0660)."""
    if os.geteuid() != 0:
        pytest.skip(reason="needs root (to act as another user)")
    gid = grp.getgrnam("daemon").gr_gid
    root = Path(tempfile.mkdtemp(prefix="sealvm-group-"))
    root.chmod(0o711)  # a run root others may traverse, as /run/sealvm is
    machine = Machine(make_spec(size="64M", scripts={"group": "daemon"}), run_root=root)
    await machine.launch()
    try:
        sock = machine.script_socket
        assert sock is not None
        assert (sock.stat().st_gid, sock.stat().st_mode & 0o777) == (gid, 0o660)
        assert machine.paths.root.stat().st_mode & 0o777 == 0o710
        assert machine.paths.qmp.stat().st_mode & 0o777 == 0o600  # sealvm's own stays private

        def probe(groups: str) -> str:
            return subprocess.run([sys.executable, "-c", PROBE, str(sock), groups],
                                  capture_output=True, text=True, check=True,
                                  timeout=30).stdout.strip()

        assert probe(str(gid)).startswith('{"QMP": {"version"')
        assert probe("") == "PermissionError"
    finally:
        await machine.shutdown()
        leftover = processes_mentioning(str(root))
        shutil.rmtree(root, ignore_errors=True)
    assert not leftover
