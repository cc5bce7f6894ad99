"""
VM specs: what a user writes (TOML or Python), validated up front.

A spec is a tree of frozen dataclasses.  `load_spec` reads TOML, resolves
relative paths against the file's directory, and validates; every problem
raises `SpecError` naming the field and the fix.  Nothing here touches QEMU.

Example::

    name = "demo"
    qemu = "/path/to/qemu-system-x86_64"   # default: $SEALVM_QEMU
    cpus = 1

    [memory]
    size = "1G"                 # bytes, or with K/M/G suffix
    backend = "memfd"           # memfd (sealed, shared) | ram (cannot live-update)
    hugetlb = false

    [guest]
    kernel = "guest.bin"
    cmdline = "hb_ms=10"

    [[vfio]]
    host = "0000:00:01.0"       # or sysfsdev = "/sys/bus/mdev/devices/<uuid>"
    backend = "iommufd"         # iommufd | legacy

    [scripts]                   # the QMP endpoint for scripts (sealvm.endpoint)
    enabled = true
    group = "vmops"             # optional: members may connect
    allow = []                  # commands allowed although refused by default
    deny = []                   # commands refused as well
    [[net]]                     # a virtio-net NIC on a tap sealvm creates and opens
    id = "net0"
    mac = "52:54:00:12:34:56"   # default: derived from the VM name and id
    tap = "demo0"               # default: derived from the VM name and id
    netns = "demo"              # the tap's namespace; created (and removed) if missing
    bridge = "br0"              # optional: attach the tap to this bridge (in netns)
    address = "192.0.2.1/24"    # optional: address the tap itself (not with bridge)
    vhost = false               # vhost-net (refused by preflight: see sealvm.net)

    [[disk]]                    # a virtio-blk disk
    id = "disk0"
    path = "disk.img"
    format = "raw"              # raw | qcow2
    cache = "none"              # none | writeback | writethrough | directsync | unsafe
    readonly = false

    [security]                  # how QEMU is confined (sealvm.confine)
    confine = true              # own uid/gid, no capabilities, no_new_privs, own
                                # mount/net/ipc/uts namespaces; false: QEMU runs as root
    user = "auto"               # "auto" (a uid of its own per VM), "UID:GID" or a user name
    seccomp = true              # -sandbox on (obsolete, elevateprivileges, resourcecontrol denied)
    cpr_exec = true             # false: spawn denied as well, and cpr-exec refused
    paths = []                  # more files or directories QEMU may read (extra_args' files)
    exec_paths = []             # more directories cpr-exec may exec a new QEMU from
"""

from __future__ import annotations

import difflib
import grp
import hashlib
import ipaddress
import os
import pwd
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import SpecError

MIB = 1 << 20
GIB = 1 << 30

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_PCI = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_SUFFIX = {"": 1, "K": 1 << 10, "M": MIB, "G": GIB, "T": 1 << 40}

MACHINES = ("q35", "pc")
ACCELS = ("tcg", "kvm")
MEMORY_BACKENDS = ("memfd", "ram")
VFIO_BACKENDS = ("iommufd", "legacy")
DISK_FORMATS = ("raw", "qcow2")
DISK_CACHES = ("none", "writeback", "writethrough", "directsync", "unsafe")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
#: a Linux interface name: IFNAMSIZ - 1 characters, no '/', ':' or blanks
_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
DEFAULT_FIRMWARE = (Path("/usr/share/qemu"), Path("/usr/share/seabios"))


@dataclass(frozen=True)
class MemorySpec:
    """Guest RAM: *size* in bytes, *backend* ``memfd`` (sealed, shared,
    survives a live update) or ``ram`` (refused by preflight), optionally
    on huge pages of *hugetlbsize* bytes."""

    size: int
    backend: str = "memfd"
    hugetlb: bool = False
    hugetlbsize: int = 2 * MIB


@dataclass(frozen=True)
class GuestSpec:
    """What the guest boots: a multiboot *kernel* (``-kernel``) and its
    command line (the test guest reads ``hb_ms=N``)."""

    kernel: Path
    cmdline: str = ""
    initrd: Path | None = None


@dataclass(frozen=True)
class NetSpec:
    """One virtio-net NIC on a tap that sealvm creates (pyroute2), opens and
    passes to QEMU by fd.  The tap lives in *netns* (created by sealvm if
    missing) or in sealvm's own namespace; *bridge*, if set, is a bridge in
    that same namespace the tap is attached to."""

    id: str
    mac: str
    tap: str
    netns: str | None = None
    bridge: str | None = None
    address: str | None = None  # CIDR, on the tap itself
    vhost: bool = False


@dataclass(frozen=True)
class DiskSpec:
    """One virtio-blk disk on an image file."""

    id: str
    path: Path
    format: str = "raw"
    cache: str = "writeback"
    readonly: bool = False


@dataclass(frozen=True)
class VfioSpec:
    """One assigned device: a PCI function (``host``) or an mdev (``sysfsdev``)."""

    id: str
    backend: str = "iommufd"
    host: str | None = None
    sysfsdev: Path | None = None

    @property
    def sysfs_path(self) -> Path:
        """The device's sysfs directory (the mdev's, or the PCI function's)."""
        if self.sysfsdev is not None:
            return self.sysfsdev
        return Path("/sys/bus/pci/devices") / str(self.host)


@dataclass(frozen=True)
class ScriptsSpec:
    """The QMP endpoint for scripts (`sealvm.endpoint`)."""

    enabled: bool = True
    #: a group whose members may connect (socket 0660, run directory 0710)
    group: str | None = None
    #: commands allowed although refused by default (`endpoint.policy`)
    allow: tuple[str, ...] = ()
    #: commands refused as well
    deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class SecuritySpec:
    """How QEMU is confined (`sealvm.confine`)."""

    #: own uid/gid, no capabilities, no_new_privs, own namespaces
    confine: bool = True
    #: "auto" (a uid of sealvm's range, per VM), "UID:GID" or a user name
    user: str = "auto"
    #: QEMU's ``-sandbox on`` (seccomp)
    seccomp: bool = True
    #: False: QEMU may spawn nothing (``spawn=deny``) and cpr-exec is refused
    cpr_exec: bool = True
    #: more files or directories QEMU may read
    paths: tuple[Path, ...] = ()
    #: more directories from which cpr-exec may exec a new QEMU
    exec_paths: tuple[Path, ...] = ()


@dataclass(frozen=True)
class VmSpec:
    """A validated VM spec (`load_spec`, `spec_from_dict`); immutable, and
    ``spec_from_dict(spec.to_dict())`` gives it back."""

    name: str
    qemu: Path
    memory: MemorySpec
    guest: GuestSpec
    machine: str = "q35"
    accel: str = "tcg"
    cpus: int = 1
    serial_log: Path | None = None
    firmware: tuple[Path, ...] = DEFAULT_FIRMWARE
    vfio: tuple[VfioSpec, ...] = ()
    net: tuple[NetSpec, ...] = ()
    disk: tuple[DiskSpec, ...] = ()
    extra_args: tuple[str, ...] = ()
    scripts: ScriptsSpec = ScriptsSpec()
    security: SecuritySpec = SecuritySpec()

    def with_qemu(self, qemu: Path) -> VmSpec:
        """The same spec with another QEMU binary."""
        return replace(self, qemu=qemu)

    def to_dict(self) -> dict[str, Any]:
        """A TOML-shaped dict that `spec_from_dict` reads back unchanged."""
        out: dict[str, Any] = {
            "name": self.name,
            "qemu": str(self.qemu),
            "machine": self.machine,
            "accel": self.accel,
            "cpus": self.cpus,
            "firmware": [str(p) for p in self.firmware],
            "extra_args": list(self.extra_args),
            "memory": {
                "size": self.memory.size,
                "backend": self.memory.backend,
                "hugetlb": self.memory.hugetlb,
                "hugetlbsize": self.memory.hugetlbsize,
            },
            "guest": {"kernel": str(self.guest.kernel), "cmdline": self.guest.cmdline,
                      **({} if self.guest.initrd is None else
                         {"initrd": str(self.guest.initrd)})},
            "net": [
                {k: v for k, v in (("id", n.id), ("mac", n.mac), ("tap", n.tap),
                                   ("netns", n.netns), ("bridge", n.bridge),
                                   ("address", n.address), ("vhost", n.vhost))
                 if v is not None}
                for n in self.net
            ],
            "disk": [
                {"id": d.id, "path": str(d.path), "format": d.format, "cache": d.cache,
                 "readonly": d.readonly}
                for d in self.disk
            ],
            "vfio": [
                {
                    k: str(v)
                    for k, v in (
                        ("id", d.id),
                        ("backend", d.backend),
                        ("host", d.host),
                        ("sysfsdev", d.sysfsdev),
                    )
                    if v is not None
                }
                for d in self.vfio
            ],
        }
        if self.serial_log is not None:
            out["serial_log"] = str(self.serial_log)
        sc = self.scripts
        out["scripts"] = {"enabled": sc.enabled, "allow": list(sc.allow), "deny": list(sc.deny)}
        if sc.group is not None:
            out["scripts"]["group"] = sc.group
        se = self.security
        out["security"] = {"confine": se.confine, "user": se.user, "seccomp": se.seccomp,
                           "cpr_exec": se.cpr_exec, "paths": [str(p) for p in se.paths],
                           "exec_paths": [str(p) for p in se.exec_paths]}
        return out


def parse_size(value: object, field_name: str) -> int:
    """``"1G"`` / ``"512MiB"`` / ``1073741824`` -> bytes."""
    if isinstance(value, bool):
        raise SpecError(field_name, f"expected a size, got {value!r}", 'write e.g. "1G"')
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(m.group(1)) * _SUFFIX[m.group(2).upper()]
    else:
        raise SpecError(field_name, f"cannot parse size {value!r}", 'write e.g. "1G" or "512M"')
    if size <= 0:
        raise SpecError(field_name, "size must be positive", 'write e.g. "1G"')
    return size


class _Table:
    """A TOML table being consumed field by field, to catch unknown keys."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise SpecError(where or "spec", f"expected a table, got {type(data).__name__}")
        self.data: dict[str, object] = dict(data)
        self.where = where
        self.known: list[str] = []

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, typ: type | tuple[type, ...], default: object = None) -> Any:
        self.known.append(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if not isinstance(value, typ) or (isinstance(value, bool) and typ in (int, (int,))):
            names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise SpecError(self.path(key), f"expected {names}, got {value!r}")
        return value

    def require(self, key: str, typ: type | tuple[type, ...], fix: str) -> Any:
        if key not in self.data:
            self.known.append(key)
            raise SpecError(self.path(key), "missing", fix)
        return self.get(key, typ)

    def done(self) -> None:
        for key in self.data:
            if key not in self.known:
                close = difflib.get_close_matches(key, self.known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(self.known)}"
                raise SpecError(self.path(key), "unknown field", hint)


def _choice(value: str, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise SpecError(where, f"{value!r} is not one of {', '.join(choices)}")
    return value


def _path(value: str, base: Path) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else (base / p)


def spec_from_dict(data: object, *, base: Path | None = None) -> VmSpec:
    """Build and validate a spec from a TOML-shaped dict.

    Relative paths are resolved against *base* (default: the cwd).

    :raise SpecError: on the first invalid field.
    """
    base = base or Path.cwd()
    top = _Table(data, "")
    name = top.require("name", str, 'give the VM a name, e.g. name = "demo"')
    if not _NAME.match(name):
        raise SpecError("name", f"{name!r} is not a valid VM name", "use letters, digits, . _ -")
    qemu_s = top.get("qemu", str) or os.environ.get("SEALVM_QEMU")
    if not qemu_s:
        raise SpecError("qemu", "no QEMU binary", "set qemu = PATH or $SEALVM_QEMU")
    qemu = _path(qemu_s, base)
    machine = _choice(top.get("machine", str, "q35"), MACHINES, "machine")
    accel = _choice(top.get("accel", str, "tcg"), ACCELS, "accel")
    cpus = top.get("cpus", int, 1)
    if not 1 <= cpus <= 64:
        raise SpecError("cpus", f"{cpus} is out of range", "use 1 to 64")
    serial = top.get("serial_log", str)
    firmware = top.get("firmware", list)
    if firmware is not None and not all(isinstance(f, str) for f in firmware):
        raise SpecError("firmware", "expected a list of directories")
    extra = top.get("extra_args", list, [])
    if not all(isinstance(a, str) for a in extra):
        raise SpecError("extra_args", "expected a list of strings", 'e.g. ["-d", "guest_errors"]')

    mt = _Table(top.require("memory", dict, 'add [memory] with size = "1G"'), "memory")
    memory = MemorySpec(
        size=parse_size(mt.require("size", (int, str), 'e.g. size = "1G"'), "memory.size"),
        backend=_choice(mt.get("backend", str, "memfd"), MEMORY_BACKENDS, "memory.backend"),
        hugetlb=mt.get("hugetlb", bool, False),
        hugetlbsize=parse_size(mt.get("hugetlbsize", (int, str), 2 * MIB), "memory.hugetlbsize"),
    )
    mt.done()
    if memory.size < 16 * MIB:
        raise SpecError("memory.size", f"{memory.size} bytes is too small", "use at least 16M")
    if memory.size % (2 * MIB):
        raise SpecError("memory.size", "not a multiple of 2 MiB", "round to a multiple of 2M")
    if memory.hugetlb and memory.backend != "memfd":
        raise SpecError("memory.hugetlb", "needs backend = \"memfd\"", 'set backend = "memfd"')
    if memory.hugetlb and memory.size % memory.hugetlbsize:
        raise SpecError("memory.size", "not a multiple of hugetlbsize", "round it up")

    gt = _Table(top.require("guest", dict, 'add [guest] with kernel = "PATH"'), "guest")
    initrd = gt.get("initrd", str)
    guest = GuestSpec(
        kernel=_path(gt.require("kernel", str, 'e.g. kernel = "guest.bin"'), base),
        cmdline=gt.get("cmdline", str, ""),
        initrd=_path(initrd, base) if initrd else None,
    )
    gt.done()

    devices: list[VfioSpec] = []
    for i, raw in enumerate(top.get("vfio", list, [])):
        vt = _Table(raw, f"vfio[{i}]")
        host = vt.get("host", str)
        sysfsdev = vt.get("sysfsdev", str)
        if (host is None) == (sysfsdev is None):
            raise SpecError(vt.where, "give exactly one of host or sysfsdev",
                            'host = "0000:00:01.0" or sysfsdev = "/sys/bus/mdev/devices/UUID"')
        if host is not None and not _PCI.match(host):
            raise SpecError(vt.path("host"), f"{host!r} is not a PCI address", "e.g. 0000:00:01.0")
        dev_id = vt.get("id", str, f"vfio{i}")
        if not _NAME.match(dev_id):
            raise SpecError(vt.path("id"), f"{dev_id!r} is not a valid id", "letters, digits, -")
        devices.append(
            VfioSpec(
                id=dev_id,
                backend=_choice(vt.get("backend", str, "iommufd"), VFIO_BACKENDS,
                                vt.path("backend")),
                host=host,
                sysfsdev=Path(sysfsdev) if sysfsdev else None,
            )
        )
        vt.done()
    ids = [d.id for d in devices]
    if len(set(ids)) != len(ids):
        raise SpecError("vfio", "device ids are not unique", "give each [[vfio]] its own id")
    scripts = _scripts(_Table(top.get("scripts", dict, {}), "scripts"))
    security = _security(_Table(top.get("security", dict, {}), "security"), base)
    nets = tuple(_net(raw, i, name) for i, raw in enumerate(top.get("net", list, [])))
    disks = tuple(_disk(raw, i, base) for i, raw in enumerate(top.get("disk", list, [])))
    _unique("net", "id", [n.id for n in nets])
    _unique("net", "mac", [n.mac for n in nets])
    _unique("net", "tap", [(n.netns, n.tap) for n in nets])
    _unique("disk", "id", [d.id for d in disks])
    _unique("disk", "path", [os.path.normpath(d.path) for d in disks])
    legacy = [d.id for d in devices if d.backend == "legacy"]
    if legacy and security.confine:
        raise SpecError("security.confine", f"vfio {legacy[0]!r} uses the legacy (type1) "
                        "backend: QEMU opens /dev/vfio itself, which a confined QEMU cannot",
                        'use backend = "iommufd" (sealvm passes the fds), or confine = false')
    every = [*ids, *(n.id for n in nets), *(d.id for d in disks)]
    twice = sorted({i for i in every if every.count(i) > 1})
    if twice:
        raise SpecError("vfio/net/disk", f"id {twice[0]!r} names two devices",
                        "give every device its own id")
    top.done()

    return VmSpec(
        name=name,
        qemu=qemu,
        memory=memory,
        guest=guest,
        machine=machine,
        accel=accel,
        cpus=cpus,
        serial_log=_path(serial, base) if serial else None,
        firmware=tuple(_path(f, base) for f in firmware) if firmware else DEFAULT_FIRMWARE,
        vfio=tuple(devices),
        net=nets,
        disk=disks,
        extra_args=tuple(extra),
        scripts=scripts,
        security=security,
    )


_COMMAND = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


def _scripts(st: _Table) -> ScriptsSpec:
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("allow", "deny"):
        value = st.get(key, list, [])
        bad = [c for c in value if not isinstance(c, str) or not _COMMAND.match(c)]
        if bad:
            raise SpecError(st.path(key), f"{bad[0]!r} is not a QMP command name",
                            'e.g. allow = ["human-monitor-command"]')
        lists[key] = tuple(value)
    both = set(lists["allow"]) & set(lists["deny"])
    if both:
        raise SpecError(st.path("deny"), f"{sorted(both)[0]!r} is both allowed and denied")
    group = st.get("group", str)
    if group is not None:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise SpecError(st.path("group"), f"no group named {group!r}",
                            "create it, or name an existing group") from None
    spec = ScriptsSpec(enabled=st.get("enabled", bool, True), group=group, **lists)
    st.done()
    return spec


_IDS = re.compile(r"^(\d+):(\d+)$")


def _security(st: _Table, base: Path) -> SecuritySpec:
    user = st.get("user", str, "auto")
    if user != "auto" and not (m := _IDS.match(user)):
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise SpecError(st.path("user"), f"no user named {user!r}",
                            'write "auto", "UID:GID" or an existing user name') from None
    elif user != "auto" and m is not None and (int(m.group(1)) == 0 or int(m.group(2)) == 0):
        raise SpecError(st.path("user"), "uid or gid 0 is root, not confinement",
                        "pick another uid, or set confine = false")
    if user != "auto" and not _IDS.match(user) and pwd.getpwnam(user).pw_uid == 0:
        raise SpecError(st.path("user"), f"{user!r} is root", "pick another user")
    lists: dict[str, tuple[Path, ...]] = {}
    for key in ("paths", "exec_paths"):
        value = st.get(key, list, [])
        if not all(isinstance(v, str) and v for v in value):
            raise SpecError(st.path(key), "expected a list of paths", f'e.g. {key} = ["/opt/qemu"]')
        lists[key] = tuple(_path(v, base) for v in value)
    spec = SecuritySpec(confine=st.get("confine", bool, True), user=user,
                        seccomp=st.get("seccomp", bool, True),
                        cpr_exec=st.get("cpr_exec", bool, True), **lists)
    st.done()
    return spec


def _unique(section: str, key: str, values: list[object]) -> None:
    seen: set[object] = set()
    for v in values:
        if v in seen:
            shown = v[1] if isinstance(v, tuple) else v
            raise SpecError(section, f"{key} {shown!r} is used twice",
                            f"give each [[{section}]] its own {key}")
        seen.add(v)


def _default_name(prefix: str, vm: str, dev: str) -> str:
    return prefix + hashlib.sha256(f"{vm}/{dev}".encode()).hexdigest()[:10]


def _net(raw: object, i: int, vm: str) -> NetSpec:
    t = _Table(raw, f"net[{i}]")
    dev_id = t.get("id", str, f"net{i}")
    if not _NAME.match(dev_id):
        raise SpecError(t.path("id"), f"{dev_id!r} is not a valid id", "letters, digits, -")
    # locally administered, unicast, stable for a VM and NIC
    default_mac = "52:54:00:" + ":".join(
        _default_name("", vm, dev_id)[k:k + 2] for k in (0, 2, 4))
    mac = t.get("mac", str, default_mac).lower()
    if not _MAC.match(mac):
        raise SpecError(t.path("mac"), f"{mac!r} is not a MAC address", "e.g. 52:54:00:12:34:56")
    if int(mac[:2], 16) & 1:
        raise SpecError(t.path("mac"), f"{mac} is a multicast address",
                        "the first octet must be even, e.g. 52:54:00:...")
    if mac == "00:00:00:00:00:00":
        raise SpecError(t.path("mac"), "the all-zero address", "e.g. 52:54:00:12:34:56")
    tap = t.get("tap", str, _default_name("svt", vm, dev_id))
    if not _IFNAME.match(tap):
        raise SpecError(t.path("tap"), f"{tap!r} is not a valid interface name",
                        "at most 15 letters, digits, . _ -")
    netns = t.get("netns", str)
    if netns is not None and not _NAME.match(netns):
        raise SpecError(t.path("netns"), f"{netns!r} is not a valid namespace name",
                        "letters, digits, . _ -")
    bridge = t.get("bridge", str)
    if bridge is not None and not _IFNAME.match(bridge):
        raise SpecError(t.path("bridge"), f"{bridge!r} is not a valid interface name",
                        "at most 15 letters, digits, . _ -")
    address = t.get("address", str)
    if address is not None:
        try:
            iface = ipaddress.ip_interface(address)
        except ValueError:
            raise SpecError(t.path("address"), f"{address!r} is not an address/prefix",
                            'e.g. "192.0.2.1/24"') from None
        if "/" not in address:
            raise SpecError(t.path("address"), "no prefix length", 'e.g. "192.0.2.1/24"')
        address = str(iface)
        if bridge is not None:
            raise SpecError(t.path("address"), "a tap attached to a bridge takes no address",
                            "address the bridge instead, or drop bridge")
    vhost = t.get("vhost", bool, False)
    t.done()
    return NetSpec(id=dev_id, mac=mac, tap=tap, netns=netns, bridge=bridge, address=address,
                   vhost=vhost)


def _disk(raw: object, i: int, base: Path) -> DiskSpec:
    t = _Table(raw, f"disk[{i}]")
    dev_id = t.get("id", str, f"disk{i}")
    if not _NAME.match(dev_id):
        raise SpecError(t.path("id"), f"{dev_id!r} is not a valid id", "letters, digits, -")
    path = _path(t.require("path", str, 'e.g. path = "disk.img"'), base)
    disk = DiskSpec(
        id=dev_id,
        path=path,
        format=_choice(t.get("format", str, "raw"), DISK_FORMATS, t.path("format")),
        cache=_choice(t.get("cache", str, "writeback"), DISK_CACHES, t.path("cache")),
        readonly=t.get("readonly", bool, False),
    )
    t.done()
    return disk


def load_spec(path: Path) -> VmSpec:
    """Read and validate a TOML spec file.

    :raise SpecError: when the file cannot be read or a field is invalid.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise SpecError(str(path), f"cannot read spec: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(str(path), f"not valid TOML: {exc}") from exc
    return spec_from_dict(data, base=path.resolve().parent)


def check_files(spec: VmSpec) -> None:
    """Check that the files a spec names exist (done at launch, not at parse).

    :raise SpecError: naming the field of the first missing file.
    """
    if not os.access(spec.qemu, os.X_OK):
        raise SpecError("qemu", f"{spec.qemu} is not an executable file",
                        "build it with `make qemu` or fix the path")
    if not spec.guest.kernel.is_file():
        raise SpecError("guest.kernel", f"{spec.guest.kernel} does not exist",
                        "build it with `make guest` or fix the path")
    if spec.guest.initrd is not None and not spec.guest.initrd.is_file():
        raise SpecError("guest.initrd", f"{spec.guest.initrd} does not exist",
                        "build it with `make linux-guest` or fix the path")
    for i, d in enumerate(spec.disk):
        if not d.path.is_file():
            raise SpecError(f"disk[{i}].path", f"{d.path} is not a file",
                            "create the image first (sealvm never creates one)")
        if not os.access(d.path, os.R_OK if d.readonly else os.R_OK | os.W_OK):
            raise SpecError(f"disk[{i}].path", f"{d.path} is not "
                            + ("readable" if d.readonly else "readable and writable"))


__all__ = [
    "DiskSpec",
    "GuestSpec",
    "ScriptsSpec",
    "SecuritySpec",
    "MemorySpec",
    "NetSpec",
    "VfioSpec",
    "VmSpec",
    "check_files",
    "load_spec",
    "parse_size",
    "spec_from_dict",
]
