"""
QEMU unprivileged and sandboxed by default (`sealvm.confine`, issue 18):
what /proc shows of it, what it may not do when asked over QMP, and live
updates in both modes with the confinement kept.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import script_view
from sealvm import Machine, PreflightError, UpdateError, confine
from sealvm.errors import QMPReplyError
from sealvm.pytest_plugin import GuestChecker, Updater, VmLauncher
from sealvm.update.wayback import Keeper


def assert_confined(pid: int, conf: confine.Confinement) -> confine.ProcessConfinement:
    p = confine.inspect(pid)
    assert (p.uid, p.gid, p.groups) == (conf.uid, conf.gid, (conf.gid,)), p
    assert (p.cap_eff, p.cap_prm, p.cap_bnd, p.cap_amb) == (0, 0, 0, 0), p
    assert p.no_new_privs, p
    assert (p.seccomp, p.filters) == (2, 1), p
    assert {"mnt", "net", "ipc", "uts"} <= set(p.own_namespaces), p
    return p


async def test_qemu_runs_as_its_own_user_with_nothing_else(vm: Machine) -> None:
    """By default: a uid and gid of sealvm's range, no capability in any
    set (bounding included), no_new_privs, one seccomp filter, its own
    mount, network, IPC and UTS namespaces; ``status`` says so."""
    assert vm.pid is not None and vm.confinement is not None
    p = assert_confined(vm.pid, vm.confinement)
    assert confine.UID_BASE <= p.uid < confine.UID_BASE + confine.UID_COUNT
    # its view: the run directory shows only QEMU's own directory
    root = Path(f"/proc/{vm.pid}/root")
    assert (root / str(vm.paths.qemu_dir).lstrip("/")).is_dir()
    assert not (root / str(vm.paths.state).lstrip("/")).exists()
    assert not (root / "root" / ".ssh").exists() and not (root / "home").exists()
    mounts = Path(f"/proc/{vm.pid}/mountinfo").read_text()
    usr = [m for m in mounts.splitlines() if m.split()[4] == "/usr"]
    assert usr and "noexec" in usr[0].split()[5], usr  # /usr/bin/sh is there, not runnable
    st = os.stat(vm.paths.qemu_dir)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (p.uid, 0o700)
    env = {**os.environ, "SEALVM_RUN_DIR": str(vm.paths.root.parent)}
    await vm.detach()  # QEMU's monitor takes one client: the CLI's
    out = subprocess.run([sys.executable, "-m", "sealvm.cli", "status", vm.name],
                         capture_output=True, text=True, env=env, timeout=60, check=False)
    await vm.connect()
    assert out.returncode == 0, out.stderr
    assert f"confined uid {p.uid} gid {p.gid}, seccomp on" in out.stdout, out.stdout
    assert "capabilities none, no_new_privs on, seccomp mode 2 (1 filter(s))" in out.stdout


async def test_escape_attempts_over_qmp_fail(sealvm_launch: VmLauncher,
                                             sealvm_check_guest: GuestChecker,
                                             tmp_path: Path) -> None:
    """Asked over QMP to do what it must not, a confined QEMU fails and the
    guest runs on: open a host file outside its view (even one its uid
    could read), write into another VM's directory, run a program
    (``migrate`` to ``exec:``), write guest memory to a host path."""
    a = await sealvm_launch(name="a")
    b = await sealvm_launch(name="b")
    assert a.confinement is not None and b.confinement is not None
    assert a.confinement.uid != b.confinement.uid
    secret = tmp_path / "secret"
    secret.write_text("host data\n")
    os.chmod(secret, 0o644)
    os.chmod(tmp_path, 0o755)
    for path in (secret, Path("/etc/shadow"), b.paths.qemu_dir / "serial.log"):
        with pytest.raises(QMPReplyError, match="No such file or directory"):
            await a.execute("blockdev-add", {"driver": "file", "node-name": "x",
                                             "filename": str(path)})
    # B's directory, named by path: not in A's view, and not A's uid's
    with pytest.raises(QMPReplyError, match="No such file or directory"):
        await a.execute("chardev-add", {"id": "w", "backend": {"type": "file", "data": {
            "out": str(b.paths.qemu_dir / "planted")}}})
    assert not (b.paths.qemu_dir / "planted").exists()
    # A's own directory is A's only: a file there is not B's either way
    with pytest.raises(QMPReplyError, match="No such file or directory|Read-only file system"):
        await a.execute("dump-guest-memory", {"paging": False,
                                              "protocol": f"file:{tmp_path / 'dump'}"})
    assert not (tmp_path / "dump").exists()
    with pytest.raises(QMPReplyError, match=r"/bin/sh. \(Permission denied\)"):
        await a.execute("migrate", {"uri": f"exec:touch {tmp_path / 'ran'}"})
    assert not (tmp_path / "ran").exists()
    for vm in (a, b):
        assert await vm.status() == "running"
        await sealvm_check_guest(vm)


async def test_unconfined_qemu_does_all_of_it(sealvm_launch: VmLauncher,
                                             tmp_path: Path) -> None:
    """The negative control of the escape attempts: with ``confine = false``
    and ``seccomp = false`` (QEMU as root, as before) the same requests
    succeed: QEMU opens /etc/shadow, writes guest memory to a host file and
    runs a program."""
    vm = await sealvm_launch(security={"confine": False, "seccomp": False})
    await vm.execute("blockdev-add", {"driver": "file", "node-name": "x",
                                      "filename": "/etc/shadow", "read-only": True})
    await vm.execute("dump-guest-memory", {"paging": False,
                                           "protocol": f"file:{tmp_path / 'dump'}"})
    assert (tmp_path / "dump").stat().st_size > 0
    await vm.execute("migrate", {"uri": f"exec:touch {tmp_path / 'ran'}"})
    for _ in range(100):
        if (tmp_path / "ran").exists():
            break
        await asyncio.sleep(0.1)
    assert (tmp_path / "ran").exists()
    await vm.execute("migrate_cancel")


async def test_spawn_denied_without_cpr_exec(sealvm_launch: VmLauncher, sealvm_update: Updater,
                                             sealvm_check_guest: GuestChecker,
                                             tmp_path: Path) -> None:
    """``security.cpr_exec = false``: QEMU's filter denies spawning
    (``spawn=deny``), preflight refuses cpr-exec before the pause, and
    cpr-transfer (sealvm starts the new QEMU) works, confined the same."""
    vm = await sealvm_launch(security={"cpr_exec": False})
    assert vm.pid is not None and vm.confinement is not None
    sandbox = vm.argv[vm.argv.index("-sandbox") + 1]
    assert sandbox.endswith(",spawn=deny"), sandbox
    pid = vm.pid
    with pytest.raises(PreflightError, match=r"sandbox: security.cpr_exec = false"):
        await sealvm_update(vm, "cpr-exec")
    assert vm.pid == pid and await vm.status() == "running"
    with pytest.raises(QMPReplyError, match=r"Failed to fork \(Operation not permitted\)"):
        await vm.execute("migrate", {"uri": f"exec:touch {tmp_path / 'ran'}"})
    assert not (tmp_path / "ran").exists()
    report = await sealvm_update(vm, "cpr-transfer")
    assert report.mismatches == 0 and report.heartbeat_continuous
    assert vm.pid != pid
    assert_confined(vm.pid, vm.confinement)
    await sealvm_check_guest(vm)


@pytest.mark.parametrize("mode", ["cpr-exec", "cpr-transfer"])
async def test_live_updates_keep_the_confinement(sealvm_launch: VmLauncher,
                                                 sealvm_update: Updater,
                                                 sealvm_check_guest: GuestChecker,
                                                 mode: str) -> None:
    """Three updates: the same uid, no capability, and one filter after
    each (a cpr-exec's new image runs under the filter it inherits; a
    cpr-transfer's new QEMU loads its own)."""
    vm = await sealvm_launch()
    assert vm.pid is not None and vm.confinement is not None
    conf = vm.confinement
    for _ in range(3):
        report = await sealvm_update(vm, mode)
        assert report.mismatches == 0 and report.heartbeat_continuous
        assert vm.pid is not None and vm.confinement == conf
        assert_confined(vm.pid, conf)
    await sealvm_check_guest(vm)


async def test_preflight_refuses_a_binary_the_vm_user_cannot_run(
        sealvm_launch: VmLauncher, sealvm_update: Updater, tmp_path: Path) -> None:
    """A new binary only root may execute (0700), and a cpr-exec target
    outside QEMU's view: each refused before the pause, naming the cause."""
    vm = await sealvm_launch()
    assert vm.pid is not None
    pid = vm.pid
    qemu = Path(vm.argv[0])
    private = tmp_path / "private"
    private.mkdir()
    copy = private / qemu.name
    shutil.copy2(qemu, copy)
    os.chmod(copy, 0o700)
    for mode in ("cpr-transfer", "cpr-exec"):
        with pytest.raises(PreflightError, match=r"vm-user: uid \d+ gid \d+ may not read and "
                                                 r"execute"):
            await sealvm_update(vm, mode, qemu=copy)
    os.chmod(copy, 0o755)
    with pytest.raises(PreflightError, match=r"exec-view: QEMU \(pid \d+\) cannot exec new "
                                             r"binary .*security.exec_paths"):
        await sealvm_update(vm, "cpr-exec", qemu=copy)
    assert vm.pid == pid and await vm.status() == "running"


def exiting_qemu(tmp: Path, real: Path) -> Path:
    """A 'new QEMU' that answers preflight like *real*, then exits when
    started for the update (tests/faults has the whole set)."""
    script = tmp / "qemu-exit"
    script.write_text(f"""#!{sys.executable}
import os, sys
if sys.argv[1:2] not in (["--version"], ["-machine"]):
    sys.exit(1)
os.execv({str(real)!r}, [{str(real)!r}] + sys.argv[1:])
""")
    script.chmod(0o755)
    return script


async def test_way_back_starts_the_previous_qemu_confined(
        sealvm_launch: VmLauncher, sealvm_update: Updater, sealvm_check_guest: GuestChecker,
        tmp_path: Path) -> None:
    """The new image of a cpr-exec exits; the keeper, which runs as root,
    starts the previous QEMU through the jail: the VM's uid, no
    capability, one filter.  (The failing binary, a Python script, is in
    QEMU's view through security.exec_paths, with its interpreter.)"""
    vm = await sealvm_launch(security=script_view(tmp_path))
    assert vm.pid is not None and vm.confinement is not None
    conf, pid = vm.confinement, vm.pid
    bad = exiting_qemu(tmp_path, Path(vm.argv[0]))
    with pytest.raises(UpdateError, match="the previous QEMU took the guest back") as err:
        await sealvm_update(vm, "cpr-exec", qemu=bad, timeout=30)
    assert err.value.rolled_back, err.value
    assert vm.pid is not None and vm.pid != pid
    assert_confined(vm.pid, conf)
    await sealvm_check_guest(vm)


async def test_disk_image_is_handed_to_the_vm_user_and_back(
        sealvm_launch: VmLauncher, tmp_path: Path) -> None:
    """A root-owned image is the VM's user's while the VM runs (QEMU opens it
    by path in its view), its owner again once the VM is down."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    os.chmod(image, 0o600)
    vm = await sealvm_launch(disk=[{"id": "d0", "path": str(image)}])
    assert vm.confinement is not None
    assert (image.stat().st_uid, image.stat().st_gid) == (vm.confinement.uid,
                                                          vm.confinement.gid)
    await vm.shutdown()
    assert (image.stat().st_uid, image.stat().st_gid) == (0, 0)
    assert not (confine.REGISTRY / str(vm.confinement.uid)).exists()


def ask_as(uid: int, gid: int, sock: Path, line: bytes) -> bytes:
    """*line* sent to the unix socket *sock* by a child running as uid/gid;
    its answer (or the error it got)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        try:
            os.close(r)
            os.setgroups([gid])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(str(sock))
                s.sendall(line)
                s.shutdown(socket.SHUT_WR)
                answer = b"".join(iter(lambda: s.recv(4096), b""))
            os.write(w, answer or b"(no answer)")
        except OSError as exc:
            os.write(w, f"OSError: {exc.strerror}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out


async def test_keeper_answers_only_root(vm: Machine) -> None:
    """The keeper's socket belongs to the VM's user, so that the trampoline,
    which runs as that user, can hand its fds over (every cpr-exec here
    does, and the way back uses them); ``status``, ``fallback`` and
    ``release`` from that user are refused, and another uid cannot even
    connect."""
    conf = vm.confinement
    assert conf is not None
    keeper = await Keeper.start(vm.paths, owner=conf)
    try:
        st = os.stat(vm.paths.keeper_sock)
        # the socket as QEMU reaches it: through its view (the run root's
        # directories are root's, 0700, on the host)
        sock = Path(f"/proc/{vm.pid}/root{vm.paths.keeper_sock}")
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (conf.uid, 0o600)
        for verb in (b"status\n", b'fallback {"argv": ["/bin/sh"], "log": "/tmp/x"}\n',
                     b"release\n"):
            answer = await asyncio.to_thread(ask_as, conf.uid, conf.gid, sock, verb)
            assert b"is root's" in answer, (verb, answer)
        assert keeper.alive()
        other = await asyncio.to_thread(ask_as, conf.uid + 1, conf.gid + 1, sock, b"status\n")
        assert other == b"OSError: Permission denied", other
        assert json.loads(await keeper.request("status")) == {"held": [], "state": None}
    finally:
        await keeper.release()
    assert not keeper.alive()


async def test_binary_replaced_on_the_host_is_not_cpr_execd(
        sealvm_launch: VmLauncher, sealvm_update: Updater, sealvm_check_guest: GuestChecker,
        qemu_binary: Path, tmp_path: Path) -> None:
    """QEMU's view has its binary as the file sealvm checked at launch.  A
    build installed over it (a new file at the same path) is not what QEMU
    would exec: cpr-exec is refused before the pause, naming it; a
    cpr-transfer (a new QEMU, a new view) takes the new file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(mode=0o755)
    qemu = bin_dir / "qemu-system-x86_64"
    shutil.copy2(qemu_binary, qemu)
    vm = await sealvm_launch(qemu=str(qemu))
    assert vm.pid is not None
    pid = vm.pid
    shutil.copy2(qemu_binary, bin_dir / "new")
    os.replace(bin_dir / "new", qemu)  # as an install does: another inode
    with pytest.raises(PreflightError, match=r"exec-view: .*cannot exec new binary "
                                             rf"{qemu}: outside its view, replaced"):
        await sealvm_update(vm, "cpr-exec", qemu=qemu)
    assert vm.pid == pid and await vm.status() == "running"
    report = await sealvm_update(vm, "cpr-transfer", qemu=qemu)
    assert report.mismatches == 0 and vm.pid != pid
    assert os.stat(f"/proc/{vm.pid}/exe").st_ino == os.stat(qemu).st_ino
    await sealvm_check_guest(vm)


async def test_relaunch_takes_the_serial_log_from_an_earlier_qemu_user(
        sealvm_launch: VmLauncher, sealvm_run_root: Path) -> None:
    """A VM launched again where an earlier QEMU of another uid left its
    serial log (the bench's --at-once relaunched this way and QEMU could not
    open it: Permission denied) starts, the log now its new user's."""
    vm = await sealvm_launch()
    spec = vm.spec
    await vm.shutdown()
    serial = vm.paths.serial
    os.chown(serial, 54321, 54321)  # as an earlier QEMU's uid would have it
    again = Machine(spec, run_root=sealvm_run_root)
    await again.launch()
    try:
        assert again.confinement is not None
        assert serial.stat().st_uid == again.confinement.uid
        assert await again.status() == "running"
    finally:
        await again.shutdown()
