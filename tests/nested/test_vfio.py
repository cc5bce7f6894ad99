"""
Nested VFIO: an emulated-IOMMU L1 host assigns a real DMA engine (edu) to
L2, and L2's QEMU is live-updated under it.

All checks happen inside L1 (tests/nested/l1_*.py) during one boot (the
session fixture `l1` in conftest.py); these tests read the results:

- L1 itself: our kernel, an IOMMU, /dev/iommu, edu bound to vfio-pci;
- IOMMUFD_TEST: CHANGE_PROCESS across a real exec, by file vs by vaddr;
- for iommufd and legacy type1: DMA heartbeat before and after each of 5
  cpr-exec updates, DMA completing within a few heartbeats of each resume
  and, in each run, a DMA issued before STOP that completed after RESUME
  (the guest's own counters), the mapping mode as QEMU traced it and as
  QEMU reports it (x-query-cpr-memory: missing is a failure),
  CHANGE_PROCESS after each exec (iommufd), guest memory pattern intact
  throughout;
- nothing left behind, in L1 or here.
"""

from __future__ import annotations

from typing import Any

import pytest

from .l0_lib import UPDATES, L1Outcome, l0_qemus_mentioning
from .l1_vfio import round_trip_bound, transfer_bound

pytestmark = pytest.mark.nested


def failed_checks(res: dict[str, Any]) -> list[str]:
    return [f"{c['name']}: {c['detail']}" for c in res["checks"] if not c["ok"]]


def assert_scenario_passed(l1: L1Outcome, name: str) -> dict[str, Any]:
    res = l1.scenario(name)
    log = l1.logs.get(name, "")
    assert res["error"] is None, f"{name} raised:\n{res['error']}\nlog:\n{log[-3000:]}"
    bad = failed_checks(res)
    assert not bad, f"{name}: failed checks:\n" + "\n".join(bad)
    return res


def check_names(res: dict[str, Any]) -> set[str]:
    return {c["name"] for c in res["checks"]}


def test_l1_is_an_iommu_host(l1: L1Outcome) -> None:
    info = l1.scenario("l1")["before"]
    assert info["kernel"].startswith("7.2"), info["kernel"]
    assert info["dev_iommu"], "no /dev/iommu in L1"
    assert info["iommu"], "no IOMMU registered in L1 (intel-iommu)"
    edu = [d for d in info["pci"].values() if d["id"] == "0x1234:0x11e8"]
    assert len(edu) == 1 and edu[0]["iommu_group"] is not None
    dmesg = l1.logs.get("dmesg", "")
    assert "DMAR" in dmesg and "IRQ remapping" in dmesg
    assert 0 < l1.result.boot_time < 60


def test_iommufd_change_process_across_exec(l1: L1Outcome) -> None:
    res = assert_scenario_passed(l1, "iommufd")
    names = check_names(res)
    for must in ("after exec: IOMMU_IOAS_CHANGE_PROCESS (by file)",
                 "before exec: CHANGE_PROCESS with a vaddr mapping",
                 "after exec: CHANGE_PROCESS with a vaddr mapping",
                 "after exec: new access pins the memfd's own pages (ACCESS_PAGES)",
                 "after exec: pin taken before exec reads the pattern (ACCESS_RW)",
                 "before exec: ftruncate shrink of the mapped sealed memfd",
                 "before exec: ftruncate grow of the mapped sealed memfd",
                 "after exec: ftruncate shrink of the mapped sealed memfd",
                 "same pid after exec"):
        assert must in names, f"check {must!r} did not run"


@pytest.mark.parametrize("backend", ["iommufd", "legacy"])
def test_dma_continues_through_cpr_exec_updates(l1: L1Outcome, backend: str) -> None:
    res = assert_scenario_passed(l1, f"vfio-{backend}")
    updates = res["figures"]["updates"]
    assert [u["update"] for u in updates] == list(range(1, UPDATES + 1))
    dma = [u["dma_before"] for u in updates] + [updates[-1]["dma_after"]]
    assert all(b > a for a, b in zip(dma, dma[1:], strict=False)), dma
    assert all(u["dma_err"] == 0 for u in updates)
    assert len({u["pid"] for u in updates}) == 1


@pytest.mark.parametrize("backend", ["iommufd", "legacy"])
def test_dma_completes_right_after_each_resume(l1: L1Outcome, backend: str) -> None:
    """From the guest's heartbeat counters around each pause: a transfer and
    a verified round trip end within a few heartbeats of the resume, and in
    the run a DMA issued before STOP completed after RESUME (in flight at the
    last heartbeat before STOP, seen finished only after RESUME)."""
    res = assert_scenario_passed(l1, f"vfio-{backend}")
    hb_ms = res["figures"]["hb_ms"]
    arounds = [u["around_pause"] for u in res["figures"]["updates"]]
    assert len(arounds) == UPDATES
    for a in arounds:
        assert a["found"] and a["dma_err_delta"] == 0, a
        assert a["transfer_done_at"] is not None, a
        assert a["transfer_done_at"] <= transfer_bound(hb_ms), a
        assert a["round_trip_done_at"] is not None, a
        assert a["round_trip_done_at"] <= round_trip_bound(hb_ms), a
    assert any(a["in_flight_across"] for a in arounds), arounds


@pytest.mark.parametrize("backend,mode", [("iommufd", "file"), ("legacy", "vaddr")])
def test_guest_ram_mapping_mode_is_observed(l1: L1Outcome, backend: str, mode: str) -> None:
    res = assert_scenario_passed(l1, f"vfio-{backend}")
    # QEMU's own report (x-query-cpr-memory, from our series): it must be there
    views = [res["figures"]["qmp_view_at_start"]] + [
        u["qmp_view"] for u in res["figures"]["updates"]]
    for view in views:
        assert view is not None, "x-query-cpr-memory is missing from our QEMU"
        (container,) = view["containers"]
        assert container["ram0_modes"] == [mode], view
        if mode == "file":
            assert container["ram0_inodes"] == [view["ram0_inode"]], view
    # the trace events, at start and after each exec
    start = res["figures"]["maps_at_start"]
    if mode == "file":
        assert start["file"] and not start["vaddr"], start
        for u in res["figures"]["updates"]:
            assert u["traces"]["iommufd_change_process"] >= 1, u
            assert not u["maps"]["file"] and not u["maps"]["vaddr"], u
    else:
        assert start["listener"] and not start["file"] and not start["vaddr"], start
        for u in res["figures"]["updates"]:
            assert u["traces"]["iommufd_change_process"] == 0, u
            assert u["traces"]["iommufd_backend_map_file_dma"] == 0, u


def test_nothing_left_behind(l1: L1Outcome) -> None:
    info = l1.scenario("l1")
    assert not info["qemu_left"], f"L2 QEMUs left in L1: {info['qemu_left']}"
    assert not info.get("killed_leftovers"), info.get("killed_leftovers")
    assert not l1.qemu_left, f"L1 QEMU still running: {l1.qemu_left}"
    assert not l0_qemus_mentioning(str(l1.share))


def test_failed_cpr_exec_leaves_no_duplicate_mapping_records(l1: L1Outcome) -> None:
    """Type1's failure path maps every section again to restore the vaddrs;
    the container's mapping records must stay as they were."""
    res = assert_scenario_passed(l1, "vfio-legacy")
    f = res["figures"]["failed_cpr_exec"]
    assert f["migration"][-1:] == ["failed"] and f["status"] == "running", f
    assert f["records_after"] == f["records_before"] > 0, f
