"""Scenario helpers for tests that drive the real QEMU and test guest."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sealvm import Machine, procfs
from sealvm.console import ConsoleLog


def qemus_mentioning(text: str) -> list[int]:
    """Pids of QEMU processes whose command line contains *text*."""
    return processes_mentioning(text, b"qemu-system")


def processes_mentioning(text: str, also: bytes = b"") -> list[int]:
    """Pids of processes whose command line contains *text* (and *also*):
    QEMUs, script endpoints, keepers of a VM in a run root."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if also in cmd and text.encode() in cmd and int(entry) != me:
            found.append(int(entry))
    return found


def backend_memfd(vm: Machine) -> procfs.Memfd:
    """The guest-RAM memfd QEMU holds (memory-backend-memfd)."""
    assert vm.pid is not None
    found = [m for m in procfs.memfds(vm.pid) if m.is_backend]
    assert len(found) == 1, f"expected one backend memfd, found {found}"
    return found[0]


def assert_guest_intact(log: ConsoleLog) -> None:
    """No reboot, heartbeat never reset, no pattern mismatch."""
    assert log.reboots == 0, "the guest rebooted"
    assert log.heartbeats, "no heartbeat seen"
    assert log.counter_continuous(), "heartbeat counter reset or skipped"
    assert not log.mismatches, f"guest memory mismatches: {log.mismatches[:5]}"
    assert not log.mismatch_counter(), f"the guest counted {log.mismatch_counter()} bad words"


def corrupt_guest_word(vm: Machine, gpa: int) -> None:
    """Overwrite one 8-byte word of guest RAM from outside QEMU, through the
    memfd (guest-physical = file offset below the PCI hole)."""
    m = backend_memfd(vm)
    fd = os.open(f"/proc/{vm.pid}/fd/{m.fd}", os.O_RDWR | os.O_CLOEXEC)
    try:
        os.pwrite(fd, b"\xde\xad\xbe\xef\xde\xad\xbe\xef", gpa)
    finally:
        os.close(fd)


#: what a Python script run as a QEMU needs in QEMU's view: the venv and the
#: installation its interpreter comes from
PYTHON_VIEW = sorted({sys.prefix, sys.base_prefix})


def script_view(tmp: Path) -> dict[str, object]:
    """``security`` for a VM whose update target is a Python script in
    *tmp* (`failing_qemu`): the directory and the interpreter's
    installation in QEMU's view (`sealvm.confine`), *tmp* made reachable
    for the VM's user.  *tmp* must hold no run root: a view's directory
    shows what is below it with the host's modes."""
    os.chmod(tmp, 0o755)
    return {"exec_paths": [str(tmp), *PYTHON_VIEW]}


def failing_qemu(tmp: Path, real: Path, how: str) -> Path:
    """A QEMU 'upgrade' that answers preflight (--version, -machine help)
    like *real* but then fails: ``start`` exits at once, ``load`` starts
    without the serial port the running VM has, so the device state does not
    load ("Unknown savevm section")."""
    script = tmp / f"qemu-fails-to-{how}"
    script.write_text(f"""#!{sys.executable}
import os, sys
args = sys.argv[1:]
if args[:1] not in (["--version"], ["-machine"]):
    if {how!r} == "start":
        sys.exit("qemu-fails-to-start: refusing to start")
    i = args.index("-serial")
    del args[i:i + 2]
os.execv({str(real)!r}, [{str(real)!r}] + args)
""")
    script.chmod(0o755)
    return script
