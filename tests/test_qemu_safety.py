"""
The patched QEMU refuses what would lose guest memory and seals what it
maps, checked the way a user would see it (QMP, /proc), on real processes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, Runstate

from helpers import assert_guest_intact
from sealvm import Machine, PreflightError, QMPReplyError, live_update, procfs
from sealvm.console import ConsoleFollower
from sealvm.inventory import Inventory, mismatches_with_proc, parse_inventory, query_inventory
from sealvm.plan import RAM_ID, incoming_argv
from sealvm.pytest_plugin import GuestChecker, VmLauncher
from sealvm.spec import DEFAULT_FIRMWARE, VmSpec
from sealvm.update import UpdateReport

EXPECTED = procfs.RAM_SEALS | procfs.F_SEAL_EXEC


async def test_qemu_refuses_cpr_exec_of_anonymous_ram(
    sealvm_launch: VmLauncher, sealvm_check_guest: GuestChecker
) -> None:
    """Without sealvm's preflight in the way: QEMU itself reports the
    blocker and fails `migrate` before the guest is paused."""
    vm = await sealvm_launch(backend="ram")
    await sealvm_check_guest(vm)
    await vm.execute("migrate-set-parameters",
                     {"mode": "cpr-exec", "cpr-exec-command": incoming_argv(vm.argv)})
    info = await vm.execute("query-migrate")
    reasons = " ".join(info.get("blocked-reasons", []))
    assert "ram0" in reasons, info
    events = vm.events(["STOP"])
    with pytest.raises(QMPReplyError, match="is not compatible with CPR"):
        await vm.execute("migrate", {"uri": f"file:{vm.paths.cpr_state}"})
    with pytest.raises(TimeoutError):  # the guest was never paused
        await asyncio.wait_for(anext(events), 1.0)
    await events.aclose()
    assert await vm.status() == "running"
    await sealvm_check_guest(vm)


async def test_every_ram_memfd_is_sealed_and_noexec(vm: Machine) -> None:
    assert vm.pid is not None
    memfds = procfs.memfds(vm.pid)
    names = {m.name for m in memfds}
    assert {"memory-backend-memfd", "pc.bios", "pc.rom"} <= names, names
    for m in memfds:
        if m.name == "CPR" or m.name.startswith("QEMU_CPR"):
            continue
        assert m.has_seals(EXPECTED), f"{m.name}: seals {m.seal_names}"
        assert not m.executable, f"{m.name} is executable"


async def test_sealed_ram_cannot_be_resized_from_outside(vm: Machine) -> None:
    assert vm.pid is not None
    for m in procfs.memfds(vm.pid):
        fd = os.open(f"/proc/{vm.pid}/fd/{m.fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            for size in (m.size // 2, m.size + (1 << 20)):
                with pytest.raises(PermissionError):
                    os.ftruncate(fd, size)
        finally:
            os.close(fd)
        assert os.stat(f"/proc/{vm.pid}/fd/{m.fd}").st_size == m.size
    assert await vm.status() == "running"


@pytest.fixture
def noexec_qemu(qemu_binary: Path, tmp_path: Path) -> Path:
    """QEMU started as pid 1 of a new pid namespace whose vm.memfd_noexec
    is 2 (the sysctl is per pid namespace)."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip(reason="needs root and util-linux unshare to make a pid namespace")
    if not Path("/proc/sys/vm/memfd_noexec").exists():
        pytest.skip(reason="kernel has no vm.memfd_noexec (before Linux 6.3)")
    wrapper = tmp_path / "qemu-in-noexec-pidns"
    wrapper.write_text(
        "#!/bin/sh\n"
        'case "$1" in --version|-machine) exec ' f'"{qemu_binary}" "$@";; esac\n'
        f'exec {unshare} --pid --fork --kill-child -- /bin/sh -c '
        "'echo 2 > /proc/sys/vm/memfd_noexec && exec \"$0\" \"$@\"' "
        f'"{qemu_binary}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def _qemu_child(pid: int) -> int:
    """The QEMU process below the unshare wrapper."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                return _qemu_child(int(entry)) if "qemu" not in procfs.exe_of(
                    int(entry)) else int(entry)
    raise AssertionError(f"no QEMU below pid {pid}")


async def test_qemu_runs_with_memfd_noexec_2(
    make_spec: Callable[..., VmSpec], run_root: Path, noexec_qemu: Path
) -> None:
    # unconfined: the wrapper makes a pid namespace and sets its sysctl as root
    vm = Machine(make_spec(qemu=str(noexec_qemu), security={"confine": False}),
                 run_root=run_root)
    await vm.launch()
    try:
        async with ConsoleFollower(vm.paths.serial) as con:
            await con.wait_full_pass()
            assert_guest_intact(con.log)
        assert vm.pid is not None
        qemu = _qemu_child(vm.pid)
        assert Path(f"/proc/{qemu}/ns/pid").resolve() != Path("/proc/self/ns/pid").resolve()
        memfds = procfs.memfds(qemu)
        assert memfds
        for m in memfds:
            assert m.has_seals(EXPECTED) and not m.executable, m
    finally:
        await vm.shutdown()


def unsealed_blocks(inv: Inventory) -> dict[str, int | None]:
    """RAM blocks whose memfd lacks GROW|SHRINK|SEAL: name -> inode."""
    return {b.name: b.inode for b in inv.ram_blocks
            if b.fd_backed and (b.seals or 0) & procfs.RAM_SEALS != procfs.RAM_SEALS}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def seals_warning(report: UpdateReport) -> str:
    (seals,) = [c for c in report.checks if c.startswith("ram-seals: ")]
    assert seals.startswith("ram-seals: warning: aux RAM memfds without GROW|SHRINK|SEAL"), seals
    return seals


@pytest.mark.parametrize("mode", ["cpr-exec", "cpr-transfer"])
async def test_update_from_stock_qemu_then_from_sealvm(
    sealvm_launch: VmLauncher, sealvm_check_guest: GuestChecker, upstream_qemu: Path,
    qemu_binary: Path, mode: str, figures: Callable[[str, str], None]
) -> None:
    """The way into sealvm: a VM on stock QEMU 10.2.2 is live-updated to
    sealvm's QEMU.  Stock QEMU creates its aux RAM memfds unsealable (no
    MFD_ALLOW_SEALING): sealvm's QEMU inherits them as they are, preflight
    names them in a warning, and x-query-cpr-memory shows them unsealed.
    They can never gain seals, so the next update (sealvm -> sealvm) keeps
    them, unsealed, with the same inodes.  Guest RAM proper was sealed by
    stock QEMU too (memory-backend-memfd seal=on) and stays sealed."""
    # cpr-exec runs sealvm's binary from the stock QEMU's view
    vm = await sealvm_launch(qemu=str(upstream_qemu),
                             security={"exec_paths": [str(qemu_binary.parent)]})
    await sealvm_check_guest(vm)
    assert await query_inventory(vm) is None  # stock QEMU
    report = await live_update(vm, qemu=qemu_binary, mode=mode)
    assert "pc.bios (SEAL)" in seals_warning(report)
    await sealvm_check_guest(vm)
    assert vm.pid is not None
    inv = await query_inventory(vm)
    assert inv is not None, "not sealvm's QEMU after the update"
    assert not mismatches_with_proc(inv, vm.pid)
    assert all(b.cpr_compatible for b in inv.ram_blocks), inv
    unsealed = unsealed_blocks(inv)
    assert {"pc.bios", "pc.rom", "/rom@etc/acpi/tables"} <= set(unsealed), inv
    (ram,) = [b for b in inv.ram_blocks if b.name == RAM_ID]
    assert ram.name not in unsealed and ram.seals is not None, ram
    section = f"stock 10.2.2 -> sealvm -> sealvm ({mode})"
    figures(section, f"stock -> sealvm: pause {_ms(report.pause_qmp)}; unsealed: " + ", ".join(
        f"{b.name} {procfs.seal_names(b.seals or 0)}" for b in inv.ram_blocks
        if b.name in unsealed) + f"; {RAM_ID} {procfs.seal_names(ram.seals)}")

    report = await live_update(vm, qemu=qemu_binary, mode=mode)  # sealvm -> sealvm
    assert "pc.bios (SEAL)" in seals_warning(report)
    await sealvm_check_guest(vm)
    again = await query_inventory(vm)
    assert again is not None and not mismatches_with_proc(again, vm.pid)
    assert unsealed_blocks(again) == unsealed, "the unsealed memfds are kept, not replaced"
    figures(section, f"sealvm -> sealvm: pause {_ms(report.pause_qmp)}; still unsealed: "
            f"{len(unsealed)} blocks, same inodes")


@pytest.mark.parametrize("mode", ["cpr-exec", "cpr-transfer"])
async def test_update_from_stock_qemu_with_anonymous_ram_is_refused(
    sealvm_launch: VmLauncher, sealvm_check_guest: GuestChecker, upstream_qemu: Path,
    qemu_binary: Path, mode: str
) -> None:
    """What CPR would lose is still refused before the guest pauses, on a
    stock QEMU too (which does not block cpr-exec of anonymous RAM, below):
    preflight finds guest RAM in no memfd QEMU holds."""
    vm = await sealvm_launch(qemu=str(upstream_qemu), backend="ram")
    with pytest.raises(PreflightError) as refused:
        await live_update(vm, qemu=qemu_binary, mode=mode)
    assert "ram-blocks: not in a memfd, CPR would lose them: ram0" in str(refused.value)
    assert "ram: guest RAM is memory-backend-ram" in str(refused.value)
    assert await vm.status() == "running"
    await sealvm_check_guest(vm)


async def test_stock_qemu_loses_anonymous_ram_in_cpr_exec(
    make_spec: Callable[..., VmSpec], run_root: Path, upstream_qemu: Path
) -> None:
    """The upstream 10.2.2 bug our series fixes, shown: cpr-exec of
    memory-backend-ram is not blocked, and the guest comes back without
    its memory (it crashes and reboots, or reports the pattern lost)."""
    vm = Machine(make_spec(qemu=str(upstream_qemu), backend="ram"), run_root=run_root)
    await vm.launch()
    try:
        async with ConsoleFollower(vm.paths.serial) as con:
            await con.wait_full_pass()
            argv = incoming_argv(vm.argv)
            await vm.execute("migrate-set-parameters",
                             {"mode": "cpr-exec", "cpr-exec-command": argv})
            assert not (await vm.execute("query-migrate")).get("blocked-reasons")
            qmp = vm.qmp
            await vm.execute("migrate", {"uri": f"file:{vm.paths.cpr_state}"})
            while qmp.runstate not in (Runstate.DISCONNECTING, Runstate.IDLE):
                await qmp.runstate_changed()  # exec drops the monitor
            await vm.connect()
            await vm.execute("migrate-set-capabilities",
                             {"capabilities": [{"capability": "events", "state": True}]})
            listener = EventListener(("MIGRATION", "RESUME"))
            assert vm.process is not None
            died = asyncio.ensure_future(vm.process.exited.wait())
            outcome = ""
            with vm.qmp.listen(listener):
                await vm.execute("migrate-incoming", {"uri": f"file:{vm.paths.cpr_state}"})
                async with asyncio.timeout(60):
                    while not outcome:
                        nxt = asyncio.ensure_future(listener.get())
                        await asyncio.wait({nxt, died}, return_when=asyncio.FIRST_COMPLETED)
                        nxt.cancel()
                        if not nxt.done() or nxt.cancelled():
                            outcome = "failed"  # QEMU exits when the load fails
                            continue
                        ev: dict[str, Any] = dict(nxt.result())
                        if ev["event"] == "RESUME":
                            outcome = "resumed"
                        elif ev["data"]["status"] == "failed":
                            outcome = "failed"
            died.cancel()
            if outcome == "failed":
                # zeroed RAM: device state that reads guest memory fails to
                # load, and the new QEMU exits with the guest
                assert await vm.process.wait_exit(10)
                assert "load of migration failed" in vm.log_tail(), vm.log_tail()
            else:
                await con.wait_for(lambda log: log.reboots > 0 or bool(log.mismatches), 30)
    finally:
        await vm.shutdown()


async def test_inventory_matches_proc(vm: Machine) -> None:
    """x-query-cpr-memory tells the same fds, inodes and seals as /proc."""
    inv = await query_inventory(vm)
    assert inv is not None, "x-query-cpr-memory missing from the patched QEMU"
    assert vm.pid is not None
    assert mismatches_with_proc(inv, vm.pid) == []
    names = {b.name for b in inv.ram_blocks}
    assert {"ram0", "pc.bios", "pc.rom"} <= names
    assert all(b.cpr_compatible and b.shared and b.fd_backed for b in inv.ram_blocks)
    assert inv.vfio_containers == ()
    # and the memfds /proc shows are exactly the ones QEMU reports
    assert {b.fd for b in inv.ram_blocks} == {m.fd for m in procfs.memfds(vm.pid)}


async def test_inventory_names_the_block_cpr_cannot_keep(sealvm_launch: VmLauncher) -> None:
    vm = await sealvm_launch(backend="ram")
    inv = await query_inventory(vm)
    assert inv is not None
    ram0 = {b.name: b for b in inv.ram_blocks}["ram0"]
    assert not ram0.cpr_compatible and not ram0.fd_backed
    assert ram0.cpr_blocker and "ram0" in ram0.cpr_blocker


def test_malformed_inventory_is_a_typed_error() -> None:
    bad: object
    for bad in ([], {"ram-blocks": [{"name": 3}], "vfio-containers": []},
                {"ram-blocks": [], "vfio-containers": [{"backend": "iommufd", "mappings": [
                    {"iova": 0, "size": 1, "mode": "teleport"}]}]}):
        with pytest.raises(QMPReplyError, match="x-query-cpr-memory"):
            parse_inventory(bad)


# require-sealed on an iommufd object: memory that VFIO would have to map
# by file although it is not sealed against resizing is refused when it is
# plugged.  The VFIO listener could only hw_error() on it at run time.
REQUIRE_SEALED = ("-m", "slots=2,maxmem=1G",
                  "-object", "iommufd,id=iommufd0,require-sealed=on")


async def plug_dimm(vm: Machine, dimm: str, backend: dict[str, Any]) -> None:
    """Hot-plug a DIMM on a new memory backend, as a user would."""
    await vm.execute("object-add", {"id": f"{dimm}-mem", "size": 64 << 20, **backend})
    await vm.execute("device_add", {"driver": "pc-dimm", "id": dimm, "memdev": f"{dimm}-mem"})


async def dimms(vm: Machine) -> set[str]:
    devices = await vm.execute("query-memory-devices")
    return {d["data"]["id"] for d in devices if d["type"] == "dimm"}


async def test_require_sealed_refuses_an_unsealed_dimm_and_the_guest_runs_on(
    make_spec: Callable[..., VmSpec], run_root: Path
) -> None:
    """What this covers: the pre-plug check of the iommufd require-sealed
    property, which needs no VFIO device.  With a VFIO device (nested tier
    only), v1 let the same DIMM reach the VFIO listener's hw_error() and
    abort QEMU; without one, as here, v1 accepted it silently."""
    vm = Machine(make_spec(extra_args=list(REQUIRE_SEALED)), run_root=run_root)
    await vm.launch()
    try:
        async with ConsoleFollower(vm.paths.serial) as con:
            await con.wait_full_pass()
            with pytest.raises(QMPReplyError, match=(
                    r"memory region unsealed-mem is backed by a file that is not sealed "
                    r"against resizing \(seals 0x\w+\), which the require-sealed "
                    r"property of iommufd iommufd0 forbids")):
                await plug_dimm(vm, "unsealed", {"qom-type": "memory-backend-memfd",
                                                 "share": True, "seal": False})
            assert await vm.status() == "running"
            # Sealed memfd memory is mapped by file and plugs; anonymous
            # memory is mapped by address, which require-sealed leaves alone.
            await plug_dimm(vm, "sealed", {"qom-type": "memory-backend-memfd",
                                           "share": True, "seal": True})
            await plug_dimm(vm, "anon", {"qom-type": "memory-backend-ram"})
            assert await dimms(vm) == {"sealed", "anon"}
            await con.wait_full_pass()
            assert_guest_intact(con.log)
        assert await vm.status() == "running"
    finally:
        await vm.shutdown()


def run_qemu_briefly(qemu: Path, *args: str, pass_fds: tuple[int, ...] = ()
                     ) -> subprocess.CompletedProcess[str]:
    firmware = [arg for fw in DEFAULT_FIRMWARE for arg in ("-L", str(fw))]
    return subprocess.run([str(qemu), *firmware, "-nodefaults", "-display", "none", "-S",
                           *args],
                          pass_fds=pass_fds, capture_output=True, text=True, timeout=60,
                          check=False)


def test_fd_passed_vfio_device_without_id_fails_cleanly(qemu_binary: Path) -> None:
    """A VFIO device passed by fd without an id used to segfault at start-up
    (cpr_save_fd(NULL) -> strlen(NULL)), which made the CPR id blocker
    unreachable.  Now it gets as far as the iommufd backend (this host has
    no usable /dev/iommu, or no such VFIO device behind fd 3) and exits with
    an error."""
    with open(os.devnull) as null:
        fd = null.fileno()
        proc = run_qemu_briefly(qemu_binary, "-object", "iommufd,id=iommufd0",
                                "-device", f"vfio-pci,fd={fd},iommufd=iommufd0",
                                pass_fds=(fd,))
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "vfio" in proc.stderr, proc.stderr
