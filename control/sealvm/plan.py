"""
From a spec to a QEMU command line and the fds passed to it.

sealvm opens what needs privilege or must outlive a QEMU process itself and
passes the fds; QEMU only refers to them by number:

- the QMP listening socket (``-chardev socket,fd=N,server=on``): created by
  sealvm, mode 0600, inherited across cpr-exec, so the controller can connect
  to the new QEMU the moment it listens, without polling for the path;
- VFIO: /dev/iommu and the vfio cdevs (iommufd backend), opened by sealvm;
- NICs: the tap of each ``[[net]]`` (`sealvm.net`), attached by sealvm
  (``-netdev tap,fd=N``), and /dev/vhost-net for ``vhost = true``.

Disks (``[[disk]]``) are opened by QEMU itself, by path (``-blockdev``
in JSON: no escaping), with image locking on: QEMU takes the image's
locks, and a migration (cpr-exec, cpr-transfer, classic) inactivates the
disks of the old QEMU, releasing its write locks, before the new QEMU
activates them.

No command line ever goes through a shell, including cpr-exec-command.
Pure functions: nothing here starts a process or opens a file.

Paths may contain commas.  Where a path is a value inside a QEMU option
string (``-chardev file,path=``, ``-device vfio-pci,sysfsdev=``) it is
escaped QEMU's way, the comma doubled (`opt_value`); QemuOpts and keyval
both read ``,,`` as a literal comma.  ``-kernel``, ``-L`` and argv[0] are
whole arguments, taken literally: they are never escaped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .confine import sandbox_args
from .spec import DiskSpec, VmSpec

#: Memory backend and machine ids, fixed so tools can find the RAM block.
RAM_ID = "ram0"
IOMMUFD_ID = "iommufd0"


@dataclass(frozen=True)
class RunPaths:
    """Files of one VM in its run directory (0700, root's).  What QEMU
    itself opens or creates by path lives in `qemu_dir`, which belongs to
    the VM's user (`sealvm.confine`) and is all QEMU sees of the run
    directory."""

    root: Path

    @property
    def qemu_dir(self) -> Path:
        return self.root / "qemu"

    @property
    def jail_root(self) -> Path:
        """The mount point of the view the jail builds (`sealvm.confine`)."""
        return self.root / ".jail"

    @property
    def qmp(self) -> Path:
        return self.root / "qmp.sock"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def qemu_log(self) -> Path:
        return self.root / "qemu.log"

    @property
    def serial(self) -> Path:
        return self.qemu_dir / "serial.log"

    @property
    def cpr_state(self) -> Path:
        return self.qemu_dir / "cpr-state"

    def qmp_next(self, generation: int) -> Path:
        """The QMP socket of a cpr-transfer successor until it takes over."""
        return self.root / f"qmp-next-{generation}.sock"

    @property
    def cpr_sock(self) -> Path:
        return self.qemu_dir / "cpr.sock"

    @property
    def main_sock(self) -> Path:
        return self.qemu_dir / "migrate.sock"

    @property
    def keeper_sock(self) -> Path:
        """cpr-exec's keeper (the way back) listens here during an update."""
        return self.qemu_dir / "keeper.sock"

    @property
    def journal(self) -> Path:
        """The journal of the update in progress (absent when none is)."""
        return self.root / "update.journal"

    @property
    def last_journal(self) -> Path:
        """The journal of the last update that ended, kept for post-mortems."""
        return self.root / "last-update.journal"

    @property
    def scripts(self) -> Path:
        """The QMP endpoint for scripts (`sealvm.endpoint`)."""
        return self.root / "qmp-scripts.sock"

    @property
    def endpoint_qemu(self) -> Path:
        """Where each QEMU of the VM connects to the script endpoint."""
        return self.qemu_dir / "endpoint-qemu.sock"

    @property
    def endpoint_ctl(self) -> Path:
        """The controller's notifications to the script endpoint."""
        return self.root / "endpoint.ctl"

    @property
    def endpoint_pid(self) -> Path:
        return self.root / "endpoint.pid"

    @property
    def endpoint_log(self) -> Path:
        return self.root / "endpoint.log"

    @property
    def lock(self) -> Path:
        """The VM's lock file; beside the run directory, so that it can be
        taken before the directory exists and outlives its cleanup."""
        return self.root.parent / f".{self.root.name}.lock"


@dataclass(frozen=True)
class FdPlan:
    """fd numbers (in QEMU) that sealvm opens and passes, by role."""

    qmp_listen: int
    iommufd: int | None = None
    vfio: dict[str, int] = field(default_factory=dict)  # device id -> cdev fd
    taps: dict[str, int] = field(default_factory=dict)  # NIC id -> tap fd
    vhost: dict[str, int] = field(default_factory=dict)  # NIC id -> /dev/vhost-net fd

    def all(self) -> list[int]:
        fds = [self.qmp_listen, *self.vfio.values(), *self.taps.values(),
               *self.vhost.values()]
        if self.iommufd is not None:
            fds.append(self.iommufd)
        return sorted(fds)

    def to_state(self) -> dict[str, Any]:
        """As recorded in state.json and the journal (`from_state` reads it)."""
        return {"qmp_listen": self.qmp_listen, "iommufd": self.iommufd, "vfio": self.vfio,
                "taps": self.taps, "vhost": self.vhost}

    @classmethod
    def from_state(cls, fds: dict[str, Any]) -> FdPlan:
        return cls(
            qmp_listen=int(fds["qmp_listen"]),
            iommufd=fds.get("iommufd"),
            vfio={str(k): int(v) for k, v in fds.get("vfio", {}).items()},
            taps={str(k): int(v) for k, v in fds.get("taps", {}).items()},
            vhost={str(k): int(v) for k, v in fds.get("vhost", {}).items()},
        )


def opt_value(value: object) -> str:
    """*value* as the value of a QEMU ``key=value,...`` option: commas doubled."""
    return str(value).replace(",", ",,")


def option_value(opts: str, key: str) -> str | None:
    """The value of *key* in a QEMU ``key=value,...`` option string (the
    inverse of `opt_value`: ``,,`` is a comma), or None."""
    out: list[str] | None = None
    i = 0
    field = ""
    while i <= len(opts):
        c = opts[i] if i < len(opts) else ","
        if c == "," and opts[i + 1:i + 2] == ",":
            field += ","
            i += 2
            continue
        if c == ",":
            name, eq, value = field.partition("=")
            if eq and name == key:
                out = [value]
            field = ""
        else:
            field += c
        i += 1
    return None if out is None else out[0]


def serial_path(argv: list[str]) -> Path | None:
    """The guest's serial log a QEMU command line names (``-chardev
    file,id=serial0,path=...``), or None."""
    for a in argv:
        if a.startswith("file,") and option_value(a, "id") == "serial0":
            path = option_value(a, "path")
            return None if path is None else Path(path)
    return None


def _size_arg(size: int) -> str:
    return str(size)


def memory_args(spec: VmSpec) -> list[str]:
    mem = spec.memory
    if mem.backend == "memfd":
        opts = f"memory-backend-memfd,id={RAM_ID},size={_size_arg(mem.size)},share=on,seal=on"
        if mem.hugetlb:
            opts += f",hugetlb=on,hugetlbsize={mem.hugetlbsize}"
    else:
        opts = f"memory-backend-ram,id={RAM_ID},size={_size_arg(mem.size)}"
    return ["-object", opts]


def vfio_args(spec: VmSpec, fds: FdPlan) -> list[str]:
    args: list[str] = []
    if any(d.backend == "iommufd" for d in spec.vfio):
        if fds.iommufd is None:
            raise ValueError("iommufd devices need FdPlan.iommufd")
        args += ["-object", f"iommufd,id={IOMMUFD_ID},fd={fds.iommufd}"]
    for dev in spec.vfio:
        if dev.backend == "iommufd":
            opts = f"vfio-pci,id={dev.id},iommufd={IOMMUFD_ID},fd={fds.vfio[dev.id]}"
            if dev.sysfsdev is not None:
                # QEMU tells an mdev by its sysfs path, even with the fd passed:
                # without it, realize asks iommufd for hardware info the
                # emulated device does not have (ENOENT)
                opts += f",sysfsdev={opt_value(dev.sysfsdev)}"
        elif dev.host is not None:
            opts = f"vfio-pci,id={dev.id},host={dev.host}"
        else:
            opts = f"vfio-pci,id={dev.id},sysfsdev={opt_value(dev.sysfsdev)}"
        args += ["-device", opts]
    return args


#: how often a QEMU retries connecting to the script endpoint
ENDPOINT_RECONNECT_MS = 100


def scripts_args(spec: VmSpec, paths: RunPaths) -> list[str]:
    """The monitor QEMU connects to the script endpoint with: a client
    socket that retries in the background, so that QEMU never waits for
    the endpoint, and reconnects after a cpr-exec."""
    if not spec.scripts.enabled:
        return []
    return ["-chardev", f"socket,id=scripts,path={opt_value(paths.endpoint_qemu)},server=off,"
            f"reconnect-ms={ENDPOINT_RECONNECT_MS}",
            "-mon", "chardev=scripts,mode=control"]


def net_args(spec: VmSpec, fds: FdPlan) -> list[str]:
    """A virtio-net NIC per ``[[net]]``, on the tap fd sealvm passes.  No
    option ROM (``romfile=``): the guests boot by ``-kernel``, and nothing
    then lives in ROM RAM that a new QEMU would have to match."""
    args: list[str] = []
    for n in spec.net:
        if n.id not in fds.taps:
            raise ValueError(f"NIC {n.id} needs FdPlan.taps[{n.id!r}]")
        netdev = f"tap,id={n.id},fd={fds.taps[n.id]}"
        if n.vhost:
            netdev += f",vhost=on,vhostfd={fds.vhost[n.id]}"
        args += ["-netdev", netdev,
                 "-device", f"virtio-net-pci,id={n.id},netdev={n.id},mac={n.mac},romfile="]
    return args


#: cache mode -> (O_DIRECT, ignore flushes, guest-visible write cache)
CACHE_MODES: dict[str, tuple[bool, bool, bool]] = {
    "none": (True, False, True),
    "writeback": (False, False, True),
    "writethrough": (False, False, False),
    "directsync": (True, False, False),
    "unsafe": (False, True, True),
}


def disk_args(disk: DiskSpec) -> list[str]:
    """``-blockdev`` (file node ``<id>-file``, format node ``<id>``, image
    locking on) and a virtio-blk device ``<id>``."""
    direct, no_flush, write_cache = CACHE_MODES[disk.cache]
    cache = {"direct": direct, "no-flush": no_flush}
    file_node = {"driver": "file", "node-name": f"{disk.id}-file", "filename": str(disk.path),
                 "cache": cache, "read-only": disk.readonly, "locking": "on"}
    fmt_node = {"driver": disk.format, "node-name": disk.id, "file": f"{disk.id}-file",
                "cache": cache, "read-only": disk.readonly}
    device = (f"virtio-blk-pci,id={disk.id},drive={disk.id},"
              f"write-cache={'on' if write_cache else 'off'}")
    return ["-blockdev", json.dumps(file_node, separators=(",", ":")),
            "-blockdev", json.dumps(fmt_node, separators=(",", ":")),
            "-device", device]


def name_arg(spec_name: str, marker: str | None = None) -> str:
    """``-name``'s value; *marker* names the process (``process=``) so that
    the QEMU of one update can be told apart from any other by its argv."""
    value = f"{spec_name},debug-threads=on"
    return value if marker is None else f"{value},process={marker}"


def qemu_argv(spec: VmSpec, paths: RunPaths, fds: FdPlan, *,
              marker: str | None = None) -> list[str]:
    """The full argv of QEMU for *spec* (argv[0] is spec.qemu)."""
    machine = f"{spec.machine},memory-backend={RAM_ID}"
    if spec.memory.backend == "memfd":
        machine += ",aux-ram-share=on"
    argv = [
        str(spec.qemu),
        "-name", name_arg(spec.name, marker),
        "-machine", machine,
        "-accel", spec.accel,
        "-cpu", "max",
        "-smp", str(spec.cpus),
        "-m", f"{spec.memory.size >> 20}M",  # a bare number would mean MiB
        *memory_args(spec),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-msg", "timestamp=on",
        *sandbox_args(spec),
    ]
    for fw in spec.firmware:
        argv += ["-L", str(fw)]
    argv += [
        "-kernel", str(spec.guest.kernel),
        *(["-initrd", str(spec.guest.initrd)] if spec.guest.initrd is not None else []),
        "-append", spec.guest.cmdline,
        "-chardev", f"socket,id=qmp,fd={fds.qmp_listen},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        *scripts_args(spec, paths),
        "-chardev",
        f"file,id=serial0,path={opt_value(spec.serial_log or paths.serial)},append=on",
        "-serial", "chardev:serial0",
        *vfio_args(spec, fds),
        *net_args(spec, fds),
        *(a for d in spec.disk for a in disk_args(d)),
        *spec.extra_args,
    ]
    return argv


def incoming_argv(argv: list[str], qemu: Path | None = None, *,
                  marker: str | None = None) -> list[str]:
    """The argv for the QEMU that takes over: same devices, possibly a new
    binary, waiting for ``migrate-incoming`` (``-incoming defer``) and, once
    the state is loaded, for ``cont`` (``-S``): the controller resumes the
    guest itself, so that nothing runs it before the controller decided
    (the fence of an update).  *marker* replaces the ``-name`` process
    marker (see `name_arg`)."""
    out = list(argv)
    # drop any previous -incoming and -S
    i = 0
    while i < len(out):
        if out[i] == "-incoming":
            del out[i : i + 2]
        elif out[i] == "-S":
            del out[i]
        else:
            i += 1
    if marker is not None and "-name" in out:
        i = out.index("-name") + 1
        kept = [o for o in out[i].split(",") if not o.startswith("process=")]
        out[i] = ",".join([*kept, f"process={marker}"])
    if qemu is not None:
        out[0] = str(qemu)
    return out + ["-S", "-incoming", "defer"]
