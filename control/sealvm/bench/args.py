"""
The bench's command line: every bad argument is a usage error (exit 2, the
message names the argument), found before any VM starts.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SpecError
from ..spec import parse_size, spec_from_dict

#: mode -> (which QEMU, live-update mode)
MODES = {
    "sealvm-exec": ("sealvm", "cpr-exec"),
    "sealvm-exec-oneway": ("sealvm", "cpr-exec"),
    "sealvm-exec-cold": ("sealvm", "cpr-exec"),
    "upstream-exec": ("upstream", "cpr-exec"),
    "sealvm-transfer": ("sealvm", "cpr-transfer"),
    "classic": ("sealvm", "migrate"),
    "sealvm-exec-2M": ("sealvm", "cpr-exec"),
    "upstream-exec-2M": ("upstream", "cpr-exec"),
}
#: the rows the goals are judged on; the other modes are diagnostics, run on request
#: (-oneway: only ever towards one binary; -cold: the page cache dropped first)
DEFAULT_MODES = ("sealvm-exec", "upstream-exec", "sealvm-transfer", "classic",
                 "sealvm-exec-2M", "upstream-exec-2M")
DEFAULT_UPDATES = 20
#: several VMs updated at once (`batch`): how many, of what size, how often
DEFAULT_AT_ONCE = "1,4,8"
DEFAULT_AT_ONCE_SIZE = "512M"
DEFAULT_AT_ONCE_ROUNDS = 10
VMS_CHOICES = ("auto", "together", "one-at-a-time")


def is_hugetlb(mode: str) -> bool:
    return mode.endswith("-2M")


def is_classic(mode: str) -> bool:
    return MODES[mode][1] == "migrate"


@dataclass(frozen=True)
class Config:
    """What one bench run does, validated."""

    sizes: list[int]
    hugetlb_sizes: list[int]
    modes: list[str]
    updates: int
    vms: str
    out: Path
    qemu: Path | None
    qemu_upstream: Path | None
    guest: Path | None
    compare: bool
    #: --compare: the published history, compared against while OUT holds one run
    baseline: Path | None = None
    at_once: list[int] = field(default_factory=list)
    at_once_size: int = 512 << 20
    at_once_rounds: int = DEFAULT_AT_ONCE_ROUNDS
    #: None: classic runs at every one of ``sizes``
    classic_sizes: list[int] | None = None

    def sizes_of(self, mode: str) -> list[int]:
        if is_hugetlb(mode):
            return self.hugetlb_sizes
        if is_classic(mode) and self.classic_sizes is not None:
            return self.classic_sizes
        return self.sizes

    def all_sizes(self) -> list[int]:
        """Every size some mode runs at, smallest first."""
        return sorted({s for m in self.modes for s in self.sizes_of(m)})

    def modes_at(self, size: int) -> list[str]:
        return [m for m in self.modes if size in self.sizes_of(m)]


def parser(doc: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sealvm.bench", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64M,1G,4G,8G",
                   help="guest RAM sizes, comma-separated (default %(default)s)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help="modes, comma-separated (default %(default)s; also known: "
                        + ", ".join(m for m in MODES if m not in DEFAULT_MODES) + ")")
    p.add_argument("--hugetlb-sizes", default="1G,4G",
                   help="sizes for the -2M (hugetlb) modes; the others use --sizes "
                        "(default %(default)s)")
    p.add_argument("--classic-sizes", default="64M,1G,4G",
                   help="sizes for classic migration, which takes ~30 s per update at 8 GiB "
                        "under TCG; the goal compares at 4G (default %(default)s; all: "
                        "every one of --sizes)")
    p.add_argument("--updates", type=int, default=DEFAULT_UPDATES,
                   help="updates per mode and size (default %(default)s)")
    p.add_argument("--vms", choices=VMS_CHOICES, default="auto",
                   help="together: one VM per mode alive for a whole size (the ones not "
                        "being updated paused); one-at-a-time: each round launches each "
                        "mode's VM for one update; auto (default): together when their RAM "
                        "fits in MemAvailable less 2 GiB")
    p.add_argument("--at-once", default=DEFAULT_AT_ONCE, metavar="COUNTS",
                   help="also update this many VMs at once, comma-separated, with cpr-exec "
                        "(`sealvm update A B ...`; default %(default)s; none: not at all)")
    p.add_argument("--at-once-size", default=DEFAULT_AT_ONCE_SIZE, metavar="SIZE",
                   help="guest RAM of each of those VMs (default %(default)s)")
    p.add_argument("--at-once-rounds", type=int, default=DEFAULT_AT_ONCE_ROUNDS,
                   metavar="N", help="rounds per count (default %(default)s)")
    p.add_argument("--out", default="bench-results",
                   help="directory of the dated tables and history.jsonl (default %(default)s)")
    p.add_argument("--compare", action="store_true",
                   help="run nothing: print the change of each p50/p95 of the last run in "
                        "OUT/history.jsonl against the run before it")
    p.add_argument("--baseline", metavar="FILE",
                   help="with --compare: a history file (the published runs, "
                        "docs/bench-history.jsonl) whose last run is the one compared "
                        "against while OUT holds a single run")
    p.add_argument("--qemu", default=os.environ.get("SEALVM_QEMU"))
    p.add_argument("--qemu-upstream", default=os.environ.get("SEALVM_QEMU_UPSTREAM"))
    p.add_argument("--guest", default=os.environ.get("SEALVM_GUEST"))
    return p


def _sizes(p: argparse.ArgumentParser, option: str, text: str, *, hugetlb: bool) -> list[int]:
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or any(not s for s in items):
        p.error(f"{option}: empty size in {text!r}; give sizes like 1G,4G"
                + (" (leave out the -2M modes for no hugetlb rows)" if hugetlb else ""))
    sizes = []
    for item in items:
        try:
            size = parse_size(item, option)
            # the VM spec's own checks (at least 16M, a multiple of 2M)
            spec_from_dict({"name": "bench-args", "qemu": "/nonexistent",
                            "memory": {"size": size, "hugetlb": hugetlb},
                            "guest": {"kernel": "/nonexistent"}})
        except SpecError as exc:
            fix = f" ({exc.fix})" if exc.fix else ""
            p.error(f"{option}: {item!r}: {exc.problem}{fix}")
        if size in sizes:
            p.error(f"{option}: {item!r} given twice")
        sizes.append(size)
    return sizes


def _counts(p: argparse.ArgumentParser, text: str) -> list[int]:
    """--at-once: VM counts, each 1..64, or "none"."""
    if text.strip() == "none":
        return []
    counts = []
    for item in (s.strip() for s in text.split(",")):
        if not item.isdigit() or not 1 <= int(item) <= 64:
            p.error(f"--at-once: {item!r} is not a count of VMs from 1 to 64 "
                    "(give e.g. 1,4,8, or none)")
        if int(item) in counts:
            p.error(f"--at-once: {item!r} given twice")
        counts.append(int(item))
    return counts


def parse(argv: list[str] | None = None, *, doc: str | None = None) -> Config:
    """Parse and check *argv*; a bad argument exits 2 with a usage error."""
    p = parser(doc)
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.baseline is not None and not a.compare:
        p.error("--baseline: only with --compare")
    if a.compare:
        baseline = Path(a.baseline) if a.baseline else None
        if baseline is not None and not baseline.is_file():
            p.error(f"--baseline: {baseline}: no such file")
        return Config(sizes=[], hugetlb_sizes=[], modes=[], updates=0, vms=a.vms, out=out,
                      qemu=None, qemu_upstream=None, guest=None, compare=True,
                      baseline=baseline)
    modes = [m.strip() for m in a.modes.split(",")]
    if not a.modes.strip() or any(not m for m in modes):
        p.error(f"--modes: empty mode in {a.modes!r}; known: {', '.join(MODES)}")
    for mode in modes:
        if mode not in MODES:
            p.error(f"--modes: unknown mode {mode!r}; known: {', '.join(MODES)}")
        if modes.count(mode) > 1:
            p.error(f"--modes: {mode!r} given twice")
    if a.updates < 1:
        p.error(f"--updates: {a.updates} updates; give at least 1 "
                f"(the figures want {DEFAULT_UPDATES} or more)")
    sizes = _sizes(p, "--sizes", a.sizes, hugetlb=False)
    hugetlb_sizes = _sizes(p, "--hugetlb-sizes", a.hugetlb_sizes, hugetlb=True)
    classic_sizes = (None if a.classic_sizes.strip() == "all"
                     else _sizes(p, "--classic-sizes", a.classic_sizes, hugetlb=False))
    at_once = _counts(p, a.at_once)
    at_once_size = _sizes(p, "--at-once-size", a.at_once_size, hugetlb=False)
    if len(at_once_size) != 1:
        p.error(f"--at-once-size: one size, not {a.at_once_size!r}")
    if a.at_once_rounds < 1:
        p.error(f"--at-once-rounds: {a.at_once_rounds}; give at least 1")
    need = {"--qemu": a.qemu, "--guest": a.guest}
    if any(MODES[m][0] == "upstream" for m in modes):
        need["--qemu-upstream"] = a.qemu_upstream
    for option, value in need.items():
        if not value:
            p.error(f"{option} missing (`make bench` sets it; or SEALVM_QEMU, "
                    "SEALVM_QEMU_UPSTREAM, SEALVM_GUEST)")
        if not os.access(value, os.R_OK):
            p.error(f"{option}: {value}: cannot read it")
    return Config(sizes=sizes, hugetlb_sizes=hugetlb_sizes, modes=modes, updates=a.updates,
                  vms=a.vms, out=out, qemu=Path(a.qemu) if a.qemu else None,
                  qemu_upstream=Path(a.qemu_upstream) if a.qemu_upstream else None,
                  at_once=at_once, at_once_size=at_once_size[0],
                  at_once_rounds=a.at_once_rounds, classic_sizes=classic_sizes,
                  guest=Path(a.guest) if a.guest else None, compare=False)
