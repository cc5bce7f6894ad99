"""
The nested scenarios' verdicts on made-up evidence (no L1): each check
passes on what a working product shows and fails on what a broken one
would -- the negative controls of the checks themselves.
"""

from __future__ import annotations

from typing import Any

from sealvm.console import Heartbeat

from .l1_lib import Checks
from .l1_mdma import gap_verdict
from .l1_vfio import check_qmp_view, dma_around_pause
from .l1_vhost import AFTER, expected_reason, refusal_verdict

MS = 1_000_000
PERIOD = 20 * MS
WITNESS = {"period_ns": 5 * MS, "stalls_list": []}


def beats(times_ms: list[float]) -> list[tuple[int, int, int]]:
    """(seq, pin_ns, rw_ns), the write 1 ms after the pin."""
    return [(i + 1, int(t * MS), int((t + 1) * MS)) for i, t in enumerate(times_ms)]


def test_gaps_within_two_periods_pass() -> None:
    v = gap_verdict(beats([0, 20, 40, 75, 95]), WITNESS, t0=10 * MS, t1=100 * MS,
                    period_ns=PERIOD)
    assert v["ok"] and v["covered"] and v["max_ms"] == 35, v


def test_a_device_stall_fails_whatever_the_guest_did() -> None:
    v = gap_verdict(beats([0, 20, 140, 160]), WITNESS, t0=10 * MS, t1=170 * MS,
                    period_ns=PERIOD)
    assert not v["ok"] and v["max_net_ms"] == 120 and not v["excused"], v


def test_only_an_l1_stall_in_the_same_interval_excuses_a_gap() -> None:
    same = dict(WITNESS, stalls_list=[(21 * MS, 131 * MS)])
    v = gap_verdict(beats([0, 20, 140, 160]), same, t0=10 * MS, t1=170 * MS,
                    period_ns=PERIOD)
    assert v["ok"] and v["excused"], v
    elsewhere = dict(WITNESS, stalls_list=[(150 * MS, 260 * MS)])
    v = gap_verdict(beats([0, 20, 140, 160]), elsewhere, t0=10 * MS, t1=170 * MS,
                    period_ns=PERIOD)
    assert not v["ok"], v


def test_a_ring_that_does_not_cover_the_window_fails() -> None:
    v = gap_verdict(beats([50, 70, 90]), WITNESS, t0=10 * MS, t1=100 * MS, period_ns=PERIOD)
    assert not v["ok"] and not v["covered"], v
    hole = [b for b in beats([0, 20, 40, 60]) if b[0] != 3]
    v = gap_verdict(hole, WITNESS, t0=10 * MS, t1=70 * MS, period_ns=PERIOD)
    assert not v["ok"] and not v["covered"], v


def hb(seq: int, host: float, **values: int) -> Heartbeat:
    return Heartbeat(seq, seq * 20, {k: str(v) for k, v in values.items()}, host)


def run(fin_after: list[int], dur_us: int) -> dict[str, Any]:
    """Heartbeats around a 1.5 s pause: a transfer in flight at H_b (iss 5,
    fin 4); after the pause, dma_fin as given."""
    hbs = [hb(1, 0.00, dma=1, dma_err=0, dma_iss=5, dma_fin=4, dma_dur_us=100_000),
           hb(2, 0.02, dma=1, dma_err=0, dma_iss=5, dma_fin=4, dma_dur_us=100_000)]
    for k, fin in enumerate(fin_after):
        hbs.append(hb(3 + k, 1.5 + 0.02 * k, dma=1 + (fin - 4) // 2, dma_err=0,
                      dma_iss=max(5, fin + 1), dma_fin=fin,
                      dma_dur_us=dur_us if fin > 4 else 100_000))
    return dma_around_pause(hbs, 20)


def test_nothing_in_flight_at_the_last_heartbeat_before_stop() -> None:
    hbs = [hb(1, 0.00, dma=1, dma_err=0, dma_iss=4, dma_fin=4, dma_dur_us=100_000),
           hb(2, 1.50, dma=1, dma_err=0, dma_iss=5, dma_fin=5, dma_dur_us=60_000)]
    a = dma_around_pause(hbs, 20)
    assert a["transfer_done_at"] == 0 and not a["in_flight_across"], a


def test_dma_across_the_pause() -> None:
    a = run([5, 5, 5, 5, 6, 6], 30_000)
    assert a["transfer_done_at"] == 0 and a["round_trip_done_at"] == 4, a
    assert a["in_flight_across"] and a["device_done_after_stop"], a


def test_dma_that_does_not_resume_or_spans_nothing() -> None:
    stuck = run([4] * 14, 30_000)
    assert stuck["transfer_done_at"] is None and stuck["round_trip_done_at"] is None, stuck
    assert not stuck["in_flight_across"], stuck
    full = run([5, 5, 5, 5, 6, 6], 100_500)  # took its whole 100 ms of guest time
    assert full["in_flight_across"] and not full["device_done_after_stop"], full


def test_missing_qmp_view_is_a_failed_check_on_our_qemu() -> None:
    checks = Checks("t")
    check_qmp_view(checks, "view", None, "iommufd", stock_qemu=False)
    assert [c.ok for c in checks.checks] == [False], checks.checks
    check_qmp_view(checks, "view", None, "iommufd", stock_qemu=True)
    assert len(checks.checks) == 1  # a stock QEMU is not asked


def refusal_row(**changes: Any) -> dict[str, Any]:
    """What a refused update of a vhost VM shows when sealvm works."""
    same = {"pid": 7, "start_time": 100, "exe": "/q"}
    row: dict[str, Any] = {
        "mode": "exec", "exit": 4, "error": "PreflightError", "reasons": [expected_reason()],
        "events": [], "query_migrate": {}, "status": "running", "before": same,
        "after": dict(same), "hb_before": 50, "hb_after": 50 + AFTER, "hb_continuous": True,
        "beats_after_return": AFTER, "largest_gap": 0.03, "journal": []}
    return row | changes


def failed_refusal_checks(row: dict[str, Any]) -> list[str]:
    return [name for name, ok, _ in refusal_verdict(row) if not ok]


def test_a_vhost_refusal_passes_when_nothing_happened() -> None:
    assert failed_refusal_checks(refusal_row()) == []


def test_a_vhost_update_that_went_ahead_fails() -> None:
    # preflight without its vhost check: the update starts, the guest pauses
    went = refusal_row(exit=0, error=None, reasons=None,
                       events=["SEALVM_UPDATE_START", "STOP", "RESUME", "SEALVM_UPDATE_END"],
                       after={"pid": 8, "start_time": 200, "exe": "/q"})
    assert len(failed_refusal_checks(went)) == 4, failed_refusal_checks(went)
    # refused, but for another reason, or with the reason reworded
    for reasons in (["binary: no such file"], [expected_reason() + " (extra)"],
                    [expected_reason(), "binary: no such file"]):
        assert failed_refusal_checks(refusal_row(reasons=reasons)) == [
            "exec: the only reason is net-net0: VHOST_REFUSAL, as written"]
    # refused only after the guest had paused
    late = refusal_row(events=["STOP", "RESUME"])
    assert failed_refusal_checks(late) == ["exec: no event during the attempt "
                                           "(no STOP/RESUME/update start)"]
    assert failed_refusal_checks(refusal_row(hb_continuous=False)) == [
        "exec: heartbeat continuous through the attempt"]
    # the guest stopped once sealvm had returned (beats during the call only)
    assert failed_refusal_checks(refusal_row(beats_after_return=0)) == [
        "exec: heartbeat continuous through the attempt"]
