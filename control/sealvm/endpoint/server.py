"""
The script endpoint's server: one process per VM, for the VM's lifetime.

    python -m sealvm.endpoint.server --name VM --clients FD --qemu FD --ctl FD

Three sockets, all created by the controller (`sealvm.endpoint.start`):

clients (``qmp-scripts.sock``)
    QMP for any number of scripts.  Each client gets its own greeting and
    capabilities negotiation; its commands go to QEMU one at a time, in
    order, and their replies come back with the client's own ``id``.
    Events from QEMU reach every negotiated client.
qemu (``endpoint-qemu.sock``)
    Every QEMU of the VM connects here itself (``-chardev socket,
    server=off,reconnect-ms=...`` plus ``-mon``): the first one at launch,
    the re-exec'd image after a cpr-exec, the new process of a cpr-transfer
    while the old one still runs.  The endpoint is the QMP *client* of
    each (qemu.qmp), and knows each connection's pid (``SO_PEERCRED``).
ctl (``endpoint.ctl``, datagrams)
    The controller says when a live update starts and ends (`notify`):
    from start to end, scripts' commands are held, not sent (they would
    race the update), and answered once the guest runs on the QEMU that
    won, to which the endpoint then switches.  Both edges reach every
    client as events of ours, ``SEALVM_UPDATE_START`` / ``_END``.

The controller never waits for the endpoint: notifications are datagrams
sent without blocking, and QEMU connects to the endpoint asynchronously.
If the endpoint dies, scripts lose their connections; the VM and its
updates do not notice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError, Runstate
from qemu.qmp.message import Message
from qemu.qmp.qmp_client import ExecInterruptedError, ExecuteError

from .policy import Policy

log = logging.getLogger("sealvm.endpoint")

#: the longest a script's command is held during an update before it is
#: answered with an error (an update whose controller died and nobody
#: recovered)
HOLD_MAX = 120.0
#: how long a command waits for a QEMU when none is connected (the VM is
#: starting, or QEMU died)
NO_QEMU_MAX = 10.0
#: a client that reads nothing is dropped once this much waits for it
CLIENT_BACKLOG = 4 << 20
#: the endpoint exits when the VM is gone: no QEMU connected and no
#: state file for this long
ORPHAN_AFTER = 30.0


def _now() -> dict[str, int]:
    t = time.time()
    return {"seconds": int(t), "microseconds": int((t % 1) * 1e6)}


def _error(desc: str, klass: str = "GenericError") -> dict[str, Any]:
    return {"error": {"class": klass, "desc": desc}}


class _Broadcast(EventListener):
    """Hands each event to *sink* as the connection reads it."""

    def __init__(self, sink: Callable[[Message], None]) -> None:
        super().__init__()
        self._sink = sink

    async def put(self, event: Message) -> None:
        self._sink(event)


class Upstream:
    """One QEMU connected to the endpoint."""

    def __init__(self, qmp: QMPClient, pid: int, seq: int) -> None:
        self.qmp = qmp
        self.pid = pid
        self.seq = seq

    @property
    def connected(self) -> bool:
        return self.qmp.runstate is Runstate.RUNNING

    def __repr__(self) -> str:
        return f"<QEMU pid {self.pid} connection {self.seq}>"


class Client:
    """One script connected to the endpoint."""

    def __init__(self, writer: asyncio.StreamWriter, seq: int) -> None:
        self.writer = writer
        self.seq = seq
        self.negotiated = False

    def send(self, msg: dict[str, Any]) -> None:
        if self.writer.is_closing():
            return
        transport = self.writer.transport
        if transport.get_write_buffer_size() > CLIENT_BACKLOG:
            log.warning("client %d reads nothing: dropped", self.seq)
            self.writer.close()
            return
        self.writer.write(json.dumps(msg).encode() + b"\r\n")


class Endpoint:
    def __init__(self, name: str, policy: Policy, state_file: str | None) -> None:
        self.name = name
        self.policy = policy
        self.state_file = state_file
        self.upstreams: list[Upstream] = []
        self.active: Upstream | None = None
        self.version: dict[str, Any] = {}
        #: the update in progress (its start notification), or None
        self.updating: dict[str, Any] | None = None
        self.changed = asyncio.Condition()
        self.clients: set[Client] = set()
        self._qemu_seq = 0
        self._client_seq = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _notify_changed(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def broadcast(self, msg: dict[str, Any]) -> None:
        for c in list(self.clients):
            if c.negotiated:
                c.send(msg)

    # ------------------------------------------------------------ QEMU side

    async def serve_qemu(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            self._spawn(self._adopt(conn))

    async def _adopt(self, conn: socket.socket) -> None:
        pid, _, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
        self._qemu_seq += 1
        qmp = QMPClient(f"{self.name}-qemu{self._qemu_seq}")
        # events go to the scripts as they are read, in order with replies
        # (the default listener would only queue them)
        qmp.events.event_filter = lambda _: False
        qmp.register_listener(_Broadcast(self._on_event))
        try:
            await qmp.connect(conn)
            version = await qmp.execute("query-version")
        except (QMPError, OSError, EOFError) as exc:
            log.warning("QEMU pid %d: cannot negotiate: %s", pid, exc)
            conn.close()
            return
        up = Upstream(qmp, pid, self._qemu_seq)
        if isinstance(version, dict):
            self.version = version
        self.upstreams.append(up)
        log.info("%r connected%s", up, " (update in progress)" if self.updating else "")
        self._select()
        await self._notify_changed()
        try:
            while qmp.runstate is Runstate.RUNNING:
                await qmp.runstate_changed()
        finally:
            with contextlib.suppress(QMPError, OSError, EOFError):
                await qmp.disconnect()
            self.upstreams.remove(up)
            log.info("%r gone", up)
            if self.active is up:
                self.active = None
            self._select()
            await self._notify_changed()

    def _on_event(self, event: Message) -> None:
        data = event.get("data")
        if (self.updating is not None and event["event"] == "SHUTDOWN"
                and isinstance(data, dict) and data.get("reason") == "host-qmp-quit"):
            return  # the old QEMU of a cpr-transfer, told to quit: not the VM
        self.broadcast(dict(event))

    def _select(self) -> None:
        """Outside updates, the newest QEMU connection is the VM's when the
        current one is gone; during an update nothing switches (`update_end`
        decides)."""
        if self.updating is not None:
            return
        if self.active is None or not self.active.connected:
            self.active = self._newest_live()

    def _newest_live(self) -> Upstream | None:
        live = [u for u in self.upstreams if u.connected]
        return live[-1] if live else None

    async def update_start(self, info: dict[str, Any]) -> None:
        self.updating = dict(info, since=time.monotonic())
        log.info("update starts: %s", info)
        self.broadcast({"event": "SEALVM_UPDATE_START", "data": info, "timestamp": _now()})

    async def update_end(self, info: dict[str, Any]) -> None:
        pid = info.get("pid")
        if isinstance(pid, int):
            # the QEMU that won connects at its start; give it a moment if
            # it has not yet
            end = time.monotonic() + 5.0
            async with self.changed:
                while not any(u.pid == pid and u.connected for u in self.upstreams) \
                        and time.monotonic() < end:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.changed.wait(), end - time.monotonic())
            mine = [u for u in self.upstreams if u.pid == pid and u.connected]
            if mine:
                self.active = mine[-1]
        if self.active is None or not self.active.connected:
            self.active = self._newest_live()
        if self.active is not None:
            # a round trip while commands are still held: every event the
            # QEMU sent before the update ended (its RESUME) reaches the
            # scripts before the end does, and before any reply
            with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
                await asyncio.wait_for(self.active.qmp.execute("query-status"), 5.0)
        self.updating = None
        self._select()
        log.info("update ends: %s; QEMU: %r", info, self.active)
        for up in list(self.upstreams):  # the loser, or the old image's copy
            if up is not self.active:
                self._spawn(up.qmp.disconnect())
        self.broadcast({"event": "SEALVM_UPDATE_END", "data": info, "timestamp": _now()})
        await self._notify_changed()

    async def serve_ctl(self, ctl: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(ctl, 65536)
            try:
                msg = json.loads(data)
                op = msg.pop("op")
            except (ValueError, KeyError, AttributeError, TypeError):
                log.warning("bad notification %r", data[:200])
                continue
            if op == "update-start":
                await self.update_start(msg)
            elif op == "update-end":
                await self.update_end(msg)
            else:
                log.warning("unknown notification %r", op)

    async def _qemu_for_command(self) -> Upstream | str:
        """The QEMU to send a script's command to, once no update holds it;
        or why there is none."""
        since = time.monotonic()
        async with self.changed:
            while True:
                now = time.monotonic()
                if self.updating is not None:
                    left = self.updating["since"] + HOLD_MAX - now
                    if left <= 0:
                        return (f"sealvm: a live update of {self.name} started "
                                f"{HOLD_MAX:.0f} s ago and has not ended (run `sealvm "
                                f"recover {self.name}`); the command was not sent")
                elif self.active is not None and self.active.connected:
                    return self.active
                else:
                    left = NO_QEMU_MAX - (now - since)
                    if left <= 0:
                        return f"sealvm: no QEMU of {self.name} is connected to the endpoint"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), left)

    # ---------------------------------------------------------- script side

    async def serve_client(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        self._client_seq += 1
        client = Client(writer, self._client_seq)
        self.clients.add(client)
        log.info("client %d connected", client.seq)
        try:
            if not self.version:
                async with self.changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self.changed.wait_for(lambda: bool(self.version)), NO_QEMU_MAX)
            client.send({"QMP": {"version": self.version, "capabilities": []}})
            decoder = json.JSONDecoder()
            buf = ""
            while data := await reader.read(65536):
                buf += data.decode(errors="replace")
                while buf := buf.lstrip():
                    try:
                        msg, end = decoder.raw_decode(buf)
                    except json.JSONDecodeError:
                        if len(buf) > (1 << 20) or not _incomplete(buf):
                            client.send(_error("JSON parse error"))
                            buf = ""
                        break
                    buf = buf[end:]
                    client.send(await self.command(client, msg))
                await writer.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # the client went, or the endpoint stops
        finally:
            self.clients.discard(client)
            writer.close()
            log.info("client %d gone", client.seq)

    async def command(self, client: Client, msg: object) -> dict[str, Any]:
        """The reply to one message of a script."""
        if not isinstance(msg, dict):
            return _error("QMP input must be a JSON object")
        ident = {"id": msg["id"]} if "id" in msg else {}
        if "exec-oob" in msg:
            return _error("sealvm: out-of-band execution is not available on the "
                          "script endpoint") | ident
        cmd = msg.get("execute")
        args = msg.get("arguments", {})
        extra = set(msg) - {"execute", "arguments", "id"}
        if not isinstance(cmd, str):
            return _error("QMP input lacks member 'execute'") | ident
        if extra:
            return _error(f"QMP input member '{sorted(extra)[0]}' is unexpected") | ident
        if not isinstance(args, dict):
            return _error("QMP input member 'arguments' must be an object") | ident
        if cmd == "qmp_capabilities":
            if client.negotiated:
                return _error("Capabilities negotiation is already complete, command "
                              "ignored", "CommandNotFound") | ident
            if args.get("enable"):
                return _error(f"Capability '{args['enable'][0]}' not available on the "
                              "sealvm script endpoint") | ident
            client.negotiated = True
            return {"return": {}} | ident
        if not client.negotiated:
            return _error("Expecting capabilities negotiation with 'qmp_capabilities'",
                          "CommandNotFound") | ident
        refusal = self.policy.refusal(cmd)
        if refusal is not None:
            return _error(refusal) | ident
        up = await self._qemu_for_command()
        if isinstance(up, str):
            return _error(up) | ident
        call = Message({"execute": cmd} | ({"arguments": args} if args else {}))
        try:
            return {"return": await up.qmp.execute_msg(call)} | ident
        except ExecuteError as exc:
            err = exc.received["error"]
            return {"error": dict(err) if isinstance(err, dict) else err} | ident
        except ExecInterruptedError:
            return _error(f"sealvm: the connection to QEMU (pid {up.pid}) went away while "
                          "the command ran; its effect is unknown") | ident
        except QMPError as exc:
            return _error(f"sealvm: {type(exc).__name__}: {exc}") | ident

    async def orphan_watch(self) -> None:
        """Exit once the VM is gone (its controller died without `down`)."""
        if self.state_file is None:
            return
        idle_since: float | None = None
        while True:
            await asyncio.sleep(2.0)
            gone = not self.upstreams and not os.path.exists(self.state_file)
            if not gone:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > ORPHAN_AFTER:
                log.info("no QEMU and no state file for %.0f s: exiting", ORPHAN_AFTER)
                return


def _incomplete(buf: str) -> bool:
    """Could more input complete *buf* into a JSON value?"""
    depth = 0
    in_str = esc = False
    for ch in buf:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                return False
    return depth > 0 or in_str


async def serve(args: argparse.Namespace) -> None:
    policy = Policy(allow=json.loads(args.allow), deny=json.loads(args.deny))
    ep = Endpoint(args.name, policy, args.state)
    clients = socket.socket(fileno=args.clients)
    qemu = socket.socket(fileno=args.qemu)
    ctl = socket.socket(fileno=args.ctl)
    for s in (clients, qemu, ctl):
        s.setblocking(False)
    server = await asyncio.start_unix_server(ep.serve_client, sock=clients)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    tasks = [asyncio.ensure_future(t) for t in
             (ep.serve_qemu(qemu), ep.serve_ctl(ctl), ep.orphan_watch())]
    try:
        await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        server.close()
        for c in list(ep.clients):
            c.writer.close()
        for up in list(ep.upstreams):
            with contextlib.suppress(QMPError, OSError, EOFError):
                await up.qmp.disconnect()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sealvm.endpoint.server")
    p.add_argument("--name", required=True)
    p.add_argument("--clients", type=int, required=True, help="listening socket for scripts")
    p.add_argument("--qemu", type=int, required=True, help="listening socket for QEMU")
    p.add_argument("--ctl", type=int, required=True, help="datagram socket for notifications")
    p.add_argument("--state", help="the VM's state file (exit once it is gone)")
    p.add_argument("--allow", default="[]", help="JSON list of commands allowed beyond "
                   "the defaults")
    p.add_argument("--deny", default="[]", help="JSON list of commands denied as well")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s endpoint: %(message)s")
    logging.getLogger("qemu").setLevel(logging.WARNING)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
