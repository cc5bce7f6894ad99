"""
Inside L1: an assigned edu keeps DMA-ing through live updates of L2 QEMU.

    python -m nested.l1_vfio BACKEND BDF [--updates N] [--mode cpr-exec]
                             [--hb-ms MS] [--stock-qemu]

BACKEND is ``iommufd`` (sealvm opens /dev/iommu and the vfio cdev and passes
the fds) or ``legacy`` (QEMU opens the type1 container and group itself).
The scenario binds BDF to vfio-pci, starts L2 -- our QEMU (TCG) running the
sealvm test guest with the device assigned, guest RAM a sealed memfd --
through `sealvm.Machine`, and live-updates it N times with
`sealvm.live_update`.  The guest's edu exerciser loops DMA
RAM -> device -> RAM and reports ``dma=<ok> dma_err=<failed>`` on each
heartbeat; the pattern task verifies guest RAM.

Observed, not assumed (QEMU trace events in L2's qemu.log): how guest RAM
was handed to the IOMMU at start (by file or by vaddr), what each update
did (CHANGE_PROCESS, new maps), and which VFIO fds QEMU holds.

DMA around each pause, from the guest's own heartbeat counters
(``dma_iss``/``dma_fin`` transfers, ``dma_dur_us`` of the last one): the
pause is the largest gap between heartbeats as they reached the log; H_b
is the last heartbeat before it, H_a the first after.  DMA must complete
within a few heartbeats of H_a (a transfer: ``ceil(100 ms / hb) + 1``; a
verified round trip: twice that), and in each run at least one transfer
must have been issued before STOP and completed after RESUME: in flight at
H_b (dma_iss > dma_fin: issued before the last heartbeat before STOP) and
seen finished only at H_a or later.

Whether edu (emulated by L0, on a clock that never stops) finished that
transfer after STOP, rather than between H_b and STOP, is shown where the
guest's HPET (L2's virtual clock: runs with L1's while L2 runs, stops while
it is paused) measured it shorter than SPAN_MS: the rest of its 100 ms went
by inside the pause.  Reported, not required: after a cpr-exec the first
polls of the new QEMU's cold TCG come late, so such a transfer often
measures longer.  The clock assumption behind it is checked in the same
run: every transfer away from a pause must measure >= NORMAL_MIN_MS.

Writes results/vfio-BACKEND.json (see l1_lib.Checks).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from sealvm import Machine, QMPReplyError, live_update, spec_from_dict
from sealvm.console import ConsoleFollower, ConsoleLog, Heartbeat

from .l1_lib import (
    Checks,
    QemuLog,
    bind_vfio_pci,
    count_events,
    failed_cpr_exec,
    iommu_group,
    pci_driver,
    qemu_pids,
    trace_args,
    vfio_cdevs,
)
from .qemu_steps import timed_events, update_steps

RUN_ROOT = Path("/run/sealvm-l2")
MEMORY = 256 << 20
#: The pattern task's range: 62 MiB above the image (whose .bss holds the
#: edu DMA pages), a full pass every few seconds nested.
PATTERN_RANGE = "0x200000-0x4000000"
#: DMA round trips to see before the first update.
DMA_WARMUP = 3
STEP_TIMEOUT = 120.0
#: one edu transfer, on L0's virtual clock (hw/misc/edu.c)
EDU_TRANSFER_MS = 100
#: a transfer measured shorter than this by the guest spanned a pause
SPAN_MS = 90
#: ... provided transfers away from any pause measure at least this
NORMAL_MIN_MS = 95

_MAP = re.compile(r"iova=0x([0-9a-f]+) size=0x([0-9a-f]+).*\((-?\d+)\)")
_REGION = re.compile(r"0x([0-9a-f]+) - 0x([0-9a-f]+)")


def last_dma(log: ConsoleLog) -> tuple[int, int]:
    hbs = [hb for hb in log.heartbeats if "dma" in hb.values]
    if not hbs:
        return -1, -1
    return hbs[-1].int("dma"), hbs[-1].int("dma_err")


async def wait_dma(con: ConsoleFollower, above: int, timeout: float) -> float:
    """Wait for a heartbeat with dma > *above*; returns the wait (s)."""
    t = time.monotonic()
    await con.wait_for(lambda log: last_dma(log)[0] > above, timeout)
    return time.monotonic() - t


def transfer_bound(hb_ms: int) -> int:
    """Heartbeats after resume within which a transfer must finish."""
    return math.ceil(EDU_TRANSFER_MS / hb_ms) + 1


def round_trip_bound(hb_ms: int) -> int:
    """Heartbeats after resume within which a verified round trip must end."""
    return 2 * transfer_bound(hb_ms)


def dma_around_pause(hbs: list[Heartbeat], hb_ms: int) -> dict[str, Any]:
    """DMA across the pause in *hbs* (the largest host-time gap between
    consecutive heartbeats), from the guest's own counters."""
    if len(hbs) < 2:
        return {"found": False, "heartbeats": len(hbs)}
    b = pause_index(hbs)
    hb_b, hb_a = hbs[b], hbs[b + 1]
    fin_b, iss_b, dma_b = hb_b.int("dma_fin", -1), hb_b.int("dma_iss", -1), hb_b.int("dma")
    after = hbs[b + 1:]
    fin_at = next((k for k, hb in enumerate(after) if hb.int("dma_fin", -1) > fin_b), None)
    dma_at = next((k for k, hb in enumerate(after) if hb.int("dma") > dma_b), None)
    # the transfer in flight at H_b, if the next completion seen is it alone
    dur_us = (after[fin_at].int("dma_dur_us") if fin_at is not None
              and after[fin_at].int("dma_fin") == fin_b + 1 else None)
    return {
        "found": True, "pause_s": hb_a.host_time - hb_b.host_time,
        "hb_before": hb_b.seq, "hb_after": hb_a.seq,
        "before": {k: hb_b.int(k, -1) for k in ("dma", "dma_err", "dma_iss", "dma_fin")},
        "after": {k: hb_a.int(k, -1) for k in ("dma", "dma_err", "dma_iss", "dma_fin")},
        "heartbeats_after": len(after),
        # heartbeats from H_a (0 = H_a itself) until a transfer / a round trip ended
        "transfer_done_at": fin_at, "round_trip_done_at": dma_at,
        "in_flight_transfer_us": dur_us,
        # issued before STOP (in flight at H_b), seen finished after RESUME
        "in_flight_across": bool(iss_b > fin_b >= 0 and fin_at is not None),
        # ... and the device finished it after STOP: part of its 100 ms went
        # by while the guest's clock stood still
        "device_done_after_stop": bool(iss_b > fin_b >= 0 and dur_us is not None
                                       and 0 < dur_us < SPAN_MS * 1000),
        "dma_err_delta": after[-1].int("dma_err") - hb_b.int("dma_err"),
    }


def pause_index(hbs: list[Heartbeat]) -> int:
    """k such that the largest host-time gap is between hbs[k] and hbs[k + 1]."""
    return max(range(len(hbs) - 1), key=lambda k: hbs[k + 1].host_time - hbs[k].host_time)


def normal_transfers_us(hbs: list[Heartbeat], pauses: list[int], hb_ms: int) -> list[int]:
    """Durations of transfers that ended away from the pauses (heartbeat seqs
    of the first heartbeat after each): one transfer between two heartbeats,
    not within transfer_bound(hb_ms) heartbeats after a pause."""
    out = []
    for prev, hb in zip(hbs, hbs[1:], strict=False):
        if hb.int("dma_fin", -1) != prev.int("dma_fin", -1) + 1:
            continue
        if any(0 <= hb.seq - p <= transfer_bound(hb_ms) + 1 for p in pauses):
            continue
        out.append(hb.int("dma_dur_us"))
    return out


def ram_maps(events: list[tuple[str, str]]) -> dict[str, list[list[int]]]:
    """Successful mappings of guest-RAM IOVAs (< MEMORY), by mechanism."""
    out: dict[str, list[list[int]]] = {"file": [], "vaddr": [], "listener": []}
    for name, rest in events:
        if name in ("iommufd_backend_map_file_dma", "iommufd_backend_map_dma"):
            m = _MAP.search(rest)
            if m and int(m.group(3)) == 0 and int(m.group(1), 16) < MEMORY:
                kind = "file" if name.endswith("file_dma") else "vaddr"
                out[kind].append([int(m.group(1), 16), int(m.group(2), 16)])
        elif name == "vfio_listener_region_add_ram":
            r = _REGION.search(rest)
            if r and int(r.group(1), 16) < MEMORY:
                out["listener"].append([int(r.group(1), 16), int(r.group(2), 16)])
    return out


def vfio_fds(pid: int) -> list[str]:
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("/dev/vfio", "/dev/iommu")):
            found.append(target)
    return sorted(found)


async def qmp_dma_view(vm: Machine) -> dict[str, Any] | None:
    """VFIO containers and how they map guest RAM (ram0), from QEMU's own
    ``x-query-cpr-memory`` (our series); None when QEMU lacks the command."""
    try:
        info = await vm.execute("x-query-cpr-memory")
    except QMPReplyError as exc:
        if "CommandNotFound" in str(exc):
            return None
        raise
    ram = {b["name"]: b for b in info["ram-blocks"]}
    view: dict[str, Any] = {"ram0_inode": ram.get("ram0", {}).get("inode"), "containers": []}
    for c in info["vfio-containers"]:
        maps = [m for m in c["mappings"] if m["memory-region"] == "ram0"]
        view["containers"].append({
            "backend": c["backend"],
            "ram0_modes": sorted({m["mode"] for m in maps}),
            "ram0_bytes": sum(m["size"] for m in maps),
            "ram0_inodes": sorted({m["inode"] for m in maps if "inode" in m}),
            "cpr_blockers": c["cpr-blockers"],
        })
    return view


def check_qmp_view(checks: Checks, name: str, view: dict[str, Any] | None, backend: str,
                   stock_qemu: bool) -> None:
    """QEMU's own view of the mappings; our QEMU must have the command."""
    if view is None and stock_qemu:
        return
    checks.check(name, view is not None and qmp_view_ok(view, backend),
                 view if view is not None else "x-query-cpr-memory is missing from our QEMU")


def qmp_view_ok(view: dict[str, Any], backend: str) -> bool:
    """One container of *backend* maps all of ram0, by file (iommufd, from the
    RAM memfd itself) or by vaddr (legacy), with no CPR blocker."""
    if len(view["containers"]) != 1:
        return False
    c = view["containers"][0]
    if c["backend"] != backend or c["cpr_blockers"] or c["ram0_bytes"] < MEMORY:
        return False
    if backend == "iommufd":
        return bool(c["ram0_modes"] == ["file"] and c["ram0_inodes"] == [view["ram0_inode"]])
    return bool(c["ram0_modes"] == ["vaddr"])


async def mapping_records(vm: Machine) -> list[tuple[str, int, int, str]]:
    """Every DMA mapping record of every container (x-query-cpr-memory)."""
    info = await vm.execute("x-query-cpr-memory")
    return [(c["backend"], m["iova"], m["size"], m["mode"])
            for c in info["vfio-containers"] for m in c["mappings"]]


async def failed_cpr_exec_then_normal(vm: Machine) -> list[str]:
    """`failed_cpr_exec`, then the mode parameter back to normal.  Type1 has
    unmapped the vaddrs in pre_save and maps every section again."""
    seen = await failed_cpr_exec(vm, STEP_TIMEOUT)
    await vm.execute("migrate-set-parameters", {"mode": "normal"})
    return seen


async def scenario(checks: Checks, backend: str, bdf: str, updates: int, mode: str,
                   hb_ms: int, stock_qemu: bool = False) -> None:
    bind_vfio_pci(bdf)
    driver, cdevs = pci_driver(bdf), vfio_cdevs(bdf)
    checks.check("edu bound to vfio-pci, with a vfio cdev", driver == "vfio-pci" and bool(cdevs),
                 f"{bdf}: driver {driver}, group {iommu_group(bdf)}, cdevs {cdevs}")
    spec = spec_from_dict({
        "name": f"l2-{backend}",
        "qemu": os.environ["SEALVM_QEMU"],
        "memory": {"size": MEMORY, "backend": "memfd"},
        "guest": {"kernel": os.environ["SEALVM_GUEST"],
                  "cmdline": f"hb_ms={hb_ms} pattern_range={PATTERN_RANGE}"},
        "vfio": [{"id": "edu0", "host": bdf, "backend": backend}],
        # legacy: QEMU opens /dev/vfio itself, which only an unconfined QEMU may
        "security": {"confine": backend != "legacy"},
        "extra_args": trace_args(),
    })
    vm = Machine(spec, run_root=RUN_ROOT)
    hb = hb_ms / 1000
    t0 = time.monotonic()
    await vm.launch(timeout=STEP_TIMEOUT)
    try:
        checks.figures["l2_start_qmp"] = time.monotonic() - t0
        assert vm.pid is not None
        pid = vm.pid
        qlog = QemuLog(vm.paths.qemu_log)
        async with ConsoleFollower(vm.paths.serial) as con:
            await wait_dma(con, 0, STEP_TIMEOUT)
            checks.figures["l2_start_first_dma"] = time.monotonic() - t0
            await wait_dma(con, DMA_WARMUP - 1, STEP_TIMEOUT)
            fds = vfio_fds(pid)
            checks.figures["vfio_fds"] = fds
            if backend == "iommufd":
                checks.check("L2 holds /dev/iommu and the vfio cdev (passed by sealvm)",
                             "/dev/iommu" in fds and any("/devices/vfio" in f for f in fds),
                             fds)
            else:
                checks.check("L2 holds the type1 container and the group",
                             "/dev/vfio/vfio" in fds and "/dev/iommu" not in fds, fds)
            start = ram_maps(qlog.new_events())
            checks.figures["maps_at_start"] = start
            if backend == "iommufd":
                checks.check("guest RAM mapped by file (iommufd_backend_map_file_dma)",
                             bool(start["file"]) and not start["vaddr"], start)
            else:
                checks.check("guest RAM mapped by vaddr (type1, no iommufd)",
                             bool(start["listener"]) and not start["file"]
                             and not start["vaddr"], start)
            view = await qmp_dma_view(vm)
            checks.figures["qmp_view_at_start"] = view
            check_qmp_view(checks, f"x-query-cpr-memory: ram0 mapped by "
                           f"{'file' if backend == 'iommufd' else 'vaddr'}",
                           view, backend, stock_qemu)
            other_pauses: list[int] = []  # heartbeat seqs after pauses of no update
            if backend == "legacy" and not stock_qemu:
                # v1 tracked the remaps of the failure path as new mappings.
                records = await mapping_records(vm)
                hb_before = con.log.heartbeats[-1].seq
                seen = await failed_cpr_exec_then_normal(vm)
                # it paused the guest too: no transfer ending from just before
                # it to shortly after it is "normal"
                await con.wait_heartbeats(1, STEP_TIMEOUT)
                other_pauses += range(hb_before, con.log.heartbeats[-1].seq + 1)
                after = await mapping_records(vm)
                before_dma, _ = last_dma(con.log)
                await wait_dma(con, before_dma + 2, STEP_TIMEOUT)
                checks.figures["failed_cpr_exec"] = {
                    "migration": seen, "records_before": len(records),
                    "records_after": len(after), "status": await vm.status()}
                checks.check("failed cpr-exec: the migration failed, the VM runs on, "
                             "DMA goes on",
                             seen[-1:] == ["failed"] and await vm.status() == "running",
                             checks.figures["failed_cpr_exec"])
                checks.check("failed cpr-exec: type1's remaps left the mapping records "
                             "as they were (no duplicates)",
                             bool(records) and sorted(after) == sorted(records),
                             {"before": records, "after": after})
            dma0, err0 = last_dma(con.log)
            checks.check("DMA heartbeat before the first update",
                         dma0 >= DMA_WARMUP and err0 == 0,
                         f"dma={dma0} dma_err={err0}")

            per_update: list[dict[str, Any]] = []
            for i in range(1, updates + 1):
                before, _ = last_dma(con.log)
                start_hb = max(len(con.log.heartbeats) - 1, 0)
                mism0 = con.log.mismatch_counter()
                report = await live_update(vm, mode=mode, heartbeat_interval=hb,
                                           timeout=STEP_TIMEOUT,
                                           require_sealed=not stock_qemu)
                # the guest runs again: enough heartbeats to see a round trip end
                await con.wait_heartbeats(round_trip_bound(hb_ms) + 2, STEP_TIMEOUT)
                waited = await wait_dma(con, max(before, last_dma(con.log)[0]) + 1,
                                        STEP_TIMEOUT)
                dma, err = last_dma(con.log)
                around = dma_around_pause(con.log.heartbeats[start_hb:], hb_ms)
                events = qlog.new_events()
                counts = count_events(events)
                maps = ram_maps(events)
                steps = update_steps(timed_events(qlog.text))
                row = {
                    "update": i, "pid": report.pid_after, "pause_qmp": report.pause_qmp,
                    "pause_guest": report.pause_guest, "total": report.total,
                    "phases": report.phases, "dma_before": before, "dma_after": dma,
                    "dma_err": err, "dma_progress_wait": waited, "traces": counts,
                    "maps": maps, "steps": steps, "around_pause": around,
                    "mism_before": mism0, "mism_after": con.log.mismatch_counter(),
                }
                per_update.append(row)
                checks.check(f"update {i}: same pid", report.pid_after == pid,
                             report.pid_after)
                checks.check(f"update {i}: QEMU's steps in the pause read from its log",
                             "total" in steps and "load" in steps, steps)
                checks.check(f"update {i}: DMA continues after the update",
                             dma > before + 1 and err == 0,
                             f"dma {before} -> {dma}, dma_err={err}")
                checks.check(f"update {i}: a transfer ends within {transfer_bound(hb_ms)} "
                             f"and a round trip within {round_trip_bound(hb_ms)} heartbeats "
                             "of the resume, no DMA error",
                             around["found"] and around["transfer_done_at"] is not None
                             and around["transfer_done_at"] <= transfer_bound(hb_ms)
                             and around["round_trip_done_at"] is not None
                             and around["round_trip_done_at"] <= round_trip_bound(hb_ms)
                             and around["dma_err_delta"] == 0, around)
                if backend == "iommufd":
                    ok = [r for n, r in events if n == "iommufd_change_process"]
                    checks.check(f"update {i}: IOMMU_IOAS_CHANGE_PROCESS after exec",
                                 any(r.endswith("(1)") for r in ok), ok)
                    checks.check(f"update {i}: no new DMA map of guest RAM",
                                 not maps["file"] and not maps["vaddr"], maps)
                else:
                    checks.check(f"update {i}: guest RAM re-registered by vaddr",
                                 bool(maps["listener"]) and not maps["file"]
                                 and counts["iommufd_change_process"] == 0, maps)
                view = await qmp_dma_view(vm)
                row["qmp_view"] = view
                check_qmp_view(checks, f"update {i}: x-query-cpr-memory in the new QEMU",
                               view, backend, stock_qemu)
                checks.check(f"update {i}: heartbeat continuous, guest's mism= unchanged",
                             report.heartbeat_continuous is True
                             and row["mism_after"] == row["mism_before"] == 0,
                             f"continuous={report.heartbeat_continuous} "
                             f"mism {row['mism_before']} -> {row['mism_after']}")
            checks.figures["updates"] = per_update
            spanning = [u["update"] for u in per_update if u["around_pause"]["in_flight_across"]]
            checks.figures["dma_in_flight_across"] = spanning
            checks.figures["dma_done_after_stop"] = [
                u["update"] for u in per_update if u["around_pause"]["device_done_after_stop"]]
            checks.check("a DMA issued before STOP completed after RESUME (at least once)",
                         bool(spanning), f"updates {spanning} of {len(per_update)}; device "
                         f"finished after STOP (HPET) in {checks.figures['dma_done_after_stop']}: "
                         + ", ".join(f"{u['around_pause']['in_flight_transfer_us']} us"
                                     for u in per_update))
            pauses = [u["around_pause"]["hb_after"] for u in per_update] + other_pauses
            normal = normal_transfers_us(con.log.heartbeats, pauses, hb_ms)
            checks.figures["normal_transfer_us"] = (
                {"n": len(normal), "min": min(normal), "max": max(normal)} if normal else None)
            # a short one, if any, with its neighbourhood: to tell a clock
            # hiccup from a pause the scenario did not know of
            short = [hb for prev, hb in zip(con.log.heartbeats, con.log.heartbeats[1:],
                                            strict=False)
                     if hb.int("dma_fin", -1) == prev.int("dma_fin", -1) + 1
                     and 0 < hb.int("dma_dur_us") < NORMAL_MIN_MS * 1000
                     and hb.int("dma_dur_us") in normal]
            checks.figures["normal_transfer_short"] = [
                {"seq": hb.seq, "dur_us": hb.int("dma_dur_us"), "pauses_hb_after": pauses,
                 "around": [(h.seq, h.guest_ms, round(h.host_time, 4), h.int("dma_fin"))
                            for h in con.log.heartbeats if abs(h.seq - hb.seq) <= 8]}
                for hb in short[:3]]
            checks.check(f"the guest's clock measures transfers away from a pause >= "
                         f"{NORMAL_MIN_MS} ms (what 'spanned a pause' relies on)",
                         len(normal) >= 10 and min(normal) >= NORMAL_MIN_MS * 1000,
                         {**(checks.figures["normal_transfer_us"] or {}),
                          "short": checks.figures["normal_transfer_short"]})
            last = await con.wait_full_pass(STEP_TIMEOUT)
            dma, err = last_dma(con.log)
            checks.check("after the last update: a full pattern pass verified",
                         last.mismatches == 0 and con.log.mismatch_counter() == 0,
                         f"pass gen {last.gen} mism {last.mismatches}, "
                         f"heartbeat mism {con.log.mismatch_counter()}")
            checks.check("guest RAM pattern intact throughout",
                         not con.log.mismatches and con.log.reboots == 0
                         and con.log.counter_continuous(),
                         f"mismatches={con.log.mismatched_words} reboots={con.log.reboots}")
            checks.check("no DMA failure throughout", err == 0, f"dma={dma} dma_err={err}")
        serial = vm.paths.serial.read_text(errors="replace")
        edu_errs = [line for line in serial.splitlines() if line.startswith("EDU-ERR")]
        checks.check("no EDU-ERR line on the guest console", not edu_errs, edu_errs[:5])
        checks.figures["edu_found"] = [line for line in serial.splitlines()
                                       if line.startswith("EDU found")]
    finally:
        await vm.shutdown()
        checks.figures["qemu_log_tail"] = vm.log_tail(40)
    checks.check("L2 QEMU gone after shutdown", not qemu_pids(), qemu_pids())
    leftovers = [str(p) for p in vm.paths.root.glob("*")
                 if p.is_socket() or p.name in ("state.json", "cpr-state")]
    checks.check("L2 run directory cleaned", not leftovers, leftovers)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("backend", choices=("iommufd", "legacy"))
    ap.add_argument("bdf")
    ap.add_argument("--updates", type=int, default=5)
    ap.add_argument("--mode", default="cpr-exec")
    ap.add_argument("--hb-ms", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--stock-qemu", action="store_true",
                    help="$SEALVM_QEMU is an unpatched QEMU (negative control)")
    args = ap.parse_args()
    checks = Checks(f"vfio-{args.backend}")
    checks.figures.update(backend=args.backend, bdf=args.bdf, mode=args.mode,
                          hb_ms=args.hb_ms, memory=MEMORY)

    async def run() -> None:
        async with asyncio.timeout(args.timeout):
            await scenario(checks, args.backend, args.bdf, args.updates, args.mode,
                           args.hb_ms, args.stock_qemu)

    return checks.finish(lambda: asyncio.run(run()))


if __name__ == "__main__":
    sys.exit(main())
