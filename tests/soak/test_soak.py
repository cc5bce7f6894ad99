"""50 alternating live updates of one VM (the long soak is `make soak`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .soak import MODES, soak, summary

UPDATES = 50


async def test_soak(qemu_binary: Path, guest_image: Path, run_root: Path) -> None:
    result = await soak(qemu=qemu_binary, guest=guest_image, run_root=run_root,
                        updates=UPDATES, size="256M")
    for line in summary(result):
        print(line)
    assert len(result.samples) == UPDATES
    assert result.mismatches == 0 and result.heartbeat_continuous
    assert len(result.pauses("pause_qmp")) == UPDATES, "a pause was not measured"
    assert result.passes_after > 0
    for mode in MODES:
        first, last = result.flat(mode)
        # a leak grows the table by an fd per update or so; only growth is one
        gained = Counter(last.fd_targets) - Counter(first.fd_targets)
        assert last.fds <= first.fds, \
            f"{mode}: open fds {first.fds} -> {last.fds}, new: {sorted(gained.elements())}"
        # a leak of one guest page per update would already be 200 KiB here;
        # a fresh cpr-transfer process may also come out smaller (CI saw
        # -1.8 %, 13364 -> 13124 KiB): only growth is a leak
        assert last.rss_anon_kib - first.rss_anon_kib <= 0.01 * first.rss_anon_kib, \
            f"{mode}: RssAnon {first.rss_anon_kib} -> {last.rss_anon_kib} KiB"
