"""
Host capabilities and host devices, probed by using them.

- `open_vfio_fds`: what QEMU must not open itself (/dev/iommu, vfio cdevs),
  opened by sealvm and passed by number.
- `host_check`: MFD_NOEXEC_SEAL, vm.memfd_noexec, memfd seals, /dev/iommu,
  type1 VFIO_UPDATE_VADDR.  Each probe tries the real thing (create the
  memfd, open the device, issue the ioctl) rather than looking for a path.
- What the host allows for an unprivileged, sandboxed QEMU (issue 18):
  seccomp filters (`probe_seccomp`), user and mount namespaces
  (`probe_userns`, `probe_mountns`: unshare(2) in a child process), a
  QEMU that loads its own filter (`probe_qemu_sandbox`: QEMU started with
  ``-sandbox``), and a VM user (`probe_vm_user`: it exists, is not root,
  and can read and execute the QEMU binary).  The namespace and access
  probes run in a forked child, so sealvm's own process never changes.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import pwd
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import _ffi, confine, procfs
from .errors import HostError
from .procfs import parse_status
from .spec import VfioSpec
from .vfio import (
    VFIO_CHECK_EXTENSION,
    VFIO_GET_API_VERSION,
    VFIO_UPDATE_VADDR,
    VFIO_TYPE1v2_IOMMU,
)


def vfio_cdev(dev: VfioSpec) -> Path:
    """The vfio cdev (/dev/vfio/devices/vfioN) of an assigned device.

    :raise HostError: when the device is not bound to a vfio driver with
        cdev support.
    """
    vdir = dev.sysfs_path / "vfio-dev"
    try:
        names = sorted(n for n in os.listdir(vdir) if n.startswith("vfio"))
    except FileNotFoundError:
        raise HostError(
            f"vfio device {dev.id}: {dev.sysfs_path} has no vfio cdev "
            "(bind it to vfio-pci; the kernel needs CONFIG_VFIO_DEVICE_CDEV)"
        ) from None
    if not names:
        raise HostError(f"vfio device {dev.id}: no cdev under {vdir}")
    return Path("/dev/vfio/devices") / names[0]


@dataclass
class VfioFds:
    """fds sealvm opened for QEMU; close() after QEMU inherited them."""

    iommufd: int | None
    devices: dict[str, int]

    def close(self) -> None:
        for fd in [self.iommufd, *self.devices.values()]:
            if fd is not None:
                os.close(fd)
        self.iommufd = None
        self.devices = {}


def open_vfio_fds(devices: tuple[VfioSpec, ...]) -> VfioFds:
    """Open /dev/iommu and the cdev of every iommufd-backed device.

    :raise HostError: naming the device and what is missing; nothing stays open.
    """
    fds = VfioFds(iommufd=None, devices={})
    wanted = [d for d in devices if d.backend == "iommufd"]
    if not wanted:
        return fds
    try:
        try:
            fds.iommufd = os.open("/dev/iommu", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise HostError(f"cannot open /dev/iommu: {exc.strerror} "
                            "(the kernel needs CONFIG_IOMMUFD)") from exc
        for dev in wanted:
            path = vfio_cdev(dev)
            try:
                fds.devices[dev.id] = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise HostError(f"vfio device {dev.id}: cannot open {path}: "
                                f"{exc.strerror}") from exc
    except BaseException:
        fds.close()
        raise
    return fds


# ------------------------------------------------------------------ probes


@dataclass(frozen=True)
class Probe:
    name: str
    ok: bool
    detail: str


def probe_memfd_noexec_seal() -> Probe:
    try:
        fd = os.memfd_create(
            "sealvm-probe", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | _ffi.MFD_NOEXEC_SEAL)
    except OSError as exc:
        why = errno.errorcode.get(exc.errno or 0, exc.strerror)
        return Probe("memfd-noexec-seal", False, f"memfd_create(MFD_NOEXEC_SEAL): {why}")
    try:
        seals = procfs.get_seals(fd)
        mode = os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
    ok = bool(seals & procfs.F_SEAL_EXEC) and not mode & 0o111
    return Probe("memfd-noexec-seal", ok,
                 f"supported: seals {'|'.join(procfs.seal_names(seals))}, mode {mode:o}")


def probe_memfd_noexec_sysctl() -> Probe:
    try:
        value = Path("/proc/sys/vm/memfd_noexec").read_text().strip()
    except FileNotFoundError:
        return Probe("vm.memfd_noexec", True, "absent (kernel before 6.3)")
    meaning = {"0": "exec allowed", "1": "noexec by default",
               "2": "exec refused: memfd_create without MFD_NOEXEC_SEAL fails"}
    return Probe("vm.memfd_noexec", True, f"{value} ({meaning.get(value, 'unknown')})")


def probe_memfd_seals() -> Probe:
    fd = os.memfd_create("sealvm-probe", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 1 << 20)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, procfs.RAM_SEALS)
        for size in (0, 2 << 20):
            try:
                os.ftruncate(fd, size)
            except PermissionError:
                continue
            return Probe("memfd-seals", False, f"ftruncate({size}) succeeded on a sealed memfd")
        seals = procfs.get_seals(fd)
    finally:
        os.close(fd)
    return Probe("memfd-seals", True,
                 f"{'|'.join(procfs.seal_names(seals))}: resize refused with EPERM")


def probe_iommufd() -> Probe:
    try:
        fd = os.open("/dev/iommu", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Probe("iommufd", False, f"/dev/iommu: {exc.strerror} (CONFIG_IOMMUFD off?)")
    os.close(fd)
    return Probe("iommufd", True, "/dev/iommu opens")


def probe_type1_update_vaddr() -> Probe:
    try:
        fd = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Probe("vfio-type1-vaddr", False, f"/dev/vfio/vfio: {exc.strerror}")
    try:
        api = fcntl.ioctl(fd, VFIO_GET_API_VERSION, 0)
        type1 = fcntl.ioctl(fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU)
        vaddr = fcntl.ioctl(fd, VFIO_CHECK_EXTENSION, VFIO_UPDATE_VADDR)
    except OSError as exc:
        return Probe("vfio-type1-vaddr", False, f"VFIO_CHECK_EXTENSION: {exc.strerror}")
    finally:
        os.close(fd)
    return Probe("vfio-type1-vaddr", bool(vaddr),
                 f"API {api}, TYPE1v2 {'yes' if type1 else 'no'}, "
                 f"VFIO_UPDATE_VADDR {'yes' if vaddr else 'no'}")


# ------------------------------------------- unprivileged QEMU (issue 18)

PROC = Path("/proc")

#: QEMU's sandbox as sealvm loads it for a VM without cpr-exec (spawn denied).
SANDBOX = confine.SANDBOX + ",spawn=deny"

#: seccomp return actions QEMU's -sandbox uses (SCMP_ACT_TRAP becomes
#: KILL_PROCESS when the kernel has it; execveat, setns and unshare are
#: KILL_THREAD; spawn and resource control are ERRNO)
_QEMU_SECCOMP_ACTIONS = ("kill_process", "kill_thread", "trap", "errno", "allow")

_SECCOMP_MODES = {"0": "none", "1": "strict", "2": "filter"}


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def probe_seccomp(proc: Path = PROC) -> Probe:
    """Whether the kernel can load a seccomp filter of the kind QEMU's
    ``-sandbox`` builds: the Seccomp field of /proc/self/status
    (CONFIG_SECCOMP) and /proc/sys/kernel/seccomp/actions_avail
    (CONFIG_SECCOMP_FILTER, with the actions QEMU uses).  Also says whether
    sealvm itself already runs under a filter: filters are inherited by
    every child and across exec(), so QEMU's would stack on top of it."""
    status = parse_status((proc / "self" / "status").read_text())
    mode = status.get("Seccomp")
    if mode is None:
        return Probe("seccomp", False,
                     "kernel without CONFIG_SECCOMP (no Seccomp field in /proc/self/status)")
    actions = _read(proc / "sys" / "kernel" / "seccomp" / "actions_avail")
    if actions is None:
        return Probe("seccomp", False,
                     "kernel without CONFIG_SECCOMP_FILTER (no "
                     "/proc/sys/kernel/seccomp/actions_avail): QEMU's -sandbox cannot load")
    missing = [a for a in _QEMU_SECCOMP_ACTIONS if a not in actions.split()]
    own = f"sealvm runs under mode {mode} ({_SECCOMP_MODES.get(mode, 'unknown')}"
    if "Seccomp_filters" in status:
        own += f", {status['Seccomp_filters']} filter(s)"
    own += ")"
    if missing:
        return Probe("seccomp", False,
                     f"filter mode without action(s) {', '.join(missing)} "
                     f"(actions: {actions}); {own}")
    return Probe("seccomp", True, f"filter mode, actions: {actions}; {own}")


def in_child(fn: Callable[[], int]) -> int:
    """Run *fn* in a forked child and return what it returned (an errno,
    0 for success; 255 if it raised).  For probes that change the process
    (unshare, setuid): sealvm's own process is never touched.  *fn* must
    only make system calls: the child shares nothing with the parent's
    threads but their memory as it was at fork()."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 255
        try:
            code = fn()
        finally:
            os._exit(code & 0xFF)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _errname(err: int) -> str:
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"


def _new_user_namespace() -> int:
    return _ffi.unshare_raw(_ffi.CLONE_NEWUSER)


def _new_mount_namespace() -> int:
    """unshare(CLONE_NEWNS), then make every mount private in it, as a
    per-VM mount namespace would start."""
    return (_ffi.unshare_raw(_ffi.CLONE_NEWNS)
            or _ffi.mount_raw("/", _ffi.MS_REC | _ffi.MS_PRIVATE))


def probe_userns(proc: Path = PROC,
                 try_it: Callable[[], int] = lambda: in_child(_new_user_namespace)) -> Probe:
    """Whether a user namespace can be created (unshare(CLONE_NEWUSER) in a
    child, as this process's user), and what the sysctls allow unprivileged
    users: user.max_user_namespaces, Debian's
    kernel.unprivileged_userns_clone, Ubuntu's AppArmor restriction."""
    facts = []
    limit = _read(proc / "sys" / "user" / "max_user_namespaces")
    facts.append(f"user.max_user_namespaces {limit if limit is not None else 'absent'}")
    for name, path in (
            ("kernel.unprivileged_userns_clone", ("kernel", "unprivileged_userns_clone")),
            ("kernel.apparmor_restrict_unprivileged_userns",
             ("kernel", "apparmor_restrict_unprivileged_userns"))):
        value = _read(proc / "sys" / Path(*path))
        if value is not None:
            facts.append(f"{name} {value}")
    err = try_it()
    who = f"uid {os.getuid()}"
    if err:
        return Probe("userns", False,
                     f"unshare(CLONE_NEWUSER) as {who}: {_errname(err)}; {', '.join(facts)}")
    return Probe("userns", True, f"unshare(CLONE_NEWUSER) as {who} works; {', '.join(facts)}")


def probe_mountns(try_it: Callable[[], int] = lambda: in_child(_new_mount_namespace)
                  ) -> Probe:
    """Whether sealvm can give QEMU a mount namespace of its own:
    unshare(CLONE_NEWNS) and a private remount of / in a child."""
    err = try_it()
    who = f"uid {os.getuid()}"
    if err:
        return Probe("mountns", False,
                     f"unshare(CLONE_NEWNS) + private / as {who}: {_errname(err)}")
    return Probe("mountns", True, f"unshare(CLONE_NEWNS) + private / as {who} work")


def sandbox_verdict(*, returncode: int | None, stderr: str, seccomp: str | None) -> Probe:
    """The qemu-sandbox probe's result from what QEMU did: its exit status,
    its stderr, and the Seccomp line of its /proc status while it ran."""
    if "-sandbox support is not enabled" in stderr or "no option group 'sandbox'" in stderr:
        return Probe("qemu-sandbox", False,
                     "QEMU built without seccomp (-sandbox support is not enabled in "
                     "this QEMU binary; build with libseccomp-dev, --enable-seccomp)")
    last = stderr.strip().splitlines()[-1:] or ["no output"]
    if returncode != 0:
        return Probe("qemu-sandbox", False,
                     f"QEMU with -sandbox {SANDBOX} exited with status {returncode}: {last[0]}")
    if seccomp is None or not seccomp.startswith("2"):
        return Probe("qemu-sandbox", False,
                     f"QEMU with -sandbox ran, but its /proc status says Seccomp {seccomp}")
    return Probe("qemu-sandbox", True,
                 f"QEMU ran with -sandbox {SANDBOX}: Seccomp {seccomp} (filter mode)")


def probe_qemu_sandbox(qemu: Path, *, timeout: float = 30.0) -> Probe:
    """Start *qemu* with ``-machine none`` and the sandbox issue 18 wants,
    talk QMP to it on stdio, read its seccomp mode from /proc while it runs,
    then quit it."""
    argv = [str(qemu), "-machine", "none", "-nodefaults", "-no-user-config",
            "-display", "none", "-sandbox", SANDBOX, "-qmp", "stdio"]
    try:
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    except OSError as exc:
        return Probe("qemu-sandbox", False, f"cannot run {qemu}: {exc.strerror}")
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        p.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    seccomp = None
    try:
        assert p.stdin is not None and p.stdout is not None
        if p.stdout.readline():  # the greeting; nothing if QEMU exited
            p.stdin.write('{"execute": "qmp_capabilities"}\n')
            p.stdin.flush()
            if p.stdout.readline():
                fields = parse_status(_read(PROC / str(p.pid) / "status") or "")
                if "Seccomp" in fields:
                    seccomp = fields["Seccomp"] + (
                        f", {fields['Seccomp_filters']} filter(s)"
                        if "Seccomp_filters" in fields else "")
                p.stdin.write('{"execute": "quit"}\n')
                p.stdin.flush()
        _, stderr = p.communicate(timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        p.kill()
        _, stderr = p.communicate()
        stderr += f"\n{exc}"
    finally:
        timer.cancel()
    if timed_out.is_set():
        stderr += f"\nno answer within {timeout:g} s"
    return sandbox_verdict(returncode=p.returncode, stderr=stderr, seccomp=seccomp)


def resolve_user(user: str) -> tuple[int, int, list[int]]:
    """A VM user as ``NAME`` or ``UID:GID``: (uid, gid, supplementary gids).

    :raise KeyError: no such user.
    :raise ValueError: a malformed UID:GID.
    """
    if ":" in user:
        uid, _, gid = user.partition(":")
        return int(uid), int(gid), [int(gid)]
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid, os.getgrouplist(user, pw.pw_gid)


def _access_as(uid: int, gid: int, groups: list[int], path: Path, mode: int) -> int:
    def check() -> int:
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
        return 0 if os.access(path, mode) else errno.EACCES
    return in_child(check)


def probe_vm_user(user: str, *, qemu: Path | None = None) -> Probe:
    """A user QEMU would run as: it exists (``NAME`` or ``UID:GID``), is not
    root, and (with *qemu*) can read and execute that binary, every
    directory on the way included (checked as that user, in a child)."""
    try:
        uid, gid, groups = resolve_user(user)
    except KeyError:
        return Probe("vm-user", False, f"{user}: no such user")
    except ValueError:
        return Probe("vm-user", False, f"{user}: expected NAME or UID:GID")
    group = f"{gid}"
    try:
        group = f"{grp.getgrgid(gid).gr_name} ({gid})"
    except KeyError:
        pass
    who = f"{user}: uid {uid}, gid {group}"
    if uid == 0:
        return Probe("vm-user", False, f"{who}: root is not an unprivileged user")
    if qemu is None:
        return Probe("vm-user", True, f"{who} (no --qemu: binary access not checked)")
    if os.getuid() != 0:
        return Probe("vm-user", False, f"{who}: cannot check access to {qemu} (not root)")
    err = _access_as(uid, gid, groups, qemu, os.R_OK | os.X_OK)
    if err:
        return Probe("vm-user", False,
                     f"{who}: cannot read and execute {qemu} ({_errname(err)}); "
                     "a cpr-exec successor runs as this user")
    return Probe("vm-user", True, f"{who}: can read and execute {qemu}")


def probe_vm_uids(proc: Path = PROC) -> Probe:
    """sealvm's uid range for VMs (`sealvm.confine`): how much of it is in
    use, and no account of this host inside it (a VM would share its uid)."""
    lo, hi = confine.UID_BASE, confine.UID_BASE + confine.UID_COUNT
    clash = sorted(f"{p.pw_name} ({p.pw_uid})" for p in pwd.getpwall() if lo <= p.pw_uid < hi)
    clash += sorted(f"group {g.gr_name} ({g.gr_gid})" for g in grp.getgrall()
                    if lo <= g.gr_gid < hi)
    running = {uid for uid in procfs.process_uids(proc) if lo <= uid < hi}
    registered = len(list(confine.REGISTRY.iterdir())) if confine.REGISTRY.is_dir() else 0
    facts = (f"uids {lo}..{hi - 1}: {registered} registered in {confine.REGISTRY}, "
             f"{len(running)} with a running process")
    if clash:
        return Probe("vm-uids", False, f"{facts}; accounts inside the range: "
                     + ", ".join(clash[:5]) + ": a VM could get their uid")
    return Probe("vm-uids", True, f"{facts}; no account of this host inside it")


#: Every probe by the name it reports, in the order `host_check` runs them.
PROBES: dict[str, Callable[[], Probe]] = {
    "memfd-noexec-seal": probe_memfd_noexec_seal,
    "vm.memfd_noexec": probe_memfd_noexec_sysctl,
    "memfd-seals": probe_memfd_seals,
    "iommufd": probe_iommufd,
    "vfio-type1-vaddr": probe_type1_update_vaddr,
    "seccomp": probe_seccomp,
    "userns": probe_userns,
    "mountns": probe_mountns,
    "vm-uids": probe_vm_uids,
}

#: Probes that run only when asked with what they need: qemu-sandbox needs a
#: QEMU binary, vm-user a user name.
PARAMETRIC_PROBES = ("qemu-sandbox", "vm-user")


def host_check(*, qemu: Path | None = None, vm_users: tuple[str, ...] = ()) -> list[Probe]:
    """Every probe, in a fixed order; then, with *qemu*, whether it loads its
    seccomp filter, and each of *vm_users* (with access to *qemu*)."""
    probes = [probe() for probe in PROBES.values()]
    if qemu is not None:
        probes.append(probe_qemu_sandbox(qemu))
    probes.extend(probe_vm_user(user, qemu=qemu) for user in vm_users)
    return probes
