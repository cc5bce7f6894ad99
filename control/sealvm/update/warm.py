"""
Warm pages for the image a cpr-exec starts.

The new image of a cpr-exec faults in its private memory (about 13.5 MiB for
sealvm's QEMU under TCG: heap, thread stacks, relocated data, the TCG
prologue) while the guest is paused.  Stock cpr-exec frees the old image's
private memory inside exec(), on the CPU that goes on to run the new image,
so those faults take pages that were just in use.  With patch 20's holder
the old address space lives until the guest runs again, so the new image
takes pages from the free lists.  On a host that runs under a hypervisor
which reclaims free guest memory (virtio-balloon free page reporting; this
machine reports every free 2 MiB block at once), those are pages the
hypervisor took back, and each first touch is a fault in the hypervisor
too: on the first cpr-exec of a freshly booted 8 GiB guest here the exec
phase was 40-74 ms, with 128 perf samples of the new image's main thread
in clear_page against 21 in a later update, and 29-38 ms with the free
lists warmed first (docs/exec-phase.md).

Before the guest is paused, `warm` touches and frees *size* bytes of
private memory on every CPU the old QEMU may run on (its affinity), one CPU
at a time from a worker thread pinned to it: freed, those pages sit at the
hot end of that CPU's free page list, where the new image's faults take
them.  It costs the controller some CPU before the pause and nothing
inside it; it is skipped (never fatal) when QEMU is gone or the kernel
says no.

It also takes CPU from the guest just before the pause, and where pages
are cheap that is all it does: in the nested L1 (TCG inside TCG, no
balloon) warming starved the L2 guest for about half a second before the
pause, longer than the pause.  So by default (`auto_size`) it runs only
where the kernel reports free pages to its hypervisor: a virtio-balloon
device that negotiated VIRTIO_BALLOON_F_REPORTING.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import time
from pathlib import Path

#: Linux 5.14: populate (prefault) writable, without writing from user space
MADV_POPULATE_WRITE = 23
#: per CPU: a little more than the new image faults in before it resumes
#: the guest (13.5 MiB here); the per-CPU free lists hold up to ~40 MiB
DEFAULT_SIZE = 16 << 20
#: the most `warm` takes per CPU (an argument above is clamped)
MAX_SIZE = 256 << 20
#: after warming, before the pause: warming shares the CPUs with the vCPU
#: threads, and the guest catches up before it is stopped
SETTLE = 0.02
#: at most this many CPUs are warmed (the first ones of QEMU's affinity)
MAX_CPUS = 16


VIRTIO_DEVICES = Path("/sys/bus/virtio/devices")
VIRTIO_ID_BALLOON = 0x5
#: feature bit: the balloon reports free pages to the hypervisor
VIRTIO_BALLOON_F_REPORTING = 5


def free_page_reporting(devices: Path = VIRTIO_DEVICES) -> bool:
    """Whether a virtio-balloon device here negotiated free page reporting
    (sysfs ``features``: one character per bit, bit 0 first)."""
    try:
        devs = sorted(devices.iterdir())
    except OSError:
        return False
    for dev in devs:
        try:
            if int((dev / "device").read_text(), 16) != VIRTIO_ID_BALLOON:
                continue
            bits = (dev / "features").read_text().strip()
        except (OSError, ValueError):
            continue
        if len(bits) > VIRTIO_BALLOON_F_REPORTING and bits[VIRTIO_BALLOON_F_REPORTING] == "1":
            return True
    return False


def auto_size() -> int:
    """`DEFAULT_SIZE` where the host reports free pages to a hypervisor,
    else 0 (off)."""
    return DEFAULT_SIZE if free_page_reporting() else 0


def cpus_of(pid: int) -> list[int]:
    """The CPUs QEMU *pid* may run on, at most `MAX_CPUS`.

    :raise OSError: no such process (ProcessLookupError) or not allowed.
    """
    return sorted(os.sched_getaffinity(pid))[:MAX_CPUS]


def _touch_and_free(size: int) -> None:
    with mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as m:
        try:
            m.madvise(MADV_POPULATE_WRITE)
        except OSError:  # an older kernel: fault each page from here
            for off in range(0, size, mmap.PAGESIZE):
                m[off] = 1
    # closed: munmap() freed the pages on this CPU


def warm_cpus(size: int, cpus: list[int]) -> None:
    """Touch and free *size* bytes on each of *cpus*, pinned to each in
    turn; the calling thread's affinity is restored.  Blocking.

    :raise OSError: from sched_setaffinity or mmap.
    """
    before = os.sched_getaffinity(0)
    try:
        for cpu in cpus:
            os.sched_setaffinity(0, {cpu})
            _touch_and_free(size)
    finally:
        os.sched_setaffinity(0, before)


async def warm(pid: int, size: int = DEFAULT_SIZE) -> str:
    """Warm *size* bytes per CPU for the image QEMU *pid* is about to exec;
    returns what was done, for the log (never raises OSError)."""
    if size <= 0:
        return "warm: off"
    size = min(size, MAX_SIZE)
    start = time.monotonic()
    try:
        cpus = cpus_of(pid)
        await asyncio.to_thread(warm_cpus, size, cpus)
    except OSError as exc:
        return f"warm: skipped ({exc})"
    took = time.monotonic() - start
    await asyncio.sleep(SETTLE)
    return (f"warm: {size >> 20} MiB on CPUs {','.join(map(str, cpus))} "
            f"in {1000 * took:.0f} ms")
