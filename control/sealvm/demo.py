"""
The main job (``make demo``): launch the test guest with 1 GiB of sealed
memfd RAM, live-update its QEMU five times with cpr-exec, print one row per
update, and exit non-zero if any column of any row is off (`Row.problems`)
or the guest saw anything wrong.

    python -m sealvm.demo [--updates N] [--memory 1G] [--qemu PATH] [--guest PATH]
                          [--run-dir DIR] [--no-require-sealed]

Against a stock QEMU the update passes preflight (its unsealed aux RAM is a
warning) and the rows show what such a QEMU gets wrong.  ``--no-require-sealed``
also lets unsealed guest RAM pass.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import procfs
from .console import ConsoleFollower, ConsoleLog
from .errors import SealvmError
from .machine import Machine
from .spec import spec_from_dict
from .update import UpdateReport, live_update

HB_MS = 10
#: What the guest-RAM memfd must carry (EXEC: created with MFD_NOEXEC_SEAL).
REQUIRED_SEALS = ("SEAL", "SHRINK", "GROW", "EXEC")
HEADER = (f"{'#':>2} {'pause QMP':>10} {'pause guest':>12} {'pid':>8} {'RAM inode':>10} "
          f"{'unchanged':>9} {'seals':>21} {'exec':>5} {'mismatches':>10}")


@dataclass(frozen=True)
class Row:
    """One live update as the demo prints it."""

    n: int
    pause_qmp: float | None
    pause_guest: float | None
    pid_before: int
    pid_after: int
    inode: int | None
    inode_unchanged: bool
    seals: tuple[str, ...]
    #: the exec bit on the guest-RAM memfd (None: no such memfd)
    executable: bool | None
    mismatches: int | None
    heartbeat_continuous: bool | None

    @classmethod
    def of(cls, n: int, report: UpdateReport, memfds: list[procfs.Memfd]) -> Row:
        """The row of update *n*: *report* from `live_update`, *memfds* what
        the QEMU holds after it (`procfs.memfds`)."""
        ram = [b for b in report.ram_after if b.name == procfs.BACKEND_MEMFD_NAME]
        backend = [m for m in memfds if m.is_backend]
        return cls(
            n=n, pause_qmp=report.pause_qmp, pause_guest=report.pause_guest,
            pid_before=report.pid_before, pid_after=report.pid_after,
            inode=ram[0].inode if ram else None, inode_unchanged=report.ram_inode_unchanged,
            seals=tuple(ram[0].seals) if ram else (),
            executable=backend[0].executable if backend else None,
            mismatches=report.mismatches, heartbeat_continuous=report.heartbeat_continuous)

    def problems(self) -> list[str]:
        """Every column that is off, named as in the header, with its value."""
        found = []
        if self.pause_qmp is None:
            found.append("pause QMP: not measured")
        if self.pause_guest is None:
            found.append("pause guest: not measured")
        if self.pid_after != self.pid_before:
            found.append(f"pid: changed {self.pid_before} -> {self.pid_after}")
        if self.inode is None:
            found.append("RAM inode: no guest-RAM memfd")
        if not self.inode_unchanged:
            found.append("unchanged: the guest-RAM memfd is another file")
        missing = [s for s in REQUIRED_SEALS if s not in self.seals]
        if missing:
            found.append(f"seals: {'|'.join(missing)} missing")
        if self.executable is not False:
            found.append("exec: the guest-RAM memfd is executable" if self.executable
                         else "exec: no guest-RAM memfd")
        if self.mismatches != 0:
            found.append(f"mismatches: {self.mismatches}")
        if self.heartbeat_continuous is not True:
            found.append(f"heartbeat: continuous {self.heartbeat_continuous}")
        return found

    def line(self) -> str:
        def ms(seconds: float | None) -> str:
            return "-" if seconds is None else f"{1000 * seconds:.1f}ms"

        problems = self.problems()
        return (f"{self.n:>2} {ms(self.pause_qmp):>10} {ms(self.pause_guest):>12} "
                f"{self.pid_after:>8} {'-' if self.inode is None else self.inode:>10} "
                f"{str(self.inode_unchanged):>9} {'|'.join(self.seals) or '-':>21} "
                f"{str(self.executable):>5} {str(self.mismatches):>10}"
                + (f"   <-- FAILED: {'; '.join(problems)}" if problems else ""))


def guest_problems(log: ConsoleLog) -> list[str]:
    """What the guest's own console says went wrong (empty: nothing)."""
    found = []
    if log.reboots:
        found.append(f"reboots: {log.reboots}")
    if not log.heartbeats:
        found.append("heartbeat: none seen")
    elif not log.counter_continuous():
        found.append("heartbeat: counter reset or skipped")
    if log.mismatches or log.mismatch_counter():
        found.append(f"mismatching words: {log.mismatched_words} reported, "
                     f"{log.mismatch_counter()} counted")
    return found


@contextlib.contextmanager
def _run_root(path: str | None) -> Iterator[Path]:
    if path:
        yield Path(path)
    else:
        with tempfile.TemporaryDirectory(prefix="sealvm-demo-") as tmp:
            yield Path(tmp)


async def run(args: argparse.Namespace) -> int:
    spec = spec_from_dict({
        "name": "sealvm-demo",
        "qemu": args.qemu,
        "memory": {"size": args.memory},
        "guest": {"kernel": args.guest, "cmdline": f"hb_ms={HB_MS}"},
    })
    failed: list[str] = []
    with _run_root(args.run_dir) as run_root:
        vm = Machine(spec, run_root=run_root)
        await vm.launch()
        try:
            print(f"QEMU {spec.qemu}\nguest {spec.guest.kernel}, {args.memory} of memfd RAM,"
                  f" heartbeat every {HB_MS} ms; pid {vm.pid}\n", flush=True)
            async with ConsoleFollower(vm.serial_log) as con:
                await con.wait_for(lambda log: len(log.passes) >= 1, 120)
                print(HEADER, flush=True)
                for i in range(1, args.updates + 1):
                    report = await live_update(vm, heartbeat_interval=HB_MS / 1000,
                                               require_sealed=args.require_sealed)
                    assert vm.pid is not None
                    row = Row.of(i, report, procfs.memfds(vm.pid))
                    failed += [f"update {i}: {p}" for p in row.problems()]
                    print(row.line(), flush=True)
                # every word written before the last update, verified after it
                await con.wait_full_pass(120)
                log = con.log
                failed += [f"guest: {p}" for p in guest_problems(log)]
                print(f"\nguest after {args.updates} updates: heartbeat {log.heartbeats[-1].seq} "
                      f"(continuous: {log.counter_continuous()}), full pattern passes verified: "
                      f"{len(log.passes)}, mismatching words: {log.mismatched_words} "
                      f"(guest's count: {log.mismatch_counter()}), reboots: {log.reboots}")
        finally:
            await vm.shutdown()
    if failed:
        print("demo: FAILED\n" + "\n".join(f"  {f}" for f in failed))
        return 1
    print("demo: OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=5)
    p.add_argument("--memory", default="1G")
    p.add_argument("--qemu", default=os.environ.get("SEALVM_QEMU"))
    p.add_argument("--guest", default=os.environ.get("SEALVM_GUEST"))
    p.add_argument("--run-dir", help="run root for the VM (default: a temporary directory)")
    p.add_argument("--no-require-sealed", dest="require_sealed", action="store_false",
                   help="let preflight pass unsealed guest RAM (comparisons with a stock "
                        "QEMU): the rows say what is off")
    args = p.parse_args(argv)
    if not args.qemu or not args.guest:
        p.error("need --qemu and --guest (or $SEALVM_QEMU, $SEALVM_GUEST: `make demo` sets them)")
    if args.updates < 1:
        p.error("--updates must be at least 1")
    try:
        return asyncio.run(run(args))
    except SealvmError as exc:
        print(f"demo: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
