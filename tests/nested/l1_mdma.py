"""
Inside L1: a mediated device that pins guest memory (mdma) through live
updates of L2 QEMU, and why the legacy type1 path cannot do it.

    python -m nested.l1_mdma iommufd [--updates N]
    python -m nested.l1_mdma legacy EDU_BDF

mdma (images/host/mdma/mdma.c, built into the L1 kernel) is an mdev whose
kernel thread writes a DMA heartbeat into guest RAM every period with
vfio_pin_pages() + vfio_dma_rw(), counting failures (with errno) in
/sys/bus/mdev/devices/<uuid>/vendor/stats.  The test guest programs it and
reports, on each heartbeat, the last device record it saw.

The device timestamps every successful pin and header write with
ktime_get_ns() (L1's CLOCK_MONOTONIC, which runs while L2 is paused) into a
ring (debugfs mdma/<uuid>/beats).  Beside it a witness, a hard-irq hrtimer
pinned to the worker's CPU every 5 ms, records each interval in which L1
itself could not run it on time (debugfs mdma/<uuid>/witness).

iommufd: sealvm passes /dev/iommu and the mdev's vfio cdev; guest RAM is
mapped by file.  N cpr-exec then N cpr-transfer updates; for each one, over
the window from just before the update until SETTLE_RECORDS records after
it, every gap between consecutive successful pins and between consecutive
successful writes must stay within GAP_PERIODS periods -- independent of
the guest's pause.  Only the part of a gap that the witness shows L1 itself
stalled for, in that same interval on the same clock, is not held against
the device (`gap_verdict`).  Also per update: zero failures, the guest's
own mism= counter unchanged; after the last update, one complete verified
pattern pass.

legacy: QEMU opens the type1 container itself.  Its mdev CPR blocker must
refuse both modes (preflight, and QEMU's own `migrate`), the guest running
on untouched.  Then the kernel rule behind the blocker, by hand on
/dev/vfio/vfio: VFIO_DMA_UNMAP_FLAG_VADDR is EBUSY with an mdev in the
container; with only a vfio-pci device (edu) the vaddr can be invalidated,
and then the mdev group cannot join (EBUSY) until the vaddr is restored:
pinning devices never see the window.

Writes results/mdma-BACKEND.json (see l1_lib.Checks); every mdev created
is removed and every QEMU stopped, and both are checked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from sealvm import Machine, PreflightError, QMPReplyError, live_update, spec_from_dict
from sealvm.console import ConsoleFollower, ConsoleLog
from sealvm.vfio import VFIO_UPDATE_VADDR

from . import l1_mdma_type1 as t1
from .l1_lib import (
    Checks,
    QemuLog,
    bind_vfio_pci,
    iommu_group,
    qemu_pids,
    trace_args,
)
from .l1_vfio import ram_maps
from .qemu_steps import timed_events, update_steps

RUN_ROOT = Path("/run/sealvm-l2")
MDEV_TYPE = Path("/sys/class/mdev_bus/mdma/mdev_supported_types/mdma-1")
MDEV_DEVICES = Path("/sys/bus/mdev/devices")
MEMORY = 256 << 20
PATTERN_RANGE = "0x200000-0x4000000"
#: the guest programs this period (images/guest/mdma.c PERIOD_MS)
PERIOD_MS = 20
HB_MS = 20
STEP_TIMEOUT = 120.0
#: device records to see after an update before measuring it
SETTLE_RECORDS = 10
#: the device's gap between consecutive successful pins/writes, in periods
GAP_PERIODS = 2
DEBUGFS = Path("/sys/kernel/debug/mdma")
#: fault injection (images/host/mdma: every pin delayed by this many ms)
STALL_PARAM = Path("/sys/module/mdma/parameters/stall_ms")


# ------------------------------------------------------------------ mdev


def create_mdev(checks: Checks) -> str:
    uid = str(uuid.uuid4())
    (MDEV_TYPE / "create").write_text(uid)
    checks.figures["mdev"] = uid
    return uid


def remove_mdev(uid: str) -> None:
    path = MDEV_DEVICES / uid
    if path.exists():
        (path / "remove").write_text("1")


def mdev_stats(uid: str) -> dict[str, int]:
    """/sys/bus/mdev/devices/<uuid>/vendor/stats as numbers."""
    out: dict[str, int] = {}
    for line in (MDEV_DEVICES / uid / "vendor" / "stats").read_text().splitlines():
        key, _, value = line.partition(" ")
        out[key] = int(value, 0)
    return out


def failures(stats: dict[str, int]) -> int:
    return stats["pin_err"] + stats["rw_err"]


def errnos(stats: dict[str, int]) -> dict[str, int]:
    """errno name -> count, from the errno_<n> lines."""
    return {errno.errorcode.get(int(k[6:]), k[6:]): v for k, v in stats.items()
            if k.startswith("errno_")}


def delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    keys = ("ticks", "beats", "pin_ok", "pin_err", "rw_ok", "rw_err", "unmap_calls")
    return {k: b[k] - a[k] for k in keys}


# ------------------------------------------------------- guest heartbeat


def mdma_hbs(log: ConsoleLog, start: int = 0) -> list[Any]:
    return [hb for hb in log.heartbeats[start:] if "mdma" in hb.values]


def last_seen(log: ConsoleLog) -> int:
    hbs = mdma_hbs(log)
    return hbs[-1].int("mdma") if hbs else -1


def guest_view(log: ConsoleLog, start: int = 0) -> dict[str, int]:
    """What the guest reported from heartbeat index *start* on: last record,
    largest device gap in that window (us), and its error counters."""
    hbs = mdma_hbs(log, start)
    if not hbs:
        return {"seen": -1, "gap_us": -1, "lost": -1, "bad": -1, "dev_err": -1}
    last = hbs[-1]
    return {"seen": last.int("mdma"), "gap_us": max(hb.int("mdma_wgap_us") for hb in hbs),
            "max_gap_us": last.int("mdma_gap_us"), "lost": last.int("mdma_lost"),
            "bad": last.int("mdma_bad"), "dev_err": last.int("mdma_dev_err")}


async def wait_records(con: ConsoleFollower, above: int, timeout: float) -> None:
    await con.wait_for(lambda log: last_seen(log) > above, timeout)


# ------------------------------------------- device timestamps and witness


def read_beats(uid: str) -> list[tuple[int, int, int]]:
    """(seq, pin_ns, rw_ns) of the device's last successful beats, oldest
    first (debugfs mdma/<uuid>/beats; ktime_get_ns, i.e. CLOCK_MONOTONIC)."""
    out = []
    for line in (DEBUGFS / uid / "beats").read_text().splitlines():
        if not line.startswith("#"):
            seq, pin, rw = (int(x) for x in line.split())
            out.append((seq, pin, rw))
    return out


def read_witness(uid: str) -> dict[str, Any]:
    """The witness: its period, CPU, ticks, largest gap and the intervals
    (from_ns, to_ns) in which it could not run on time."""
    info: dict[str, Any] = {"stalls_list": []}
    for line in (DEBUGFS / uid / "witness").read_text().splitlines():
        a, b = line.split()
        if a.isdigit():
            info["stalls_list"].append((int(a), int(b)))
        else:
            info[a] = int(b)
    return info


def explained_ns(a: int, b: int, stalls: list[tuple[int, int]], witness_ns: int) -> int:
    """How much of the interval [a, b] the witness shows L1 itself stalled:
    for each witness interval (c, d) overlapping it, the overlap less the one
    witness period it would have waited anyway."""
    return sum(max(0, min(b, d) - max(a, c) - witness_ns) for c, d in stalls)


def gap_verdict(beats: list[tuple[int, int, int]], witness: dict[str, Any], *, t0: int,
                t1: int, period_ns: int) -> dict[str, Any]:
    """Every gap between consecutive successful pins, and between consecutive
    successful writes, over [t0, t1] (CLOCK_MONOTONIC ns): within
    GAP_PERIODS periods once the part the witness shows L1 stalled for in
    that same interval is taken off.  The ring must cover the window (a
    beat at or before t0, sequence numbers without a hole)."""
    bound = GAP_PERIODS * period_ns
    before = [b for b in beats if b[2] <= t0]
    inside = [b for b in beats if t0 < b[2] <= t1]
    window = before[-1:] + inside
    seqs = [b[0] for b in window]
    covered = bool(before) and all(y == x + 1 for x, y in zip(seqs, seqs[1:], strict=False))
    stalls = witness["stalls_list"]
    gaps: list[int] = []
    worst: dict[str, Any] = {"net_ns": -1}
    excused = []
    for x, y in zip(window, window[1:], strict=False):
        for kind, i in (("pin", 1), ("rw", 2)):
            gap = y[i] - x[i]
            net = gap - explained_ns(x[i], y[i], stalls, witness["period_ns"])
            gaps.append(gap)
            if gap > bound and net <= bound:
                excused.append({"seq": y[0], "kind": kind, "gap_ms": gap / 1e6,
                                "l1_stalled_ms": (gap - net) / 1e6})
            if net > worst["net_ns"]:
                worst = {"net_ns": net, "gap_ns": gap, "seq": y[0], "kind": kind,
                         "from_ns": x[i], "to_ns": y[i]}
    ordered = sorted(gaps)
    return {
        "ok": covered and bool(gaps) and worst["net_ns"] <= bound,
        "covered": covered, "beats": len(window), "n": len(gaps), "bound_ms": bound / 1e6,
        "p50_ms": ordered[len(ordered) // 2] / 1e6 if gaps else None,
        "max_ms": ordered[-1] / 1e6 if gaps else None,
        "max_net_ms": worst["net_ns"] / 1e6, "worst": worst, "excused": excused,
        "witness_stalls": [s for s in stalls if s[1] > t0 and s[0] < t1],
    }


def gap_detail(v: dict[str, Any]) -> str:
    return (f"n={v['n']} gaps over {v['beats']} beats, p50 {v['p50_ms']} ms, max "
            f"{v['max_ms']} ms, max net of L1 stalls {v['max_net_ms']:.1f} ms (bound "
            f"{v['bound_ms']:.0f} ms), ring covers the window: {v['covered']}, excused by "
            f"the witness: {v['excused'] or 'none'}")


def l2_spec(name: str, uid: str, backend: str) -> Any:
    return spec_from_dict({
        "name": name,
        "qemu": os.environ["SEALVM_QEMU"],
        "memory": {"size": MEMORY, "backend": "memfd"},
        "guest": {"kernel": os.environ["SEALVM_GUEST"],
                  "cmdline": f"hb_ms={HB_MS} pattern_range={PATTERN_RANGE}"},
        "vfio": [{"id": "mdma0", "sysfsdev": str(MDEV_DEVICES / uid), "backend": backend}],
        # legacy: QEMU opens /dev/vfio itself, which only an unconfined QEMU may
        "security": {"confine": backend != "legacy"},
        "extra_args": trace_args(),
    })


def check_cleanup(checks: Checks, vm: Machine, uid: str) -> None:
    checks.check("L2 QEMU gone after shutdown", not qemu_pids(), qemu_pids())
    stats = mdev_stats(uid)
    checks.check("mdma stopped when QEMU closed the device", stats["running"] == 0, stats)
    remove_mdev(uid)
    checks.check("mdev removed", not (MDEV_DEVICES / uid).exists(), uid)
    leftovers = [str(p) for p in vm.paths.root.glob("*")
                 if p.is_socket() or p.name in ("state.json", "cpr-state")]
    checks.check("L2 run directory cleaned", not leftovers, leftovers)


# -------------------------------------------------------------- iommufd


async def scenario_iommufd(checks: Checks, updates: int) -> None:
    uid = create_mdev(checks)
    checks.check("mdma mdev created", (MDEV_DEVICES / uid).is_dir(), uid)
    vm = Machine(l2_spec("l2-mdma", uid, "iommufd"), run_root=RUN_ROOT)
    try:
        await vm.launch(timeout=STEP_TIMEOUT)
        qlog = QemuLog(vm.paths.qemu_log)
        async with ConsoleFollower(vm.paths.serial) as con:
            await wait_records(con, 2 * SETTLE_RECORDS, STEP_TIMEOUT)
            maps = ram_maps(qlog.new_events())
            checks.check("guest RAM mapped by file (iommufd_backend_map_file_dma)",
                         bool(maps["file"]) and not maps["vaddr"], maps)
            stats0 = mdev_stats(uid)
            checks.figures["stats_at_start"] = stats0
            checks.check("device heartbeat reaches guest RAM before the updates",
                         stats0["beats"] > 0 and failures(stats0) == 0
                         and last_seen(con.log) > 0, f"seen {last_seen(con.log)}, {stats0}")
            rows: list[dict[str, Any]] = []
            modes = ["cpr-exec"] * updates + ["cpr-transfer"] * updates
            for i, mode in enumerate(modes, 1):
                rows.append(await one_update(checks, vm, con, qlog, uid, i, mode))
            checks.figures["updates"] = rows
            last = await con.wait_full_pass(STEP_TIMEOUT)
            checks.check("after the last update: a complete pattern pass verified, "
                         "the guest's mism= still 0",
                         last.mismatches == 0 and con.log.mismatch_counter() == 0,
                         f"pass gen {last.gen} mism {last.mismatches}, "
                         f"heartbeat mism {con.log.mismatch_counter()}")
            final = mdev_stats(uid)
            checks.figures["stats_at_end"] = final
            view = guest_view(con.log)
            checks.figures["guest_at_end"] = view
            checks.check("no mdma failure in the whole run (sysfs)",
                         failures(final) == 0 and not errnos(final),
                         f"pin_err={final['pin_err']} rw_err={final['rw_err']} "
                         f"errnos={errnos(final)}")
            checks.check("guest saw every device record (none lost, none torn)",
                         view["lost"] == 0 and view["bad"] == 0 and view["dev_err"] == 0,
                         view)
            checks.check("no unmap reached the device while it ran",
                         final["unmap_calls"] == stats0["unmap_calls"],
                         f"{stats0['unmap_calls']} -> {final['unmap_calls']}")
            checks.check("guest RAM pattern intact throughout, no reboot",
                         not con.log.mismatches and con.log.reboots == 0,
                         f"mismatches={con.log.mismatched_words} reboots={con.log.reboots}")
    finally:
        await vm.shutdown()
        checks.figures["qemu_log_tail"] = vm.log_tail(30)
        with contextlib.suppress(OSError):
            checks.figures["stats_after_shutdown"] = mdev_stats(uid)
        check_cleanup(checks, vm, uid)


async def one_update(checks: Checks, vm: Machine, con: ConsoleFollower, qlog: QemuLog,
                     uid: str, i: int, mode: str) -> dict[str, Any]:
    start = len(con.log.heartbeats)
    before = mdev_stats(uid)
    seen0 = last_seen(con.log)
    mism0 = con.log.mismatch_counter()
    t0 = time.monotonic_ns()  # CLOCK_MONOTONIC: the device's clock
    report = await live_update(vm, mode=mode, heartbeat_interval=HB_MS / 1000,
                               timeout=STEP_TIMEOUT)
    resumed = last_seen(con.log)
    await wait_records(con, max(resumed, seen0) + SETTLE_RECORDS, STEP_TIMEOUT)
    t1 = time.monotonic_ns()
    after = mdev_stats(uid)
    gaps = gap_verdict(read_beats(uid), read_witness(uid), t0=t0, t1=t1,
                       period_ns=after["period_ms"] * 1_000_000)
    view = guest_view(con.log, start)
    qlog.new_events()
    steps = update_steps(timed_events(qlog.text))
    pause = report.pause_guest if report.pause_guest is not None else -1.0
    row: dict[str, Any] = {
        "update": i, "mode": mode, "pid": report.pid_after, "pause_qmp": report.pause_qmp,
        "pause_guest": report.pause_guest, "total": report.total, "phases": report.phases,
        "steps": steps, "guest_gap_ms": view["gap_us"] / 1000, "seen_before": seen0,
        "seen_after": view["seen"], "device": delta(before, after), "errnos": errnos(after),
        "gaps": gaps, "mism_before": mism0, "mism_after": con.log.mismatch_counter(),
    }
    print(f"update {i} {mode}: pause guest {pause * 1000:.0f} ms, qmp "
          f"{(report.pause_qmp or -1) * 1000:.0f} ms, device gaps {gap_detail(gaps)}, "
          f"failures {failures(after) - failures(before)}", flush=True)
    checks.check(f"update {i} ({mode}): QEMU's steps in the pause read from its log",
                 "total" in steps and "load" in steps, steps)
    checks.check(f"update {i} ({mode}): device kept writing",
                 view["seen"] > seen0 + SETTLE_RECORDS and row["device"]["beats"] > 0,
                 f"seen {seen0} -> {view['seen']}, {row['device']}")
    checks.check(f"update {i} ({mode}): zero mdma failures",
                 failures(after) == failures(before),
                 f"{row['device']} errnos={row['errnos']}")
    checks.check(f"update {i} ({mode}): every gap between successful pins/writes <= "
                 f"{GAP_PERIODS} periods (device clock; L1's own stalls per the witness aside)",
                 gaps["ok"], gap_detail(gaps))
    checks.check(f"update {i} ({mode}): guest lost no record",
                 view["lost"] == 0 and view["bad"] == 0, view)
    checks.check(f"update {i} ({mode}): the guest's own mism= counter unchanged",
                 row["mism_after"] == row["mism_before"] == 0,
                 f"mism {row['mism_before']} -> {row['mism_after']}")
    return row


# --------------------------------------------------------------- legacy


async def scenario_legacy(checks: Checks, edu_bdf: str) -> None:
    uid = create_mdev(checks)
    checks.check("mdma mdev created", (MDEV_DEVICES / uid).is_dir(), uid)
    try:
        await qemu_refuses(checks, uid)
        kernel_rule(checks, uid, edu_bdf)
        stall_control(checks, uid)
    finally:
        remove_mdev(uid)
    checks.check("mdev removed", not (MDEV_DEVICES / uid).exists(), uid)


async def qemu_refuses(checks: Checks, uid: str) -> None:
    vm = Machine(l2_spec("l2-mdma-legacy", uid, "legacy"), run_root=RUN_ROOT)
    try:
        await vm.launch(timeout=STEP_TIMEOUT)
        async with ConsoleFollower(vm.paths.serial) as con:
            await wait_records(con, 2 * SETTLE_RECORDS, STEP_TIMEOUT)
            stats0 = mdev_stats(uid)
            checks.check("device heartbeat reaches guest RAM (type1, by vaddr)",
                         stats0["beats"] > 0 and failures(stats0) == 0, stats0)
            for mode in ("cpr-exec", "cpr-transfer"):
                try:
                    await live_update(vm, mode=mode, heartbeat_interval=HB_MS / 1000,
                                      timeout=STEP_TIMEOUT)
                except PreflightError as exc:
                    checks.figures[f"preflight_{mode}"] = exc.reasons
                    checks.check(f"{mode} refused before the pause: QEMU's mdev CPR blocker",
                                 any("CPR does not support vfio mdev" in r
                                     for r in exc.reasons), exc.reasons)
                else:
                    checks.check(f"{mode} refused before the pause: QEMU's mdev CPR blocker",
                                 False, "the update went through")
            # QEMU itself, without sealvm's preflight: migrate in cpr-exec mode.
            # The exec command does not exist: were the blocker missing, the
            # exec would fail and QEMU resume (migration/cpr-exec.c).
            await vm.execute("migrate-set-parameters", {
                "mode": "cpr-exec", "cpr-exec-command": ["/nonexistent/qemu"]})
            try:
                await vm.execute("migrate", {"uri": f"file:{vm.paths.root}/never"})
            except QMPReplyError as exc:
                checks.figures["qmp_migrate_error"] = str(exc)
                checks.check("QEMU refuses migrate in cpr-exec mode (mdev blocker)",
                             "CPR does not support vfio mdev" in str(exc), exc)
            else:
                checks.check("QEMU refuses migrate in cpr-exec mode (mdev blocker)", False,
                             "migrate was accepted")
            finally:
                await vm.execute("migrate-set-parameters", {"mode": "normal"})
            seen = last_seen(con.log)
            await wait_records(con, seen + SETTLE_RECORDS, STEP_TIMEOUT)
            stats1 = mdev_stats(uid)
            checks.check("guest and device run on after the refusals",
                         await vm.status() == "running" and failures(stats1) == 0
                         and stats1["beats"] > stats0["beats"],
                         f"status {await vm.status()}, {delta(stats0, stats1)}")
            checks.figures["legacy_l2_stats"] = stats1
    finally:
        await vm.shutdown()
    checks.check("L2 QEMU gone after shutdown", not qemu_pids(), qemu_pids())
    stats = mdev_stats(uid)
    # not a check (timing): pins between QEMU's mm teardown and device close
    checks.figures["legacy_l2_shutdown_errnos"] = errnos(stats)
    checks.check("mdma stopped when QEMU closed the device", stats["running"] == 0, stats)


def errno_of(fn: Any, *args: Any, **kwargs: Any) -> int:
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        return exc.errno or 0
    return 0


def run_mdma(bar: t1.MdmaBar, buf: t1.DmaBuffer, iova: int, seconds: float,
             period_ms: int = 10) -> int:
    """Let the device write into *buf* for *seconds* (the measurement
    window); the last seq it wrote."""
    bar.start(iova=iova, length=4096, period_ms=period_ms)
    time.sleep(seconds)
    return buf.u64(8) if buf.u64(0) == t1.MDMA_MAGIC else 0


def kernel_rule(checks: Checks, uid: str, edu_bdf: str) -> None:
    """type1 keeps pinning devices out of the VADDR window, by hand."""
    bind_vfio_pci(edu_bdf)
    edu_group = f"/dev/vfio/{iommu_group(edu_bdf)}"
    mdev_group = f"/dev/vfio/{(MDEV_DEVICES / uid / 'iommu_group').resolve().name}"
    iova, size = 0x100000, 0x10000
    stats0 = mdev_stats(uid)
    evidence: dict[str, Any] = {"edu_group": edu_group, "mdev_group": mdev_group}
    checks.figures["kernel_rule"] = evidence

    # 1. mdev in the container, pinning: the vaddr cannot be invalidated.
    buf = t1.DmaBuffer(size)
    try:
        with t1.Fds() as fds:
            c = fds.open("/dev/vfio/vfio")
            g = fds.open(mdev_group)
            t1.group_set_container(g, c)
            t1.set_iommu(c)
            evidence["update_vaddr_ext_with_mdev"] = t1.check_extension(c, VFIO_UPDATE_VADDR)
            t1.dma_map(c, vaddr=buf.vaddr, iova=iova, size=size)
            dev = fds.add(t1.group_get_device_fd(g, uid))
            bar = t1.MdmaBar.of(dev)
            seq = run_mdma(bar, buf, iova, 0.5)
            evidence["mdev_container_seq"] = seq
            checks.check("type1: mdma pins and writes through a vaddr mapping", seq > 0,
                         f"seq {seq}")
            err = errno_of(t1.dma_unmap_vaddr, c, iova=iova, size=size)
            evidence["unmap_vaddr_with_mdev"] = errno.errorcode.get(err, str(err))
            checks.check("type1: VFIO_DMA_UNMAP_FLAG_VADDR with an mdev in the container "
                         "-> EBUSY", err == errno.EBUSY, evidence["unmap_vaddr_with_mdev"])
            checks.check("type1: VFIO_UPDATE_VADDR not offered while an mdev is attached",
                         evidence["update_vaddr_ext_with_mdev"] == 0,
                         evidence["update_vaddr_ext_with_mdev"])
            bar.stop()
    finally:
        buf.close()

    # 2. only the vfio-pci device: the window opens, and the mdev is kept out.
    buf = t1.DmaBuffer(size)
    buf2 = buf.another_view()       # same pages, new address (as after exec)
    try:
        with t1.Fds() as fds:
            c = fds.open("/dev/vfio/vfio")
            ge = fds.open(edu_group)
            t1.group_set_container(ge, c)
            t1.set_iommu(c)
            evidence["update_vaddr_ext_pci_only"] = t1.check_extension(c, VFIO_UPDATE_VADDR)
            t1.dma_map(c, vaddr=buf.vaddr, iova=iova, size=size)
            t1.dma_unmap_vaddr(c, iova=iova, size=size)
            checks.check("type1, vfio-pci only: VFIO_DMA_UNMAP_FLAG_VADDR accepted "
                         "(vaddr invalid: the window)",
                         evidence["update_vaddr_ext_pci_only"] == 1,
                         f"VFIO_UPDATE_VADDR={evidence['update_vaddr_ext_pci_only']}")
            gm = fds.open(mdev_group)
            err = errno_of(t1.group_set_container, gm, c)
            evidence["attach_mdev_in_window"] = errno.errorcode.get(err, str(err))
            checks.check("type1: attaching the mdev group while vaddrs are invalid -> EBUSY",
                         err == errno.EBUSY, evidence["attach_mdev_in_window"])
            t1.dma_remap_vaddr(c, vaddr=buf2.vaddr, iova=iova, size=size)
            err = errno_of(t1.group_set_container, gm, c)
            evidence["attach_mdev_after_remap"] = errno.errorcode.get(err, "success")
            if not checks.check("type1: after VFIO_DMA_MAP_FLAG_VADDR the mdev group attaches",
                                err == 0, evidence["attach_mdev_after_remap"]):
                return
            dev = fds.add(t1.group_get_device_fd(gm, uid))
            bar = t1.MdmaBar.of(dev)
            seq = run_mdma(bar, buf2, iova, 0.5)
            evidence["after_remap_seq"] = seq
            checks.check("type1: mdma writes to the new vaddr after the remap",
                         seq > 0 and buf.u64(8) >= seq, f"seq {seq}")
            err = errno_of(t1.dma_unmap_vaddr, c, iova=iova, size=size)
            evidence["unmap_vaddr_after_attach"] = errno.errorcode.get(err, str(err))
            checks.check("type1: and the window cannot be reopened (EBUSY)",
                         err == errno.EBUSY, evidence["unmap_vaddr_after_attach"])
            bar.stop()
            t1.dma_unmap(c, iova=iova, size=size)
    finally:
        buf.close()
        buf2.close()
    stats1 = mdev_stats(uid)
    evidence["device"] = delta(stats0, stats1)
    evidence["errnos"] = errnos(stats1)
    checks.check("mdma counted no failure in these sequences",
                 failures(stats1) == failures(stats0), f"{delta(stats0, stats1)}")
    checks.check("mdma stopped when the device fd closed", stats1["running"] == 0, stats1)
    mapper_gone(checks, uid, mdev_group, evidence)


def stall_control(checks: Checks, uid: str, seconds: float = 1.5) -> None:
    """Negative control of the gap check (`gap_verdict`): with every pin
    delayed STALL_MS (fault injection in the driver), the gaps between
    successful pins/writes exceed GAP_PERIODS periods, and the witness --
    which kept running -- must excuse none of it.  Driven by hand through
    type1 (the device, not the container, is what is measured)."""
    stall_ms = 100
    iova, size = 0x100000, 0x10000
    mdev_group = f"/dev/vfio/{(MDEV_DEVICES / uid / 'iommu_group').resolve().name}"
    buf = t1.DmaBuffer(size)
    first = mdev_stats(uid)["beats"]
    STALL_PARAM.write_text(f"{stall_ms}\n")
    try:
        with t1.Fds() as fds:
            c = fds.open("/dev/vfio/vfio")
            g = fds.open(mdev_group)
            t1.group_set_container(g, c)
            t1.set_iommu(c)
            t1.dma_map(c, vaddr=buf.vaddr, iova=iova, size=size)
            bar = t1.MdmaBar.of(fds.add(t1.group_get_device_fd(g, uid)))
            run_mdma(bar, buf, iova, seconds, period_ms=PERIOD_MS)
            end = time.monotonic_ns()
            bar.stop()
            t1.dma_unmap(c, iova=iova, size=size)
    finally:
        STALL_PARAM.write_text("0\n")
        buf.close()
    beats = [b for b in read_beats(uid) if b[0] > first]
    verdict = gap_verdict(beats, read_witness(uid), t0=beats[0][2] if beats else end, t1=end,
                          period_ns=PERIOD_MS * 1_000_000)
    checks.figures["stall_control"] = {"stall_ms": stall_ms, "verdict": verdict}
    checks.check(f"control: pins delayed {stall_ms} ms fail the gap check, the witness "
                 "excuses none of it",
                 verdict["covered"] and verdict["n"] >= 4 and not verdict["ok"]
                 and verdict["max_net_ms"] >= stall_ms and not verdict["excused"],
                 gap_detail(verdict))
    checks.check("control: stall_ms back to 0", STALL_PARAM.read_text().strip() == "0",
                 STALL_PARAM.read_text().strip())


def mapper_gone(checks: Checks, uid: str, mdev_group: str, evidence: dict[str, Any]) -> None:
    """3. type1 pins through the mm of the process that mapped: once that mm
    is gone (exec replaces it; here the mapping child exits), every pin
    fails, although the memory (a memfd we still hold) is there."""
    iova, size = 0x100000, 0x10000
    buf = t1.DmaBuffer(size)
    try:
        with t1.Fds() as fds:
            c = fds.open("/dev/vfio/vfio")
            g = fds.open(mdev_group)
            t1.group_set_container(g, c)
            t1.set_iommu(c)
            child = buf.another_view()
            pid = os.fork()
            if pid == 0:  # the "old QEMU": maps its view, then its mm goes away
                try:
                    t1.dma_map(c, vaddr=child.vaddr, iova=iova, size=size)
                except BaseException:
                    os._exit(1)
                os._exit(0)
            child.close()
            _, status = os.waitpid(pid, 0)
            dev = fds.add(t1.group_get_device_fd(g, uid))
            bar = t1.MdmaBar.of(dev)
            before = mdev_stats(uid)
            seq = run_mdma(bar, buf, iova, 0.3)
            bar.stop()
            after = mdev_stats(uid)
            t1.dma_unmap(c, iova=iova, size=size)
    finally:
        buf.close()
    new = {k: after.get(k, 0) - before.get(k, 0) for k in after if k.startswith("errno_")}
    evidence["mapper_gone"] = {"child_status": status, "seq": seq,
                               "device": delta(before, after),
                               "errnos": {errno.errorcode.get(int(k[6:]), k): v
                                          for k, v in new.items() if v}}
    checks.check("type1: pins fail once the mapping process's mm is gone (ENODEV)",
                 status == 0 and seq == 0 and after["pin_err"] > before["pin_err"]
                 and after["pin_ok"] == before["pin_ok"]
                 and set(evidence["mapper_gone"]["errnos"]) == {"ENODEV"},
                 evidence["mapper_gone"])


# ------------------------------------------------------------------ main


def summary_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """The measured figures, for the L0 terminal summary."""
    lines: list[str] = []
    res = results.get("mdma-iommufd")
    if res:
        lines.append("mdma over iommufd (device heartbeat every 20 ms, L1 kernel worker):")
        for u in res["figures"].get("updates", []):
            pg = u["pause_guest"] if u["pause_guest"] is not None else -1
            pq = u["pause_qmp"] if u["pause_qmp"] is not None else -1
            g = u["gaps"]
            lines.append(f"  update {u['update']} {u['mode']}: pause guest {pg * 1000:.0f} ms, "
                         f"QMP {pq * 1000:.0f} ms; device gaps n={g['n']} p50 "
                         f"{g['p50_ms'] or -1:.1f} max {g['max_ms'] or -1:.1f} ms, net of L1 "
                         f"stalls {g['max_net_ms']:.1f} ms (bound {g['bound_ms']:.0f}), "
                         f"witness-excused {len(g['excused'])}; failures pin "
                         f"{u['device']['pin_err']} rw {u['device']['rw_err']}")
        end = res["figures"].get("stats_at_end")
        if end:
            lines.append(f"  whole run: beats {end['beats']}, pin_ok {end['pin_ok']}, "
                         f"rw_ok {end['rw_ok']}, failures {failures(end)}, "
                         f"device max gap {end['max_gap_ns'] / 1e6:.1f} ms")
    res = results.get("mdma-legacy")
    if res:
        ev = res["figures"].get("kernel_rule", {})
        lines.append("mdma over legacy type1: " + "; ".join(
            f"{k}={v}" for k, v in ev.items() if k in (
                "unmap_vaddr_with_mdev", "attach_mdev_in_window", "unmap_vaddr_after_attach")))
        ctl = res["figures"].get("stall_control")
        if ctl:
            v = ctl["verdict"]
            lines.append(f"  control, pins delayed {ctl['stall_ms']} ms: max gap "
                         f"{v['max_ms'] or -1:.1f} ms, net {v['max_net_ms']:.1f} ms > bound "
                         f"{v['bound_ms']:.0f} ms: check fails as it must ({not v['ok']})")
        gone = ev.get("mapper_gone")
        if gone:
            lines.append(f"  type1 pins after the mapping process's mm is gone: "
                         f"{gone['device']['pin_err']} failed, errnos {gone['errnos']}")
        for mode in ("cpr-exec", "cpr-transfer"):
            for r in res["figures"].get(f"preflight_{mode}", []):
                if "mdev" in r:
                    lines.append(f"  {mode} refused: {r}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("backend", choices=("iommufd", "legacy"))
    ap.add_argument("edu_bdf", nargs="?", help="a vfio-pci device (legacy)")
    ap.add_argument("--updates", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=800.0)
    args = ap.parse_args()
    checks = Checks(f"mdma-{args.backend}")
    checks.figures.update(backend=args.backend, period_ms=PERIOD_MS, hb_ms=HB_MS)

    async def run() -> None:
        async with asyncio.timeout(args.timeout):
            if not MDEV_TYPE.is_dir():
                raise RuntimeError(f"no {MDEV_TYPE}: kernel without CONFIG_SAMPLE_VFIO_MDEV_MDMA")
            if args.backend == "iommufd":
                await scenario_iommufd(checks, args.updates)
            else:
                if not args.edu_bdf:
                    raise SystemExit("legacy needs EDU_BDF")
                await scenario_legacy(checks, args.edu_bdf)

    return checks.finish(lambda: asyncio.run(run()))


if __name__ == "__main__":
    sys.exit(main())
