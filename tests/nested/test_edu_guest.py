"""
The test guest's edu exerciser, directly on L0 (no VFIO, no nesting): it
counts verified DMA round trips, catches broken ones, and stays silent when
there is no edu device -- so ``dma=N dma_err=0`` in L1 means something.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sealvm import Machine
from sealvm.console import ConsoleFollower, ConsoleLog
from sealvm.spec import VmSpec

pytestmark = pytest.mark.qemu

HB_MS = 50


def dma(log: ConsoleLog) -> tuple[int, int]:
    hb = log.heartbeats[-1]
    return hb.int("dma", -1), hb.int("dma_err", -1)


async def run_guest(spec: VmSpec, run_root: Path, heartbeats: int) -> tuple[ConsoleLog, str]:
    vm = Machine(spec, run_root=run_root)
    await vm.launch()
    try:
        async with ConsoleFollower(vm.paths.serial) as con:
            await con.wait_heartbeats(heartbeats, 60)
            log = con.log
        serial = vm.paths.serial.read_text(errors="replace")
    finally:
        await vm.shutdown()
    return log, serial


async def test_dma_round_trips_are_verified(make_spec: Callable[..., VmSpec],
                                            run_root: Path) -> None:
    spec = make_spec(cmdline=f"hb_ms={HB_MS}", extra_args=["-device", "edu"])
    log, serial = await run_guest(spec, run_root, 40)
    done, failed = dma(log)
    assert done >= 5 and failed == 0, (done, failed)
    assert "EDU found" in serial and "EDU-ERR" not in serial
    assert not log.mismatches  # DMA pages are outside the pattern range


async def test_broken_dma_is_reported(make_spec: Callable[..., VmSpec],
                                      run_root: Path) -> None:
    """edu clamps DMA addresses to its dma_mask: with 1 MiB, the guest's
    DMA pages (above 1 MiB) are missed and every round trip must fail."""
    spec = make_spec(cmdline=f"hb_ms={HB_MS}",
                     extra_args=["-device", "edu,dma_mask=0xfffff"])
    log, serial = await run_guest(spec, run_root, 40)
    done, failed = dma(log)
    assert done == 0 and failed >= 3, (done, failed)
    assert "EDU-ERR round=1 what=mismatch" in serial


async def test_silent_without_edu(make_spec: Callable[..., VmSpec], run_root: Path) -> None:
    log, serial = await run_guest(make_spec(cmdline=f"hb_ms={HB_MS}"), run_root, 5)
    assert all("dma" not in hb.values for hb in log.heartbeats)
    assert "EDU" not in serial
