"""
Nested: a VM with vhost-net is refused a live update, where vhost exists.

vhost-net cannot be kept across a live update (the worker belongs to the old
QEMU: VHOST_SET_OWNER binds /dev/vhost-net to its mm), so preflight refuses
an update of a VM with ``vhost = true``, naming why (`sealvm.net.VHOST_REFUSAL`).
L0 has no /dev/vhost-net; L1 has.  Scenario: tests/nested/l1_vhost.py (one
L1 boot, see conftest.py); these tests read its results.
"""

from __future__ import annotations

from typing import Any

import pytest

from sealvm.net import TUN_DEVICE, VHOST_DEVICE

from .l0_lib import L1Outcome
from .l1_vhost import AFTER, MODES, PAUSE_EVENTS, expected_reason

pytestmark = pytest.mark.nested


def vhost_result(l1: L1Outcome) -> dict[str, Any]:
    res = l1.scenario("vhost")
    log = l1.logs.get("vhost", "")
    assert res["error"] is None, f"vhost raised:\n{res['error']}\nlog:\n{log[-3000:]}"
    bad = [f"{c['name']}: {c['detail']}" for c in res["checks"] if not c["ok"]]
    assert not bad, "vhost: failed checks:\n" + "\n".join(bad)
    return res


def test_qemu_runs_with_vhost_net(l1: L1Outcome) -> None:
    fig = vhost_result(l1)["figures"]
    q = fig["vhost_qemu"]
    assert "vhost=on" in q["netdev"] and f"vhostfd={q['vhost_fd']['fd']}" in q["netdev"], q
    assert q["vhost_fd"]["target"] == VHOST_DEVICE and q["tap_fd"]["target"] == TUN_DEVICE, q
    assert q["vhost_workers"], q
    assert [n["qdev_id"] for n in fig["vhost_query_pci"]] == ["net0"], fig["vhost_query_pci"]


@pytest.mark.parametrize("mode", MODES)
def test_update_refused_before_the_guest_pauses(l1: L1Outcome, mode: str) -> None:
    rows = {r["mode"]: r for r in vhost_result(l1)["figures"]["refusals"]}
    r = rows[mode]
    assert r["exit"] == 4 and r["error"] == "PreflightError", r
    assert r["reasons"] == [expected_reason()], r["reasons"]
    assert not [e for e in r["events"] if e in PAUSE_EVENTS], r["events"]
    assert r["query_migrate"] == {} and r["status"] == "running", r
    assert r["before"] == r["after"], r
    assert r["hb_continuous"] and r["beats_after_return"] >= AFTER, r


@pytest.mark.parametrize("mode", MODES)
def test_without_vhost_the_same_vm_updates(l1: L1Outcome, mode: str) -> None:
    rows = {r["mode"]: r for r in vhost_result(l1)["figures"]["control_updates"]}
    r = rows[mode]
    assert r["exit"] == 0 and r["heartbeat_continuous"] is True, r
    assert (r["pid_after"] == r["pid_before"]) == (mode == "exec"), r
    assert {"STOP", "RESUME"} <= set(r["events"]), r["events"]


def test_down_removes_tap_and_namespace(l1: L1Outcome) -> None:
    fig = vhost_result(l1)["figures"]
    for key in ("vhost_down", "control_down"):
        gone = fig[key]
        assert gone["exit"] == 0, gone
        assert not gone["qemu_left"] and not gone["tap_left"] and not gone["netns_left"], gone
