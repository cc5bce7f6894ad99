"""``python -m sealvm.bench``: run the bench, or compare the last two runs."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import __doc__ as DOC
from . import args, history, report
from .batch import run_batches
from .run import NR_HUGEPAGES, restore_hugepages, run_all

REPO = Path(__file__).resolve().parents[3]


async def run(cfg: args.Config) -> int:
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    commit = history.git_commit(REPO)  # the code that runs: read before, not after
    load_start = history.loadavg()
    skipped: list[str] = []
    failed: list[str] = []
    hugepages_before = NR_HUGEPAGES.read_text() if NR_HUGEPAGES.exists() else None
    try:
        points = await run_all(cfg, skipped, failed)
    finally:
        restore_hugepages(hugepages_before)
    batches = []
    if cfg.at_once and cfg.qemu is not None:
        with tempfile.TemporaryDirectory(prefix="sealvm-bench-") as tmp:
            batches = await run_batches(cfg, qemu=cfg.qemu, run_root=Path(tmp), failed=failed)
    load_end = history.loadavg()
    r = report.ratios(points, batches)
    lines = report.table(points) + report.batch_table(batches)
    lines += [""] + [f"skipped: {s}" for s in skipped] + [f"FAILED: {s}" for s in failed]
    lines += report.ratio_lines(r)
    print("\n" + "\n".join(lines))

    stem = history.table_stem(started, out)
    entry: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "commit": commit,
        "load_start": load_start,
        "load_end": load_end,
        "machine": history.machine({"sealvm": cfg.qemu, "upstream": cfg.qemu_upstream}),
        "args": {"sizes": cfg.sizes, "hugetlb_sizes": cfg.hugetlb_sizes,
                 "classic_sizes": cfg.classic_sizes, "modes": cfg.modes,
                 "updates": cfg.updates, "vms": cfg.vms, "at_once": cfg.at_once,
                 "at_once_size": cfg.at_once_size, "at_once_rounds": cfg.at_once_rounds},
        "table": stem,
        "duration": round(time.time() - started.timestamp()),
        "points": [_brief(report.summary(p)) for p in points],
        "at_once": [report.batch_summary(b) for b in batches],
        "ratios": r,
        "skipped": skipped,
        "failed": failed,
    }
    data = dict(entry, points=[report.summary(p) for p in points],
                samples=[{"mode": p.mode, "size": p.size,
                          "samples": [s.to_dict() for s in p.samples]} for p in points],
                at_once_rounds=[{"count": b.count, "rounds": [x.to_dict() for x in b.rounds],
                                 "alone": [x.to_dict() for x in b.alone]}
                                for b in batches])
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    header = (f"sealvm bench {entry['date']}  commit {entry['commit']}  load "
              f"{load_start} -> {load_end}  machine {json.dumps(entry['machine'])}")
    (out / f"{stem}.txt").write_text(header + "\n\n" + "\n".join(lines) + "\n")
    plotted = report.plot(points, out / f"{stem}.png")
    hist = history.append(out, entry)
    print(f"\nwrote {out / stem}.json, .txt{', .png' if plotted else ''}; appended to {hist}")
    return 1 if failed else 0


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    """A point as kept in the history: its figures, without the phases."""
    return {k: v for k, v in summary.items() if k != "phases"}


def main(argv: list[str] | None = None) -> int:
    cfg = args.parse(argv, doc=DOC)
    if cfg.compare:
        status, lines = history.compare_last(cfg.out, baseline=cfg.baseline)
        print("\n".join(lines))
        return status
    return asyncio.run(run(cfg))


if __name__ == "__main__":
    sys.exit(main())
