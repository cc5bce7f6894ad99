"""Console line parsing and heartbeat accounting."""

from __future__ import annotations

from sealvm.console import ConsoleLog, Heartbeat, Mismatch, Pass, parse_line


def test_parse_heartbeat() -> None:
    ev = parse_line("HB 42 t=420 gen=3 mism=0", 1.5)
    assert isinstance(ev, Heartbeat)
    assert (ev.seq, ev.guest_ms, ev.host_time) == (42, 420, 1.5)
    assert ev.int("gen") == 3 and ev.int("mism") == 0


def test_parse_mismatch_and_pass() -> None:
    ev = parse_line("MISMATCH gen=2 addr=0x200000 words=512 expected=0xdead got=0x0")
    assert ev == Mismatch(gen=2, addr=0x200000, words=512, expected=0xDEAD, got=0)
    assert parse_line("PASS gen=5 mism=0 ms=290") == Pass(5, 0, 290)


def test_garbage_is_ignored() -> None:
    for line in ["", "HB", "HB x t=1", "HB 1 gen=2", "MISMATCH gen=1", "SeaBIOS (version"]:
        assert parse_line(line) is None


def test_log_counts_and_gaps() -> None:
    log = ConsoleLog()
    for seq, t in [(0, 0.00), (1, 0.01), (2, 0.02), (3, 0.12), (4, 0.13)]:
        log.add(f"HB {seq} t={seq * 10} gen=0 mism=0", t)
    log.add("MISMATCH gen=0 addr=0x1000 words=3 expected=0x1 got=0x2")
    assert log.counter_continuous()
    assert abs(log.largest_gap() - 0.10) < 1e-9
    assert abs(log.largest_gap(3) - 0.01) < 1e-9
    # only gaps that began at or after a moment (a resume): not the pause
    assert abs(log.largest_gap(after=0.05) - 0.01) < 1e-9
    assert abs(log.largest_gap(after=0.02) - 0.10) < 1e-9
    assert log.largest_gap(after=0.2) == 0.0
    # only gaps that ended by a moment (the pause's start): the stalls before it
    assert abs(log.largest_gap(before=0.12) - 0.10) < 1e-9
    assert abs(log.largest_gap(before=0.11) - 0.01) < 1e-9
    assert log.largest_gap(before=0.0) == 0.0
    # the gap a moment falls in
    assert log.gap_around(0.05) == (0.02, 0.12)
    assert log.gap_around(0.12) == (0.12, 0.13)
    assert log.gap_around(0.5) is None and log.gap_around(-1.0) is None
    assert log.mismatched_words == 3
    log.add("HB 0 t=0 gen=0 mism=0", 0.2)  # a reset guest starts over
    assert not log.counter_continuous()


def test_mismatch_counter_is_the_guests_own() -> None:
    log = ConsoleLog()
    assert log.mismatch_counter() is None
    log.add("HB 0 t=0 gen=0 mism=0")
    assert log.mismatch_counter() == 0
    # the guest counts words, whether or not its MISMATCH lines arrived
    log.add("HB 1 t=10 gen=1 mism=7")
    assert log.mismatch_counter() == 7 and not log.mismatches
    log.add("HB 2 t=20 gen=1")  # a heartbeat without the counter changes nothing
    assert log.mismatch_counter() == 7


def test_measure_gaps_splits_them_at_the_pause() -> None:
    """The gap around QEMU's STOP -> RESUME is the pause; a longer stall
    before it (the new QEMU starting beside the guest) is not."""
    import time

    from sealvm.update.report import UpdateReport, measure_gaps

    mono_to_wall = time.time() - time.monotonic()
    t0 = time.monotonic() - 10.0
    log = ConsoleLog()
    # heartbeats every 10 ms; a 30 ms gap (20 ms stall) after 0.02; QEMU
    # stops at 0.305 and resumes at 0.320, the first heartbeat after at 0.325
    stamps = [0.00, 0.01, 0.02] + [i / 100 for i in range(5, 31)] + [0.325, 0.335]
    for seq, t in enumerate(stamps):
        log.add(f"HB {seq} t={seq * 10} gen=0 mism=0", t0 + t)
    report = UpdateReport(mode="cpr-transfer", qemu_before="q", qemu_after="q",
                          pid_before=1, pid_after=2, ram_before=[], ram_after=[],
                          pause_qmp=0.015, resumed_at=t0 + 0.320 + mono_to_wall)
    measure_gaps(report, log, 0, 0.010, resumed=t0 + 0.321)
    assert report.pause_gap is not None and abs(report.pause_gap - 0.015) < 1e-3
    assert report.stall_before_stop is not None
    assert abs(report.stall_before_stop - 0.020) < 1e-3
    # the largest gap of all is the stall; nothing long after the resume
    assert report.pause_guest is not None and abs(report.pause_guest - 0.020) < 1e-3
    assert report.stall_after_resume is not None and report.stall_after_resume < 1e-3
    # without QMP timestamps (a paused guest) nothing is located
    bare = UpdateReport(mode="cpr-exec", qemu_before="q", qemu_after="q", pid_before=1,
                        pid_after=1, ram_before=[], ram_after=[])
    measure_gaps(bare, log, 0, 0.010, resumed=None)
    assert bare.pause_gap is None and bare.stall_before_stop is None
    assert bare.stall_after_resume is None and bare.pause_guest is not None
