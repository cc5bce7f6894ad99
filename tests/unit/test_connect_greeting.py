"""connect_qmp and a stale message ahead of QEMU's greeting.

QEMU resets a QMP monitor's negotiation only when the next client
connects, so an event emitted after the previous client went away can
reach the next one before the greeting (seen in the fault matrix: a
killed controller's MIGRATION "failed" was the first thing `recover`
read).  A small QMP server plays that first connection; the real case is
tests/faults (transfer, controller killed at migrate-sent).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from sealvm.errors import LaunchError
from sealvm.machine import connect_qmp

GREETING = {"QMP": {"version": {"qemu": {"major": 10, "minor": 2, "micro": 2},
                                "package": ""}, "capabilities": []}}
STALE = {"timestamp": {"seconds": 1, "microseconds": 0}, "event": "MIGRATION",
         "data": {"status": "failed"}}


async def serve(path: Path, stale_connections: int) -> tuple[asyncio.Server, list[int]]:
    seen = [0]

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen[0] += 1
        if seen[0] <= stale_connections:
            writer.write(json.dumps(STALE).encode() + b"\r\n")
        writer.write(json.dumps(GREETING).encode() + b"\r\n")
        await writer.drain()
        while chunk := await reader.read(4096):  # one request per write: no newline in QMP
            req = json.loads(chunk)
            reply: dict[str, object] = {"return": {}}
            if "id" in req:
                reply["id"] = req["id"]
            writer.write(json.dumps(reply).encode() + b"\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(client, path=str(path))
    return server, seen


async def test_a_stale_event_before_the_greeting_means_connect_again(tmp_path: Path) -> None:
    server, seen = await serve(tmp_path / "qmp.sock", stale_connections=1)
    async with server:
        qmp = await connect_qmp(tmp_path / "qmp.sock", name="t", timeout=10)
        await qmp.disconnect()
    assert seen[0] == 2


async def test_stale_messages_on_every_connection_still_fail(tmp_path: Path) -> None:
    server, seen = await serve(tmp_path / "qmp.sock", stale_connections=99)
    async with server:
        with pytest.raises(LaunchError, match="Did not understand Greeting"):
            await connect_qmp(tmp_path / "qmp.sock", name="t", timeout=10)
    assert seen[0] == 3
