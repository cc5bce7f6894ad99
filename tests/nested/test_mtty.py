"""
Nested VFIO: a migration-capable mdev (mtty) through live updates.

In cpr-transfer and cpr-exec the old and new QEMU share the one device, so
its VFIO device state must be left alone (the sealvm series' patch
"vfio/migration: Keep device state migration inactive in CPR modes"): no
save/load, no migration-state transition, no reset -- without
``enable-migration=off``.  Normal migration, to another mtty instance, must
still carry the device state.  Scenario: tests/nested/l1_mtty.py (one L1
boot, see conftest.py); these tests read its results.

Evidence per update, each from its own source: QEMU's trace events, kprobes
on the driver's state-change and reset paths plus mtty's reset line in L1's
kernel log, the device's state read through QEMU's fd, and the guest's UART
exchange (bytes in flight in the FIFO across every update).
"""

from __future__ import annotations

from typing import Any

import pytest

from .l0_lib import UPDATES, L1Outcome
from .l1_mtty import GUEST_LCR, STATE_TRACES

pytestmark = pytest.mark.nested


def mtty_result(l1: L1Outcome) -> dict[str, Any]:
    res = l1.scenario("mtty")
    log = l1.logs.get("mtty", "")
    assert res["error"] is None, f"mtty raised:\n{res['error']}\nlog:\n{log[-3000:]}"
    bad = [f"{c['name']}: {c['detail']}" for c in res["checks"] if not c["ok"]]
    assert not bad, "mtty: failed checks:\n" + "\n".join(bad)
    return res


def updates_in(res: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [u for u in res["figures"]["updates"] if u["mode"] == mode]


def assert_guest_used_the_device(u: dict[str, Any]) -> None:
    assert u["mtty_err"] == 0, u
    assert u["mtty_after"] > u["mtty_before"] + 1, u


def assert_device_running_as_programmed(u: dict[str, Any]) -> None:
    dev = u["device"]
    assert dev["state"] == "RUNNING" and dev["lcr"] == GUEST_LCR, dev


@pytest.mark.parametrize("mode", ["cpr-transfer", "cpr-exec"])
def test_cpr_leaves_the_device_state_alone(l1: L1Outcome, mode: str) -> None:
    res = mtty_result(l1)
    rows = updates_in(res, mode)
    assert len(rows) == UPDATES, [u["update"] for u in rows]
    for u in rows:
        moved = {k: u["traces"][k] for k in STATE_TRACES if u["traces"][k]}
        assert not moved, f"update {u['update']}: QEMU touched the device state: {moved}"
        assert u["traces"]["vfio_vmstate_change_cpr"] >= 1, u["traces"]
        assert u["kernel"]["set_state"] == [], u["kernel"]
        assert u["kernel"]["resets"] == 0 and u["kernel"]["reset_log_lines"] == 0, u["kernel"]
        assert_device_running_as_programmed(u)
        assert_guest_used_the_device(u)
        assert u["mism_before"] == u["mism_after"] == 0, u
    pids = {u["pid"] for u in rows}
    if mode == "cpr-exec":
        assert all(u["pid"] == u["pid_before"] for u in rows)
    else:
        assert len(pids) == UPDATES and all(u["pid"] != u["pid_before"] for u in rows)


def test_a_verified_pattern_pass_follows_the_updates(l1: L1Outcome) -> None:
    after = mtty_result(l1)["figures"]["pass_after_updates"]
    assert after["mism"] == 0 and after["heartbeat_mism"] == 0, after


def test_normal_migration_still_migrates_the_device_state(l1: L1Outcome) -> None:
    mig = mtty_result(l1)["figures"]["migration"]
    t = mig["traces"]
    assert t["vfio_save_setup"] >= 1 and t["vfio_save_complete_precopy"] >= 1, t
    assert t["vfio_load_state"] >= 1, t
    assert {"STOP_COPY", "RESUMING"} <= set(mig["set_state"]), mig["set_state"]
    assert {"STOP_COPY", "RESUMING"} <= set(mig["kernel"]["set_state"]), mig["kernel"]
    # the target is another mtty instance: its line settings came with the state
    assert mig["device"]["cdev"] != mtty_result(l1)["figures"]["device_at_start"]["cdev"]
    assert_device_running_as_programmed(mig)
    assert_guest_used_the_device(mig)


def test_the_reset_watch_sees_a_reset(l1: L1Outcome) -> None:
    seen = mtty_result(l1)["figures"]["reset_control"]
    assert seen["resets"] == 1 and seen["reset_log_lines"] == 1, seen


def test_preflight_reports_the_device_per_mode(l1: L1Outcome) -> None:
    views = mtty_result(l1)["figures"]["preflight"]
    for line in views.values():
        assert "kernel: VFIO migration STOP_COPY" in line, line
        assert "enable-migration=auto" in line, line
    for mode in ("cpr-transfer", "cpr-exec"):
        assert "neither saved nor loaded" in views[mode], views[mode]
    assert "saved and loaded into the target" in views["migrate"], views["migrate"]


def test_mtty_scenario_cleans_up(l1: L1Outcome) -> None:
    names = {c["name"]: c["ok"] for c in mtty_result(l1)["checks"]}
    for must in ("L2 QEMU gone after shutdown", "mtty instances removed", "kprobes removed",
                 "L2 run directory cleaned"):
        assert names.get(must) is True, must


def test_paused_cpr_exec_then_cont_runs_the_device(l1: L1Outcome) -> None:
    """New QEMU starts from the device's real state (STOP after a paused
    update), so cont moves it back to RUNNING."""
    p = mtty_result(l1)["figures"]["paused_cpr_exec"]
    assert p["paused"]["state"] == "STOP" and p["after_exec"]["state"] == "STOP", p
    assert p["status_after_exec"] == "paused"
    assert p["during_exec"]["set_state"] == [] and p["during_exec"]["resets"] == 0, p
    assert p["resumed"]["state"] == "RUNNING", p["resumed"]
    assert p["mtty_err"] == 0 and p["mtty_after"] > p["mtty_before"], p


def test_savevm_after_a_failed_cpr_saves_the_device_state(l1: L1Outcome) -> None:
    """The mode parameter stays cpr-exec after a failed cpr-exec; a snapshot
    (snapshot-save, runstate save-vm) must still save the device state."""
    s = mtty_result(l1)["figures"]["savevm_after_failed_cpr"]
    assert s["cpr_status"] == "failed" and s["mode_after_cpr"] == "cpr-exec", s
    assert s["traces"]["vfio_save_setup"] >= 1, s["traces"]
    assert s["traces"]["vfio_save_complete_precopy"] >= 1, s["traces"]
    assert "STOP_COPY" in s["kernel"]["set_state"], s["kernel"]
    assert s["status"] == "running" and s["mtty_err"] == 0, s
