"""Preflight's inventory check when QEMU lacks ``x-query-cpr-memory`` (a
stock QEMU, on its way into sealvm): pure logic, a QMP stand-in instead of
QEMU, this process's own memfds instead of QEMU's."""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from sealvm.machine import Machine
from sealvm.preflight import check_inventory
from sealvm.spec import VfioSpec

RAMBLOCKS = """\
              Block Name    PSize              Offset               Used              Total                HVA  RO
                    ram0    4 KiB  0x0000000000000000 0x0000000004000000 0x0000000004000000 0x00007f5d2ffff000  rw
                 pc.bios    4 KiB  0x0000000004000000 0x0000000000040000 0x0000000000040000 0x00007f5d78a00000  ro
                  pc.rom    4 KiB  0x0000000004040000 0x0000000000020000 0x0000000000020000 0x00007f5d78800000  ro
"""  # noqa: E501  (HMP `info ramblock` of QEMU 10.2.2, as it prints it)


class StockQemu:
    """Answers like a QEMU without sealvm's series: the command is absent,
    `info ramblock` lists ram0, pc.bios and pc.rom; the "QEMU" process is
    this one."""

    def __init__(self, vfio: tuple[VfioSpec, ...] = ()) -> None:
        self.pid = os.getpid()
        self.spec = SimpleNamespace(vfio=vfio)

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        if command == "query-commands":
            return [{"name": "query-status"}, {"name": "migrate"}]
        assert command == "human-monitor-command", command
        assert args == {"command-line": "info ramblock"}, args
        return RAMBLOCKS


@pytest.fixture
def memfds() -> Iterator[list[int]]:
    """Memfds this process holds (closed at teardown); add with memfd_create."""
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def stock(vfio: tuple[VfioSpec, ...] = ()) -> Machine:
    return cast(Machine, StockQemu(vfio))


async def test_stock_qemu_whose_ram_blocks_are_all_memfds_passes(memfds: list[int]) -> None:
    memfds += [os.memfd_create(n) for n in ("memory-backend-memfd", "pc.bios", "pc.rom")]
    (check,) = await check_inventory(stock())
    assert check.name == "ram-blocks" and check.ok, check
    assert "3 RAM blocks" in check.detail and "stock QEMU" in check.detail, check


async def test_stock_qemu_with_a_ram_block_outside_a_memfd_is_refused(
    memfds: list[int]
) -> None:
    memfds.append(os.memfd_create("pc.bios"))  # ram0 and pc.rom: anonymous, CPR would lose them
    (check,) = await check_inventory(stock())
    assert check.name == "ram-blocks" and not check.ok, check
    assert check.detail == "not in a memfd, CPR would lose them: ram0, pc.rom", check


async def test_stock_qemu_with_assigned_devices_is_refused_when_required(
    memfds: list[int]
) -> None:
    memfds += [os.memfd_create(n) for n in ("memory-backend-memfd", "pc.bios", "pc.rom")]
    vm = stock((VfioSpec(id="nic0", host="0000:01:00.0"),))
    blocks, inv = await check_inventory(vm)
    assert blocks.ok and not inv.ok and inv.name == "qemu-inventory", inv
    assert "x-query-cpr-memory not available" in inv.detail and "nic0" in inv.detail
    blocks, inv = await check_inventory(vm, required=False)
    assert inv.ok and inv.warning and "not required" in inv.detail, inv
