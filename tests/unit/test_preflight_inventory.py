"""Preflight's inventory check when QEMU lacks ``x-query-cpr-memory``:
pure logic, a QMP stand-in instead of QEMU."""

from __future__ import annotations

from typing import Any, cast

from sealvm.machine import Machine
from sealvm.preflight import check_inventory


class NoInventoryQmp:
    """Answers like a QEMU without sealvm's series: the command is absent."""

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        assert command == "query-commands", command
        return [{"name": "query-status"}, {"name": "migrate"}]


async def test_missing_inventory_fails_when_sealvm_qemu_is_required() -> None:
    (check,) = await check_inventory(cast(Machine, NoInventoryQmp()))
    assert check.name == "qemu-inventory" and not check.ok, check
    assert "x-query-cpr-memory not available" in check.detail


async def test_missing_inventory_is_only_reported_for_a_stock_qemu() -> None:
    (check,) = await check_inventory(cast(Machine, NoInventoryQmp()), required=False)
    assert check.ok and "not required" in check.detail, check
