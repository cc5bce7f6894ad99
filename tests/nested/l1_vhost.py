"""
Inside L1: a VM with vhost-net is refused a live update, where vhost exists.

    python -m nested.l1_vhost [--hb-ms MS]

L0 has no /dev/vhost-net; L1 (CONFIG_TUN, CONFIG_VHOST_NET in
images/host/sealvm.config) has.  Driven through sealvm's CLI, as an operator
would (`sealvm up`, `update`, `down`, each its own process):

1. ``sealvm up`` a VM (the bare-metal test guest, which does not drive the
   NIC) with one ``[[net]]`` of ``vhost = true`` in a namespace sealvm
   creates.  Observed: the namespace and the tap exist; QEMU's argv has
   ``vhost=on,vhostfd=N`` and its fd N is /dev/vhost-net, its tap fd
   /dev/net/tun; the vhost worker (VHOST_SET_OWNER) is a task named
   ``vhost-<QEMU pid>``; QMP ``query-pci`` shows the virtio-net device.
2. ``sealvm update`` in each mode: exit 4, PreflightError whose only reason
   is ``net-<id>: <id>: VHOST_REFUSAL``.  Before the guest pauses: a QMP
   client on the VM's script endpoint sees no event at all during the
   attempt (no STOP, RESUME, SEALVM_UPDATE_START), ``query-migrate`` is
   empty, the heartbeat's sequence is continuous, the same QEMU (pid, start
   time, executable) runs the guest, no journal was written.
3. ``sealvm down``: QEMU, the tap and the namespace are gone.
4. Control: the same VM with ``vhost = false`` goes through a cpr-exec and a
   cpr-transfer update (exit 0, heartbeat continuous), and the same event
   watcher sees each update's STOP and RESUME (so its silence in 2 means
   something); ``down`` removes the tap and the namespace.

Writes results/vhost.json (see l1_lib.Checks).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient

from sealvm.console import ConsoleFollower
from sealvm.net import TUN_DEVICE, VHOST_DEVICE, VHOST_REFUSAL, namespaces, tap_exists

from .l1_lib import Checks, qemu_pids

BASE = Path("/run/sealvm-vhost")
RUN_ROOT = BASE / "vms"
NETNS = "sealvm-vhost"
NIC = "net0"
MEMORY = "256M"
PATTERN_RANGE = "0x200000-0x4000000"
STEP_TIMEOUT = 120.0
WARMUP = 10
#: heartbeats to see after a refused update before judging it
AFTER = 10
MODES = ("exec", "transfer")
#: QMP events that an update (or any pause) would have produced
PAUSE_EVENTS = ("STOP", "RESUME", "MIGRATION", "SEALVM_UPDATE_START", "SEALVM_UPDATE_END")


def expected_reason(nic: str = NIC) -> str:
    """The one preflight failure a vhost NIC gets (check_nics' text)."""
    return f"net-{nic}: {nic}: {VHOST_REFUSAL}"


def spec_toml(name: str, *, vhost: bool, hb_ms: int) -> str:
    return "\n".join([
        f"name = {json.dumps(name)}",
        f"qemu = {json.dumps(os.environ['SEALVM_QEMU'])}",
        "[memory]",
        f"size = {json.dumps(MEMORY)}",
        'backend = "memfd"',
        "[guest]",
        f"kernel = {json.dumps(os.environ['SEALVM_GUEST'])}",
        f'cmdline = "hb_ms={hb_ms} pattern_range={PATTERN_RANGE}"',
        "[[net]]",
        f"id = {json.dumps(NIC)}",
        f"netns = {json.dumps(NETNS)}",
        'address = "192.0.2.1/24"',
        f"vhost = {'true' if vhost else 'false'}",
        "",
    ])


async def sealvm(*args: str, timeout: float = STEP_TIMEOUT) -> tuple[int, dict[str, Any], str]:
    """Run the sealvm CLI (its own process, ``--json``): (exit, JSON, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sealvm.cli", "--json", "--run-dir", str(RUN_ROOT), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    text = out.decode(errors="replace").strip()
    try:
        data = json.loads(text) if text else {}
    except json.JSONDecodeError:
        data = {"unparsed": text}
    return proc.returncode, data, err.decode(errors="replace")


# ----------------------------------------------------------- what /proc shows


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def start_time(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[19])


def fd_target(pid: int, fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


def netdev_opts(argv: list[str]) -> dict[str, str]:
    """The options of QEMU's (one) ``-netdev``."""
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "-netdev":
            return dict(kv.partition("=")[::2] for kv in value.split(",")[1:])
    return {}


def vhost_workers(pid: int) -> list[str]:
    """Tasks named ``vhost-<pid>``: the worker VHOST_SET_OWNER created, a
    thread of QEMU's (vhost_task) or a kernel thread."""
    name = f"vhost-{pid}"
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if task.joinpath("comm").read_text().strip() == name:
                found.append(f"thread {task.name} of QEMU")
        except OSError:
            continue
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and proc.name != str(pid):
            try:
                if proc.joinpath("comm").read_text().strip() == name:
                    found.append(f"task {proc.name}")
            except OSError:
                continue
    return found


def qemu_view(pid: int) -> dict[str, Any]:
    argv = cmdline(pid)
    opts = netdev_opts(argv)
    view: dict[str, Any] = {
        "pid": pid, "start_time": start_time(pid), "exe": os.readlink(f"/proc/{pid}/exe"),
        "netdev": next((v for f, v in zip(argv, argv[1:], strict=False) if f == "-netdev"),
                       None),
        "device": next((v for f, v in zip(argv, argv[1:], strict=False)
                        if f == "-device" and v.startswith("virtio-net")), None),
        "vhost_workers": vhost_workers(pid),
    }
    if "fd" in opts:
        view["tap_fd"] = {"fd": int(opts["fd"]), "target": fd_target(pid, int(opts["fd"]))}
    if "vhostfd" in opts:
        view["vhost_fd"] = {"fd": int(opts["vhostfd"]),
                            "target": fd_target(pid, int(opts["vhostfd"]))}
    view["vhost_fds_open"] = sorted(
        int(fd) for fd in os.listdir(f"/proc/{pid}/fd")
        if fd_target(pid, int(fd)) == VHOST_DEVICE)
    return view


def net_pci(pci: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """virtio-net functions in a ``query-pci`` reply."""
    out = []
    for bus in pci:
        for dev in bus["devices"]:
            if dev["id"]["vendor"] == 0x1AF4 and dev["id"]["device"] in (0x1000, 0x1041):
                out.append({"slot": dev["slot"], "qdev_id": dev.get("qdev_id"),
                            "id": f"{dev['id']['vendor']:04x}:{dev['id']['device']:04x}",
                            "class": dev["class_info"].get("desc")})
    return out


# ------------------------------------------------------------ one update


class Watch:
    """A QMP client on the VM's script endpoint, keeping every event."""

    def __init__(self, socket: str) -> None:
        self.socket = socket
        self.qmp = QMPClient("l1-vhost-watch")
        self.listener = EventListener()
        self.qmp.register_listener(self.listener)

    async def __aenter__(self) -> Watch:
        await self.qmp.connect(self.socket)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.qmp.disconnect()

    def names(self) -> list[str]:
        return [str(ev["event"]) for ev in self.listener.history]

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(cmd, args)


def refusal_verdict(row: dict[str, Any]) -> list[tuple[str, bool, object]]:
    """(check, ok, detail) for one refused update (kept pure: tested on
    made-up rows in test_scenario_checks)."""
    mode = row["mode"]
    paused = [e for e in row["events"] if e in PAUSE_EVENTS]
    return [
        (f"{mode}: refused with exit 4, PreflightError",
         row["exit"] == 4 and row["error"] == "PreflightError",
         f"exit {row['exit']}, {row['error']}"),
        (f"{mode}: the only reason is net-{NIC}: VHOST_REFUSAL, as written",
         row["reasons"] == [expected_reason()], row["reasons"]),
        (f"{mode}: no event during the attempt (no STOP/RESUME/update start)",
         not paused, row["events"] or "none"),
        (f"{mode}: query-migrate empty, guest running",
         row["query_migrate"] == {} and row["status"] == "running",
         f"query-migrate {row['query_migrate']}, {row['status']}"),
        (f"{mode}: same QEMU (pid, start time, executable)",
         row["before"] == row["after"], f"{row['before']} -> {row['after']}"),
        (f"{mode}: heartbeat continuous through the attempt",
         row["hb_continuous"] and row["beats_after_return"] >= AFTER,
         f"seq {row['hb_before']} -> {row['hb_after']}, continuous {row['hb_continuous']}, "
         f"{row['beats_after_return']} after sealvm returned, "
         f"largest gap {row['largest_gap'] * 1000:.0f} ms"),
        (f"{mode}: no journal left", not row["journal"], row["journal"]),
    ]


async def qmp_or_error(watch: Watch, cmd: str) -> dict[str, Any]:
    try:
        reply = await watch.execute(cmd)
    except Exception as exc:
        return {"qmp_error": str(exc)}
    return dict(reply)


def identity(pid: int) -> dict[str, Any]:
    return {"pid": pid, "start_time": start_time(pid), "exe": os.readlink(f"/proc/{pid}/exe")}


async def refused_update(vm: str, mode: str, pid: int, con: ConsoleFollower, watch: Watch,
                         hb_ms: int) -> dict[str, Any]:
    before = identity(pid)
    n0 = len(con.log.heartbeats)
    seq0 = con.log.heartbeats[-1].seq
    watch.listener.clear()
    t = time.monotonic()
    code, data, err = await sealvm("update", vm, "--mode", mode, "--heartbeat-ms", str(hb_ms),
                                   "--timeout", str(STEP_TIMEOUT))
    seconds = time.monotonic() - t
    # the guest must go on after the attempt too; a refusal that did not
    # hold (the update went ahead, QEMU gone) is recorded, not raised
    n1 = len(con.log.heartbeats)
    with contextlib.suppress(TimeoutError):
        await con.wait_for(lambda log: len(log.heartbeats) >= n1 + AFTER, STEP_TIMEOUT / 4)
    events = [f"{ev['event']}" for ev in watch.listener.clear()]
    return {
        "mode": mode, "exit": code, "error": data.get("error"),
        "reasons": data.get("reasons"), "message": data.get("message"), "stderr": err.strip(),
        "seconds": seconds, "events": events,
        "query_migrate": await qmp_or_error(watch, "query-migrate"),
        "status": (await qmp_or_error(watch, "query-status")).get("status"),
        "before": before, "after": identity(pid) if os.path.exists(f"/proc/{pid}") else None,
        "hb_before": seq0, "hb_after": con.log.heartbeats[-1].seq,
        "beats_after_return": len(con.log.heartbeats) - n1,
        "hb_continuous": con.log.counter_continuous() and con.log.reboots == 0,
        "largest_gap": con.log.largest_gap(n0 - 1),
        "journal": sorted(p.name for p in (RUN_ROOT / vm).glob("journal*")),
    }


# ------------------------------------------------------------------ scenario


async def up(checks: Checks, name: str, *, vhost: bool, hb_ms: int) -> dict[str, Any]:
    spec = BASE / f"{name}.toml"
    spec.write_text(spec_toml(name, vhost=vhost, hb_ms=hb_ms))
    code, info, err = await sealvm("up", str(spec))
    checks.check(f"{name}: sealvm up (vhost={str(vhost).lower()})", code == 0,
                 f"exit {code}, pid {info.get('pid')} {err.strip()[-300:]}")
    if code != 0:
        raise RuntimeError(f"sealvm up {name}: exit {code}: {err}")
    return info


def ours(name: str) -> list[int]:
    """QEMUs of VM *name* (their argv names its run directory)."""
    where = str(RUN_ROOT / name)
    left = []
    for pid in qemu_pids():
        try:
            if any(where in arg for arg in cmdline(pid)):
                left.append(pid)
        except OSError:
            continue
    return left


async def down(checks: Checks, name: str, info: dict[str, Any]) -> dict[str, Any]:
    code, data, err = await sealvm("down", name)
    tap = info["net"][0]["tap"]
    gone = {"exit": code, "qemu_left": ours(name),
            "tap_left": tap_exists(tap, NETNS), "netns_left": NETNS in namespaces()}
    checks.check(f"{name}: sealvm down removed QEMU, tap {tap} and namespace {NETNS}",
                 code == 0 and not gone["qemu_left"] and not gone["tap_left"]
                 and not gone["netns_left"], f"{gone} {err.strip()[-300:]}")
    return gone


async def vhost_vm(checks: Checks, hb_ms: int) -> None:
    name = "l2-vhost"
    info = await up(checks, name, vhost=True, hb_ms=hb_ms)
    pid = int(info["pid"])
    try:
        nic = info["net"][0]
        checks.figures["vhost_nic"] = nic
        checks.check("namespace and tap created by sealvm",
                     NETNS in namespaces() and tap_exists(nic["tap"], NETNS),
                     f"netns {NETNS}, tap {nic['tap']}")
        view = qemu_view(pid)
        checks.figures["vhost_qemu"] = view
        opts = netdev_opts(cmdline(pid))
        checks.check("QEMU runs with -netdev tap,fd=N,vhost=on,vhostfd=M",
                     opts.get("vhost") == "on" and "vhostfd" in opts, view["netdev"])
        checks.check(f"QEMU's vhostfd is {VHOST_DEVICE} (opened by sealvm), its tap fd "
                     f"{TUN_DEVICE}",
                     view.get("vhost_fd", {}).get("target") == VHOST_DEVICE
                     and view.get("tap_fd", {}).get("target") == TUN_DEVICE,
                     f"vhost {view.get('vhost_fd')}, tap {view.get('tap_fd')}")
        checks.check(f"the vhost worker of QEMU exists (vhost-{pid}: VHOST_SET_OWNER done)",
                     bool(view["vhost_workers"]), view["vhost_workers"])
        async with ConsoleFollower(Path(info["serial"])) as con, \
                Watch(info["scripts"]["socket"]) as watch:
            nets = net_pci(await watch.execute("query-pci"))
            checks.figures["vhost_query_pci"] = nets
            checks.check("QMP query-pci shows the virtio-net device",
                         any(n["qdev_id"] == NIC for n in nets), nets)
            await con.wait_heartbeats(WARMUP, STEP_TIMEOUT)
            rows = []
            for mode in MODES:
                row = await refused_update(name, mode, pid, con, watch, hb_ms)
                rows.append(row)
                for check, ok, detail in refusal_verdict(row):
                    checks.check(check, ok, detail)
                if row["after"] is None:
                    break  # the VM's QEMU is gone: nothing left to refuse
            checks.figures["refusals"] = rows
            after = qemu_view(pid) if os.path.exists(f"/proc/{pid}") else {}
            checks.check("the vhost fd is still QEMU's after both refusals",
                         after.get("vhost_fd") == view.get("vhost_fd"), after.get("vhost_fd"))
    finally:
        checks.figures["vhost_down"] = await down(checks, name, info)


async def control_vm(checks: Checks, hb_ms: int) -> None:
    name = "l2-novhost"
    info = await up(checks, name, vhost=False, hb_ms=hb_ms)
    try:
        view = qemu_view(int(info["pid"]))
        checks.figures["control_qemu"] = view
        checks.check("control: QEMU runs the tap without vhost",
                     "vhost" not in netdev_opts(cmdline(int(info["pid"])))
                     and not view["vhost_fds_open"], view["netdev"])
        rows = []
        async with ConsoleFollower(Path(info["serial"])) as con, \
                Watch(info["scripts"]["socket"]) as watch:
            await con.wait_heartbeats(WARMUP, STEP_TIMEOUT)
            for mode in MODES:
                watch.listener.clear()
                code, rep, err = await sealvm("update", name, "--mode", mode,
                                              "--heartbeat-ms", str(hb_ms),
                                              "--timeout", str(STEP_TIMEOUT))
                await con.wait_heartbeats(5, STEP_TIMEOUT)
                events = [str(ev["event"]) for ev in watch.listener.clear()]
                row = {"mode": mode, "exit": code, "pid_before": rep.get("pid_before"),
                       "pid_after": rep.get("pid_after"), "pause_qmp": rep.get("pause_qmp"),
                       "pause_guest": rep.get("pause_guest"),
                       "heartbeat_continuous": rep.get("heartbeat_continuous"),
                       "total": rep.get("total"), "events": events,
                       "error": rep.get("message"), "stderr": err.strip()[-500:]}
                rows.append(row)
                same = row["pid_after"] == row["pid_before"]
                checks.check(f"control {mode}: update completed, heartbeat continuous, "
                             f"{'same' if mode == 'exec' else 'new'} pid",
                             code == 0 and row["heartbeat_continuous"] is True
                             and same == (mode == "exec"),
                             {k: row[k] for k in ("exit", "pid_before", "pid_after",
                                                  "pause_qmp", "pause_guest", "error")})
                checks.check(f"control {mode}: the event watch saw the pause",
                             "STOP" in events and "RESUME" in events
                             and "SEALVM_UPDATE_START" in events, events)
        checks.figures["control_updates"] = rows
    finally:
        checks.figures["control_down"] = await down(checks, name, info)


async def scenario(checks: Checks, hb_ms: int) -> None:
    shutil.rmtree(BASE, ignore_errors=True)
    BASE.mkdir(mode=0o700)
    RUN_ROOT.mkdir(mode=0o700)
    checks.check(f"L1 has {VHOST_DEVICE} and {TUN_DEVICE}",
                 os.path.exists(VHOST_DEVICE) and os.path.exists(TUN_DEVICE),
                 {p: os.path.exists(p) for p in (VHOST_DEVICE, TUN_DEVICE)})
    for part in (vhost_vm, control_vm):  # the control runs even if the first part failed
        try:
            await part(checks, hb_ms)
        except Exception as exc:
            checks.check(f"{part.__name__} ran to the end", False,
                         "".join(traceback.format_exception(exc))[-2000:])
    checks.check("no QEMU, no namespace left", not qemu_pids() and NETNS not in namespaces(),
                 f"qemu {qemu_pids()}, namespaces {namespaces()}")


def summary_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """The scenario's figures for the nested summary."""
    res = results.get("vhost")
    if not res:
        return []
    fig = res["figures"]
    lines = []
    q = fig.get("vhost_qemu")
    if q:
        lines.append(f"vhost: QEMU pid {q['pid']} -netdev {q['netdev']}; vhostfd "
                     f"{q.get('vhost_fd')}, worker {q['vhost_workers']}")
    for r in fig.get("refusals", []):
        lines.append(f"  update --mode {r['mode']:<8}: exit {r['exit']} {r['error']} in "
                     f"{r['seconds']:.2f} s, events {r['events'] or 'none'}, "
                     f"pid {r['before']['pid']} -> "
                     f"{(r['after'] or {}).get('pid')}, hb {r['hb_before']} -> "
                     f"{r['hb_after']} (largest gap {r['largest_gap'] * 1000:.0f} ms)")
        for reason in r["reasons"] or []:
            lines.append(f"    reason: {reason}")
    for r in fig.get("control_updates", []):
        pq = r["pause_qmp"] if r["pause_qmp"] is not None else -1
        pg = r["pause_guest"] if r["pause_guest"] is not None else -1
        lines.append(f"  control vhost=false {r['mode']:<8}: exit {r['exit']}, pid "
                     f"{r['pid_before']} -> {r['pid_after']}, pause QMP {pq * 1000:.0f} ms, "
                     f"guest {pg * 1000:.0f} ms, events {r['events']}")
    for key in ("vhost_down", "control_down"):
        if key in fig:
            lines.append(f"  {key}: {fig[key]}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hb-ms", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()
    checks = Checks("vhost")
    checks.figures.update(hb_ms=args.hb_ms, memory=MEMORY, netns=NETNS)

    async def run() -> None:
        async with asyncio.timeout(args.timeout):
            await scenario(checks, args.hb_ms)

    return checks.finish(lambda: asyncio.run(run()))


if __name__ == "__main__":
    sys.exit(main())
