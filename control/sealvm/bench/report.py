"""
What a bench run prints and writes: per point the figures (`Dist`: p50,
p95, max and n_ok/n of each), the table, the ratios and the goals (judged
on p50 and on p95), the plot.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .args import MODES
from .batch import Batch
from .run import TEARDOWN_HOLDER, Point, Sample
from .stats import Dist, in_seconds, summarize, value_text

#: figure -> what it is, for the table's legend
FIGURES: dict[str, Callable[[Sample], float | None]] = {
    "pause_guest": lambda s: None if s.report is None else s.report.pause_guest,
    "pause_qmp": lambda s: None if s.report is None else s.report.pause_qmp,
    "teardown": lambda s: s.teardown,
    "total": lambda s: s.total,
    "update_total": lambda s: None if s.report is None else s.report.total,
    "pause_gap": lambda s: None if s.report is None else s.report.pause_gap,
    # what the guest saw of the pause beyond QEMU's own STOP -> RESUME
    "beyond": lambda s: (None if s.report is None or s.report.pause_gap is None
                         or s.report.pause_qmp is None
                         else s.report.pause_gap - s.report.pause_qmp),
    "stall_before": lambda s: None if s.report is None else s.report.stall_before_stop,
    "stall_after": lambda s: None if s.report is None else s.report.stall_after_resume,
    "resident": lambda s: None if s.resident is None else float(s.resident),
    "mapped": lambda s: None if s.mapped is None else float(s.mapped),
}


def figures(p: Point) -> dict[str, Dist | None]:
    """Every figure of *p*; ``teardown`` is None (not applicable) for the
    modes whose teardown is not a column of its own."""
    out: dict[str, Dist | None] = {k: summarize(f(s) for s in p.samples)
                                   for k, f in FIGURES.items()}
    if p.teardown_kind != TEARDOWN_HOLDER:
        out["teardown"] = None
    return out


def phases(p: Point) -> dict[str, Dist]:
    names: list[str] = []
    for s in p.samples:
        if s.report is not None:
            names += [k for k in s.report.phases if k not in names]
    return {k: summarize(None if s.report is None else s.report.phases.get(k)
                         for s in p.samples) for k in names}


def summary(p: Point) -> dict[str, Any]:
    """JSON-ready: the point's figures and phases."""
    return {"mode": p.mode, "size": p.size, "vms": p.vms, "teardown_kind": p.teardown_kind,
            "figures": {k: None if d is None else d.to_dict() for k, d in figures(p).items()},
            "phases": {k: d.to_dict() for k, d in phases(p).items()}}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.1f}"


def cell(d: Dist | None, *, na: str = "n/a", stats: tuple[str, ...] = ("p50", "p95", "max")
         ) -> str:
    """``p50/p95/max`` in ms, with ``[n_ok/n]`` when values are missing."""
    if d is None:
        return na
    text = "/".join(_ms(getattr(d, s)) for s in stats)
    return text if d.missing == 0 else f"{text} [{d.n_ok}/{d.n}]"


def _pct(d: Dist | None, size: int) -> str:
    if d is None or d.p50 is None:
        return "-"
    text = f"{100 * d.p50 / size:.0f}%"
    return text if d.missing == 0 else f"{text} [{d.n_ok}/{d.n}]"


def table(points: list[Point]) -> list[str]:
    """The table, then each point's phases (ms, p50/p95)."""
    head = ["mode", "RAM", "resident", "mapped", "n", "guest p50/p95/max",
            "QMP p50/p95/max", "teardown p50/p95/max", "total p50/p95/max",
            "beyond p50/p95", "before STOP p50/p95/max", "after resume p50/p95/max"]
    rows = [head]
    for p in points:
        f = figures(p)
        n = len(p.samples)
        ok = sum(1 for s in p.samples if s.report is not None)
        rows.append([p.mode, f"{p.size >> 20}M", _pct(f["resident"], p.size),
                     _pct(f["mapped"], p.size), f"{ok}/{n}" if ok != n else str(n),
                     cell(f["pause_guest"]), cell(f["pause_qmp"]),
                     cell(f["teardown"], na=p.teardown_kind), cell(f["total"]),
                     cell(f["beyond"], stats=("p50", "p95")), cell(f["stall_before"]),
                     cell(f["stall_after"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
             for r in rows]
    lines += [
        "",
        "ms; percentiles nearest-rank; [n_ok/n]: values missing; resident/mapped: guest RAM the",
        "memfds hold / the replaced QEMU had mapped, p50 over updates, % of RAM.  teardown: RESUME",
        "to the exit of the old address space's holder (sealvm cpr-exec); 'in exec': stock",
        "cpr-exec unmaps it inside exec(), in the pause; 'in total': the old QEMU's exit is in",
        "the update (phase handover).  total: start of the update to its end or the old address",
        "space gone, whichever is later.  guest: the largest heartbeat gap of the update,",
        "wherever it was.  beyond: the gap around QEMU's STOP->RESUME less QEMU's own pause.",
        "before STOP: the largest gap that ended before that one (the guest stalled while the",
        "update was prepared); after resume: the largest that began after the controller saw",
        "QEMU resume the guest (a stall once it runs again).  Per update, guest is at least",
        "each of the three.",
        "",
        "phases, ms p50/p95:",
    ]
    for p in points:
        ph = " ".join(f"{k}={cell(d, stats=('p50', 'p95'))}" for k, d in phases(p).items())
        lines.append(f"  {p.mode} {p.size >> 20}M: {ph}")
    return lines


GIB = 1 << 30
#: goal -> bound; judged on p50 and on p95
GOALS = {
    "pause(8G)/pause(1G) sealvm-exec": 1.2,
    "sealvm/upstream cpr-exec pause at 8G": 0.3,
    "sealvm cpr-exec/classic total at 4G": 0.05,
    "beyond QEMU's STOP->RESUME (sealvm-exec, s)": 0.005,
    "sealvm-exec guest-seen pause, worst size (s)": 0.060,
    "sealvm-transfer guest-seen pause, worst size (s)": 0.020,
    "wall(8 VMs at once)/wall(1 VM) sealvm-exec": 2.0,
}
STATS = ("p50", "p95")


def ratios(points: list[Point], batches: list[Batch] | None = None
           ) -> dict[str, dict[str, float | None]]:
    """Each ratio on p50 and on p95 (the ratio of the two p50s, of the two
    p95s)."""
    def get(mode: str, size: int, key: str) -> Dist | None:
        for p in points:
            if p.mode == mode and p.size == size:
                return figures(p)[key]
        return None

    def div(a: Dist | None, b: Dist | None) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for s in STATS:
            x = None if a is None else getattr(a, s)
            y = None if b is None else getattr(b, s)
            out[s] = x / y if x is not None and y else None
        return out

    out: dict[str, dict[str, float | None]] = {}
    for mode in MODES:
        out[f"pause(8G)/pause(1G) {mode}"] = div(get(mode, 8 * GIB, "pause_guest"),
                                                 get(mode, GIB, "pause_guest"))
    out["sealvm/upstream cpr-exec pause at 8G"] = div(
        get("sealvm-exec", 8 * GIB, "pause_guest"), get("upstream-exec", 8 * GIB, "pause_guest"))
    out["sealvm cpr-exec/classic total at 4G"] = div(
        get("sealvm-exec", 4 * GIB, "total"), get("classic", 4 * GIB, "total"))
    out["way back cost: sealvm-exec/sealvm-exec-oneway pause at 1G"] = div(
        get("sealvm-exec", GIB, "pause_guest"), get("sealvm-exec-oneway", GIB, "pause_guest"))
    out["warm pages: sealvm-exec/sealvm-exec-cold pause at 8G"] = div(
        get("sealvm-exec", 8 * GIB, "pause_guest"), get("sealvm-exec-cold", 8 * GIB, "pause_guest"))
    added = summarize(FIGURES["beyond"](s) for p in points if p.mode == "sealvm-exec"
                      for s in p.samples)
    out["beyond QEMU's STOP->RESUME (sealvm-exec, s)"] = {s: getattr(added, s) for s in STATS}
    for mode in ("sealvm-exec", "sealvm-transfer"):
        out[f"{mode} guest-seen pause, worst size (s)"] = worst(
            [figures(p)["pause_guest"] for p in points if p.mode == mode])
    walls = {b.count: batch_figures(b)["wall"] for b in batches or []}
    out["wall(8 VMs at once)/wall(1 VM) sealvm-exec"] = div(walls.get(8), walls.get(1))
    alone = {b.count: batch_figures(b)["alone_wall"] for b in batches or [] if b.alone}
    out["wall(one of 8 alone, 7 running)/wall(1 VM)"] = div(alone.get(8), walls.get(1))
    out["wall(8 VMs at once)/wall(one of 8 alone)"] = div(walls.get(8), alone.get(8))
    return out


def batch_figures(b: Batch) -> dict[str, Dist]:
    """A count's wall time per round, and every VM's pauses; the wall time
    of the rounds updating only its first VM (n = 0 for one VM)."""
    return {"wall": summarize(r.wall for r in b.rounds),
            "alone_wall": summarize(r.wall for r in b.alone),
            "pause_guest": summarize(rep.pause_guest for r in b.rounds for rep in r.reports),
            "pause_qmp": summarize(rep.pause_qmp for r in b.rounds for rep in r.reports)}


def batch_summary(b: Batch) -> dict[str, Any]:
    return {"count": b.count, "size": b.size, "skipped": b.skipped,
            "figures": {k: d.to_dict() for k, d in batch_figures(b).items()}}


def batch_table(batches: list[Batch]) -> list[str]:
    """Several VMs updated at once: wall time per round, pauses per VM."""
    if not batches:
        return []
    lines = ["", f"several VMs updated at once (sealvm-exec, "
             f"{batches[0].size >> 20} MiB each, all running), ms:",
             f"  {'VMs':>3}  {'rounds':>6}  {'wall p50/p95/max':>22}  "
             f"{'guest p50/p95/max, each VM':>28}  {'QMP p50/p95/max':>20}"]
    for b in batches:
        if b.skipped:
            lines.append(f"  {b.count:>3}  skipped: {b.skipped}")
            continue
        f = batch_figures(b)
        lines.append(f"  {b.count:>3}  {len(b.rounds):>6}  {cell(f['wall']):>22}  "
                     f"{cell(f['pause_guest']):>28}  {cell(f['pause_qmp']):>20}")
        if b.alone:
            lines.append(f"  {'':>3}  {len(b.alone):>6}  "
                         f"{cell(f['alone_wall']):>22}  "
                         f"only the first VM updated, the other {b.count - 1} running")
    return lines


def worst(dists: list[Dist | None]) -> dict[str, float | None]:
    """Per statistic, the largest over *dists* (the sizes of one mode);
    None where no size measured it."""
    out: dict[str, float | None] = {}
    for s in STATS:
        values = [v for d in dists if d is not None and (v := getattr(d, s)) is not None]
        out[s] = max(values) if values else None
    return out


def verdict(values: dict[str, float | None], goal: float) -> str:
    """``ok`` when p50 and p95 both meet *goal*; else which missed or is unknown."""
    known = {s: v for s in STATS if (v := values.get(s)) is not None}
    missed = [s for s, v in known.items() if v > goal]
    if missed:
        return f"MISSED ({', '.join(missed)})"
    if not known:
        return "not measured"
    if len(known) < len(STATS):
        return f"ok on {', '.join(known)} only"
    return "ok"


def ratio_lines(r: dict[str, dict[str, float | None]]) -> list[str]:
    lines = ["ratios and goals, on p50 and p95 (goal in brackets, met only if both meet it):"]
    for k, v in r.items():
        goal = GOALS.get(k)
        if goal is None and all(v.get(s) is None for s in STATS):
            continue  # not a goal, and this run did not measure it
        line = (f"  {k:<58} p50 {value_text(k, v.get('p50')):>8}  "
                f"p95 {value_text(k, v.get('p95')):>8}")
        if goal is not None:
            bound = f"{1000 * goal:g} ms" if in_seconds(k) else f"{goal}"
            line += f"  [<= {bound}]  {verdict(v, goal)}"
        lines.append(line)
    return lines


def plot(points: list[Point], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib missing, no plot (pip install '.[bench]')", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in MODES:
        pts = sorted((p for p in points if p.mode == mode), key=lambda p: p.size)
        xs = [p.size / GIB for p in pts]
        dists = [figures(p)["pause_guest"] for p in pts]
        p50 = [1000 * (d.p50 or 0) if d else 0 for d in dists]
        p95 = [1000 * (d.p95 or 0) if d else 0 for d in dists]
        if xs:
            (line,) = ax.plot(xs, p50, marker="o", label=f"{mode} p50")
            ax.plot(xs, p95, marker=".", linestyle=":", color=line.get_color(),
                    label=f"{mode} p95")
    ax.set_xlabel("guest RAM (GiB)")
    ax.set_ylabel("guest-seen pause (ms)")
    ax.set_yscale("log")
    ax.set_title("Live update pause vs guest RAM (TCG; -2M: hugetlb, else 4 KiB pages)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True
