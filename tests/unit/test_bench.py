"""The bench's pure logic: its one statistic, its usage errors, its table
with missing values, and the history it appends to and compares."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sealvm.bench import args, history, report
from sealvm.bench.__main__ import main
from sealvm.bench.batch import Batch, BatchRound
from sealvm.bench.run import Point, Sample
from sealvm.bench.stats import Dist, percentile, summarize
from sealvm.update import UpdateReport

# ---- stats: nearest rank


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(20, 0, -1)]  # 20 .. 1, unsorted on purpose
    assert percentile(values, 50) == 10.0  # the lower middle value, not 10.5
    assert percentile(values, 95) == 19.0  # ceil(0.95 * 20) = 19th
    assert percentile(values, 100) == 20.0
    assert percentile(values, 1) == 1.0
    assert percentile([7.0], 50) == percentile([7.0], 95) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == 5.0  # ceil(4.75) = 5th


@pytest.mark.parametrize("values,q", [([], 50), ([1.0], 0), ([1.0], 101)])
def test_percentile_refuses(values: list[float], q: float) -> None:
    with pytest.raises(ValueError):
        percentile(values, q)


def test_summarize_counts_missing_values() -> None:
    d = summarize([0.03, None, 0.01, 0.02, None])
    assert d == Dist(n=5, n_ok=3, p50=0.02, p95=0.03, max=0.03)
    assert d.missing == 2
    assert summarize([None, None]) == Dist(2, 0, None, None, None)
    assert summarize([]) == Dist(0, 0, None, None, None)
    assert Dist.from_dict(d.to_dict()) == d


# ---- usage errors


@pytest.fixture
def binaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    for var in ("SEALVM_QEMU", "SEALVM_QEMU_UPSTREAM", "SEALVM_GUEST"):
        monkeypatch.delenv(var, raising=False)
    for name in ("qemu", "upstream", "guest"):
        (tmp_path / name).write_text("")
    return ["--qemu", str(tmp_path / "qemu"), "--qemu-upstream", str(tmp_path / "upstream"),
            "--guest", str(tmp_path / "guest")]


@pytest.mark.parametrize("argv,named", [
    (["--hugetlb-sizes", ""], "--hugetlb-sizes"),
    (["--hugetlb-sizes", "1G,"], "--hugetlb-sizes"),
    (["--hugetlb-sizes", "3M"], "--hugetlb-sizes"),
    (["--sizes", "0"], "--sizes"),
    (["--sizes", ""], "--sizes"),
    (["--sizes", "1G,1G"], "--sizes"),
    (["--sizes", "8M"], "--sizes"),
    (["--sizes", "lots"], "--sizes"),
    (["--classic-sizes", ""], "--classic-sizes"),
    (["--classic-sizes", "4G,nine"], "--classic-sizes"),
    (["--updates", "0"], "--updates"),
    (["--updates", "-3"], "--updates"),
    (["--updates", "many"], "--updates"),
    (["--modes", "sealvm-exec,warp"], "--modes"),
    (["--modes", ""], "--modes"),
    (["--modes", "classic,classic"], "--modes"),
    (["--vms", "some"], "--vms"),
    (["--at-once", ""], "--at-once"),
    (["--at-once", "1,0"], "--at-once"),
    (["--at-once", "4,4"], "--at-once"),
    (["--at-once", "100"], "--at-once"),
    (["--at-once", "two"], "--at-once"),
    (["--at-once-size", "1G,2G"], "--at-once-size"),
    (["--at-once-size", "5M"], "--at-once-size"),
    (["--at-once-rounds", "0"], "--at-once-rounds"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v) or "empty")
def test_bad_argument_is_a_usage_error(argv: list[str], named: str, binaries: list[str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        args.parse(binaries + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and named in err.splitlines()[-1], err


def test_missing_binary_is_a_usage_error(binaries: list[str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        args.parse(binaries[2:])  # no --qemu
    assert exc.value.code == 2
    assert "--qemu missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        args.parse([*binaries[:2], binaries[2], "/nonexistent/qemu", *binaries[4:]])
    assert exc.value.code == 2
    assert "--qemu-upstream: /nonexistent/qemu" in capsys.readouterr().err


def test_good_arguments(binaries: list[str]) -> None:
    cfg = args.parse([*binaries, "--sizes", "512M,256M", "--modes",
                      "sealvm-exec,sealvm-exec-2M", "--hugetlb-sizes", "1G"])
    assert cfg.updates == args.DEFAULT_UPDATES >= 20
    assert cfg.all_sizes() == [256 << 20, 512 << 20, 1 << 30]
    assert cfg.modes_at(1 << 30) == ["sealvm-exec-2M"]
    assert cfg.modes_at(256 << 20) == ["sealvm-exec"]
    assert cfg.at_once == [1, 4, 8] and cfg.at_once_size == 512 << 20
    assert args.parse([*binaries, "--at-once", "none"]).at_once == []
    assert args.parse([*binaries, "--at-once", "2, 3", "--at-once-size", "256M"]).at_once == [2, 3]
    # no upstream mode: no upstream binary needed
    cfg = args.parse([*binaries[:2], *binaries[4:], "--modes", "sealvm-transfer"])
    assert cfg.qemu_upstream is None


def test_default_rows_are_the_goals_and_classic_stops_at_4g(binaries: list[str]) -> None:
    cfg = args.parse(binaries)
    assert set(cfg.modes) == set(args.DEFAULT_MODES)
    assert "sealvm-exec-cold" not in cfg.modes and "sealvm-exec-oneway" not in cfg.modes
    assert cfg.modes_at(8 << 30) == ["sealvm-exec", "upstream-exec", "sealvm-transfer"]
    assert "classic" in cfg.modes_at(4 << 30)
    # the diagnostics on request, classic everywhere on request
    cfg = args.parse([*binaries, "--modes", "sealvm-exec-cold,classic", "--classic-sizes", "all"])
    assert cfg.modes_at(8 << 30) == ["sealvm-exec-cold", "classic"]


# ---- the table and goals


def _report(guest: float | None, qmp: float | None) -> UpdateReport:
    return UpdateReport(mode="cpr-exec", qemu_before="q", qemu_after="q", pid_before=1,
                        pid_after=1, ram_before=[], ram_after=[], pause_guest=guest,
                        pause_qmp=qmp, phases={"exec": 0.03}, total=0.1)


def test_worst_size_goals() -> None:
    """The absolute goals take each statistic's worst size; a mode that was
    not run is "not measured", not met."""
    def point(mode: str, size: int, *guest: float) -> Point:
        return Point(mode, size, "together", [Sample(i, _report(g, g - 0.002))
                                              for i, g in enumerate(guest)])
    pts = [point("sealvm-exec", 1 << 30, 0.040, 0.050, 0.070),
           point("sealvm-exec", 8 << 30, 0.045, 0.055, 0.058)]
    r = report.ratios(pts)
    exe = r["sealvm-exec guest-seen pause, worst size (s)"]
    assert exe == {"p50": 0.055, "p95": 0.070}  # p50 from 8G, p95 from 1G
    lines = "\n".join(report.ratio_lines(r))
    assert "sealvm-exec guest-seen pause, worst size (s)" in lines
    assert "p50  55.0 ms  p95  70.0 ms  [<= 60 ms]  MISSED (p95)" in lines
    assert "sealvm-transfer guest-seen pause, worst size (s)" in lines
    assert "[<= 20 ms]  not measured" in lines
    ok = report.ratios([point("sealvm-transfer", 1 << 30, 0.010, 0.012, 0.015)])
    assert report.verdict(ok["sealvm-transfer guest-seen pause, worst size (s)"], 0.020) == "ok"


def test_at_once_table_and_goal() -> None:
    """Wall time per round of several VMs at once against one; a failed
    round has no wall time and counts as missing; a count not run is
    'not measured'."""
    def batch(count: int, *walls: float | None) -> Batch:
        b = Batch(count, 512 << 20)
        b.rounds = [BatchRound(i, w, [_report(0.04, 0.03)] * count,
                               [] if w is not None else ["vm: UpdateError: boom"])
                    for i, w in enumerate(walls)]
        return b
    one, eight = batch(1, 0.20, 0.22, 0.25), batch(8, 0.50, None, 0.60)
    skipped = Batch(16, 512 << 20, skipped="16 VMs of 512 MiB need 8192 MiB")
    text = "\n".join(report.batch_table([one, eight, skipped]))
    assert "220.0/250.0/250.0" in text and "500.0/600.0/600.0 [2/3]" in text
    assert "skipped: 16 VMs" in text
    r = report.ratios([], [one, eight])["wall(8 VMs at once)/wall(1 VM) sealvm-exec"]
    assert r == {"p50": 0.50 / 0.22, "p95": 0.60 / 0.25}
    lines = "\n".join(report.ratio_lines(report.ratios([], [one, eight])))
    assert "[<= 2.0]  MISSED (p50, p95)" in lines
    assert "[<= 2.0]  not measured" in "\n".join(report.ratio_lines(report.ratios([], [one])))
    # the first of the 8 updated alone, the other 7 running
    eight.alone = [BatchRound(i, w) for i, w in enumerate((0.40, 0.44, 0.45))]
    text = "\n".join(report.batch_table([one, eight]))
    assert "440.0/450.0/450.0  only the first VM updated, the other 7 running" in text
    r2 = report.ratios([], [one, eight])
    assert r2["wall(one of 8 alone, 7 running)/wall(1 VM)"] == {"p50": 0.44 / 0.22,
                                                               "p95": 0.45 / 0.25}
    assert r2["wall(8 VMs at once)/wall(one of 8 alone)"] == {"p50": 0.50 / 0.44,
                                                             "p95": 0.60 / 0.45}


def test_table_shows_missing_values_and_failures() -> None:
    p = Point("sealvm-exec", 256 << 20, "together")
    p.samples = [Sample(0, _report(0.04, 0.03), resident=256 << 20, mapped=128 << 20,
                        teardown=0.01, total=0.12),
                 Sample(1, _report(0.05, None), teardown=None, total=None),
                 Sample(2, error="UpdateError: boom")]
    f = report.figures(p)
    assert f["pause_guest"] == Dist(3, 2, 0.04, 0.05, 0.05)
    assert f["pause_qmp"] == Dist(3, 1, 0.03, 0.03, 0.03)
    text = "\n".join(report.table([p]))
    assert "2/3" in text  # two updates of three gave a report
    assert "30.0/30.0/30.0 [1/3]" in text  # QMP pause: one value of three
    assert "10.0/10.0/10.0 [1/3]" in text  # teardown
    assert "exec=30.0/30.0 [2/3]" in text
    q = Point("upstream-exec", 256 << 20, "together", [Sample(0, _report(0.2, 0.19), total=0.3)])
    assert report.figures(q)["teardown"] is None
    assert "in exec" in "\n".join(report.table([q]))


def test_goals_are_judged_on_p50_and_p95() -> None:
    assert report.verdict({"p50": 0.2, "p95": 0.29}, 0.3) == "ok"
    assert report.verdict({"p50": 0.2, "p95": 0.31}, 0.3) == "MISSED (p95)"
    assert report.verdict({"p50": 0.4, "p95": 0.5}, 0.3) == "MISSED (p50, p95)"
    assert report.verdict({"p50": None, "p95": None}, 0.3) == "not measured"
    assert report.verdict({"p50": 0.1, "p95": None}, 0.3) == "ok on p50 only"


# ---- history


def _entry(date: str, guest_p50: float, guest_p95: float) -> dict[str, object]:
    fig = {"n": 20, "n_ok": 20, "p50": guest_p50, "p95": guest_p95, "max": guest_p95}
    return {"date": date, "commit": "abc", "load_start": [1.0, 1.0, 1.0],
            "load_end": [1.5, 1.0, 1.0], "machine": {"nproc": 2}, "args": {"updates": 20},
            "points": [{"mode": "sealvm-exec", "size": 1 << 30,
                        "figures": {"pause_guest": fig, "teardown": None}}],
            "ratios": {"sealvm/upstream cpr-exec pause at 8G": {"p50": 0.3, "p95": 0.4},
                       "sealvm-exec guest-seen pause, worst size (s)":
                           {"p50": 0.0504, "p95": 0.0604}}}


def test_history_appends_and_compares(tmp_path: Path) -> None:
    assert history.compare_last(tmp_path)[0] == 1  # nothing to compare yet
    history.append(tmp_path, _entry("2026-11-30T08:00:00+00:00", 0.040, 0.050))
    status, lines = history.compare_last(tmp_path)
    assert status == 1 and "1 run(s)" in lines[0]
    with open(tmp_path / history.HISTORY, "a") as f:
        f.write('{"date": "a run killed mid-wri\n')
    history.append(tmp_path, _entry("2026-11-30T09:00:00+00:00", 0.044, 0.040))
    runs = history.load(tmp_path)
    assert [r["date"] for r in runs] == ["2026-11-30T08:00:00+00:00",
                                         "2026-11-30T09:00:00+00:00"]
    status, lines = history.compare_last(tmp_path)
    assert status == 0
    row = next(line for line in lines if "pause_guest" in line)
    assert "40.0 -> 44.0 (+10%)" in row and "50.0 -> 40.0 (-20%)" in row
    assert any("p50 0.300 -> 0.300" in line for line in lines)
    # a time prints in ms: 60.4 ms is not "0.060", the bound it missed
    assert any("p50 50.4 ms -> 50.4 ms   p95 60.4 ms -> 60.4 ms" in line for line in lines)
    assert not any(line.startswith("note:") for line in lines)  # same machine, same args


def test_compare_notes_what_differs_but_the_uptime() -> None:
    a = _entry("2026-11-30T08:00:00+00:00", 0.040, 0.050)
    b = _entry("2026-11-30T09:00:00+00:00", 0.040, 0.050)
    a["machine"] = {"nproc": 2, "uptime_s": 100, "qemu": {"sealvm": "k1"}}
    b["machine"] = {"nproc": 2, "uptime_s": 3700, "qemu": {"sealvm": "k1"}}
    assert not any(line.startswith("note:") for line in history.compare(a, b))
    b["machine"] = {"nproc": 4, "uptime_s": 3700, "qemu": {"sealvm": "k2"}}
    b["args"] = {"updates": 5}
    notes = [line for line in history.compare(a, b) if line.startswith("note:")]
    assert notes == [
        "note: machine differ: nproc 2 -> 4; qemu {'sealvm': 'k1'} -> {'sealvm': 'k2'}",
        "note: args differ: updates 20 -> 5"]


def test_first_run_compares_against_the_published_one(tmp_path: Path) -> None:
    """A fresh clone's first `make bench`: `make bench-compare` compares it
    against the last run of the published history; with two runs of its own,
    against its own previous one."""
    published = tmp_path / "published.jsonl"
    out = tmp_path / "out"
    out.mkdir()
    history.append(tmp_path, _entry("2026-12-01T13:00:00+00:00", 0.050, 0.060))
    (tmp_path / history.HISTORY).rename(published)
    assert history.compare_last(out, baseline=published)[0] == 1  # no run of its own
    history.append(out, _entry("2026-12-02T08:00:00+00:00", 0.040, 0.050))
    assert history.compare_last(out)[0] == 1
    status, lines = history.compare_last(out, baseline=published)
    assert status == 0 and "published" in lines[0]
    row = next(line for line in lines if "pause_guest" in line)
    assert "50.0 -> 40.0 (-20%)" in row
    history.append(out, _entry("2026-12-02T09:00:00+00:00", 0.044, 0.050))
    status, lines = history.compare_last(out, baseline=published)
    assert "published" not in lines[0]
    assert "40.0 -> 44.0 (+10%)" in next(line for line in lines if "pause_guest" in line)


def test_baseline_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        args.parse(["--compare", "--baseline", str(tmp_path / "nope.jsonl")])
    assert exc.value.code == 2 and "--baseline" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        args.parse(["--baseline", str(tmp_path)])
    assert exc.value.code == 2 and "only with --compare" in capsys.readouterr().err


def test_dated_table_names_do_not_overwrite(tmp_path: Path) -> None:
    when = datetime(2026, 11, 30, 8, 5, tzinfo=UTC)
    assert history.table_stem(when, tmp_path) == "bench-2026-11-30T0805"
    (tmp_path / "bench-2026-11-30T0805.json").write_text("{}")
    assert history.table_stem(when, tmp_path) == "bench-2026-11-30T0805-2"


def test_machine_record(tmp_path: Path) -> None:
    binary = tmp_path / "qemu" / "sealvm-22e58152bd23ab1c" / "build" / "qemu-system-x86_64"
    binary.parent.mkdir(parents=True)
    binary.write_text("")
    m = history.machine({"sealvm": binary, "upstream": None})
    assert m["qemu"] == {"sealvm": "sealvm-22e58152bd23ab1c", "upstream": None}
    assert m["nproc"] and m["mem_total"] and m["kernel"]
    json.dumps(m)


def test_compare_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    history.append(tmp_path, _entry("2026-11-30T08:00:00+00:00", 0.040, 0.050))
    history.append(tmp_path, _entry("2026-11-30T09:00:00+00:00", 0.040, 0.050))
    assert main(["--compare", "--out", str(tmp_path)]) == 0
    assert "40.0 -> 40.0 (+0%)" in capsys.readouterr().out


async def test_a_vm_that_does_not_launch_fails_its_count_not_the_bench(
        binaries: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--at-once: a launch that fails (here a stand-in raising LaunchError;
    the real one was QEMU unable to open its serial log) is recorded as
    FAILED for that count and the bench goes on to print its table."""
    from sealvm.bench import batch
    from sealvm.bench.run import Slot
    from sealvm.errors import LaunchError

    async def launch(*a: object, **kw: object) -> Slot:
        raise LaunchError("QEMU exited before its monitor answered")

    monkeypatch.setattr(Slot, "launch", launch)
    cfg = args.parse([*binaries, "--at-once", "1", "--at-once-size", "64M"])
    failed: list[str] = []
    assert cfg.qemu is not None
    b = await batch.run_batch(cfg, 1, qemu=cfg.qemu, run_root=tmp_path, failed=failed)
    assert b.rounds == [] and not b.skipped
    assert failed == ["at once x1: launching VM 0: LaunchError: QEMU exited before its "
                      "monitor answered"], failed
