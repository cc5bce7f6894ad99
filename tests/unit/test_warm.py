"""`sealvm.update.warm`: pages touched and freed on each CPU QEMU may run
on before a cpr-exec pause.  Whether it shortens the pause is measured by
the bench (mode sealvm-exec-cold), not asserted here."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from sealvm.update import warm

T = TypeVar("T")


def _in_thread(fn: Callable[[], T]) -> T:
    """Run *fn* in a fresh thread (affinity is per thread) and return its result."""
    out: list[T] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_pinned_to_each_cpu_in_turn_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    seen: list[set[int]] = []
    monkeypatch.setattr(warm, "_touch_and_free",
                        lambda size: seen.append(os.sched_getaffinity(0)))

    def run() -> set[int]:
        warm.warm_cpus(1 << 20, cpus)
        return os.sched_getaffinity(0)

    assert _in_thread(run) == set(cpus)  # restored
    assert seen == [{c} for c in cpus]


def test_affinity_restored_when_a_cpu_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(size: int) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(warm, "_touch_and_free", boom)

    def run() -> tuple[str, set[int]]:
        try:
            warm.warm_cpus(1 << 20, sorted(os.sched_getaffinity(0)))
        except OSError as exc:
            return str(exc), os.sched_getaffinity(0)
        return "", set()

    err, after = _in_thread(run)
    assert "Cannot allocate memory" in err and after == os.sched_getaffinity(0)


def test_touches_real_memory() -> None:
    """On the real kernel: MADV_POPULATE_WRITE or the fallback faults every page."""
    before = _minflt()
    warm._touch_and_free(4 << 20)
    assert _minflt() - before >= 1024  # 4 MiB of 4 KiB pages, each faulted once


def _minflt() -> int:
    with open("/proc/thread-self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def test_off_and_gone() -> None:
    assert asyncio.run(warm.warm(os.getpid(), 0)) == "warm: off"
    assert asyncio.run(warm.warm(2**22 + 12345, 1 << 20)).startswith("warm: skipped")


def test_warms_the_cpus_of_the_process() -> None:
    said = asyncio.run(warm.warm(os.getpid(), 1 << 20))
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))[:warm.MAX_CPUS]))
    assert said.startswith(f"warm: 1 MiB on CPUs {cpus} in "), said


def _virtio(root: Path, name: str, device: str, features: str) -> None:
    d = root / name
    d.mkdir()
    (d / "device").write_text(device + "\n")
    (d / "features").write_text(features + "\n")


def test_free_page_reporting_needs_a_reporting_balloon(tmp_path: Path) -> None:
    assert not warm.free_page_reporting(tmp_path / "missing")
    _virtio(tmp_path, "virtio0", "0x0002", "0110010100000000")  # a block device, bit 5 set
    _virtio(tmp_path, "virtio1", "0x0005", "0110000100000000")  # a balloon, no reporting
    _virtio(tmp_path, "virtio2", "junk", "1111111111")
    assert not warm.free_page_reporting(tmp_path)
    _virtio(tmp_path, "virtio3", "0x0005", "0110010100000000")  # this machine's balloon
    assert warm.free_page_reporting(tmp_path)
