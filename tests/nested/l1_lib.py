"""
Helpers for the scenarios that run inside L1 (tests/nested/l1_*.py).

They run as root in the L1 VM booted by `nested.harness.l1.run_in_l1`, see the
repository read-only at its usual path, and report to the writable share
(``$SEALVM_L1_SHARE``) as JSON; the L0 tests (test_*.py) assert on that.
A scenario records every check it makes (`Checks`) rather than stopping at
the first failure, so one L1 boot tells the whole story.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .qemu_steps import STEP_TRACES, TIMESTAMP_ARGS

if TYPE_CHECKING:
    from sealvm import Machine

SYS_PCI = Path("/sys/bus/pci")


def share() -> Path:
    return Path(os.environ.get("SEALVM_L1_SHARE", "."))


def results_dir() -> Path:
    d = share() / "results"
    d.mkdir(exist_ok=True)
    return d


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Write results/<name>.json atomically."""
    path = results_dir() / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)
    return path


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Checks:
    """Named checks of one scenario, in order, plus measured figures."""

    scenario: str
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def check(self, name: str, ok: bool, detail: object = "") -> bool:
        self.checks.append(Check(name, bool(ok), str(detail)))
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        return bool(ok)

    def failed(self, exc: BaseException) -> None:
        self.error = "".join(traceback.format_exception(exc))
        print(f"ERROR {self.scenario}: {self.error}", flush=True)

    def save(self) -> Path:
        return write_result(self.scenario, asdict(self))

    def finish(self, body: Callable[[], object]) -> int:
        """Run *body*, record an exception as the scenario's error (the L0
        test fails on it), save the result, return the exit status."""
        try:
            body()
        except Exception as exc:
            self.failed(exc)
        self.save()
        return 0 if self.error is None and all(c.ok for c in self.checks) else 1


# ------------------------------------------------------- the guest's pattern


# -------------------------------------------------------------- PCI / VFIO


def pci_driver(bdf: str) -> str | None:
    link = SYS_PCI / "devices" / bdf / "driver"
    return link.resolve().name if link.exists() else None


def bind_vfio_pci(bdf: str) -> None:
    """Bind PCI function *bdf* to vfio-pci (driver_override + drivers_probe)."""
    dev = SYS_PCI / "devices" / bdf
    if pci_driver(bdf) == "vfio-pci":
        return
    if pci_driver(bdf) is not None:
        (dev / "driver" / "unbind").write_text(bdf)
    (dev / "driver_override").write_text("vfio-pci")
    (SYS_PCI / "drivers_probe").write_text(bdf)
    if pci_driver(bdf) != "vfio-pci":
        raise RuntimeError(f"{bdf}: not bound to vfio-pci after drivers_probe "
                           f"(driver: {pci_driver(bdf)})")


def iommu_group(bdf: str) -> int:
    return int((SYS_PCI / "devices" / bdf / "iommu_group").resolve().name)


def vfio_cdevs(bdf: str) -> list[str]:
    d = SYS_PCI / "devices" / bdf / "vfio-dev"
    return sorted(os.listdir(d)) if d.is_dir() else []


# ------------------------------------------------------------- QEMU traces

#: Trace events that show how L2 QEMU hands guest RAM to the IOMMU.
MAP_TRACES = (
    "iommufd_backend_map_file_dma",
    "iommufd_backend_map_dma",
    "iommufd_change_process",
    "vfio_listener_region_add_ram",
    "vfio_cpr_find_device",
)


def trace_args(names: tuple[str, ...] = MAP_TRACES + STEP_TRACES) -> list[str]:
    """QEMU arguments enabling the trace events *names*, each log line
    timestamped (for `qemu_steps`)."""
    args: list[str] = list(TIMESTAMP_ARGS)
    for event in names:
        args += ["-trace", f"enable={event}"]
    return args


@functools.lru_cache
def _trace_re(names: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"\b(" + "|".join(names) + r")\b(.*)$")


def trace_events(text: str, names: tuple[str, ...] = MAP_TRACES) -> list[tuple[str, str]]:
    """(event, rest of line) for each trace line of *names* in a QEMU log."""
    out = []
    for line in text.splitlines():
        if m := _trace_re(names).search(line):
            out.append((m.group(1), m.group(2).strip()))
    return out


class QemuLog:
    """L2 QEMU's log (stdout/stderr, traces; both QEMUs of a cpr-transfer
    append to it), read incrementally for the trace events *names*."""

    def __init__(self, path: Path, names: tuple[str, ...] = MAP_TRACES) -> None:
        self.path = path
        self.names = names
        self.offset = 0
        self.text = ""  # what the last new_events() read

    def new_events(self) -> list[tuple[str, str]]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        self.text = data.decode(errors="replace")
        return trace_events(self.text, self.names)


def count_events(events: list[tuple[str, str]]) -> dict[str, int]:
    counts = dict.fromkeys(MAP_TRACES, 0)
    for name, _ in events:
        counts[name] += 1
    return counts


def qemu_pids() -> list[int]:
    """Every qemu-system process in L1."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            exe = os.readlink(f"/proc/{entry}/exe")
        except OSError:
            continue
        if "qemu-system" in exe:
            pids.append(int(entry))
    return pids


async def failed_cpr_exec(vm: Machine, timeout: float) -> list[str]:
    """A cpr-exec whose command cannot be executed: the migration completes,
    exec fails, the migration fails and the VM runs again.  Returns the
    MIGRATION statuses seen; the mode parameter stays cpr-exec (sticky)."""
    await vm.execute("migrate-set-capabilities",
                     {"capabilities": [{"capability": "events", "state": True}]})
    await vm.execute("migrate-set-parameters", {
        "mode": "cpr-exec", "cpr-exec-command": ["/nonexistent/qemu-system-x86_64"]})
    events = vm.events(["MIGRATION"])
    seen: list[str] = []
    try:
        await vm.execute("migrate", {"uri": f"file:{vm.paths.cpr_state}"})
        async with asyncio.timeout(timeout):
            async for ev in events:
                seen.append(ev["data"]["status"])
                if seen[-1] in ("failed", "cancelled"):
                    break
    finally:
        await events.aclose()
        with contextlib.suppress(FileNotFoundError):
            vm.paths.cpr_state.unlink()
    return seen
