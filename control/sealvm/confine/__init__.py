"""
QEMU without privileges: the VM's own user, no capabilities, seccomp, and a
mount namespace that shows only what the VM needs.

sealvm opens everything privileged (the QMP socket, /dev/iommu, VFIO cdevs,
taps, /dev/vhost-net) and passes fds (`sealvm.plan`).  What QEMU opens by
path, it opens in a view of its own, built by the jail (`jail`, run between
sealvm's fork and QEMU's exec):

==========================  =========================================
seen by QEMU                how
==========================  =========================================
/usr                        read-only, noexec; /usr/lib/<multiarch> and
                            /usr/lib64 read-only, executable (shared
                            libraries; `LIB_DIRS`)
the QEMU binary             read-only, executable (the file; its directory
                            read-only, noexec, for its data)
security.exec_paths         read-only, executable (cpr-exec targets)
the cpr-exec trampoline     read-only, executable
kernel, initrd, firmware,   read-only
security.paths, /sys (VFIO)
disks                       read-write (read-only when ``readonly``)
the VM's ``qemu/`` dir      read-write: QEMU's own files (serial log,
                            cpr-state, cpr.sock, migrate.sock, keeper
                            and endpoint sockets)
/dev                        null, zero, full, random, urandom (+ kvm)
/proc                       its own, showing only its user's processes
==========================  =========================================

plus a few files of /etc (the loader cache, passwd, group, localtime).  It
runs in its own network (no interface but a down loopback), IPC and UTS
namespaces.

Seccomp is QEMU's own ``-sandbox on`` with obsolete, elevateprivileges and
resourcecontrol denied (`sandbox_args`), and spawn denied unless the VM
may be updated by cpr-exec, where QEMU must exec its successor
(``security.cpr_exec``).  A cpr-exec's new image inherits the filter; its
command line leaves ``-sandbox`` out (`strip_sandbox`), so that filters do
not stack up one per update.

Each VM gets a uid and gid of its own from sealvm's range (`allocate`),
recorded in the host-wide registry under /run/sealvm/uids, or the ones
``security.user`` names.  Disk images are handed to that user for the VM's
life (`hand_disks`) and their owner restored when it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import procfs
from ..errors import HostError
from ..spec import SecuritySpec, VmSpec

#: sealvm's uids and gids for VMs: [UID_BASE, UID_BASE + UID_COUNT)
UID_BASE = 0x70000000
UID_COUNT = 65536
#: one file per uid in use, naming the VM's run directory
REGISTRY = Path(os.environ.get("SEALVM_UID_REGISTRY", "/run/sealvm/uids"))

#: QEMU's -sandbox, always
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny"
DEV_NODES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/passwd", "/etc/group",
             "/etc/nsswitch.conf")
JAIL = Path(__file__).with_name("jail.py")
#: where shared libraries are: executable in the view (/usr stays noexec)
_MULTIARCH = getattr(sys.implementation, "_multiarch", "")
LIB_DIRS = ((f"/usr/lib/{_MULTIARCH}",) if _MULTIARCH else ("/usr/lib",)) + (
    "/usr/lib64", "/lib64")


@dataclass(frozen=True)
class Confinement:
    """How one VM's QEMU runs (recorded in state.json: `to_state`)."""

    uid: int
    gid: int
    seccomp: bool
    cpr_exec: bool
    #: the registry entry this VM holds (auto-allocated ids), if any
    leased: bool = False
    #: disk image -> [uid, gid] it had before `hand_disks`
    disks: tuple[tuple[str, int, int], ...] = ()

    def to_state(self) -> dict[str, Any]:
        return {**asdict(self), "disks": [list(d) for d in self.disks]}

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> Confinement | None:
        """None for a VM that runs unconfined (or predates confinement)."""
        if not data:
            return None
        return cls(uid=int(data["uid"]), gid=int(data["gid"]), seccomp=bool(data["seccomp"]),
                   cpr_exec=bool(data["cpr_exec"]), leased=bool(data.get("leased", False)),
                   disks=tuple((str(p), int(u), int(g)) for p, u, g in data.get("disks", [])))


# ------------------------------------------------------------------- ids


def _fixed_ids(user: str) -> tuple[int, int]:
    if ":" in user:
        uid, gid = user.split(":", 1)
        return int(uid), int(gid)
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


@contextlib.contextmanager
def _registry_lock() -> Iterator[None]:
    REGISTRY.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(REGISTRY.parent / ".uids.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _holder(uid: int) -> Path | None:
    try:
        return Path((REGISTRY / str(uid)).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _stale(uid: int, run_dir: Path) -> bool:
    """An entry whose VM is gone: its run directory was removed, or its
    state names another uid (a VM launched there since)."""
    if not run_dir.is_dir():
        return True
    try:
        state = json.loads((run_dir / "state.json").read_text())
    except FileNotFoundError:
        return False  # launching
    except (OSError, ValueError):
        return False
    sec = state.get("security") or {}
    return int(sec.get("uid", -1)) != uid


def allocate(security: SecuritySpec, run_dir: Path) -> tuple[int, int, bool]:
    """The uid and gid of the VM in *run_dir*: the spec's, or the first free
    one of sealvm's range from a start derived from *run_dir* (registered
    until `release`).  Returns (uid, gid, leased).

    :raise HostError: when the range is full.
    """
    if security.user != "auto":
        uid, gid = _fixed_ids(security.user)
        return uid, gid, False
    start = int.from_bytes(hashlib.sha256(os.fsencode(run_dir)).digest()[:4], "little")
    with _registry_lock():
        busy = procfs.process_uids()
        for k in range(UID_COUNT):
            uid = UID_BASE + (start + k) % UID_COUNT
            if uid in busy:
                continue
            holder = _holder(uid)
            if holder is not None and holder != run_dir and not _stale(uid, holder):
                continue
            (REGISTRY / str(uid)).write_text(str(run_dir))
            return uid, uid, True
    raise HostError(f"no free uid in sealvm's range {UID_BASE}..{UID_BASE + UID_COUNT - 1}")


def release(conf: Confinement | None, run_dir: Path) -> None:
    """Give the VM's uid back (when it holds the registry's entry)."""
    if conf is None or not conf.leased:
        return
    with _registry_lock():
        if _holder(conf.uid) == run_dir:
            (REGISTRY / str(conf.uid)).unlink()


def registered_under(root: Path, *, release: bool = False) -> list[tuple[int, Path]]:
    """The uids registered for run directories under *root* (a run root),
    given back when *release*."""
    found = []
    with _registry_lock():
        for entry in sorted(REGISTRY.iterdir()):
            holder = _holder(int(entry.name)) if entry.name.isdigit() else None
            if holder is not None and holder.is_relative_to(root):
                found.append((int(entry.name), holder))
                if release:
                    entry.unlink()
    return found


def confinement(spec: VmSpec, run_dir: Path) -> Confinement | None:
    """The confinement a VM launched from *spec* in *run_dir* gets (ids
    allocated), or None when ``security.confine`` is off.

    :raise HostError: when sealvm does not run as root (it could not start
        QEMU as another user), or the uid range is full.
    """
    sec = spec.security
    if not sec.confine:
        return None
    if os.geteuid() != 0:
        raise HostError(
            f"security.confine: sealvm starts QEMU as a user of its own, in namespaces of its "
            f"own, which needs root (sealvm runs as uid {os.geteuid()}); run sealvm as root, or "
            f"set confine = false in [security] (QEMU then runs as uid {os.geteuid()})")
    uid, gid, leased = allocate(sec, run_dir)
    return Confinement(uid=uid, gid=gid, seccomp=sec.seccomp, cpr_exec=sec.cpr_exec,
                       leased=leased)


# ---------------------------------------------------------------- seccomp


def sandbox_args(spec: VmSpec) -> list[str]:
    """``-sandbox`` for *spec* (none when seccomp is off)."""
    sec = spec.security
    if not sec.seccomp:
        return []
    return ["-sandbox", SANDBOX + ("" if sec.cpr_exec else ",spawn=deny")]


def strip_sandbox(argv: list[str]) -> list[str]:
    """*argv* without ``-sandbox``: the command line of a cpr-exec's new
    image, which runs under the filter it inherits (the same policy)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "-sandbox":
            skip = True
        else:
            out.append(a)
    return out


# ------------------------------------------------------------------- view


def view(spec: VmSpec, qemu_dir: Path, *, trampoline: Path | None = None) -> list[list[str]]:
    """What QEMU sees (see the module): ``[path, mode]`` pairs."""
    binds: list[list[str]] = [["/usr", "ro"]]
    binds += [[d, "rx"] for d in LIB_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    binds += [[f, "ro"] for f in ETC_FILES if os.path.exists(f)]
    # the binary's directory for its data (a build tree's pc-bios), the
    # binary itself executable: bound as a file, the one sealvm checked at
    # launch (a file put in its place later is not what QEMU sees)
    qemu = os.path.abspath(spec.qemu)
    binds += [[os.path.dirname(qemu), "ro"], [qemu, "rx"]]
    sec = spec.security
    binds += [[os.path.abspath(p), "rx"] for p in sec.exec_paths]
    if trampoline is not None and sec.cpr_exec:
        binds.append([str(trampoline), "rx"])
    ro = [spec.guest.kernel, *([spec.guest.initrd] if spec.guest.initrd else []),
          *spec.firmware, *sec.paths]
    binds += [[os.path.abspath(p), "ro"] for p in ro if os.path.exists(p)]
    if spec.vfio:
        binds.append(["/sys", "ro"])
    binds += [[os.path.abspath(d.path), "ro" if d.readonly else "rw"] for d in spec.disk]
    if spec.serial_log is not None:
        binds.append([os.path.abspath(spec.serial_log), "rw"])
    binds.append([str(qemu_dir), "rw"])
    return binds


def jail_plan(spec: VmSpec, conf: Confinement, qemu_dir: Path, jail_root: Path, *,
              trampoline: Path | None = None) -> dict[str, Any]:
    dev = [n for n in DEV_NODES if os.path.exists(n)]
    if spec.accel == "kvm":
        dev.append("/dev/kvm")
    return {"uid": conf.uid, "gid": conf.gid, "root": str(jail_root),
            "binds": view(spec, qemu_dir, trampoline=trampoline), "dev": dev, "proc": True}


def wrap(argv: list[str], plan: dict[str, Any]) -> list[str]:
    """*argv* started through the jail with *plan*."""
    return [sys.executable, "-I", "-S", str(JAIL),
            json.dumps(plan, separators=(",", ":")), "--", *argv]


# ------------------------------------------------------------------ files


def prepare(conf: Confinement | None, qemu_dir: Path, jail_root: Path,
            serial_log: Path | None) -> None:
    """QEMU's own directory (owned by the VM's user, 0700), the jail's mount
    point, and the serial log, which the user may append to (created, or
    taken from the user of an earlier QEMU of the VM's: a relaunch may get
    another uid)."""
    qemu_dir.mkdir(mode=0o700, exist_ok=True)
    jail_root.mkdir(mode=0o700, exist_ok=True)
    owner = (0, 0) if conf is None else (conf.uid, conf.gid)
    os.chown(qemu_dir, *owner)
    os.chmod(qemu_dir, 0o700)
    if conf is not None and serial_log is not None:
        fd = os.open(serial_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                     | os.O_NOFOLLOW, 0o600)
        try:
            os.fchown(fd, conf.uid, conf.gid)
        finally:
            os.close(fd)


def give(path: Path, conf: Confinement | None) -> None:
    """Let the VM's user use the socket or file sealvm created at *path*."""
    if conf is not None:
        os.chown(path, conf.uid, conf.gid, follow_symlinks=False)


def hand_disks(spec: VmSpec, conf: Confinement) -> Confinement:
    """Make each disk image the VM's user's for the VM's life; the returned
    confinement records what to restore (`restore_disks`)."""
    handed = list(conf.disks)
    for d in spec.disk:
        path = os.path.abspath(d.path)
        st = os.stat(path)
        if any(p == path for p, _, _ in handed):
            continue
        if (st.st_uid, st.st_gid) != (conf.uid, conf.gid):
            handed.append((path, st.st_uid, st.st_gid))
            os.chown(path, conf.uid, conf.gid)
    return Confinement(**{**asdict(conf), "disks": tuple(handed)})


def restore_disks(conf: Confinement | None) -> list[str]:
    """Give each disk image its owner back; returns what was restored."""
    done: list[str] = []
    if conf is None:
        return done
    for path, uid, gid in conf.disks:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(path)
            if (st.st_uid, st.st_gid) == (conf.uid, conf.gid):
                os.chown(path, uid, gid)
                done.append(path)
    return done


def can_execute(path: Path, uid: int, gid: int) -> bool:
    """Whether *uid*/*gid* may read and execute *path* (its own mode bits;
    the jail makes the directories above it reachable)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_uid == uid:
        return st.st_mode & 0o500 == 0o500
    if st.st_gid == gid:
        return st.st_mode & 0o050 == 0o050
    return st.st_mode & 0o005 == 0o005


def seen_by(pid: int, path: Path) -> bool:
    """Whether process *pid* could exec *path* as the very file sealvm sees:
    the same inode in its view (a file replaced on the host after the view
    was made is not), on a mount of its view that is not noexec (access(2)
    checks that, walking *pid*'s mounts through /proc/PID/root)."""
    inside = f"/proc/{pid}/root{os.path.abspath(path)}"
    try:
        st_in, st_out = os.stat(inside), os.stat(path)
    except OSError:
        return False
    return ((st_in.st_dev, st_in.st_ino) == (st_out.st_dev, st_out.st_ino)
            and os.access(inside, os.X_OK))


# ------------------------------------------------------------- inspection


@dataclass(frozen=True)
class ProcessConfinement:
    """What /proc shows of a process's confinement."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    cap_eff: int
    cap_prm: int
    cap_bnd: int
    cap_amb: int
    no_new_privs: bool
    seccomp: int  # 0 none, 1 strict, 2 filter
    filters: int
    #: namespaces (mnt, net, ipc, uts, pid, user) that differ from sealvm's own
    own_namespaces: tuple[str, ...]


def inspect(pid: int) -> ProcessConfinement:
    """:raise ProcessLookupError: when *pid* is gone."""
    fields = procfs.status(pid)
    own = []
    for ns in ("mnt", "net", "ipc", "uts", "pid", "user"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"):
                own.append(ns)
    return ProcessConfinement(
        uid=int(fields["Uid"].split()[0]), gid=int(fields["Gid"].split()[0]),
        groups=tuple(int(g) for g in fields.get("Groups", "").split()),
        cap_eff=int(fields["CapEff"], 16), cap_prm=int(fields["CapPrm"], 16),
        cap_bnd=int(fields["CapBnd"], 16), cap_amb=int(fields.get("CapAmb", "0"), 16),
        no_new_privs=fields.get("NoNewPrivs") == "1",
        seccomp=int(fields.get("Seccomp", "0")),
        filters=int(fields.get("Seccomp_filters", "0")), own_namespaces=tuple(own))


def describe(conf: Confinement | None, pid: int | None) -> str:
    """One line for ``sealvm status``."""
    if conf is None:
        return "off (security.confine = false): QEMU runs as root with every capability"
    text = (f"uid {conf.uid} gid {conf.gid}, seccomp "
            + ("on" + ("" if conf.cpr_exec else ", spawn denied (no cpr-exec)")
               if conf.seccomp else "off"))
    if pid is not None and procfs.pid_alive(pid):
        with contextlib.suppress(ProcessLookupError, KeyError, ValueError):
            p = inspect(pid)
            caps = "none" if not (p.cap_eff | p.cap_prm | p.cap_bnd | p.cap_amb) else \
                f"eff {p.cap_eff:#x}"
            text += (f"; /proc: uid {p.uid}, capabilities {caps}, no_new_privs "
                     f"{'on' if p.no_new_privs else 'off'}, seccomp mode {p.seccomp} "
                     f"({p.filters} filter(s)), namespaces {','.join(p.own_namespaces) or 'host'}")
    return text

