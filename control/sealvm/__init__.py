"""
sealvm: live re-exec of QEMU under a running guest.

Guest RAM lives in sealed memfds that survive exec; VFIO maps it by file.
The library launches VMs (`Machine`), and replaces their QEMU in place
(`live_update`), refusing before the guest pauses whenever guest memory
could be lost (`PreflightError`).  The public API is `__all__` (listed in
docs/api.md); `sealvm.pytest_plugin` has fixtures for tests of your own.
"""

import logging

from .console import (
    ConsoleFollower,
    ConsoleLog,
    GuestCheck,
    Heartbeat,
    check_guest_console,
    read_console,
)
from .endpoint import script_socket
from .errors import (
    HostError,
    InterruptedUpdateError,
    LaunchError,
    PreflightError,
    QMPReplyError,
    SealvmError,
    SpecError,
    StateError,
    UpdateError,
)
from .machine import Machine
from .runroot import default_run_root
from .spec import (
    GuestSpec,
    MemorySpec,
    ScriptsSpec,
    VfioSpec,
    VmSpec,
    load_spec,
    spec_from_dict,
)
from .update import RamBlock, RecoverReport, UpdateReport, live_update, recover

logging.getLogger("sealvm").addHandler(logging.NullHandler())

__all__ = [
    "ConsoleFollower",
    "ConsoleLog",
    "GuestCheck",
    "GuestSpec",
    "Heartbeat",
    "HostError",
    "InterruptedUpdateError",
    "LaunchError",
    "Machine",
    "MemorySpec",
    "PreflightError",
    "QMPReplyError",
    "RamBlock",
    "RecoverReport",
    "ScriptsSpec",
    "SealvmError",
    "SpecError",
    "StateError",
    "UpdateError",
    "UpdateReport",
    "VfioSpec",
    "VmSpec",
    "check_guest_console",
    "default_run_root",
    "live_update",
    "load_spec",
    "read_console",
    "recover",
    "script_socket",
    "spec_from_dict",
]
