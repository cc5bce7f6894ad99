"""
Inside L1: run several scenarios in one boot, each in its own process.

    python -m nested.l1_run NAME=ARGV... [NAME=ARGV...]     (cwd: tests/)

Each argument is ``name=module arg arg...`` (split on spaces); the module
(tests/nested/<module>.py) is run with this Python as ``-m nested.<module>``,
with a timeout, its output saved to results/<name>.log.  Before and after,
L1's own state is recorded in results/l1.json (kernel, IOMMU, PCI devices,
leftover QEMUs) and the kernel log in results/dmesg.txt.  Exit status: 0
when every scenario exited 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .l1_lib import SYS_PCI, pci_driver, qemu_pids, results_dir, write_result

HERE = Path(__file__).resolve().parent
#: a scenario still running then is killed (after its stacks are dumped)
SCENARIO_TIMEOUT = float(os.environ.get("SEALVM_SCENARIO_TIMEOUT", "900"))


def l1_info() -> dict[str, Any]:
    devices = {}
    for dev in sorted((SYS_PCI / "devices").iterdir()):
        ids = [(dev / n).read_text().strip() for n in ("vendor", "device")]
        group = dev / "iommu_group"
        devices[dev.name] = {"id": ":".join(ids), "driver": pci_driver(dev.name),
                             "iommu_group": group.resolve().name if group.exists() else None}
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return {
        "kernel": platform.release(),
        "cmdline": Path("/proc/cmdline").read_text().strip(),
        "uptime": uptime,
        "iommu": sorted(os.listdir("/sys/class/iommu")) if Path("/sys/class/iommu").exists()
        else [],
        "dev_iommu": Path("/dev/iommu").exists(),
        "mdevs": sorted(os.listdir("/sys/bus/mdev/devices"))
        if Path("/sys/bus/mdev/devices").is_dir() else [],
        "pci": devices,
        "memfd_noexec": Path("/proc/sys/vm/memfd_noexec").read_text().strip()
        if Path("/proc/sys/vm/memfd_noexec").exists() else None,
    }


def _comm_state(task: Path) -> tuple[str, str]:
    """Name and state of the process or thread at /proc path *task*."""
    stat = (task / "stat").read_text()
    return stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]


def kernel_stacks(pgid: int) -> str:
    """State, wait channel and kernel stack of every thread of process group
    *pgid* (a hung scenario), of every QEMU (L2s run in sessions of their
    own) and of every process in uninterruptible sleep; and the kernel's
    list of blocked tasks (sysrq w, in dmesg)."""
    out = []
    qemus = {str(p) for p in qemu_pids()}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if (os.getpgid(int(entry)) != pgid and entry not in qemus
                    and _comm_state(Path("/proc", entry))[1] != "D"):
                continue
            for tid in sorted(os.listdir(f"/proc/{entry}/task"), key=int):
                task = Path(f"/proc/{entry}/task/{tid}")
                comm, state = _comm_state(task)
                out.append(f"{entry}/{tid} {comm} {state} wchan={(task / 'wchan').read_text()}\n"
                           + (task / "stack").read_text())
        except (OSError, ValueError):
            continue
    with contextlib.suppress(OSError):
        Path("/proc/sysrq-trigger").write_text("w")
    return "".join(out)


async def run_one(name: str, argv: list[str]) -> dict[str, Any]:
    out = results_dir() / f"{name}.log"
    t = time.monotonic()
    with open(out, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-X", "faulthandler", "-m", f"nested.{argv[0]}", *argv[1:],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=HERE.parent,
            start_new_session=True)
        try:
            async with asyncio.timeout(SCENARIO_TIMEOUT):
                status = await proc.wait()
        except TimeoutError:
            log.write(f"\n--- {name}: no exit after {SCENARIO_TIMEOUT:.0f} s: where it "
                      "hangs ---\n".encode())
            log.write(kernel_stacks(proc.pid).encode())
            log.flush()
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGABRT)  # faulthandler: every thread's stack
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await proc.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()
            status = -9
    return {"name": name, "argv": argv, "status": status, "seconds": time.monotonic() - t}


async def main_async(specs: list[str]) -> int:
    info: dict[str, Any] = {"before": l1_info(), "scenarios": []}
    rc = 0
    for spec in specs:
        name, _, cmd = spec.partition("=")
        res = await run_one(name, cmd.split())
        info["scenarios"].append(res)
        print(f"{name}: exit {res['status']} in {res['seconds']:.1f} s", flush=True)
        rc |= res["status"] != 0
        # a scenario must not leave an L2 behind for the next one
        for pid in qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            info.setdefault("killed_leftovers", []).append(pid)
    info["after"] = l1_info()
    info["qemu_left"] = qemu_pids()
    write_result("l1", info)
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, check=False)
    (results_dir() / "dmesg.txt").write_text(dmesg.stdout)
    return int(rc)


def main() -> int:
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    print(json.dumps({"argv": sys.argv[1:]}), flush=True)
    return asyncio.run(main_async(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
