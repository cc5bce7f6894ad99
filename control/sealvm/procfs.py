"""
What a running QEMU holds, read from outside through /proc.

The source of truth for guest-RAM fds: each memfd a process holds, with its
inode, size, seals (``F_GET_SEALS``) and whether it can be executed.  Used to
verify a live update (same inodes before and after) and by tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

F_SEAL_SEAL = 0x0001
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004
F_SEAL_WRITE = 0x0008
F_SEAL_FUTURE_WRITE = 0x0010
F_SEAL_EXEC = 0x0020

SEAL_NAMES = {
    F_SEAL_SEAL: "SEAL",
    F_SEAL_SHRINK: "SHRINK",
    F_SEAL_GROW: "GROW",
    F_SEAL_WRITE: "WRITE",
    F_SEAL_FUTURE_WRITE: "FUTURE_WRITE",
    F_SEAL_EXEC: "EXEC",
}

#: The seals sealvm expects on every guest-RAM memfd.
RAM_SEALS = F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL

_MEMFD_PREFIX = "/memfd:"

#: QEMU names a memory-backend-memfd's memfd after the backend's type, not
#: its id; aux RAM (aux-ram-share=on) memfds carry the RAM block's name.
BACKEND_MEMFD_NAME = "memory-backend-memfd"


def seal_names(seals: int) -> list[str]:
    """``0x7`` -> ``['SEAL', 'SHRINK', 'GROW']``."""
    return [name for bit, name in SEAL_NAMES.items() if seals & bit]


@dataclass(frozen=True)
class Memfd:
    """One memfd held by a process."""

    fd: int
    name: str
    inode: int
    size: int
    seals: int
    executable: bool

    @property
    def seal_names(self) -> list[str]:
        return seal_names(self.seals)

    @property
    def is_backend(self) -> bool:
        """True for a memory-backend-memfd (guest RAM proper), not aux RAM."""
        return self.name == BACKEND_MEMFD_NAME

    def has_seals(self, seals: int) -> bool:
        return self.seals & seals == seals


def get_seals(fd: int) -> int:
    """F_GET_SEALS on an open fd (EINVAL if the file does not support seals)."""
    return fcntl.fcntl(fd, fcntl.F_GET_SEALS)


def memfds(pid: int) -> list[Memfd]:
    """Every memfd process *pid* holds, sorted by fd number.

    :raise ProcessLookupError: when the process does not exist.
    """
    fd_dir = f"/proc/{pid}/fd"
    try:
        entries = os.listdir(fd_dir)
    except FileNotFoundError as exc:
        raise ProcessLookupError(pid) from exc
    found = []
    for entry in entries:
        path = f"{fd_dir}/{entry}"
        try:
            target = os.readlink(path)
        except FileNotFoundError:
            continue  # closed meanwhile
        if not target.startswith(_MEMFD_PREFIX):
            continue
        name = target[len(_MEMFD_PREFIX):].removesuffix(" (deleted)")
        try:
            mfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            st = os.fstat(mfd)
            seals = get_seals(mfd)
        finally:
            os.close(mfd)
        found.append(
            Memfd(
                fd=int(entry),
                name=name,
                inode=st.st_ino,
                size=st.st_size,
                seals=seals,
                executable=bool(stat.S_IMODE(st.st_mode) & 0o111),
            )
        )
    return sorted(found, key=lambda m: m.fd)


@dataclass(frozen=True)
class Child:
    """A child process: its pid, command name (comm) and state letter
    (``Z`` for a zombie not yet reaped)."""

    pid: int
    comm: str
    state: str


def children(pid: int) -> list[Child]:
    """The children of *pid*, zombies included (/proc/PID/task/*/children);
    [] when *pid* is gone."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                for child in map(int, Path(f"/proc/{pid}/task/{tid}/children").read_text().split()):
                    with contextlib.suppress(OSError):
                        text = Path(f"/proc/{child}/stat").read_text()
                        found.append(Child(child, text[text.index("(") + 1:text.rindex(")")],
                                           text.rsplit(")", 1)[1].split()[0]))
    return found


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (field 3 onwards), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def pid_alive(pid: int) -> bool:
    """True while *pid* exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def start_time(pid: int) -> int | None:
    """When *pid* started (clock ticks since boot), or None if it is gone.

    A pid and its start time name one process for good: a recycled pid has a
    later start time.  exec() does not change it (cpr-exec keeps both).
    """
    fields = _stat_fields(pid)
    return None if fields is None or fields[0] == "Z" else int(fields[19])


def same_process(pid: int, started: int) -> bool:
    """True while the process *pid* that started at *started* is alive."""
    return start_time(pid) == started


def cmdline(pid: int) -> list[str] | None:
    """The argv *pid* runs now (changes at exec), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]]


def pids_with_arg(arg: str) -> list[int]:
    """Live processes one of whose arguments is exactly *arg*."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            argv = cmdline(int(entry))
            if argv and arg in argv and pid_alive(int(entry)):
                found.append(int(entry))
    return sorted(found)


def pids_mentioning(text: str) -> list[int]:
    """Live processes other than this one with *text* in their command line
    (anywhere in any argument): what still runs from a given run directory."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            argv = cmdline(int(entry))
            if argv and any(text in a for a in argv) and pid_alive(int(entry)):
                found.append(int(entry))
    return sorted(found)


def parse_status(text: str) -> dict[str, str]:
    """/proc/PID/status as a dict: ``{"Seccomp": "0", "Uid": "0 0 0 0", ...}``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = " ".join(value.split())
    return fields


def status(pid: int) -> dict[str, str]:
    """`parse_status` of process *pid*.

    :raise ProcessLookupError: when it is gone.
    """
    try:
        return parse_status(Path(f"/proc/{pid}/status").read_text())
    except FileNotFoundError as exc:
        raise ProcessLookupError(pid) from exc


def process_uids(proc: Path = Path("/proc")) -> set[int]:
    """The uids that own a process (of /proc's directories)."""
    uids = set()
    for entry in os.scandir(proc):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                uids.add(entry.stat().st_uid)
    return uids


def exe_of(pid: int) -> str:
    """The executable *pid* runs now (changes at exec)."""
    return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")


def open_files(pid: int) -> list[tuple[int, os.stat_result]]:
    """(fd, stat of what it refers to) for every fd of *pid* that can be stat()ed."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append((int(name), os.stat(f"/proc/{pid}/fd/{name}")))
        except OSError:
            continue
    return out
