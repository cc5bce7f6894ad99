"""
Side-by-side live-update benchmark (``make bench``; not a test).

For each guest RAM size, every mode's test guest is updated N times (20 by
default), the modes interleaved round by round (`run`); each figure is
printed as p50, p95 and max over the updates with their count, missing
values counted (`stats`, `report`).  Every run appends a line to
``OUT/history.jsonl`` and writes its dated table; ``--compare`` (``make
bench-compare``) prints how the last run moved against the one before
(`history`).  The ratios and the goals, judged on p50 and on p95, are
printed last.

What the guest touches matters, so it is stated and measured: in the CPR
modes the guest rewrites all its RAM forever and every update waits for a
complete pass first, so all of it is mapped in the QEMU being replaced --
the worst case for exec's teardown (the table's ``mapped`` column says how
much was).  For classic migration the guest writes its RAM once and then
idles (``pattern_passes=1``): every page holds data and must be copied,
and the copy can converge.

Modes:
  sealvm-exec       cpr-exec with our QEMU
  sealvm-exec-oneway  the same without the way back (no keeper, no trampoline:
                    what the way back costs)
  sealvm-exec-cold  the same without warming pages for the new image
                    (`sealvm.update.warm`: what warming saves)
  upstream-exec     cpr-exec with pristine QEMU 10.2.2 (make qemu-upstream)
  sealvm-transfer   cpr-transfer with our QEMU
  classic           live migration to a new local QEMU over a unix socket
                    (RAM copied)
  sealvm-exec-2M    cpr-exec with our QEMU, guest RAM in a hugetlb memfd
  upstream-exec-2M  the same with pristine QEMU
Besides the modes, ``--at-once 1,4,8`` updates that many running 512 MiB
guests with cpr-exec at once (`batch`) and compares the wall time with one.
The hugetlb rows run only where the machine can reserve the huge pages
(the bench reserves them through vm.nr_hugepages and gives them back);
otherwise they are skipped, saying why.

    python -m sealvm.bench [--sizes 64M,1G,4G,8G] [--updates 20] [--at-once 1,4,8] [--out DIR]
    python -m sealvm.bench --compare [--out DIR]
"""

from .stats import Dist, percentile, summarize

__all__ = ["Dist", "percentile", "summarize"]
