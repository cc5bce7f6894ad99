"""
The QMP endpoint for scripts: one socket per VM that many QMP clients share,
that lives through live updates, and that sealvm never waits for.

QEMU's own monitor serves one client at a time, and sealvm needs it for
every verb; a script connected to it would make `sealvm update` and `down`
fail, and would lose its connection at every update anyway.  So each VM
has a second monitor, which QEMU connects *out* of to a small server of
ours (`server`), started with the VM and stopped with it.  Scripts connect
to `RunPaths.scripts` (``qmp-scripts.sock`` in the run directory; also
`script_socket`) with any QMP client: qemu.qmp, ``qmp-shell``, socat.

- Each client negotiates capabilities itself and keeps its own ids.
- A command sent during an update is held and answered by the QEMU that
  runs the guest afterwards; events of the new QEMU reach every client, and
  each client sees ``SEALVM_UPDATE_START`` / ``SEALVM_UPDATE_END`` events.
- Commands that would break sealvm's control of the VM are refused with a
  QMP error naming the verb to use (`policy`; the spec's ``[scripts]``
  table widens or narrows the list).

This module is the controller's side: start, stop, notify.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .. import procfs
from ..confine import Confinement, give
from ..errors import HostError
from ..plan import RunPaths
from ..runroot import default_run_root
from ..spec import ScriptsSpec

log = logging.getLogger("sealvm.endpoint")


def script_socket(name: str, run_root: Path | None = None) -> Path:
    """The path scripts connect to for VM *name*."""
    return RunPaths((run_root or default_run_root()) / name).scripts


def _listen(path: Path, kind: int = socket.SOCK_STREAM) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    s = socket.socket(socket.AF_UNIX, kind)
    try:
        old = os.umask(0o177)
        try:
            s.bind(str(path))
        finally:
            os.umask(old)
        if kind == socket.SOCK_STREAM:
            s.listen(64)
    except OSError:
        s.close()
        raise
    return s


def start(paths: RunPaths, name: str, spec: ScriptsSpec, *,
          owner: Confinement | None = None) -> int:
    """Start the VM's script endpoint (before its QEMU: QEMU connects to it).

    The sockets are bound here, so scripts and QEMU can connect as soon as
    this returns; QEMU's belongs to *owner*, the VM's user of a confined
    QEMU (`sealvm.confine`).  Returns the endpoint's pid.

    :raise HostError: when it cannot be started.
    """
    socks: list[socket.socket] = []
    try:
        socks = [_listen(paths.scripts), _listen(paths.endpoint_qemu),
                 _listen(paths.endpoint_ctl, socket.SOCK_DGRAM)]
        give(paths.endpoint_qemu, owner)
        if spec.group is not None:
            gid = grp.getgrnam(spec.group).gr_gid
            os.chown(paths.scripts, -1, gid)
            os.chmod(paths.scripts, 0o660)
            os.chown(paths.root, -1, gid)
            os.chmod(paths.root, 0o710)
        argv = [sys.executable, "-m", "sealvm.endpoint.server", "--name", name,
                "--clients", str(socks[0].fileno()), "--qemu", str(socks[1].fileno()),
                "--ctl", str(socks[2].fileno()), "--state", str(paths.state),
                "--allow", json.dumps(list(spec.allow)), "--deny", json.dumps(list(spec.deny))]
        logf = os.open(paths.endpoint_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                       0o600)
        try:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(Path(__file__).resolve().parents[2]),
                 *filter(None, [os.environ.get("PYTHONPATH")])]))
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                     pass_fds=[s.fileno() for s in socks],
                                     start_new_session=True, env=env)
        finally:
            os.close(logf)
    except (OSError, KeyError) as exc:
        for p in (paths.scripts, paths.endpoint_qemu, paths.endpoint_ctl):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise HostError(f"cannot start the script endpoint of {name}: {exc}") from exc
    finally:
        for s in socks:
            s.close()
    record = {"pid": popen.pid, "start_time": procfs.start_time(popen.pid)}
    paths.endpoint_pid.write_text(json.dumps(record))
    popen.returncode = 0  # it outlives us: no ResourceWarning, never reaped here
    return popen.pid


def pid_of(paths: RunPaths) -> int | None:
    """The pid of the VM's endpoint, if it runs."""
    try:
        record = json.loads(paths.endpoint_pid.read_text())
        pid, started = int(record["pid"]), int(record["start_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if procfs.same_process(pid, started) else None


def stop(paths: RunPaths, timeout: float = 5.0) -> None:
    """Stop the VM's endpoint (its scripts are disconnected) and remove its
    files.  Idempotent."""
    pid = pid_of(paths)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        while procfs.pid_alive(pid) and time.monotonic() < end:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            time.sleep(0.02)
        else:
            if procfs.pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    for p in (paths.scripts, paths.endpoint_qemu, paths.endpoint_ctl, paths.endpoint_pid):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def notify(paths: RunPaths, op: str, **info: Any) -> None:
    """Tell the endpoint that an update starts or ends; never waits, never
    fails (the endpoint may be gone: scripts are not the VM)."""
    if not paths.endpoint_ctl.exists():
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.sendto(json.dumps({"op": op, **info}).encode(), str(paths.endpoint_ctl))
    except OSError as exc:
        log.debug("script endpoint not told %s: %s", op, exc)


__all__ = ["notify", "pid_of", "script_socket", "start", "stop"]
