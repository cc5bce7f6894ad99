"""
Every bench run is kept: one JSON line appended to ``OUT/history.jsonl``
(commit, date, load average at start and end, machine, arguments, every
point's figures and the ratios) beside its dated table
(``OUT/bench-YYYY-MM-DDTHHMM.json`` and ``.txt``).  `compare` prints the
change of each p50 and p95 of the last run against the run before it
(``make bench-compare``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

from .stats import value_text

HISTORY = "history.jsonl"


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def mem_total() -> int | None:
    """MemTotal in bytes, from /proc/meminfo."""
    return _meminfo("MemTotal")


def mem_available() -> int | None:
    """MemAvailable in bytes, from /proc/meminfo."""
    return _meminfo("MemAvailable")


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cache_key(binary: Path | None) -> str | None:
    """The build cache key of a QEMU binary (``sealvm-22e58152bd23ab1c``:
    the directory above ``build/``), else its path."""
    if binary is None:
        return None
    for parent in binary.resolve().parents:
        if parent.name == "build":
            return parent.parent.name
    return str(binary)


def git_commit(where: Path) -> str | None:
    """HEAD of the checkout at *where*, ``+dirty`` when it has changes; None
    outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=where, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def machine(qemu: dict[str, Path | None]) -> dict[str, Any]:
    """What the figures depend on besides the code."""
    return {"nproc": os.cpu_count(), "mem_total": mem_total(), "kernel": platform.release(),
            "uptime_s": uptime(), "qemu": {k: cache_key(v) for k, v in qemu.items()}}


def uptime() -> int | None:
    """Seconds since the machine started (a freshly started machine and a
    long-running one give different pauses here), None if unreadable."""
    try:
        return round(float(Path("/proc/uptime").read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return None


def table_stem(when: datetime, out: Path) -> str:
    """``bench-YYYY-MM-DDTHHMM``, with a suffix if a run of the same minute
    already wrote one."""
    stem = f"bench-{when:%Y-%m-%dT%H%M}"
    n = 2
    name = stem
    while (out / f"{name}.json").exists():
        name = f"{stem}-{n}"
        n += 1
    return name


def append(out: Path, entry: dict[str, Any]) -> Path:
    """Append *entry* as one line to ``out/history.jsonl``; returns the path."""
    path = out / HISTORY
    with open(path, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
    return path


def load(out: Path) -> list[dict[str, Any]]:
    """Every run in ``out/history.jsonl``, oldest first (unparseable lines
    are skipped: a run killed mid-write)."""
    return load_file(out / HISTORY)


def load_file(path: Path) -> list[dict[str, Any]]:
    """Every run in the history file *path*, oldest first."""
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            runs.append(entry)
    return runs


#: the figures compared, in the order printed
FIGURES = ("pause_guest", "pause_qmp", "teardown", "total")


def _change(old: float | None, new: float | None) -> str:
    if old is None or new is None:
        return f"{_fmt(old)} -> {_fmt(new)}"
    pct = f"{100 * (new - old) / old:+.0f}%" if old else "n/a"
    return f"{_fmt(old)} -> {_fmt(new)} ({pct})"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.1f}"


#: machine facts that differ between any two runs: not worth a note
CHANGES_ANYWAY = ("uptime_s",)


def _differences(old: Any, new: Any) -> str:
    """What differs between two runs' *old* and *new* (dicts: key by key,
    the uptime left out; else both whole); "" when nothing does."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return "" if old == new else f"{old} vs {new}"
    keys = [k for k in sorted(set(old) | set(new), key=str)
            if k not in CHANGES_ANYWAY and old.get(k) != new.get(k)]
    return "; ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in keys)


def compare(prev: dict[str, Any], last: dict[str, Any]) -> list[str]:
    """Lines saying how each p50 and p95 of *last* moved against *prev*
    (figures in milliseconds; ratios as they are, or in milliseconds where
    they are times: `value_text`)."""
    lines = [f"previous: {prev.get('date')}  commit {prev.get('commit')}  "
             f"load {prev.get('load_start')} -> {prev.get('load_end')}",
             f"last:     {last.get('date')}  commit {last.get('commit')}  "
             f"load {last.get('load_start')} -> {last.get('load_end')}"]
    for key in ("machine", "args"):
        changed = _differences(prev.get(key), last.get(key))
        if changed:
            lines.append(f"note: {key} differ: {changed}")
    before = {(p["mode"], p["size"]): p for p in prev.get("points", [])}
    lines.append("")
    lines.append(f"{'mode':<18} {'RAM':>6} {'figure':<12} {'p50 ms':<28} {'p95 ms':<28}")
    for p in last.get("points", []):
        q = before.get((p["mode"], p["size"]))
        if q is None:
            lines.append(f"{p['mode']:<18} {p['size'] >> 20:>5}M (not in the previous run)")
            continue
        for fig in FIGURES:
            a, b = q.get("figures", {}).get(fig), p.get("figures", {}).get(fig)
            if not a or not b:
                continue
            if a.get("n_ok", 0) == 0 and b.get("n_ok", 0) == 0:
                continue
            lines.append(f"{p['mode']:<18} {p['size'] >> 20:>5}M {fig:<12} "
                         f"{_change(a.get('p50'), b.get('p50')):<28} "
                         f"{_change(a.get('p95'), b.get('p95')):<28}")
    gone = set(before) - {(p["mode"], p["size"]) for p in last.get("points", [])}
    for mode, size in sorted(gone):
        lines.append(f"{mode:<18} {size >> 20:>5}M (only in the previous run)")
    ratios_prev, ratios_last = prev.get("ratios", {}), last.get("ratios", {})
    if ratios_last:
        lines.append("")
        lines.append("ratios (p50, p95):")
        for name, r in ratios_last.items():
            o = ratios_prev.get(name) or {}
            if all(d.get(s) is None for d in (o, r) for s in ("p50", "p95")):
                continue  # measured in neither run
            lines.append(f"  {name:<58} "
                         f"p50 {value_text(name, o.get('p50'))} -> {value_text(name, r.get('p50'))}"
                         f"   p95 {value_text(name, o.get('p95'))} -> "
                         f"{value_text(name, r.get('p95'))}")
    return lines


def compare_last(out: Path, *, baseline: Path | None = None) -> tuple[int, list[str]]:
    """(exit status, lines) for ``make bench-compare``: the last run in
    *out* against the one before it; while *out* holds a single run (a
    fresh clone's first `make bench`), against the last run of the
    *baseline* history (the published one)."""
    runs = load(out)
    if len(runs) >= 2:
        return 0, compare(runs[-2], runs[-1])
    published = load_file(baseline) if baseline is not None else []
    if len(runs) == 1 and published:
        return 0, [f"(previous: the last published run, {baseline})",
                   *compare(published[-1], runs[-1])]
    return 1, [f"{out / HISTORY}: {len(runs)} run(s) recorded; "
               "comparing needs two (run `make bench` again)"]
