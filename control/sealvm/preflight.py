"""
Preflight: everything a live update needs, checked before the guest pauses.

Each check returns a `Check` (name, ok, detail; a passed check may carry a
warning: something the update keeps as it is, such as aux RAM that a stock
QEMU left unsealed).  `run_preflight` runs them
all and raises `PreflightError` listing every failure; the only state it
touches (the migration mode, to read QEMU's blockers for that mode) is put
back as it was, so a refused update leaves the VM exactly as it found it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import confine, net, procfs, vfio
from ._ffi import pidfd_getfd
from .errors import HostError, PreflightError, QMPReplyError
from .host import vfio_cdev
from .inventory import COMMAND, query_inventory, ram_block_names
from .plan import RAM_ID
from .trampoline import trampoline

if TYPE_CHECKING:
    from .machine import Machine

#: cpr-exec and cpr-transfer keep guest RAM in place; "migrate" is classic
#: live migration to a new local QEMU (RAM copied), the baseline they beat.
CPR_MODES = ("cpr-exec", "cpr-transfer")
MODES = (*CPR_MODES, "migrate")
#: Free space wanted next to the CPR state file (device state only; RAM is
#: never copied, so a few MiB suffice; keep a margin).
STATE_ROOM = 64 << 20


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    #: passed, with something the operator should know (never on a failure)
    warning: bool = False

    def __str__(self) -> str:
        return f"{self.name}: {'warning: ' if self.warning else ''}{self.detail}"


@dataclass(frozen=True)
class BinaryInfo:
    path: Path
    version: str
    machines: frozenset[str]


async def _run(argv: list[str], timeout: float) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "QEMU_CPR_EXEC_STATE"}
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=env)
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


#: probe_binary results by (path, inode, size, mtime): a binary that did not
#: change need not be run again (it costs two QEMU start-ups per update).
_probed: dict[tuple[str, int, int, int], BinaryInfo] = {}


async def probe_binary(path: Path, *, timeout: float = 20.0) -> BinaryInfo:
    """Run a QEMU binary to learn its version and machine types (cached
    while the file is unchanged).

    :raise OSError: when it cannot be executed.
    :raise ValueError: when its output is not QEMU's.
    :raise TimeoutError: when it does not answer in *timeout*.
    """
    st = os.stat(path)
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _probed:
        _probed[key] = await _probe_binary(path, timeout=timeout)
    return _probed[key]


async def _probe_binary(path: Path, *, timeout: float) -> BinaryInfo:
    rc, out = await _run([str(path), "--version"], timeout)
    m = re.search(r"QEMU emulator version (\S+)", out)
    if rc != 0 or not m:
        raise ValueError(f"{path} --version: not QEMU (exit {rc}): {out.strip()[:200]}")
    rc, out = await _run([str(path), "-machine", "help"], timeout)
    machines = set()
    for line in out.splitlines()[1:]:
        parts = line.split()
        if parts:
            machines.add(parts[0])
            alias = re.search(r"\(alias of (\S+)\)", line)
            if alias:
                machines.add(alias.group(1))
    return BinaryInfo(path=path, version=m.group(1), machines=frozenset(machines))


async def check_binary(vm: Machine, qemu: Path) -> Check:
    if not qemu.is_file():
        return Check("new-binary", False, f"{qemu} does not exist")
    if not os.access(qemu, os.X_OK):
        return Check("new-binary", False, f"{qemu} is not executable")
    try:
        info = await probe_binary(qemu)
    except (OSError, ValueError, TimeoutError) as exc:
        return Check("new-binary", False, f"{qemu} does not run: {exc}")
    mtype = await vm.execute("qom-get", {"path": "/machine", "property": "type"})
    if not isinstance(mtype, str):
        raise QMPReplyError("qom-get", f"machine type is {mtype!r}")
    mname = mtype.removesuffix("-machine")
    if mname not in info.machines:
        return Check("new-binary", False,
                     f"QEMU {info.version} at {qemu} lacks machine type {mname}")
    return Check("new-binary", True, f"QEMU {info.version} accepts {mname}")


def check_ram(vm: Machine) -> Check:
    assert vm.pid is not None
    if vm.spec.memory.backend != "memfd":
        return Check("ram", False,
                     f"guest RAM is memory-backend-{vm.spec.memory.backend}, not a shared "
                     "memfd: it would not survive the update (use backend = \"memfd\")")
    ram = [m for m in procfs.memfds(vm.pid) if m.is_backend]
    if not ram:
        return Check("ram", False, f"QEMU (pid {vm.pid}) holds no guest-RAM memfd")
    m = ram[0]
    return Check("ram", True, f"{RAM_ID}: memfd inode {m.inode}, {m.size >> 20} MiB, "
                 f"seals {'|'.join(m.seal_names) or 'none'}")


def check_seals(vm: Machine) -> Check:
    """Guest RAM (memory-backend-memfd, seal=on) must be sealed
    GROW|SHRINK|SEAL, and no RAM memfd may be sealed against writes: a
    sealvm QEMU refuses to inherit either.  Aux RAM memfds (firmware, ROMs,
    ACPI tables) that a QEMU without sealvm's series created are unsealable
    (F_SEAL_SEAL only): a sealvm QEMU inherits them as they are and they
    stay unsealed until the VM restarts, which is a warning naming them."""
    assert vm.pid is not None
    memfds = procfs.memfds(vm.pid)
    write = [f"{m.name} ({'|'.join(m.seal_names)})" for m in memfds
             if m.seals & (procfs.F_SEAL_WRITE | procfs.F_SEAL_FUTURE_WRITE)]
    ram = [f"{m.name} ({'|'.join(m.seal_names) or 'no seals'})" for m in memfds
           if m.is_backend and not m.has_seals(procfs.RAM_SEALS)]
    if write or ram:
        return Check("ram-seals", False, "; ".join(
            [*(["sealed against writes: " + ", ".join(write)] if write else []),
             *(["guest RAM without GROW|SHRINK|SEAL: " + ", ".join(ram) +
                " (memory-backend-memfd seal=on)"] if ram else [])]) +
            "; a sealvm QEMU will not inherit them (restart the VM on a sealvm QEMU once)")
    loose = [f"{m.name} ({'|'.join(m.seal_names) or 'no seals'})" for m in memfds
             if not m.has_seals(procfs.RAM_SEALS)]
    if loose:
        return Check("ram-seals", True,
                     "aux RAM memfds without GROW|SHRINK|SEAL (made by a QEMU without "
                     "sealvm's series; they can never be sealed): " + ", ".join(loose) +
                     "; kept as they are, and unsealed until the VM restarts", warning=True)
    return Check("ram-seals", True, "every RAM memfd is sealed GROW|SHRINK|SEAL")


async def check_aux_ram_share(vm: Machine) -> Check:
    value = await vm.execute("qom-get", {"path": "/machine", "property": "aux-ram-share"})
    if value is not True:
        return Check("aux-ram-share", False,
                     "-machine aux-ram-share is off: ROM/firmware RAM would be lost")
    return Check("aux-ram-share", True, "on")


def check_room(path: Path) -> Check:
    usage = shutil.disk_usage(path.parent)
    if usage.free < STATE_ROOM:
        return Check("state-room", False,
                     f"{path.parent} has {usage.free >> 20} MiB free, need {STATE_ROOM >> 20}")
    return Check("state-room", True, f"{usage.free >> 20} MiB free in {path.parent}")


def check_nics(vm: Machine) -> list[Check]:
    """Each NIC's tap must be the fd sealvm passed (the new QEMU gets that
    same fd: inherited, or duplicated from the old QEMU), without a vnet
    header (`sealvm.net`); vhost-net cannot be handed over."""
    assert vm.state is not None
    taps = vm.state.fd_plan().taps
    checks = []
    for n in vm.spec.net:
        name = f"net-{n.id}"
        if n.vhost:
            checks.append(Check(name, False, f"{n.id}: {net.VHOST_REFUSAL}"))
            continue
        number = taps.get(n.id)
        if number is None:
            checks.append(Check(name, False, f"{n.id}: no tap fd recorded for QEMU "
                                "(launched by an older sealvm?): restart the VM"))
            continue
        try:
            fd = pidfd_getfd(vm.state.pid, number)
        except OSError as exc:
            checks.append(Check(name, False, f"{n.id}: cannot look at QEMU's fd {number}: "
                                f"{exc.strerror or exc}"))
            continue
        try:
            ifname, flags = net.tap_info(fd)
        except OSError as exc:
            checks.append(Check(name, False, f"{n.id}: QEMU's fd {number} is not a tap "
                                f"({exc.strerror or exc})"))
            continue
        finally:
            os.close(fd)
        if ifname != n.tap:
            checks.append(Check(name, False, f"{n.id}: QEMU's fd {number} is tap {ifname}, "
                                f"not {n.tap}"))
        elif flags & net.IFF_VNET_HDR:
            checks.append(Check(name, False, f"{n.id}: tap {ifname} has a vnet header: a new "
                                "QEMU would reset its length under the old one"))
        else:
            checks.append(Check(name, True, f"{n.id}: tap {ifname} (QEMU fd {number}) handed "
                                "over by fd, no vnet header"))
    return checks


TUN_RDEV = os.makedev(10, 200)  # /dev/net/tun


def check_foreign_taps(vm: Machine) -> Check:
    """A tap QEMU opened itself (``-netdev tap,ifname=...`` in extra_args, a
    script's netdev_add) cannot be handed over: QEMU 10.2's tap fd is not
    close-on-exec, and the new QEMU (or the old one, going back) opens the
    same name again and gets EBUSY.  Only the taps sealvm passed can."""
    assert vm.state is not None
    passed = set(vm.state.fd_plan().taps.values())
    foreign = []
    for number, st in procfs.open_files(vm.state.pid):
        if number in passed or not stat.S_ISCHR(st.st_mode) or st.st_rdev != TUN_RDEV:
            continue
        name = "?"
        with contextlib.suppress(OSError):
            fd = pidfd_getfd(vm.state.pid, number)
            try:
                name = net.tap_info(fd)[0]
            finally:
                os.close(fd)
        foreign.append(f"{name} (QEMU fd {number})")
    if foreign:
        return Check("taps", False, "QEMU opened tap " + ", ".join(foreign) + " itself "
                     "(-netdev tap by name?): a new QEMU cannot open it again (EBUSY), nor "
                     "can the old one on the way back; give the NIC as [[net]] in the spec, "
                     "whose tap sealvm passes and hands over")
    return Check("taps", True, "every tap QEMU holds is one sealvm passed")


def check_disks(vm: Machine) -> list[Check]:
    """The new QEMU opens each image by path: the path must still name the
    file the running QEMU has open, or the guest would move to another disk."""
    assert vm.state is not None and vm.pid is not None
    held = set()
    for _fd, st in procfs.open_files(vm.pid):
        held.add((st.st_dev, st.st_ino))
    checks = []
    for d in vm.spec.disk:
        name = f"disk-{d.id}"
        launched = vm.state.disks.get(d.id)
        try:
            st = os.stat(d.path)
        except OSError as exc:
            checks.append(Check(name, False, f"{d.id}: {d.path}: {exc.strerror}: the new QEMU "
                                "could not open the image"))
            continue
        now = (st.st_dev, st.st_ino)
        if launched is not None and tuple(launched) != now:
            checks.append(Check(name, False, f"{d.id}: {d.path} now names another file (inode "
                                f"{launched[1]} at launch, {st.st_ino} now): the new QEMU "
                                "would open it; put the image back"))
        elif now not in held:
            checks.append(Check(name, False, f"{d.id}: QEMU (pid {vm.pid}) has no fd on "
                                f"{d.path} (inode {st.st_ino})"))
        else:
            checks.append(Check(name, True, f"{d.id}: {d.path} ({d.format}, cache={d.cache}"
                                f"{', read-only' if d.readonly else ''}), same inode "
                                f"{st.st_ino}; locks pass at switchover (disks inactivated)"))
    return checks


async def check_inventory(vm: Machine, *, required: bool = True) -> list[Check]:
    """What QEMU itself reports (sealvm's QEMU): RAM blocks CPR cannot keep,
    VFIO mappings that do not go through the file.  Without the command the
    QEMU is not sealvm's: a failure when *required* (sealvm's QEMU expected),
    else reported (a comparison with a stock QEMU)."""
    inv = await query_inventory(vm)
    if inv is None:
        return await check_stock_inventory(vm, required=required)
    bad = [f"{b.name}: {b.cpr_blocker or 'not preserved'}" for b in inv.ram_blocks
           if not b.cpr_compatible]
    checks = [Check("ram-blocks", not bad,
                    "; ".join(bad) if bad else f"{len(inv.ram_blocks)} RAM blocks, all kept")]
    for c in inv.vfio_containers:
        name = f"vfio-{c.backend}{'' if c.ioas_id is None else f'-ioas{c.ioas_id}'}"
        vaddr = c.by_vaddr
        if c.backend == "iommufd" and vaddr:
            regions = sorted({m.memory_region or hex(m.iova) for m in vaddr})
            checks.append(Check(name, False,
                                f"{len(vaddr)} DMA mapping(s) by virtual address "
                                f"({', '.join(regions)}): the device would lose them at exec"))
        else:
            how = "by file" if c.backend == "iommufd" else "by vaddr (type1 VADDR update)"
            checks.append(Check(name, True, f"{len(c.mappings)} DMA mapping(s) {how}"))
    return checks


async def check_stock_inventory(vm: Machine, *, required: bool = True) -> list[Check]:
    """A QEMU without sealvm's series (the stock QEMU a VM comes from on its
    way into sealvm) cannot say what it keeps: every RAM block it lists must
    be a memfd it holds, or CPR would lose the block (stock QEMU does not
    block cpr-exec of anonymous RAM).  Its DMA mappings cannot be seen: a VM
    with assigned devices is refused when *required*."""
    assert vm.pid is not None
    held = {m.name for m in procfs.memfds(vm.pid)}
    names = await ram_block_names(vm)
    # guest RAM's memfd is named after the backend's type, aux RAM's after the block
    lost = [n for n in names
            if (procfs.BACKEND_MEMFD_NAME if n == RAM_ID else n) not in held]
    checks = [Check("ram-blocks", not lost,
                    f"not in a memfd, CPR would lose them: {', '.join(lost)}" if lost else
                    f"{len(names)} RAM blocks, each in a memfd QEMU holds ({COMMAND} not "
                    "available: stock QEMU, checked in /proc)")]
    if vm.spec.vfio:
        devices = ", ".join(d.id for d in vm.spec.vfio)
        detail = (f"{COMMAND} not available: this QEMU lacks sealvm's series, so the DMA "
                  f"mappings of {devices} cannot be checked")
        checks.append(Check("qemu-inventory", not required,
                            detail if required else f"(not required) {detail}",
                            warning=not required))
    return checks


async def migration_info_for_mode(vm: Machine, mode: str) -> dict[str, Any]:
    """``query-migrate`` as it reads in *mode*: blockers are per mode, so the
    mode is set to read them, then put back as it was."""
    params = await vm.execute("query-migrate-parameters")
    old_mode = params.get("mode", "normal") if isinstance(params, dict) else "normal"
    if old_mode != mode:
        await vm.execute("migrate-set-parameters", {"mode": mode})
    try:
        info = await vm.execute("query-migrate")
    finally:
        if old_mode != mode:
            await vm.execute("migrate-set-parameters", {"mode": old_mode})
    if not isinstance(info, dict):
        raise QMPReplyError("query-migrate", f"malformed reply {info!r}")
    return info


async def check_blockers(vm: Machine, mode: str) -> Check:
    """QEMU's own blockers for *mode* (query-migrate blocked-reasons)."""
    info = await migration_info_for_mode(vm, mode)
    status = info.get("status")
    if status in ("setup", "active", "device", "wait-unplug", "cancelling", "pre-switchover"):
        return Check("migration-idle", False, f"a migration is already {status}")
    reasons = info.get("blocked-reasons") or []
    if reasons:
        return Check("qemu-blockers", False, "; ".join(str(r) for r in reasons))
    return Check("qemu-blockers", True, f"none for {mode}")


#: A trace event added by the sealvm series' patch "vfio/migration: Keep
#: device state migration inactive in CPR modes": a QEMU that knows it leaves
#: VFIO device state alone in cpr-transfer and cpr-exec.
CPR_DEVICE_STATE_FIX_EVENT = "vfio_vmstate_change_cpr"


async def _has_cpr_device_state_fix(vm: Machine) -> bool:
    try:
        await vm.execute("trace-event-get-state", {"name": CPR_DEVICE_STATE_FIX_EVENT})
    except QMPReplyError:
        return False
    return True


def _kernel_migration(vm: Machine, dev_id: str) -> vfio.DeviceMigration | str:
    """The driver's answer through a duplicate of QEMU's device fd, or why
    there is none."""
    dev = next(d for d in vm.spec.vfio if d.id == dev_id)
    if dev.backend != "iommufd":
        return "not asked (QEMU opened the device through its VFIO group)"
    assert vm.pid is not None
    try:
        fd = vfio.qemu_device_fd(vm.pid, str(vfio_cdev(dev)))
    except (HostError, OSError) as exc:
        return f"not asked ({exc})"
    try:
        return vfio.device_migration(fd)
    except OSError as exc:
        return f"not asked ({exc})"
    finally:
        os.close(fd)


async def check_vfio_devices(vm: Machine, mode: str) -> list[Check]:
    """Per assigned device: does it support VFIO migration, does QEMU
    migrate its state, and what *mode* does to it.

    Sources: the kernel driver (VFIO_DEVICE_FEATURE_MIGRATION, asked on a
    duplicate of QEMU's own device fd: only a bound fd can ask), QEMU's
    ``enable-migration`` property and its normal-mode migration blockers
    (QEMU gives up device-state migration for a device it cannot migrate, and
    says so there), and whether this QEMU carries the sealvm fix that keeps
    device state alone in the CPR modes.  Fails only where the update would
    hurt the device: a stock QEMU in cpr-transfer with a device whose state
    it migrates (it would reset the device).
    """
    if not vm.spec.vfio:
        return []
    info = await migration_info_for_mode(vm, "normal")
    blockers = [str(r) for r in info.get("blocked-reasons") or []]
    fixed = await _has_cpr_device_state_fix(vm)
    checks = []
    for dev in vm.spec.vfio:
        name = dev.id if dev.backend == "iommufd" else dev.sysfs_path.name
        kernel = _kernel_migration(vm, dev.id)
        try:
            enable = await vm.execute("qom-get", {"path": f"/machine/peripheral/{dev.id}",
                                                  "property": "enable-migration"})
        except QMPReplyError as exc:
            enable = f"unknown ({exc})"
        mine = [b for b in blockers if b.startswith(f"{name}:")]
        migrates = not mine and enable != "off" and not (
            isinstance(kernel, vfio.DeviceMigration) and not kernel.supported)
        facts = (f"kernel: {kernel}; QEMU: enable-migration={enable}, "
                 + ("device state migrates in normal migration" if migrates else
                    "no device-state migration (" + ("; ".join(mine) or "disabled") + ")"))
        ok = True
        if mode == "migrate":
            effect = ("migrate: device state saved and loaded into the target's device"
                      if migrates else "migrate: blocked by this device")
        elif not migrates:
            effect = (f"{mode}: device fd handed over, the device keeps running; "
                      "no device state involved")
        elif fixed:
            effect = (f"{mode}: device fd handed over, the device keeps running; its state "
                      "is neither saved nor loaded nor stopped (sealvm QEMU)")
        elif mode == "cpr-transfer":
            ok = False
            effect = ("cpr-transfer: this QEMU would save and load the device state on the "
                      "device both QEMUs share; old QEMU's STOP_COPY races new QEMU's "
                      "RESUMING and resets the device. Use sealvm's QEMU, or "
                      f"enable-migration=off on {dev.id}")
        else:
            effect = ("cpr-exec: this QEMU stops the device, saves its state, execs and "
                      "writes the state back into the same device (stock behaviour)")
        checks.append(Check(f"vfio-dev-{dev.id}", ok, f"{facts}; {effect}"))
    return checks


def check_confinement(vm: Machine, mode: str, qemu: Path, *, way_back: bool) -> list[Check]:
    """A confined VM (`sealvm.confine`): its user must be able to run the
    new binary; for cpr-exec, QEMU must be allowed to exec it (spawn not
    denied) and must see, in its own view, the very files sealvm checked
    (the new binary, and the trampoline for the way back)."""
    conf = vm.confinement
    if conf is None:
        return [Check("confinement", True, "off (security.confine = false)", warning=True)]
    may = confine.can_execute(qemu, conf.uid, conf.gid)
    checks = [Check("vm-user", may, f"uid {conf.uid} gid {conf.gid} "
                    f"{'may' if may else 'may not'} read and execute {qemu}")]
    if mode != "cpr-exec":
        return checks
    if not conf.cpr_exec:
        checks.append(Check("sandbox", False, "security.cpr_exec = false: QEMU runs with "
                            "spawn=deny and cannot exec a new binary; use cpr-transfer"))
        return checks
    wanted = [("new binary", qemu)]
    if way_back:
        try:
            wanted.append(("trampoline", trampoline()))
        except HostError as exc:
            checks.append(Check("exec-view", False, str(exc)))
            return checks
    hidden = [f"{what} {path}" for what, path in wanted
              if vm.pid is None or not confine.seen_by(vm.pid, path)]
    checks.append(Check(
        "exec-view", not hidden,
        "QEMU sees " + " and ".join(f"{w} {p}" for w, p in wanted) + " as sealvm does"
        if not hidden else
        f"QEMU (pid {vm.pid}) cannot exec {', '.join(hidden)}: outside its view, replaced "
        "since its view was made, or on a noexec mount there; add the directory to "
        "security.exec_paths (at launch), or use cpr-transfer"))
    return checks


async def run_preflight(vm: Machine, *, mode: str, qemu: Path,
                        require_sealed: bool = True, raise_on_failure: bool = True,
                        way_back: bool = True) -> list[Check]:
    """Run every check; raise if any fails (unless *raise_on_failure* is
    False: a dry run that returns every check, failed or not).

    Aux RAM memfds that a stock QEMU left unsealed pass with a warning
    (the way into sealvm is an update from stock QEMU).  With
    *require_sealed* False (comparisons with a stock QEMU), unsealed guest
    RAM and, for a VM with assigned devices, a missing
    ``x-query-cpr-memory`` are reported but do not fail the preflight.

    :raise PreflightError: listing every failed check (the VM is untouched).
    """
    if mode not in MODES:
        raise PreflightError([f"mode {mode!r} is not one of {', '.join(MODES)}"])
    checks: list[Check] = []
    status = await vm.status()
    checks.append(Check("vm-state", status in ("running", "paused"),
                        f"guest is {status}"))
    if mode in CPR_MODES:
        checks.append(check_ram(vm))
        seals = check_seals(vm)
        checks.append(seals if require_sealed or seals.ok else
                      Check(seals.name, True, f"(not required) {seals.detail}", warning=True))
        checks.append(await check_aux_ram_share(vm))
        checks.extend(await check_inventory(vm, required=require_sealed))
    checks.extend(await check_vfio_devices(vm, mode))
    checks.extend(check_nics(vm))
    checks.append(check_foreign_taps(vm))
    checks.extend(check_disks(vm))
    checks.append(await check_binary(vm, qemu))
    checks.extend(check_confinement(vm, mode, qemu, way_back=way_back))
    if mode == "cpr-exec":
        checks.append(check_room(vm.paths.cpr_state))
    checks.append(await check_blockers(vm, "normal" if mode == "migrate" else mode))
    failed = [str(c) for c in checks if not c.ok]
    if failed and raise_on_failure:
        raise PreflightError(failed)
    return checks
