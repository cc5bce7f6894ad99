"""
A mediated device that pins guest memory keeps DMA-ing through live
updates on iommufd; the legacy type1 path refuses, and why.

mdma (images/host/mdma/mdma.c, in the L1 kernel) writes a heartbeat into
L2's RAM from a kernel worker with vfio_pin_pages() + vfio_dma_rw() and
counts failures with their errno in sysfs; the test guest reads it back.
The checks run inside L1 (tests/nested/l1_mdma.py) during the shared boot
(conftest.py); these tests read the results:

- iommufd (fds passed by sealvm, RAM mapped by file): 5 cpr-exec and 5
  cpr-transfer updates, zero failures, and every gap between the device's
  consecutive successful pins and writes (its own ktime_get_ns stamps) within
  two periods, whatever the guest's pause; only what the in-kernel witness
  (an hrtimer on the same CPU and clock) shows L1 itself stalled for, in the
  same interval, is not counted; the guest's own mism= counter stays 0 and a
  complete verified pass follows the last update;
- the gap check fails when the driver delays every pin by 100 ms (kept
  negative control);
- legacy type1: QEMU's mdev CPR blocker refuses both modes, the guest runs
  on; by hand on /dev/vfio/vfio, VFIO_DMA_UNMAP_FLAG_VADDR is EBUSY with the
  mdev attached, and the mdev cannot attach (EBUSY) while vaddrs are invalid;
- every mdev and QEMU gone afterwards.
"""

from __future__ import annotations

from typing import Any

import pytest

from .l0_lib import UPDATES, L1Outcome
from .l1_mdma import GAP_PERIODS, PERIOD_MS, SETTLE_RECORDS
from .test_vfio import assert_scenario_passed, check_names

pytestmark = pytest.mark.nested


@pytest.fixture(scope="module")
def iommufd_run(l1: L1Outcome) -> dict[str, Any]:
    return assert_scenario_passed(l1, "mdma-iommufd")


@pytest.fixture(scope="module")
def legacy_run(l1: L1Outcome) -> dict[str, Any]:
    return assert_scenario_passed(l1, "mdma-legacy")


@pytest.mark.parametrize("mode", ["cpr-exec", "cpr-transfer"])
def test_mdev_keeps_dma_through_updates_on_iommufd(iommufd_run: dict[str, Any],
                                                   mode: str) -> None:
    rows = [u for u in iommufd_run["figures"]["updates"] if u["mode"] == mode]
    assert len(rows) == UPDATES, rows
    for u in rows:
        assert u["device"]["pin_err"] == 0 and u["device"]["rw_err"] == 0, u
        assert u["device"]["beats"] > 0 and u["seen_after"] > u["seen_before"], u
        g = u["gaps"]
        assert g["covered"] and g["n"] >= 2 * SETTLE_RECORDS, g
        assert g["bound_ms"] == GAP_PERIODS * PERIOD_MS, g
        # every gap, net of what the witness shows L1 itself stalled for
        assert g["max_net_ms"] <= g["bound_ms"], g
        assert u["mism_before"] == u["mism_after"] == 0, u
    if mode == "cpr-exec":
        assert len({u["pid"] for u in rows}) == 1, "cpr-exec keeps the pid"


def test_mdev_counted_no_failure_on_iommufd(iommufd_run: dict[str, Any]) -> None:
    end = iommufd_run["figures"]["stats_at_end"]
    assert end["pin_err"] == 0 and end["rw_err"] == 0, end
    assert not [k for k in end if k.startswith("errno_")], end
    assert end["pin_ok"] >= end["beats"] > 0, end
    guest = iommufd_run["figures"]["guest_at_end"]
    assert guest["lost"] == 0 and guest["bad"] == 0 and guest["dev_err"] == 0, guest
    assert "guest RAM mapped by file (iommufd_backend_map_file_dma)" in check_names(
        iommufd_run)


def test_legacy_qemu_blocks_cpr_for_mdev(legacy_run: dict[str, Any]) -> None:
    fig = legacy_run["figures"]
    for mode in ("cpr-exec", "cpr-transfer"):
        assert any("CPR does not support vfio mdev" in r for r in fig[f"preflight_{mode}"])
    assert "CPR does not support vfio mdev" in fig["qmp_migrate_error"]
    assert fig["legacy_l2_stats"]["pin_err"] == 0 and fig["legacy_l2_stats"]["rw_err"] == 0


def test_legacy_type1_keeps_pinning_devices_out_of_the_vaddr_window(
        legacy_run: dict[str, Any]) -> None:
    ev = legacy_run["figures"]["kernel_rule"]
    assert ev["unmap_vaddr_with_mdev"] == "EBUSY", ev
    assert ev["update_vaddr_ext_with_mdev"] == 0 and ev["update_vaddr_ext_pci_only"] == 1, ev
    assert ev["attach_mdev_in_window"] == "EBUSY", ev
    assert ev["unmap_vaddr_after_attach"] == "EBUSY", ev
    assert ev["mdev_container_seq"] > 0 and ev["after_remap_seq"] > 0, ev
    assert ev["device"]["pin_err"] == 0 and ev["device"]["rw_err"] == 0, ev


def test_gap_check_fails_when_pins_stall(legacy_run: dict[str, Any]) -> None:
    """Negative control: the driver delays every pin by 100 ms."""
    ctl = legacy_run["figures"]["stall_control"]
    v = ctl["verdict"]
    assert v["covered"] and v["n"] >= 4, v
    assert not v["ok"] and v["max_net_ms"] >= ctl["stall_ms"] and not v["excused"], v


def test_legacy_type1_pins_need_the_mapping_process_mm(legacy_run: dict[str, Any]) -> None:
    """What exec does to a type1 mapping: pins go through the old mm."""
    gone = legacy_run["figures"]["kernel_rule"]["mapper_gone"]
    assert gone["seq"] == 0 and gone["device"]["pin_ok"] == 0, gone
    assert gone["device"]["pin_err"] > 0 and set(gone["errnos"]) == {"ENODEV"}, gone


def test_no_mdma_mdev_left_behind(l1: L1Outcome, iommufd_run: dict[str, Any],
                                  legacy_run: dict[str, Any]) -> None:
    created = {iommufd_run["figures"]["mdev"], legacy_run["figures"]["mdev"]}
    left = set(l1.scenario("l1")["after"]["mdevs"])
    assert not created & left, f"mdma mdevs left in L1: {created & left}"
