"""
The bench's one statistic: p50, p95 and max of a sample, with its count of
missing values; and how a ratio or goal value prints.

Percentiles are nearest-rank (the smallest value with at least q % of the
sample at or below it): every figure printed is a measured value, never an
interpolation between two updates.  So p50 of an even-sized sample is the
lower of the two middle values (not their mean, unlike
`statistics.median`), and p95 of 20 values is the 19th smallest.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank *q*-th percentile (0 < *q* <= 100) of *values*.

    :raise ValueError: when *values* is empty or *q* is out of range.
    """
    if not values:
        raise ValueError("percentile of an empty sample")
    if not 0 < q <= 100:
        raise ValueError(f"percentile {q} is not in (0, 100]")
    ordered = sorted(values)
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[max(rank, 1) - 1]


@dataclass(frozen=True)
class Dist:
    """p50, p95 and max of the values that were measured; *n* the updates
    attempted, *n_ok* those that gave a value (the rest are missing)."""

    n: int
    n_ok: int
    p50: float | None
    p95: float | None
    max: float | None

    @property
    def missing(self) -> int:
        return self.n - self.n_ok

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "n_ok": self.n_ok, "p50": self.p50, "p95": self.p95,
                "max": self.max}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Dist:
        return cls(n=int(d["n"]), n_ok=int(d["n_ok"]), p50=d.get("p50"), p95=d.get("p95"),
                   max=d.get("max"))


def summarize(values: Iterable[float | None]) -> Dist:
    """The `Dist` of *values*, where None is a missing value: counted in
    ``n``, not in ``n_ok``, and never silently dropped."""
    all_values = list(values)
    ok = [v for v in all_values if v is not None]
    if not ok:
        return Dist(len(all_values), 0, None, None, None)
    return Dist(len(all_values), len(ok), percentile(ok, 50), percentile(ok, 95), max(ok))


def in_seconds(name: str) -> bool:
    """Whether the ratio or goal *name* is a time (its name ends in "s)"),
    not a bare ratio."""
    return name.endswith(("(s)", ", s)"))


def value_text(name: str, v: float | None) -> str:
    """*v*, a value of the ratio or goal *name*: a time in milliseconds to
    0.1 ms (so that 60.4 ms does not print as a bound of 0.060 s it
    missed), a ratio to three decimals, None as "-"."""
    if v is None:
        return "-"
    return f"{1000 * v:.1f} ms" if in_seconds(name) else f"{v:.3f}"
