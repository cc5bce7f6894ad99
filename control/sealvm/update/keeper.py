"""
sealvm's cpr-exec keeper: holds the guest's fds across the exec (`wayback`).

Run by path, in isolated mode, with the standard library only, so that it
starts fast and imports nothing of the controller:

    python -I keeper.py --fd LISTENING-SOCKET-FD --name RUN-DIR

See sealvm.update.wayback for the protocol.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import struct
import time
from typing import Any

#: the keeper gives up (closing every fd) if nobody releases it by then
MAX_LIFETIME = 3600.0


def _spawn(argv: list[str], held: dict[int, int], state: int, log: str) -> int:
    """posix_spawn *argv* with each held fd at its number in the old QEMU."""
    top = max([*held, 2]) + 1
    moved = {num: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top + 64) for num, fd in held.items()}
    logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        actions: list[tuple[int, int, int]] = [
            (os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, logfd, 1),
            (os.POSIX_SPAWN_DUP2, logfd, 2)]
        actions += [(os.POSIX_SPAWN_DUP2, fd, num) for num, fd in moved.items()]
        env = {k: v for k, v in os.environ.items() if not k.startswith("QEMU_CPR_EXEC")}
        env["QEMU_CPR_EXEC_STATE"] = str(state)
        return os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)
    finally:
        for fd in (*moved.values(), logfd, null):
            os.close(fd)


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def serve(listen_fd: int) -> int:
    sock = socket.socket(fileno=listen_fd)
    sock.settimeout(MAX_LIFETIME)
    held: dict[int, int] = {}
    state: int | None = None
    deadline = time.monotonic() + MAX_LIFETIME
    try:
        while time.monotonic() < deadline:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                break
            with conn:
                conn.settimeout(10)
                msg, fds, _, _ = socket.recv_fds(conn, 65536, 253)
                for fd in fds:  # received without close-on-exec: no leak into a spawn
                    os.set_inheritable(fd, False)
                while not msg.endswith(b"\n"):
                    more = conn.recv(65536)
                    if not more:
                        break
                    msg += more
                words = msg.decode(errors="replace").strip().split(" ", 1)
                verb, rest = words[0], (words[1] if len(words) > 1 else "")
                if verb != "fds" and _peer_uid(conn) != 0:
                    # the socket may belong to a confined VM's user (for the
                    # trampoline's "fds"): everything else is root's
                    for fd in fds:
                        os.close(fd)
                    conn.sendall(json.dumps({"error": f"{verb!r} is root's"}).encode())
                    continue
                if verb == "fds":
                    for fd in held.values():
                        os.close(fd)
                    head, *nums = rest.split()
                    state = None if head == "state=-" else int(head.removeprefix("state="))
                    held = dict(zip((int(n) for n in nums), fds, strict=True))
                    continue  # the trampoline does not wait for an answer
                for fd in fds:
                    os.close(fd)
                if verb == "status":
                    conn.sendall(json.dumps({"held": sorted(held), "state": state}).encode())
                elif verb == "fallback":
                    req = json.loads(rest)
                    if state is None or not held:
                        reply: dict[str, Any] = {"error": "no fds were handed over"}
                    else:
                        try:
                            reply = {"pid": _spawn(req["argv"], held, state, req["log"])}
                        except OSError as exc:
                            reply = {"error": f"{req['argv'][0]}: {exc}"}
                    conn.sendall(json.dumps(reply).encode())
                elif verb == "release":
                    conn.sendall(b"k")
                    return 0
                else:
                    conn.sendall(json.dumps({"error": f"unknown request {verb!r}"}).encode())
    finally:
        for fd in held.values():
            os.close(fd)
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sealvm-keeper", description=__doc__)
    p.add_argument("--fd", type=int, required=True, help="the listening socket, inherited")
    p.add_argument("--name", default="", help="the VM's run directory (for ps, and for "
                   "whoever looks for what is left of a run root)")
    args = p.parse_args(argv)
    return serve(args.fd)


if __name__ == "__main__":
    # The keeper is released right after the guest runs again, when a CPU
    # the guest's vCPUs need may be all there is: exit without the
    # interpreter's teardown (a full garbage collection and module cleanup,
    # ~5 ms of CPU here).  Nothing is buffered; the kernel closes the fds.
    os._exit(main())
