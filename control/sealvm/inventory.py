"""
What QEMU says it maps: ``x-query-cpr-memory`` (sealvm's QEMU series),
parsed and validated, and checked against what /proc shows.

Per RAM block: fd, inode, seals, shared, whether CPR can preserve it and
why not.  Per VFIO container: backend (iommufd | legacy) and every DMA
mapping with its mode (``file``: the device reaches guest RAM through the
sealed memfd; ``vaddr``: through QEMU's address space, which exec
replaces).  A stock QEMU lacks the command: `query_inventory` returns None,
and `ram_block_names` (HMP ``info ramblock``) is all it says about its RAM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import procfs
from .errors import QMPReplyError

if TYPE_CHECKING:
    from .machine import Machine

COMMAND = "x-query-cpr-memory"


@dataclass(frozen=True)
class RamBlockInfo:
    name: str
    used_length: int
    max_length: int
    fd_backed: bool
    shared: bool
    cpr_compatible: bool
    fd: int | None = None
    inode: int | None = None
    seals: int | None = None
    cpr_blocker: str | None = None


@dataclass(frozen=True)
class DmaMapping:
    iova: int
    size: int
    mode: str  # "file" | "vaddr"
    memory_region: str | None = None
    inode: int | None = None


@dataclass(frozen=True)
class VfioContainerInfo:
    backend: str  # "iommufd" | "legacy" | "other"
    mappings: tuple[DmaMapping, ...]
    ioas_id: int | None = None
    cpr_blockers: tuple[str, ...] = ()

    @property
    def by_vaddr(self) -> list[DmaMapping]:
        return [m for m in self.mappings if m.mode == "vaddr"]


@dataclass(frozen=True)
class Inventory:
    ram_blocks: tuple[RamBlockInfo, ...]
    vfio_containers: tuple[VfioContainerInfo, ...]


def _get(d: dict[str, Any], key: str, typ: type, where: str, optional: bool = False) -> Any:
    if key not in d:
        if optional:
            return None
        raise QMPReplyError(COMMAND, f"{where}: missing '{key}'")
    value = d[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise QMPReplyError(COMMAND, f"{where}.{key}: expected {typ.__name__}, got {value!r}")
    return value


def parse_inventory(reply: object) -> Inventory:
    """Validate and convert a reply; :raise QMPReplyError: when malformed."""
    if not isinstance(reply, dict):
        raise QMPReplyError(COMMAND, f"expected an object, got {reply!r}")
    blocks = []
    for i, b in enumerate(_get(reply, "ram-blocks", list, "reply")):
        w = f"ram-blocks[{i}]"
        if not isinstance(b, dict):
            raise QMPReplyError(COMMAND, f"{w}: expected an object")
        blocks.append(RamBlockInfo(
            name=_get(b, "name", str, w),
            used_length=_get(b, "used-length", int, w),
            max_length=_get(b, "max-length", int, w),
            fd_backed=_get(b, "fd-backed", bool, w),
            shared=_get(b, "shared", bool, w),
            cpr_compatible=_get(b, "cpr-compatible", bool, w),
            fd=_get(b, "fd", int, w, optional=True),
            inode=_get(b, "inode", int, w, optional=True),
            seals=_get(b, "seals", int, w, optional=True),
            cpr_blocker=_get(b, "cpr-blocker", str, w, optional=True),
        ))
    containers = []
    for i, c in enumerate(_get(reply, "vfio-containers", list, "reply")):
        w = f"vfio-containers[{i}]"
        if not isinstance(c, dict):
            raise QMPReplyError(COMMAND, f"{w}: expected an object")
        maps = []
        for j, m in enumerate(_get(c, "mappings", list, w)):
            wm = f"{w}.mappings[{j}]"
            if not isinstance(m, dict):
                raise QMPReplyError(COMMAND, f"{wm}: expected an object")
            mode = _get(m, "mode", str, wm)
            if mode not in ("file", "vaddr"):
                raise QMPReplyError(COMMAND, f"{wm}.mode: unknown mode {mode!r}")
            maps.append(DmaMapping(
                iova=_get(m, "iova", int, wm), size=_get(m, "size", int, wm), mode=mode,
                memory_region=_get(m, "memory-region", str, wm, optional=True),
                inode=_get(m, "inode", int, wm, optional=True)))
        blockers = _get(c, "cpr-blockers", list, w, optional=True) or []
        containers.append(VfioContainerInfo(
            backend=_get(c, "backend", str, w), mappings=tuple(maps),
            ioas_id=_get(c, "ioas-id", int, w, optional=True),
            cpr_blockers=tuple(str(x) for x in blockers)))
    return Inventory(tuple(blocks), tuple(containers))


async def query_inventory(vm: Machine) -> Inventory | None:
    """The VM's inventory, or None when its QEMU lacks the command."""
    commands = await vm.execute("query-commands")
    if not isinstance(commands, list):
        raise QMPReplyError("query-commands", f"malformed reply {commands!r}")
    if not any(isinstance(c, dict) and c.get("name") == COMMAND for c in commands):
        return None
    return parse_inventory(await vm.execute(COMMAND))


async def ram_block_names(vm: Machine) -> list[str]:
    """The names of the VM's RAM blocks, from HMP ``info ramblock`` (any
    QEMU has it; the name of an aux-RAM block is also its memfd's name)."""
    text = await vm.execute("human-monitor-command", {"command-line": "info ramblock"})
    if not isinstance(text, str):
        raise QMPReplyError("human-monitor-command", f"malformed reply {text!r}")
    names = []
    for line in text.splitlines():
        words = line.split()
        if words and not (words[0] == "Block" and words[1:2] == ["Name"]):
            names.append(words[0])
    return names


def mismatches_with_proc(inv: Inventory, pid: int) -> list[str]:
    """Where QEMU's account of its RAM fds differs from /proc."""
    proc = {m.fd: m for m in procfs.memfds(pid)}
    problems = []
    for b in inv.ram_blocks:
        if not b.fd_backed or b.fd is None:
            continue
        m = proc.get(b.fd)
        if m is None:
            problems.append(f"{b.name}: fd {b.fd} is not a memfd in /proc/{pid}/fd")
            continue
        if b.inode != m.inode:
            problems.append(f"{b.name}: inode {b.inode}, /proc says {m.inode}")
        if b.seals != m.seals:
            problems.append(f"{b.name}: seals {b.seals:#x}, /proc says {m.seals:#x}")
        if b.max_length > m.size:
            problems.append(f"{b.name}: max-length {b.max_length} > file size {m.size}")
    return problems
