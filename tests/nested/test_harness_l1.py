"""
nested.harness.l1.run_in_l1 on a real L1: what comes back, and that it always
cleans up -- on success, timeout, cancellation and boot failure.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness.l1 import BOOT_PANICS_SEEN, BOOT_RETRIES, L1BootError, L1Timeout, run_in_l1
from .l0_lib import l0_qemus_mentioning

pytestmark = pytest.mark.nested

TMP_PREFIX = "sealvm-l1-"


def temp_shares() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*")}


@pytest.fixture
def no_leak() -> Iterator[None]:
    """Afterwards: no L1 QEMU on a temporary share, no temporary share."""
    before = temp_shares()
    yield
    assert not l0_qemus_mentioning(str(Path(tempfile.gettempdir()) / TMP_PREFIX)), \
        "L1 QEMU left running"
    assert temp_shares() <= before, f"temporary shares left: {temp_shares() - before}"


async def test_exit_status_output_and_files(host_kernel: Path, qemu_binary: Path,
                                            no_leak: None) -> None:
    script = ('echo "out $(uname -r)"; echo err >&2; '
              'mkdir -p sub && echo data > "$SEALVM_L1_SHARE/sub/f.txt"; exit 3')
    r = await run_in_l1(["sh", "-c", script], kernel=host_kernel, qemu=qemu_binary,
                        timeout=300)
    assert r.exit_status == 3
    assert "out 7.2" in r.output and "err" in r.output
    assert r.files == {"sub/f.txt": b"data\n"}
    assert 0 < r.boot_time < r.start_to_init < r.wall_time
    assert "SEALVM-L1 init" in r.console


async def test_timeout_kills_l1(host_kernel: Path, qemu_binary: Path, no_leak: None) -> None:
    with pytest.raises(L1Timeout) as info:
        # L1 reaches init in about 3 s here
        await run_in_l1(["sleep", "3600"], kernel=host_kernel, qemu=qemu_binary, timeout=15)
    assert "SEALVM-L1 init" in info.value.console  # it did boot; the command hung


async def test_cancellation_kills_l1(host_kernel: Path, qemu_binary: Path, tmp_path: Path,
                                     no_leak: None) -> None:
    """Cancelled while the command runs (init seen on the console): L1 is killed."""
    console = tmp_path / "console"
    task = asyncio.create_task(run_in_l1(["sleep", "3600"], kernel=host_kernel,
                                         qemu=qemu_binary, timeout=300, console_log=console))
    deadline = time.monotonic() + 120
    while "SEALVM-L1 init" not in (console.read_text() if console.exists() else ""):
        if task.done():  # L1 ended by itself: say how, with its console
            pytest.fail(f"L1 ended before it was cancelled: {task.exception()!r}\n"
                        f"console:\n{console.read_text()[-3000:] if console.exists() else ''}")
        assert time.monotonic() < deadline, "L1 did not reach init within 120 s"
        await asyncio.sleep(0.2)
    assert l0_qemus_mentioning(str(Path(tempfile.gettempdir()) / TMP_PREFIX))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_no_init_is_a_boot_failure(qemu_binary: Path, tmp_path: Path,
                                         no_leak: None) -> None:
    junk = tmp_path / "not-a-kernel"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(L1BootError, match="no init within 15 s"):
        await run_in_l1(["true"], kernel=junk, qemu=qemu_binary, timeout=60, boot_timeout=15)


async def test_qemu_exit_is_a_boot_failure(host_kernel: Path, qemu_binary: Path,
                                           no_leak: None) -> None:
    with pytest.raises(L1BootError, match="L0 QEMU exited with status 1") as info:
        await run_in_l1(["true"], kernel=host_kernel, qemu=qemu_binary, timeout=60,
                        memory_mib=1 << 40)
    assert "memory" in info.value.console  # QEMU's own error message


async def test_panic_before_init_boots_again_then_fails(host_kernel: Path, qemu_binary: Path,
                                                        tmp_path: Path, no_leak: None) -> None:
    """A kernel that panics before init every time: booted 1 + BOOT_RETRIES
    times, then a boot failure that says so (an init that does not exist)."""
    console = tmp_path / "console"
    seen = len(BOOT_PANICS_SEEN)
    try:
        with pytest.raises(L1BootError, match="exited with status 0") as info:
            await run_in_l1(["true"], kernel=host_kernel, qemu=qemu_binary, timeout=60,
                            kernel_args=("quiet", "init=/nonexistent"), console_log=console)
        assert len(BOOT_PANICS_SEEN) == seen + BOOT_RETRIES
        assert "Requested init /nonexistent failed" in BOOT_PANICS_SEEN[-1]
    finally:
        del BOOT_PANICS_SEEN[seen:]  # the nested figures list unplanned panics only
    assert "Kernel panic" in info.value.console
    notes = getattr(info.value, "__notes__", [])
    assert any(f"after {BOOT_RETRIES} earlier boot(s) that panicked" in n for n in notes)
    assert console.read_text().count("Kernel panic - not syncing") == 1 + BOOT_RETRIES
