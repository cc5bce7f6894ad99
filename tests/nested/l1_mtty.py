"""
Inside L1: a migration-capable mdev (mtty) through live updates of L2 QEMU.

    python -m nested.l1_mtty [--updates N] [--hb-ms MS]

mtty (Linux samples/vfio-mdev) supports VFIO migration, so QEMU registers
device-state migration for it.  In cpr-transfer and cpr-exec, old and new
QEMU share the one device (the fd is handed over): its state must be left
alone -- no save/load, no migration-state transition, no reset.  In normal
migration, to another mtty instance, the state must still travel.

The scenario creates two mtty instances (A for the VM, B as the target of
the normal migration), launches L2 -- our QEMU (TCG), the sealvm test guest
whose mtty task keeps bytes in flight through the UART's FIFO and checks the
line settings, reporting ``mtty=<ok> mtty_err=<n>`` on each heartbeat -- and
then runs N cpr-transfer and N cpr-exec updates (alternating), then one
normal migration from A to B.  Observed, not assumed, per update:

- QEMU's own trace events (vfio_migration_set_state, vfio_save_*,
  vfio_load_*, vfio_vmstate_change*) in L2's qemu.log;
- the driver's side, through kprobes in L1's kernel: every
  ``mtty_set_state`` (a migration-state change) and every reset
  (``mtty_reset``, or ``mtty_ioctl`` with VFIO_DEVICE_RESET when it is
  inlined), plus mtty's own "mtty_reset: called" line in the kernel log;
- the device itself, read from L1 through a duplicate of QEMU's device fd:
  its migration state (VFIO_DEVICE_FEATURE) and its LCR register;
- the guest: the exchange goes on without an error.

The sealvm preflight's per-device report is recorded for each mode.  At the
end, a VFIO_DEVICE_RESET issued on purpose checks that the reset watch sees
resets.  Writes results/mtty.json (see l1_lib.Checks).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from qemu.qmp import Runstate

from sealvm import Machine, live_update, spec_from_dict
from sealvm.console import ConsoleFollower, ConsoleLog
from sealvm.plan import incoming_argv
from sealvm.preflight import run_preflight
from sealvm.spec import VfioSpec
from sealvm.vfio import (
    VFIO_DEVICE_RESET,
    VFIO_PCI_BAR0_REGION_INDEX,
    device_migration,
    device_reset,
    mig_state_name,
    qemu_device_fd,
    region_info,
)

from .l1_lib import Checks, QemuLog, failed_cpr_exec, qemu_pids, trace_args

RUN_ROOT = Path("/run/sealvm-l2")
MEMORY = 256 << 20
PATTERN_RANGE = "0x200000-0x4000000"
STEP_TIMEOUT = 120.0
#: rounds of the guest's UART exchange to see before the first update
WARMUP = 20
MDEV_TYPES = Path("/sys/class/mdev_bus/mtty/mdev_supported_types")
MDEV_TYPE = "mtty-1"
MDEV_DEVICES = Path("/sys/bus/mdev/devices")
DEV_ID = "mtty0"
#: what the guest programs (images/guest/mtty.c): 8 bits, even parity, 1 stop
GUEST_LCR = 0x1B
UART_LCR = 3

#: QEMU trace events of VFIO device-state migration.
VFIO_TRACES = (
    "vfio_migration_realize",
    "vfio_migration_set_state",
    "vfio_migration_set_device_state",
    "vfio_save_setup",
    "vfio_save_complete_precopy",
    "vfio_save_device_config_state",
    "vfio_save_cleanup",
    "vfio_load_state",
    "vfio_load_device_config_state_start",
    "vfio_load_cleanup",
    "vfio_vmstate_change",
    "vfio_vmstate_change_prepare",
    "vfio_vmstate_change_cpr",
)
#: of those, the ones that mean the device state was saved, loaded or moved
STATE_TRACES = ("vfio_migration_set_state", "vfio_migration_set_device_state",
                "vfio_save_setup", "vfio_save_complete_precopy", "vfio_load_state",
                "vfio_load_device_config_state_start")

TRACEFS = Path("/sys/kernel/tracing")
KPROBE_GROUP = "sealvm_mtty"
_KEVENT = re.compile(r"\s(mtty_set_state|mtty_reset):\s+\([^)]*\)\s*(.*)$")
_RESET_LOG = "mtty_reset: called"


# ----------------------------------------------------------------- the guest


def last_mtty(log: ConsoleLog) -> tuple[int, int]:
    hbs = [hb for hb in log.heartbeats if "mtty" in hb.values]
    if not hbs:
        return -1, -1
    return hbs[-1].int("mtty"), hbs[-1].int("mtty_err")


async def wait_mtty(con: ConsoleFollower, above: int, timeout: float) -> float:
    t = time.monotonic()
    await con.wait_for(lambda log: last_mtty(log)[0] > above, timeout)
    return time.monotonic() - t


# ------------------------------------------------------------ QEMU's traces



def counts(events: list[tuple[str, str]]) -> dict[str, int]:
    c = Counter(name for name, _ in events)
    return {name: c.get(name, 0) for name in VFIO_TRACES}


def set_state_targets(events: list[tuple[str, str]]) -> list[str]:
    """The states vfio_migration_set_state asked for, in order."""
    out = []
    for name, rest in events:
        if name == "vfio_migration_set_state":
            m = re.search(r"new state (\w+)", rest)
            out.append(m.group(1) if m else rest)
    return out


# ------------------------------------------------------ L1's kernel, mtty


def kprobe_command(command: str) -> None:
    """Append one command to kprobe_events (no seek: tracefs refuses it)."""
    fd = os.open(TRACEFS / "kprobe_events", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, command.encode() + b"\n")
    finally:
        os.close(fd)


class KernelWatch:
    """kprobes on mtty's migration-state change and reset paths, and the
    kernel log's reset lines: what the driver itself saw."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.reset_probe = ""
        self._pipe: int | None = None

    def start(self) -> None:
        if not (TRACEFS / "kprobe_events").exists():
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=True)
        syms = {line.split()[2] for line in
                Path("/proc/kallsyms").read_text().splitlines()
                if line.split()[2].startswith("mtty_")}
        if "mtty_set_state" not in syms:
            raise RuntimeError(f"no mtty_set_state in kallsyms (mtty symbols: {sorted(syms)})")
        probes = [f"p:{KPROBE_GROUP}/mtty_set_state mtty_set_state state=%si:u32"]
        if "mtty_reset" in syms:
            probes.append(f"p:{KPROBE_GROUP}/mtty_reset mtty_reset")
            self.reset_probe = "mtty_reset"
        else:  # inlined into mtty_ioctl: probe the ioctl, keep VFIO_DEVICE_RESET
            probes.append(f"p:{KPROBE_GROUP}/mtty_reset mtty_ioctl cmd=%si:x32")
            self.reset_probe = "mtty_ioctl(VFIO_DEVICE_RESET)"
        for probe in probes:
            try:
                kprobe_command(probe)
            except OSError as exc:
                err = (TRACEFS / "error_log").read_text()
                raise RuntimeError(f"kprobe {probe!r}: {exc}: {err}") from exc
        if self.reset_probe.startswith("mtty_ioctl"):
            (TRACEFS / "events" / KPROBE_GROUP / "mtty_reset" / "filter").write_text(
                f"cmd == {VFIO_DEVICE_RESET:#x}\n")
        (TRACEFS / "events" / KPROBE_GROUP / "enable").write_text("1\n")
        (TRACEFS / "tracing_on").write_text("1\n")
        self._pipe = os.open(TRACEFS / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
        self.drain()

    def drain(self) -> list[tuple[str, str]]:
        """Kernel events since the last drain: (probe, args)."""
        if self._pipe is None:
            return []
        data = b""
        while True:
            try:
                chunk = os.read(self._pipe, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        out = []
        for line in data.decode(errors="replace").splitlines():
            self.events.append(line)
            if m := _KEVENT.search(line):
                out.append((m.group(1), m.group(2).strip()))
        return out

    def stop(self) -> list[str]:
        """Remove the probes; returns what could not be cleaned."""
        problems = []
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
        with contextlib.suppress(OSError):
            (TRACEFS / "events" / KPROBE_GROUP / "enable").write_text("0\n")
        for name in ("mtty_set_state", "mtty_reset"):
            try:
                kprobe_command(f"-:{KPROBE_GROUP}/{name}")
            except OSError as exc:
                if (TRACEFS / "events" / KPROBE_GROUP / name).exists():
                    problems.append(f"{name}: {exc}")
        left = [line for line in (TRACEFS / "kprobe_events").read_text().splitlines()
                if KPROBE_GROUP in line]
        return problems + left


def reset_lines() -> int:
    """mtty's own "mtty_reset: called" lines in the kernel log so far."""
    out = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    return out.count(_RESET_LOG)


def kernel_summary(events: list[tuple[str, str]]) -> dict[str, Any]:
    states = []
    for name, args in events:
        if name == "mtty_set_state":
            m = re.search(r"state=(\d+)", args)
            states.append(mig_state_name(int(m.group(1))) if m else args)
    return {"set_state": states,
            "resets": sum(1 for name, _ in events if name == "mtty_reset")}


# ----------------------------------------------------------- mdev instances


def create_mdev() -> Path:
    uid = str(uuid.uuid4())
    (MDEV_TYPES / MDEV_TYPE / "create").write_text(uid)
    return MDEV_DEVICES / uid


def remove_mdev(path: Path) -> None:
    if path.exists():
        (path / "remove").write_text("1")


def device_view(pid: int, mdev: Path) -> dict[str, Any]:
    """The device as L1 sees it through QEMU's own fd: migration support and
    state, and the UART's LCR (what the guest programmed)."""
    cdev = "/dev/vfio/devices/" + sorted(os.listdir(mdev / "vfio-dev"))[0]
    fd = qemu_device_fd(pid, cdev)
    try:
        mig = device_migration(fd)
        bar0 = region_info(fd, VFIO_PCI_BAR0_REGION_INDEX)
        lcr = os.pread(fd, 1, bar0.offset + UART_LCR)[0]
    finally:
        os.close(fd)
    return {"cdev": cdev, "migration": str(mig), "flags": mig.flags,
            "state": mig_state_name(mig.state) if mig.state is not None else None,
            "lcr": lcr}


def view_ok(view: dict[str, Any]) -> bool:
    return bool(view["state"] == "RUNNING" and view["lcr"] == GUEST_LCR)


# ------------------------------------------------------- for the L0 summary


def summary_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """The pause per mode and what each update did to the device, for the
    nested tier's terminal summary."""
    res = results.get("mtty")
    if not res:
        return []
    fig = res["figures"]
    # "updates" is the count asked for until the scenario records its rows
    updates = fig.get("updates")
    rows = ((updates if isinstance(updates, list) else [])
            + ([fig["migration"]] if "migration" in fig else []))
    lines = ["L2 mtty (migration-capable mdev): pause per update (QMP STOP->RESUME, "
             "guest heartbeat gap)"]
    for u in rows:
        pq = u["pause_qmp"] if u["pause_qmp"] is not None else -1
        pg = u["pause_guest"] if u["pause_guest"] is not None else -1
        moved = {k: v for k, v in u["traces"].items() if k in STATE_TRACES and v}
        lines.append(f"  update {u['update']} {u['mode']:<12}: pause QMP {pq * 1000:4.0f} ms, "
                     f"guest {pg * 1000:4.0f} ms, total {u['total']:.2f} s; "
                     f"device-state traces {moved or 'none'}, driver set_state "
                     f"{u['kernel']['set_state'] or 'none'}, resets {u['kernel']['resets']}")
    return lines


# ------------------------------------------------------------------ scenario


async def preflight_views(vm: Machine) -> dict[str, str]:
    """The preflight's per-device line for each mode (run, not guessed)."""
    views = {}
    for mode in ("cpr-transfer", "cpr-exec", "migrate"):
        checks = await run_preflight(vm, mode=mode, qemu=Path(vm.argv[0]))
        views[mode] = "; ".join(str(c) for c in checks if c.name == f"vfio-dev-{DEV_ID}")
    return views


async def one_update(checks: Checks, vm: Machine, con: ConsoleFollower, qlog: QemuLog,
                     kw: KernelWatch, *, i: int, mode: str, mdev: Path,
                     hb: float) -> dict[str, Any]:
    before, _ = last_mtty(con.log)
    mism0 = con.log.mismatch_counter()
    resets_before = reset_lines()
    kw.drain()
    qlog.new_events()
    report = await live_update(vm, mode=mode, heartbeat_interval=hb, timeout=STEP_TIMEOUT)
    waited = await wait_mtty(con, max(before, last_mtty(con.log)[0]) + 2, STEP_TIMEOUT)
    mism1 = con.log.mismatch_counter()
    ok, err = last_mtty(con.log)
    events = qlog.new_events()
    kernel = kernel_summary(kw.drain())
    kernel["reset_log_lines"] = reset_lines() - resets_before
    assert vm.pid is not None
    view = device_view(vm.pid, mdev)
    tag = f"update {i} ({mode})"
    row: dict[str, Any] = {
        "update": i, "mode": mode, "pid_before": report.pid_before, "pid": report.pid_after,
        "pause_qmp": report.pause_qmp, "pause_guest": report.pause_guest,
        "total": report.total, "phases": report.phases,
        "mtty_before": before, "mtty_after": ok, "mtty_err": err, "mtty_wait": waited,
        "traces": counts(events), "set_state": set_state_targets(events),
        "kernel": kernel, "device": view, "mism_before": mism0, "mism_after": mism1,
        "trace_lines": [f"{n} {r}" for n, r in events],
    }
    checks.check(f"{tag}: guest's UART exchange continues without error",
                 ok > before + 1 and err == 0, f"mtty {before} -> {ok}, mtty_err={err}")
    if mode == "migrate":
        return row
    state_traces = {n: row["traces"][n] for n in STATE_TRACES if row["traces"][n]}
    checks.check(f"{tag}: QEMU made no device-state transition, saved and loaded nothing",
                 not state_traces and row["traces"]["vfio_vmstate_change_cpr"] >= 1,
                 f"state traces {state_traces or 'none'}, vfio_vmstate_change_cpr "
                 f"{row['traces']['vfio_vmstate_change_cpr']}")
    checks.check(f"{tag}: the driver saw no migration-state change (kprobe mtty_set_state)",
                 not kernel["set_state"], kernel["set_state"])
    checks.check(f"{tag}: the device was not reset ({kw.reset_probe}, kernel log)",
                 kernel["resets"] == 0 and kernel["reset_log_lines"] == 0, kernel)
    checks.check(f"{tag}: device RUNNING, LCR as the guest set it (read via QEMU's fd)",
                 view_ok(view), view)
    checks.check(f"{tag}: heartbeat continuous, the guest's own mism= counter unchanged",
                 report.heartbeat_continuous is True and mism1 == mism0 == 0,
                 f"continuous={report.heartbeat_continuous} mism {mism0} -> {mism1}")
    if mode == "cpr-exec":
        checks.check(f"{tag}: same pid", report.pid_after == report.pid_before,
                     f"{report.pid_before} -> {report.pid_after}")
    else:
        checks.check(f"{tag}: new process", report.pid_after != report.pid_before,
                     f"{report.pid_before} -> {report.pid_after}")
    return row


async def paused_cpr_exec(checks: Checks, vm: Machine, con: ConsoleFollower,
                          qlog: QemuLog, kw: KernelWatch, *, mdev: Path) -> dict[str, Any]:
    """stop, cpr-exec, cont: new QEMU must start from the state the device
    is really in (STOP, set by old QEMU's stop), so that cont runs it again.
    live_update wants a running guest; this drives QMP directly."""
    assert vm.pid is not None
    kw.drain()
    qlog.new_events()
    await vm.pause()
    on_stop = kernel_summary(kw.drain())
    paused = device_view(vm.pid, mdev)
    argv = incoming_argv(vm.argv)
    uri = f"file:{vm.paths.cpr_state}"
    await vm.execute("migrate-set-parameters", {"mode": "cpr-exec", "cpr-exec-command": argv})
    old = vm.qmp
    await vm.execute("migrate", {"uri": uri})
    async with asyncio.timeout(STEP_TIMEOUT):
        while old.runstate not in (Runstate.DISCONNECTING, Runstate.IDLE):
            await old.runstate_changed()
    await vm.connect(timeout=STEP_TIMEOUT)
    assert vm.state is not None
    vm.state.argv = argv
    events = vm.events(["MIGRATION"])
    try:
        await vm.execute("migrate-set-capabilities",
                         {"capabilities": [{"capability": "events", "state": True}]})
        await vm.execute("migrate-incoming", {"uri": uri})
        async with asyncio.timeout(STEP_TIMEOUT):
            async for ev in events:
                if ev["data"]["status"] in ("completed", "failed", "cancelled"):
                    break
    finally:
        await events.aclose()
        with contextlib.suppress(FileNotFoundError):
            vm.paths.cpr_state.unlink()
    status = await vm.status()
    during = kernel_summary(kw.drain())
    after_exec = device_view(vm.pid, mdev)
    before, _ = last_mtty(con.log)
    await vm.resume()
    on_cont = kernel_summary(kw.drain())
    resumed = device_view(vm.pid, mdev)
    await wait_mtty(con, before + 2, STEP_TIMEOUT)
    ok, err = last_mtty(con.log)
    traces = qlog.new_events()
    row = {"on_stop": on_stop, "paused": paused, "status_after_exec": status,
           "during_exec": during, "after_exec": after_exec, "on_cont": on_cont,
           "resumed": resumed, "mtty_before": before, "mtty_after": ok, "mtty_err": err,
           "trace_lines": [f"{n} {r}" for n, r in traces]}
    tag = "paused cpr-exec"
    checks.check(f"{tag}: stop put the device in STOP", paused["state"] == "STOP"
                 and on_stop["set_state"][-1:] == ["STOP"], {"stop": on_stop, "dev": paused})
    checks.check(f"{tag}: the update itself changed no device state, reset nothing",
                 not during["set_state"] and during["resets"] == 0 and status == "paused"
                 and after_exec["state"] == "STOP", {"during": during, "status": status,
                                                     "dev": after_exec})
    checks.check(f"{tag}: cont after the update runs the device again",
                 resumed["state"] == "RUNNING" and on_cont["set_state"][-1:] == ["RUNNING"],
                 {"cont": on_cont, "dev": resumed})
    checks.check(f"{tag}: the guest's UART exchange goes on", ok > before + 1 and err == 0,
                 f"mtty {before} -> {ok}, mtty_err={err}")
    return row


async def run_job(vm: Machine, command: str, args: dict[str, Any]) -> None:
    """Run a QMP job to its end and dismiss it; raise if it failed."""
    job_id = args["job-id"]
    events = vm.events(["JOB_STATUS_CHANGE"])
    try:
        await vm.execute(command, args)
        async with asyncio.timeout(STEP_TIMEOUT):
            async for ev in events:
                if ev["data"]["id"] == job_id and ev["data"]["status"] == "concluded":
                    break
    finally:
        await events.aclose()
    job = next(j for j in await vm.execute("query-jobs") if j["id"] == job_id)
    await vm.execute("job-dismiss", {"id": job_id})
    if "error" in job:
        raise RuntimeError(f"{command}: {job['error']}")


async def qcow2_node(vm: Machine, path: Path, node: str) -> None:
    """A qcow2 image for snapshots, made through QMP (no qemu-img here)."""
    await run_job(vm, "blockdev-create", {"job-id": f"{node}-file", "options": {
        "driver": "file", "filename": str(path), "size": 0}})
    await vm.execute("blockdev-add", {"driver": "file", "node-name": f"{node}-file",
                                      "filename": str(path)})
    await run_job(vm, "blockdev-create", {"job-id": f"{node}-fmt", "options": {
        "driver": "qcow2", "file": f"{node}-file", "size": 64 << 20}})
    await vm.execute("blockdev-add", {"driver": "qcow2", "node-name": node,
                                      "file": f"{node}-file"})


async def savevm_after_failed_cpr(checks: Checks, vm: Machine, con: ConsoleFollower,
                                  qlog: QemuLog, kw: KernelWatch) -> dict[str, Any]:
    """A cpr-exec that fails (its command cannot be executed) leaves the
    mode parameter at cpr-exec.  A snapshot taken afterwards must still save
    the device state: it does not share the device with another QEMU."""
    image = vm.paths.qemu_dir / "snapshot.qcow2"  # QEMU creates it: in its own directory
    await qcow2_node(vm, image, "snap")
    # cpr-exec completes the migration, then fails to exec: completed,
    # then failed, and the VM runs again.
    seen = await failed_cpr_exec(vm, STEP_TIMEOUT)
    cpr_status = seen[-1]
    params = await vm.execute("query-migrate-parameters")
    status_after_cpr = await vm.status()
    before, _ = last_mtty(con.log)
    kw.drain()
    qlog.new_events()
    await run_job(vm, "snapshot-save", {"job-id": "savevm", "tag": "after-failed-cpr",
                                        "vmstate": "snap", "devices": ["snap"]})
    traces = qlog.new_events()
    kernel = kernel_summary(kw.drain())
    await wait_mtty(con, before + 2, STEP_TIMEOUT)
    ok, err = last_mtty(con.log)
    await vm.execute("migrate-set-parameters", {"mode": "normal"})
    await vm.execute("blockdev-del", {"node-name": "snap"})
    await vm.execute("blockdev-del", {"node-name": "snap-file"})
    image.unlink()
    assert vm.pid is not None
    row = {"cpr_status": cpr_status, "mode_after_cpr": params["mode"],
           "status_after_cpr": status_after_cpr, "traces": counts(traces),
           "set_state": set_state_targets(traces), "kernel": kernel,
           "mtty_before": before, "mtty_after": ok, "mtty_err": err,
           "status": await vm.status(), "trace_lines": [f"{n} {r}" for n, r in traces]}
    tag = "savevm after a failed cpr-exec"
    checks.check(f"{tag}: the cpr-exec failed, the VM runs, mode stays cpr-exec",
                 cpr_status == "failed" and status_after_cpr == "running"
                 and params["mode"] == "cpr-exec",
                 {k: row[k] for k in ("cpr_status", "status_after_cpr", "mode_after_cpr")})
    checks.check(f"{tag}: QEMU saved the device state (vfio_save_setup, "
                 "vfio_save_complete_precopy)",
                 row["traces"]["vfio_save_setup"] >= 1
                 and row["traces"]["vfio_save_complete_precopy"] >= 1,
                 {k: row["traces"][k] for k in STATE_TRACES})
    checks.check(f"{tag}: the driver went through STOP_COPY (kprobe)",
                 "STOP_COPY" in kernel["set_state"], kernel["set_state"])
    checks.check(f"{tag}: the guest runs on, its UART exchange without error",
                 row["status"] == "running" and ok > before + 1 and err == 0,
                 f"status={row['status']} mtty {before} -> {ok}, mtty_err={err}")
    return row


async def scenario(checks: Checks, updates: int, hb_ms: int) -> None:
    kw = KernelWatch()
    mdevs: list[Path] = []
    vm: Machine | None = None
    hb = hb_ms / 1000
    try:
        kw.start()
        checks.figures["reset_probe"] = kw.reset_probe
        mdevs = [create_mdev(), create_mdev()]
        src, dst = mdevs
        checks.check("two mtty instances created", all(p.exists() for p in mdevs),
                     [p.name for p in mdevs])
        spec = spec_from_dict({
            "name": "l2-mtty",
            "qemu": os.environ["SEALVM_QEMU"],
            "memory": {"size": MEMORY, "backend": "memfd"},
            "guest": {"kernel": os.environ["SEALVM_GUEST"],
                      "cmdline": f"hb_ms={hb_ms} pattern_range={PATTERN_RANGE}"},
            "vfio": [{"id": DEV_ID, "sysfsdev": str(src), "backend": "iommufd"}],
            "extra_args": trace_args(VFIO_TRACES),
        })
        vm = Machine(spec, run_root=RUN_ROOT)
        t0 = time.monotonic()
        await vm.launch(timeout=STEP_TIMEOUT)
        checks.figures["l2_start_qmp"] = time.monotonic() - t0
        qlog = QemuLog(vm.paths.qemu_log, VFIO_TRACES)
        async with ConsoleFollower(vm.paths.serial) as con:
            await wait_mtty(con, WARMUP, STEP_TIMEOUT)
            checks.figures["l2_start_warm"] = time.monotonic() - t0
            start = qlog.new_events()
            checks.figures["traces_at_start"] = [f"{n} {r}" for n, r in start]
            checks.check("QEMU set up VFIO migration for mtty (vfio_migration_realize)",
                         counts(start)["vfio_migration_realize"] == 1, counts(start))
            found = [line for line in vm.paths.serial.read_text(errors="replace").splitlines()
                     if line.startswith("MTTY found")]
            checks.check("guest found mtty and programmed it", bool(found), found)
            ok0, err0 = last_mtty(con.log)
            checks.check("UART exchange before the first update", ok0 > WARMUP and err0 == 0,
                         f"mtty={ok0} mtty_err={err0}")
            assert vm.pid is not None
            view = device_view(vm.pid, src)
            checks.figures["device_at_start"] = view
            checks.check("kernel: mtty supports VFIO migration, RUNNING, LCR set",
                         view["flags"] & 1 and view_ok(view), view)
            checks.figures["preflight"] = await preflight_views(vm)
            kw.drain()

            rows = []
            modes = ["cpr-transfer", "cpr-exec"] * updates
            for i, mode in enumerate(modes, 1):
                rows.append(await one_update(checks, vm, con, qlog, kw, i=i, mode=mode,
                                             mdev=src, hb=hb))
            checks.figures["updates"] = rows
            last = await con.wait_full_pass(STEP_TIMEOUT)
            checks.figures["pass_after_updates"] = {"gen": last.gen, "mism": last.mismatches,
                                                    "heartbeat_mism": con.log.mismatch_counter()}
            checks.check("after the last CPR update: a complete pattern pass verified, "
                         "the guest's mism= still 0",
                         last.mismatches == 0 and con.log.mismatch_counter() == 0,
                         checks.figures["pass_after_updates"])
            checks.figures["paused_cpr_exec"] = await paused_cpr_exec(
                checks, vm, con, qlog, kw, mdev=src)
            checks.figures["savevm_after_failed_cpr"] = await savevm_after_failed_cpr(
                checks, vm, con, qlog, kw)

            # Normal migration to the other instance: the state must travel.
            vm.spec = dataclasses.replace(
                vm.spec, vfio=(VfioSpec(id=DEV_ID, backend="iommufd", sysfsdev=dst),))
            mig = await one_update(checks, vm, con, qlog, kw, i=len(modes) + 1,
                                   mode="migrate", mdev=dst, hb=hb)
            checks.figures["migration"] = mig
            t = mig["traces"]
            checks.check("migrate: old QEMU saved the device state, new QEMU loaded it",
                         t["vfio_save_setup"] >= 1 and t["vfio_save_complete_precopy"] >= 1
                         and t["vfio_load_state"] >= 1,
                         {k: t[k] for k in STATE_TRACES})
            checks.check("migrate: QEMU moved the devices through STOP_COPY and RESUMING",
                         "STOP_COPY" in mig["set_state"] and "RESUMING" in mig["set_state"],
                         mig["set_state"])
            checks.check("migrate: the drivers saw STOP_COPY and RESUMING (kprobe)",
                         {"STOP_COPY", "RESUMING"} <= set(mig["kernel"]["set_state"]),
                         mig["kernel"]["set_state"])
            checks.check("migrate: the target instance carries the guest's line settings",
                         view_ok(mig["device"]), mig["device"])

            # The reset watch sees a reset when there is one.
            kw.drain()
            resets_before = reset_lines()
            cdev = mig["device"]["cdev"]
            fd = qemu_device_fd(vm.pid, cdev)
            try:
                device_reset(fd)
            finally:
                os.close(fd)
            seen = kernel_summary(kw.drain())
            seen["reset_log_lines"] = reset_lines() - resets_before
            checks.figures["reset_control"] = seen
            checks.check("control: a VFIO_DEVICE_RESET issued on purpose is seen",
                         seen["resets"] == 1 and seen["reset_log_lines"] == 1, seen)
            ok, err = last_mtty(con.log)
            checks.check("no UART error throughout", err == 0, f"mtty={ok} mtty_err={err}")
        serial = vm.paths.serial.read_text(errors="replace")
        errs = [line for line in serial.splitlines() if line.startswith("MTTY-ERR")]
        checks.check("no MTTY-ERR line on the guest console", not errs, errs[:5])
    finally:
        if vm is not None:
            await vm.shutdown()
            checks.figures["qemu_log_tail"] = vm.log_tail(30)
        for p in mdevs:
            with contextlib.suppress(OSError):
                remove_mdev(p)
        left = kw.stop()
        checks.figures["kernel_events"] = kw.events[-200:]
    checks.check("L2 QEMU gone after shutdown", not qemu_pids(), qemu_pids())
    checks.check("mtty instances removed", not any(p.exists() for p in mdevs),
                 [p.name for p in mdevs if p.exists()])
    checks.check("kprobes removed", not left, left)
    leftovers = [str(p) for p in vm.paths.root.glob("*")
                 if p.is_socket() or p.name in ("state.json", "cpr-state")]
    checks.check("L2 run directory cleaned", not leftovers, leftovers)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=5, help="of each CPR mode")
    ap.add_argument("--hb-ms", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    checks = Checks("mtty")
    checks.figures.update(updates=args.updates, hb_ms=args.hb_ms, memory=MEMORY,
                          mdev_type=MDEV_TYPE)

    async def run() -> None:
        async with asyncio.timeout(args.timeout):
            await scenario(checks, args.updates, args.hb_ms)

    return checks.finish(lambda: asyncio.run(run()))


if __name__ == "__main__":
    sys.exit(main())
