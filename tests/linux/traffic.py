"""
Traffic to the Linux test guest (images/linux-guest) from a network
namespace the test created, checked byte for byte, and the guest's disk
format read back from the host.

Sockets are created inside the namespace (`sealvm.net.in_netns`: a thread
that entered it), then used from ordinary threads here; the guest listens
on 7000 (TCP echo), 7001 (TCP stream) and 7002 (UDP).

- `Traffic` keeps one echo connection (it sends stream(0, i), 512 bytes
  every 10 ms, and checks the echo), one stream connection (checks
  stream(1, i) as it arrives) and a UDP sequence (one datagram every 5 ms,
  each answered by the guest with the same sequence number).  Every
  arrival is timestamped, so a window (an update) gets its own figures:
  the largest gap between TCP arrivals, the datagrams sent in it that were
  never answered.  A byte that differs, a reset or an EOF is recorded.
- `check_disk_image` re-reads every block of the guest's disk image.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sealvm.net import in_netns

GUEST_IP = "192.0.2.2"
HOST_IP = "192.0.2.1"
PORT_ECHO, PORT_STREAM, PORT_UDP = 7000, 7001, 7002
MASK = (1 << 64) - 1
BLOCK = 4096
MAGIC = 0x5345414C564D424B


def splitmix64(k: int) -> int:
    z = (k + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def stream(key: int, offset: int, size: int) -> bytes:
    """Bytes [offset, offset + size) of the guest's stream *key*."""
    first, last = offset // 8, (offset + size + 7) // 8
    words = b"".join(splitmix64(key << 40 | w).to_bytes(8, "little")
                     for w in range(first, last))
    start = offset - first * 8
    return words[start:start + size]


@dataclass
class Window:
    """The figures of one time window (an update)."""

    udp_sent: int
    udp_lost: int
    tcp_stall: float  # largest gap between TCP arrivals (both connections), s


@dataclass
class _Conn:
    sock: socket.socket
    key: int
    received: int = 0
    arrivals: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Traffic:
    """TCP echo + TCP stream + UDP sequence to the guest, from namespace *ns*."""

    def __init__(self, ns: str, *, udp_interval: float = 0.005) -> None:
        self.ns = ns
        self.udp_interval = udp_interval
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.sent_echo = 0
        self.corrupt_at: int | None = None  # negative control: send one wrong byte there
        self.udp_sent: list[float] = []  # send time by sequence number
        self.udp_answered: dict[int, float] = {}
        self.errors: list[str] = []
        self.echo: _Conn | None = None
        self.stream: _Conn | None = None
        self.udp: socket.socket | None = None

    def _socket(self, kind: int) -> socket.socket:
        return in_netns(self.ns, lambda: socket.socket(socket.AF_INET, kind))

    def connect(self, timeout: float = 60.0) -> None:
        """Connect both TCP connections (retrying until the guest listens)."""
        deadline = time.monotonic() + timeout
        conns = []
        for port, key in ((PORT_ECHO, 0), (PORT_STREAM, 1)):
            while True:
                sock = self._socket(socket.SOCK_STREAM)
                sock.settimeout(2.0)
                try:
                    sock.connect((GUEST_IP, port))
                    break
                except OSError:
                    sock.close()
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns.append(_Conn(sock, key))
        self.echo, self.stream = conns
        self.udp = self._socket(socket.SOCK_DGRAM)
        self.udp.connect((GUEST_IP, PORT_UDP))

    def start(self) -> None:
        self.connect()
        assert self.echo is not None and self.stream is not None
        for target, name in ((self._send_echo, "echo-send"),
                             (lambda: self._receive(self.echo), "echo-recv"),
                             (lambda: self._receive(self.stream), "stream-recv"),
                             (self._send_udp, "udp-send"), (self._receive_udp, "udp-recv")):
            t = threading.Thread(target=target, name=f"traffic-{name}", daemon=True)
            t.start()
            self.threads.append(t)

    def close(self) -> None:
        """Stop every thread and close every socket (idempotent)."""
        self.stop.set()
        for conn in (self.echo, self.stream):
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
        if self.udp is not None:
            with contextlib.suppress(OSError):
                self.udp.shutdown(socket.SHUT_RDWR)
        for t in self.threads:
            t.join(10)
        for conn in (self.echo, self.stream):
            if conn is not None:
                conn.sock.close()
        if self.udp is not None:
            self.udp.close()

    def sockets(self) -> list[socket.socket]:
        conns = [c.sock for c in (self.echo, self.stream) if c is not None]
        return conns + ([self.udp] if self.udp is not None else [])

    # ------------------------------------------------------------ threads

    def _send_echo(self) -> None:
        assert self.echo is not None
        while not self.stop.wait(0.010):
            data = bytearray(stream(0, self.sent_echo, 512))
            if self.corrupt_at is not None and 0 <= self.corrupt_at - self.sent_echo < 512:
                data[self.corrupt_at - self.sent_echo] ^= 0xFF
                self.corrupt_at = None
            try:
                self.echo.sock.sendall(data)
            except OSError as exc:
                if not self.stop.is_set():
                    self.errors.append(f"echo send: {exc}")
                return
            self.sent_echo += len(data)

    def _receive(self, conn: _Conn | None) -> None:
        assert conn is not None
        while True:
            try:
                data = conn.sock.recv(65536)
            except OSError as exc:
                if not self.stop.is_set():
                    conn.errors.append(f"recv: {exc}")
                return
            if not data:
                if not self.stop.is_set():
                    conn.errors.append(f"EOF after {conn.received} bytes")
                return
            conn.arrivals.append(time.monotonic())
            want = stream(conn.key, conn.received, len(data))
            if data != want:
                bad = next(i for i, (a, b) in enumerate(zip(data, want, strict=True)) if a != b)
                conn.errors.append(f"byte {conn.received + bad} differs "
                                   f"(got {data[bad]:#04x}, want {want[bad]:#04x})")
            conn.received += len(data)

    def _send_udp(self) -> None:
        assert self.udp is not None
        while not self.stop.wait(self.udp_interval):
            seq = len(self.udp_sent)
            self.udp_sent.append(time.monotonic())
            with contextlib.suppress(OSError):  # e.g. the tap is down (negative control)
                self.udp.send(struct.pack("<Q", seq))

    def _receive_udp(self) -> None:
        assert self.udp is not None
        while not self.stop.is_set():
            try:
                data = self.udp.recv(64)
            except OSError:
                if self.stop.is_set():
                    return
                continue
            if len(data) >= 8:
                self.udp_answered.setdefault(struct.unpack_from("<Q", data)[0], time.monotonic())

    # ------------------------------------------------------------ figures

    def tcp_errors(self) -> list[str]:
        out = list(self.errors)
        for name, conn in (("echo", self.echo), ("stream", self.stream)):
            if conn is not None:
                out += [f"{name}: {e}" for e in conn.errors]
        return out

    def window(self, start: float, end: float) -> Window:
        """Figures for [start, end]: datagrams sent in it and never answered
        (call once answers had time to arrive), the largest TCP gap."""
        sent = [seq for seq, t in enumerate(self.udp_sent) if start <= t <= end]
        lost = [seq for seq in sent if seq not in self.udp_answered]
        stall = 0.0
        for conn in (self.echo, self.stream):
            if conn is None:
                continue
            arrivals = list(conn.arrivals)
            # the last arrival before the window, those in it, the first after it
            before = [t for t in arrivals if t < start][-1:]
            after = [t for t in arrivals if t > end][:1] or [time.monotonic()]
            times = before + [t for t in arrivals if start <= t <= end] + after
            stall = max([stall] + [b - a for a, b in zip(times, times[1:], strict=False)])
        return Window(udp_sent=len(sent), udp_lost=len(lost), tcp_stall=stall)

    def echo_verified(self) -> int:
        """Bytes the guest echoed back, each checked against what was sent."""
        return self.echo.received if self.echo is not None else 0


@dataclass(frozen=True)
class DiskCheck:
    blocks: int
    bad: list[str]
    max_seq: int


def _fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & MASK
    return h


def check_disk_image(path: Path) -> DiskCheck:
    """Re-read every block the guest wrote: magic, block number, checksum."""
    bad = []
    max_seq = 0
    with open(path, "rb") as f:
        data = f.read()
    blocks = len(data) // BLOCK
    for lba in range(blocks):
        blk = data[lba * BLOCK:(lba + 1) * BLOCK]
        magic, blk_lba, seq = struct.unpack_from("<QQQ", blk)
        (csum,) = struct.unpack_from("<Q", blk, BLOCK - 8)
        if magic != MAGIC:
            bad.append(f"{lba}: magic")
        elif blk_lba != lba:
            bad.append(f"{lba}: holds block {blk_lba}")
        elif _fnv1a(blk[:BLOCK - 8]) != csum:
            bad.append(f"{lba}: checksum")
        else:
            max_seq = max(max_seq, seq)
    return DiskCheck(blocks, bad, max_seq)


def flip_latest_block(path: Path) -> int:
    """Negative control: flip one payload byte of the block the guest wrote
    last (the writer will not come back to it for a while), behind the
    guest's back.  Returns its block number."""
    with open(path, "r+b") as f:
        data = f.read()
        seqs = [struct.unpack_from("<QQQ", data, lba * BLOCK)
                for lba in range(len(data) // BLOCK)]
        lba = max((s[2], i) for i, s in enumerate(seqs) if s[0] == MAGIC)[1]
        offset = lba * BLOCK + 100
        f.seek(offset)
        f.write(bytes([data[offset] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())
    return lba


def image_holders(path: Path) -> dict[int, list[int]]:
    """Every process with an fd open on *path*'s inode: {pid: [fd, ...]}."""
    st = os.stat(path)
    out: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    s = os.stat(f"/proc/{pid}/fd/{fd}")
                    if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
                        out.setdefault(int(pid), []).append(int(fd))
    return out


#: QEMU's file-posix lock bytes: 100 + permission bit (BLK_PERM_WRITE = 1 << 1)
QEMU_LOCK_WRITE_PERM = 101


def write_perm_locked(path: Path) -> bool:
    """True when some process (a QEMU) holds the image's "write" permission
    lock byte: F_OFD_GETLK of a write lock there reports a conflict."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        req = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, QEMU_LOCK_WRITE_PERM, 1, 0)
        l_type = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_OFD_GETLK, req))[0]
    finally:
        os.close(fd)
    return bool(l_type != fcntl.F_UNLCK)


def tap_holders(tap: str) -> dict[int, list[int]]:
    """Every process with an fd attached to tap *tap* (``iff:`` in fdinfo)."""
    out: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    if f"iff:\t{tap}\n" in f.read():
                        out.setdefault(int(pid), []).append(int(fd))
    return out
