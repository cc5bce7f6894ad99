"""Side-by-side benchmarks run as ``python -m bench.NAME`` (not tests)."""

from __future__ import annotations

import argparse
import os


def ab_args(prog: str, doc: str | None, target: str) -> argparse.Namespace:
    """The options every A/B bench here takes (``--rounds``, ``--size``,
    ``--qemu``, ``--guest``); bad ones are usage errors (exit 2) naming
    *target*, the make target that sets the binaries."""
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--size", default="256M")
    p.add_argument("--qemu", default=os.environ.get("SEALVM_QEMU"))
    p.add_argument("--guest", default=os.environ.get("SEALVM_GUEST"))
    args = p.parse_args()
    if not args.qemu or not args.guest:
        p.error(f"set SEALVM_QEMU and SEALVM_GUEST (or --qemu/--guest); `make {target}` does")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args
