"""
What L2 QEMU did inside an update's pause, step by step, from its own
trace events (timestamped with ``-msg timestamp=on``; both QEMUs of an
update write to the one log, on one clock).

Marks an update passes (a cpr-transfer's new QEMU starts and sets up its
devices before the pause, so those fall outside it):

  stopped     old QEMU: the guest stopped (vmstate_downtime_checkpoint src-vm-stopped)
  saved       old QEMU: device state saved (src-non-iterable-saved)
  exec        old QEMU: about to exec the new binary (cpr_exec)
  started     new QEMU: reads the CPR state, early in main (cpr_state_load)
  vfio        new QEMU: first VFIO device event (bind, attach, regions, listener)
  vfio_done   new QEMU: last VFIO device event before the load
  load        new QEMU: the first device section's load starts
  loaded      new QEMU: the device state loaded (dst-precopy-loadvm-completed)
  running     new QEMU: the guest runs (dst-precopy-bh-vm-started)

and the steps between them (`STEPS`; in a cpr-transfer the new QEMU loads
while the old one still saves, so ``save`` and ``load`` overlap there).
Two more figures come from QEMU's own per-section timing
(vmstate_downtime_load/save, us): ``change_process``, the iommufd section's
load (its post_load is IOMMU_IOAS_CHANGE_PROCESS) and ``probe``, its save
(pre_save tries the ioctl on the old QEMU's side).
"""

from __future__ import annotations

import re
from datetime import datetime

#: QEMU trace events the steps are read from (globs, for ``-trace enable=``)
STEP_TRACES = (
    "vmstate_downtime_*",
    "cpr_exec",
    "cpr_state_load",
    "qemu_loadvm_state_section_startfull",
    "iommufd_cdev_*",
    "vfio_cpr_find_device",
    "vfio_device_get",
    "vfio_device_attach",
    "vfio_region_setup",
    "vfio_listener_region_add_ram",
)
#: ``-msg timestamp=on`` prefixes every log line with an ISO 8601 UTC time
TIMESTAMP_ARGS = ["-msg", "timestamp=on"]

VFIO_EVENTS = ("iommufd_cdev_", "vfio_cpr_find_device", "vfio_device_get",
               "vfio_device_attach", "vfio_region_setup", "vfio_listener_region_add_ram")
#: (step, from mark, to mark); ``start-up`` ends at the VFIO device, or
#: at the load in a VM without one
STEPS = (
    ("save", "stopped", "saved"),
    ("hand-off", "saved", "exec"),
    ("exec", "exec", "started"),
    ("start-up", "started", "vfio"),
    ("start-up", "started", "load"),
    ("vfio", "vfio", "vfio_done"),
    ("init", "vfio_done", "load"),
    ("load", "load", "loaded"),
    ("resume", "loaded", "running"),
)
_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT[\d:.]+Z) (\w+) ?(.*)$")
_DOWNTIME = re.compile(r"idstr=(\S+) instance_id=\d+ downtime=(\d+)")

Event = tuple[float, str, str]


def timed_events(text: str) -> list[Event]:
    """(seconds since the epoch, event, rest) of each timestamped line."""
    out = []
    for line in text.splitlines():
        if m := _LINE.match(line):
            t = datetime.fromisoformat(m.group(1)).timestamp()
            out.append((t, m.group(2), m.group(3).strip()))
    return out


def _marks(events: list[Event]) -> dict[str, float]:
    """The last update's marks: from its last src-vm-stopped on."""
    stops = [t for t, name, rest in events
             if name == "vmstate_downtime_checkpoint" and rest == "src-vm-stopped"]
    if not stops:
        return {}
    t0 = stops[-1]
    marks: dict[str, float] = {"stopped": t0}
    after = sorted(e for e in events if e[0] >= t0)
    for t, name, rest in after:
        if name == "vmstate_downtime_checkpoint":
            key = {"src-non-iterable-saved": "saved",
                   "dst-precopy-loadvm-completed": "loaded",
                   "dst-precopy-bh-vm-started": "running"}.get(rest)
            if key:
                marks.setdefault(key, t)
        elif name == "cpr_exec":
            marks.setdefault("exec", t)
        elif name == "cpr_state_load":
            marks.setdefault("started", t)
        elif name == "qemu_loadvm_state_section_startfull":
            marks.setdefault("load", t)
        elif name.startswith(VFIO_EVENTS) and "load" not in marks:
            marks.setdefault("vfio", t)
            marks["vfio_done"] = t
    return marks


def _section_us(events: list[Event], t0: float, kind: str, idstr: str) -> float | None:
    for t, name, rest in events:
        if t >= t0 and name == f"vmstate_downtime_{kind}" and (m := _DOWNTIME.search(rest)):
            if m.group(1) == idstr:
                return int(m.group(2)) / 1e6
    return None


def update_steps(events: list[Event]) -> dict[str, float]:
    """The last update's `STEPS` (s) whose marks it passed, ``total``
    (stopped to running) and ``change_process`` and ``probe`` where the
    iommufd section was timed.  Empty when its pause is not in *events*."""
    marks = _marks(events)
    if "running" not in marks:
        return {}
    steps: dict[str, float] = {}
    for step, a, b in STEPS:
        if step not in steps and a in marks and b in marks:
            steps[step] = marks[b] - marks[a]
    steps["total"] = marks["running"] - marks["stopped"]
    for key, kind in (("change_process", "load"), ("probe", "save")):
        v = _section_us(events, marks["stopped"], kind, "iommufd")
        if v is not None:
            steps[key] = v
    return steps
