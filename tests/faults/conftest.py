"""
The fault matrix: every way a live update can be interrupted, each case
ending *refused before the pause*, *rolled back*, *completed* or
*recovered by `sealvm recover`* with the guest verified.  `make faults` runs
this directory and prints the table (case, outcome, guest, leftovers).
"""

from __future__ import annotations

from typing import Any

ROWS: list[dict[str, Any]] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    tr = terminalreporter
    tr.section("fault matrix")
    tr.write_line(f"{'case':<40} {'update':<22} {'recover':<13} {'guest verified':<24} "
                  "leftovers")
    for r in sorted(ROWS, key=lambda r: r["case"]):
        tr.write_line(f"{r['case']:<40} {r['update']:<22} {r['recover']:<13} "
                      f"{r['guest']:<24} {r['leftovers'] or 'none'}")
    lost = [r["case"] for r in ROWS if "lost" in (r["update"], r["recover"])]
    tr.write_line(f"{len(ROWS)} cases, {len(lost)} with the guest lost"
                  + (f": {', '.join(lost)}" if lost else ""))
