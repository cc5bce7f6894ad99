"""
Taps for the VM's virtio-net NICs: created with pyroute2, opened by sealvm,
passed to QEMU by fd.

For each ``[[net]]`` of a spec, `setup` creates (netlink, never ``ip``) the
network namespace if it does not exist yet, a persistent tap in it (or in
sealvm's own namespace), attaches it to a bridge or addresses it, and
brings it up; `NetRecord` says what was created, and `teardown` removes
exactly that (the tap always, the namespace only if sealvm created it).

sealvm attaches to the tap itself (``open("/dev/net/tun")`` in the tap's
namespace, then ``TUNSETIFF``) and QEMU gets the fd (``-netdev
tap,fd=N``): QEMU never opens a tap by name, so a QEMU that takes over
needs no privilege and finds no busy tap:

- cpr-exec: the fd has no close-on-exec, the new image inherits it at the
  same number (and the keeper holds a copy for the way back);
- cpr-transfer (and classic migration): `take_taps` duplicates the old
  QEMU's fds with ``pidfd_getfd(2)`` (the same open file, the same tap
  queue) and they are passed to the new QEMU.  A non-multiqueue tap takes
  one attachment only: a second ``TUNSETIFF`` would fail with EBUSY, and
  a second queue would steal half the packets.

The tap is opened without ``IFF_VNET_HDR``.  With a vnet header, QEMU sets
the header length (``TUNSETVNETHDRSZ``) when it creates the netdev, and in
cpr-transfer the new QEMU creates its netdev while the old one still runs
the guest on the same tap: the old QEMU's packets would be framed with the
wrong header length until it stopped.  Without one, a new QEMU's netdev
only sets the send buffer size, as the old one did.

vhost-net is refused for live updates (`VHOST_REFUSAL`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from cffi import FFI
from pyroute2 import IPRoute, NetlinkError, NetNS, netns

from ._ffi import check_layouts, pidfd_getfd
from .errors import HostError
from .spec import NetSpec, VmSpec

ffi = FFI()
ffi.cdef(
    """
    /* include/uapi/linux/if.h (Linux 7.2), the members sealvm uses */
    struct ifmap {
        unsigned long mem_start;
        unsigned long mem_end;
        unsigned short base_addr;
        unsigned char irq;
        unsigned char dma;
        unsigned char port;
    };
    struct ifreq {
        char ifr_name[16];
        union {
            short ifru_flags;
            int ifru_ivalue;
            int ifru_mtu;
            struct ifmap ifru_map;
            char ifru_slave[16];
            char ifru_newname[16];
            void *ifru_data;
        } ifr_ifru;
    };
    int ioctl(int fd, unsigned long request, ...);
    """
)
_libc = ffi.dlopen(None)

#: sizeof() from the 7.2 headers (x86_64), checked against cffi at import.
HEADER_SIZES: dict[str, int] = {"struct ifmap": 24, "struct ifreq": 40}
check_layouts(ffi, HEADER_SIZES, __name__)

# include/uapi/linux/if_tun.h
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100

TUN_DEVICE = "/dev/net/tun"
VHOST_DEVICE = "/dev/vhost-net"

#: Why preflight refuses a live update of a NIC with vhost=on.
VHOST_REFUSAL = (
    "vhost=on: the vhost-net worker belongs to the old QEMU (VHOST_SET_OWNER binds "
    "/dev/vhost-net to the owner's mm), and this QEMU has no way to hand it to a new "
    "process (upstream's pending 'cpr tap/vhost' series uses VHOST_RESET_OWNER); "
    "the NIC would stop. Use vhost=false")

T = TypeVar("T")


@dataclass(frozen=True)
class NetRecord:
    """What sealvm created for one NIC (kept in the VM's state file)."""

    id: str
    tap: str
    netns: str | None
    created_netns: bool

    def where(self) -> str:
        return f"namespace {self.netns}" if self.netns else "sealvm's namespace"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetRecord:
        return cls(id=str(data["id"]), tap=str(data["tap"]),
                   netns=None if data.get("netns") is None else str(data["netns"]),
                   created_netns=bool(data.get("created_netns")))


@contextlib.contextmanager
def _rtnl(ns: str | None) -> Iterator[IPRoute]:
    """A netlink socket in namespace *ns* (sealvm's own when None)."""
    sock: IPRoute = NetNS(ns, flags=0) if ns else IPRoute()
    try:
        yield sock
    finally:
        sock.close()


def in_netns(ns: str | None, fn: Callable[[], T]) -> T:
    """Run *fn* in a thread of its own that entered namespace *ns* first
    (setns(2) is per thread: the caller's namespace does not change).  Every
    netlink call goes through here, *ns* None included: pyroute2's
    synchronous API runs an event loop of its own, which cannot nest in the
    controller's."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            if ns is not None:
                netns.setns(ns, flags=0)
            result.append(fn())
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    thread = threading.Thread(target=run, name=f"sealvm-netns-{ns}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def namespaces() -> list[str]:
    return list(netns.listnetns())


def tap_exists(tap: str, ns: str | None) -> bool:
    """True when interface *tap* exists in *ns* (False when *ns* does not)."""
    if ns is not None and ns not in namespaces():
        return False

    def look() -> bool:
        with _rtnl(ns) as rtnl:
            return bool(rtnl.link_lookup(ifname=tap))

    return in_netns(None, look)


def _create(n: NetSpec, created: list[NetRecord]) -> None:
    made_ns = False
    if n.netns is not None and n.netns not in namespaces():
        netns.create(n.netns)
        made_ns = True
    rec = NetRecord(n.id, n.tap, n.netns, made_ns)
    try:
        with _rtnl(n.netns) as rtnl:
            _create_tap(n, rec, rtnl)
    except BaseException:
        if made_ns:  # nothing of ours is in it yet: teardown would not see it
            netns.remove(n.netns)
        raise
    created.append(rec)


def _create_tap(n: NetSpec, rec: NetRecord, rtnl: IPRoute) -> None:
    where = rec.where()
    if rtnl.link_lookup(ifname=n.tap):
        raise HostError(f"net {n.id}: interface {n.tap} already exists in {where}; "
                        "sealvm creates its taps itself (remove it or choose another tap)")
    master = None
    if n.bridge is not None:
        found = rtnl.link_lookup(ifname=n.bridge)
        kind = None
        if found:
            info = rtnl.link("get", index=found[0])[0].get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        if kind != "bridge":
            raise HostError(f"net {n.id}: no bridge {n.bridge} in {where}"
                            + (f" ({n.bridge} is a {kind or 'plain'} link)" if found else ""))
        master = found[0]
    rtnl.link("add", ifname=n.tap, kind="tuntap", mode="tap")
    try:
        index = rtnl.link_lookup(ifname=n.tap)[0]
        if master is not None:
            rtnl.link("set", index=index, master=master)
        if n.address is not None:
            addr, prefix = n.address.split("/")
            rtnl.addr("add", index=index, address=addr, prefixlen=int(prefix))
        rtnl.link("set", index=index, state="up")
    except BaseException:
        with contextlib.suppress(NetlinkError, IndexError):
            rtnl.link("del", index=rtnl.link_lookup(ifname=n.tap)[0])
        raise


def setup(spec: VmSpec) -> list[NetRecord]:
    """Create every NIC's tap (and namespace, when missing).

    :raise HostError: naming the NIC; whatever was created is removed.
    """
    created: list[NetRecord] = []
    try:
        for n in spec.net:
            if n.vhost and not os.path.exists(VHOST_DEVICE):
                raise HostError(f"net {n.id}: vhost=true but this host has no {VHOST_DEVICE} "
                                "(CONFIG_VHOST_NET); use vhost=false")
            try:
                in_netns(None, lambda n=n: _create(n, created))  # type: ignore[misc]
            except (NetlinkError, OSError) as exc:
                raise HostError(f"net {n.id}: cannot create tap {n.tap} in "
                                f"{'namespace ' + n.netns if n.netns else 'this namespace'}: "
                                f"{exc}") from exc
    except BaseException:
        teardown(created)
        raise
    return created


def teardown(records: list[NetRecord]) -> list[str]:
    """Remove what `setup` created: each tap, and each namespace sealvm
    created.  Idempotent; returns what it removed ("tap X", "netns Y")."""
    return in_netns(None, lambda: _teardown(records)) if records else []


def _teardown(records: list[NetRecord]) -> list[str]:
    removed: list[str] = []
    for rec in records:
        if rec.netns is not None and rec.netns not in namespaces():
            continue
        with _rtnl(rec.netns) as rtnl:
            for index in rtnl.link_lookup(ifname=rec.tap):
                with contextlib.suppress(NetlinkError):
                    rtnl.link("del", index=index)
                    removed.append(f"tap {rec.tap}")
    for ns in dict.fromkeys(r.netns for r in records if r.created_netns and r.netns):
        if ns in namespaces():
            netns.remove(ns)
            removed.append(f"netns {ns}")
    return removed


# ------------------------------------------------------------------- fds


def _ioctl_ifreq(fd: int, request: int, name: str = "", flags: int = 0) -> tuple[str, int]:
    req = ffi.new("struct ifreq *")
    raw = name.encode()
    ffi.memmove(req.ifr_name, raw, len(raw))
    req.ifr_ifru.ifru_flags = flags
    if _libc.ioctl(fd, ffi.cast("unsigned long", request), req) < 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err))
    return ffi.string(req.ifr_name).decode(), int(req.ifr_ifru.ifru_flags) & 0xFFFF


def open_tap(rec: NetRecord) -> int:
    """Attach to tap *rec* (TUNSETIFF, no vnet header, no packet info): the
    fd QEMU gets.  Close-on-exec is set; pass it explicitly.

    :raise HostError: when the tap is missing or already attached (EBUSY).
    """
    def attach() -> int:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        try:
            _ioctl_ifreq(fd, TUNSETIFF, rec.tap, IFF_TAP | IFF_NO_PI)
        except BaseException:
            os.close(fd)
            raise
        return fd

    try:
        return in_netns(rec.netns, attach)
    except OSError as exc:
        raise HostError(f"net {rec.id}: cannot attach to tap {rec.tap} in {rec.where()}: "
                        f"{exc.strerror or exc}") from exc


def open_taps(records: list[NetRecord]) -> dict[str, int]:
    """`open_tap` for each record: {NIC id: fd}."""
    fds: dict[str, int] = {}
    try:
        for rec in records:
            fds[rec.id] = open_tap(rec)
    except BaseException:
        close_fds(fds)
        raise
    return fds


def open_vhost(nics: tuple[NetSpec, ...]) -> dict[str, int]:
    """/dev/vhost-net for each NIC with vhost=true: {NIC id: fd}.

    :raise HostError: when it cannot be opened.
    """
    fds: dict[str, int] = {}
    try:
        for n in nics:
            if n.vhost:
                try:
                    fds[n.id] = os.open(VHOST_DEVICE, os.O_RDWR | os.O_CLOEXEC)
                except OSError as exc:
                    raise HostError(f"net {n.id}: cannot open {VHOST_DEVICE}: "
                                    f"{exc.strerror}") from exc
    except BaseException:
        close_fds(fds)
        raise
    return fds


def tap_info(fd: int) -> tuple[str, int]:
    """(interface name, IFF_* flags) of a tap fd (TUNGETIFF)."""
    return _ioctl_ifreq(fd, TUNGETIFF)


def take_taps(pid: int, fds: dict[str, int]) -> dict[str, int]:
    """Duplicates (close-on-exec) of the tap fds QEMU *pid* holds at the
    numbers *fds* names: {NIC id: fd}, for the QEMU that takes over.

    :raise HostError: when one cannot be taken (QEMU gone, no ptrace access).
    """
    taken: dict[str, int] = {}
    try:
        for nic, number in fds.items():
            try:
                taken[nic] = pidfd_getfd(pid, number)
            except OSError as exc:
                raise HostError(f"net {nic}: cannot take fd {number} (its tap) from QEMU "
                                f"pid {pid}: {exc.strerror or exc}") from exc
    except BaseException:
        close_fds(taken)
        raise
    return taken


def close_fds(fds: dict[str, int]) -> None:
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)


__all__ = [
    "NetRecord",
    "VHOST_REFUSAL",
    "close_fds",
    "in_netns",
    "open_tap",
    "open_taps",
    "open_vhost",
    "setup",
    "take_taps",
    "tap_exists",
    "tap_info",
    "teardown",
]
