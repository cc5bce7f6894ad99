"""
The nested VFIO test bed: run a command inside an L1 VM with an IOMMU.

This machine has no IOMMU and its kernel lacks iommufd, so VFIO is
exercised one level down.  L1 is booted under TCG by our own QEMU (the L0
VMM) with the test-bed kernel (scripts/build-kernel), an emulated
``intel-iommu`` (interrupt remapping, caching mode) and one or more ``edu``
PCI devices -- real DMA engines behind the emulated IOMMU, which L1 binds to
vfio-pci and assigns to an L2 guest.

L1 runs no distribution: its root is this machine's root, read-only over
virtio-9p, so L1 sees the same paths (the repository, .venv, the build
cache).  Its PID 1 is images/host/init: it mounts proc/sys/dev, tmpfs on
/run, /tmp and /var/tmp, and a second, writable 9p share (the *share*
directory here, ``$SEALVM_L1_SHARE`` inside L1); it runs the command,
stores its exit status and output in the share, and powers off.

`run_in_l1` returns an `L1Result` (exit status, output, console, boot time,
the files the command left in the share).  It always reaps L1: a timeout
or a cancellation kills the L1 QEMU, and temporary directories go too.

Errors (all `SealvmError`)::

    NestedError
     +-- L1BootError      L1 did not reach its init (kernel, QEMU or 9p root)
     +-- L1Error          L1 booted but reported no exit status
          +-- L1Timeout   ... because the run exceeded its timeout
"""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealvm.errors import SealvmError
from sealvm.spec import DEFAULT_FIRMWARE

log = logging.getLogger("sealvm.testing.l1")

#: PID 1 of L1 (must be reachable at the same path through the 9p root).
DEFAULT_INIT = Path(__file__).resolve().parents[3] / "images" / "host" / "init"
#: Mount point of the writable share inside L1 (see images/host/init).
L1_SHARE = "/run/sealvm-l1/share"
#: Harness files inside the share.
CTL_DIR = ".l1"
#: PCI slot of the first edu device in L1 (then +1 for each).
EDU_SLOT = 0x10
#: edu masks DMA addresses to 28 bits by default; L2 RAM can sit higher.
EDU_DMA_MASK = (1 << 39) - 1
#: Largest share file returned in `L1Result.files`.
MAX_FILE = 16 << 20

_INIT_LINE = re.compile(r"SEALVM-L1 init uptime=([0-9.]+)")
_DONE_LINE = re.compile(r"SEALVM-L1 done status=(\d+) uptime=([0-9.]+)")
_PANIC_LINE = re.compile(r"Kernel panic - not syncing")
#: Boots after the first when L1's kernel panicked before init (see run_in_l1).
BOOT_RETRIES = 1
#: Every such panic in this process, summarised (`panic_summary`), for the record.
BOOT_PANICS_SEEN: list[str] = []


class NestedError(SealvmError):
    """The nested test bed failed (not the command run inside it)."""

    def __init__(self, message: str, *, console: str = "", output: str = "",
                 argv: Sequence[str] = (), qemu_status: int | None = None) -> None:
        #: L1's serial console, with L0 QEMU's own stdout and stderr
        self.console = console
        #: the command's output, when L1 got that far
        self.output = output
        #: the L0 QEMU command line and how it ended (None: still running)
        self.argv = list(argv)
        self.qemu_status = qemu_status
        text = message
        if console:
            tail = "\n".join(console.splitlines()[-25:])
            text += "\n--- L1 console (tail) ---\n" + tail
        super().__init__(text)


class L1BootError(NestedError):
    """L1 did not reach its init: bad kernel, QEMU failure, no 9p root."""


class L1Error(NestedError):
    """L1 reached init but reported no exit status (crash, power loss)."""


class L1Timeout(L1Error):
    """The L1 run took longer than its timeout and was killed."""


@dataclass(frozen=True)
class L1Config:
    """What the L1 VM looks like."""

    kernel: Path
    qemu: Path
    edu: int = 1
    memory_mib: int = 2048
    cpus: int = 2
    init: Path = DEFAULT_INIT
    firmware: tuple[Path, ...] = DEFAULT_FIRMWARE
    edu_dma_mask: int = EDU_DMA_MASK
    #: appended to the kernel command line
    kernel_args: tuple[str, ...] = ("quiet",)

    @property
    def edu_addresses(self) -> list[str]:
        """PCI addresses of the edu devices as L1 sees them."""
        return edu_addresses(self.edu)


@dataclass(frozen=True)
class L1Result:
    """One L1 run."""

    command: list[str]
    exit_status: int
    #: the command's stdout and stderr
    output: str
    #: L1's serial console, with L0 QEMU's own messages
    console: str
    #: L1 kernel start -> init reached, by L1's clock (s)
    boot_time: float
    #: L0 QEMU started -> init reached, by this host's clock (s)
    start_to_init: float
    #: init reached -> command done, by L1's clock (s)
    run_time: float
    #: L0 QEMU started -> L0 QEMU gone (s)
    wall_time: float
    #: files the command left in the share, by relative path
    files: dict[str, bytes] = field(default_factory=dict)


def edu_addresses(count: int) -> list[str]:
    return [f"0000:00:{EDU_SLOT + i:02x}.0" for i in range(count)]


def kernel_cmdline(cfg: L1Config) -> str:
    args = [
        "console=ttyS0",
        "root=/dev/root",
        "rootfstype=9p",
        "rootflags=trans=virtio,version=9p2000.L,msize=512000,cache=loose",
        "ro",
        f"init={cfg.init}",
        "intel_iommu=on",
        "panic=-1",
        *cfg.kernel_args,
    ]
    return " ".join(args)


def l1_argv(cfg: L1Config, *, share: Path) -> list[str]:
    """The L0 QEMU command line for L1 (pure)."""
    if not 1 <= cfg.edu <= 8:
        raise ValueError(f"edu: {cfg.edu} devices, expected 1 to 8")
    for p in (cfg.init, share):
        if "," in str(p) or " " in str(p):
            raise ValueError(f"{p}: commas and spaces cannot be passed to QEMU/the kernel")
    argv = [
        str(cfg.qemu),
        "-name", "sealvm-l1,debug-threads=on",
        "-accel", "tcg",
        "-cpu", "max",
        "-machine", "q35,kernel-irqchip=split",
        "-m", f"{cfg.memory_mib}M",
        "-smp", str(cfg.cpus),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
    ]
    for fw in cfg.firmware:
        argv += ["-L", str(fw)]
    argv += ["-device", "intel-iommu,intremap=on,caching-mode=on"]
    for i in range(cfg.edu):
        argv += ["-device",
                 f"edu,id=edu{i},addr={EDU_SLOT + i:#x},dma_mask={cfg.edu_dma_mask:#x}"]
    argv += [
        "-fsdev", "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=root,mount_tag=/dev/root,addr=0x8",
        "-fsdev", f"local,id=out,path={share},security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=out,mount_tag=out,addr=0x9",
        "-chardev", "stdio,id=con,signal=off",
        "-serial", "chardev:con",
        "-kernel", str(cfg.kernel),
        "-append", kernel_cmdline(cfg),
    ]
    return argv


def tree_python_env() -> dict[str, str]:
    """The environment that runs this tree's sealvm and tests (not whichever
    sealvm the venv installed) in L1; compiles them here first, because L1
    reads the repository over 9p read-only and writes no bytecode."""
    tests = Path(__file__).resolve().parents[2]
    control = tests.parent / "control"
    for tree in (control / "sealvm", tests / "nested"):
        compileall.compile_dir(tree, quiet=1)
    return {"PYTHONPATH": f"{control}:{tests}", "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1"}


async def run_cancellable(main: Coroutine[Any, Any, int]) -> int:
    """Run *main* (a script's body around `run_in_l1`) so that SIGTERM, like
    SIGINT, cancels it: `run_in_l1` then stops L1 before the script exits.
    Without this, SIGTERM ended the script at once and left L1 running."""
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, terminate)
    try:
        return await task
    except asyncio.CancelledError:
        if not terminated:
            raise
        print("terminated (SIGTERM): L1 stopped", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def command_script(command: Sequence[str], env: Mapping[str, str]) -> str:
    """The shell script init runs: the environment, then exec the command."""
    lines = ["# written by nested.harness.l1"]
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"env: {key!r} is not a variable name")
        lines.append(f"export {key}={shlex.quote(value)}")
    lines.append("exec " + shlex.join(command))
    return "\n".join(lines) + "\n"


class _Console:
    """L1's serial console, line by line, with the init markers."""

    def __init__(self, stream: asyncio.StreamReader, copy_to: Path | None) -> None:
        self.lines: list[str] = []
        self.init_uptime: float | None = None
        self.init_seen: float | None = None
        self.done: tuple[int, float] | None = None
        self.init_event = asyncio.Event()
        self._stream = stream
        self._copy_to = copy_to

    async def pump(self) -> None:
        copy = open(self._copy_to, "a", errors="replace") if self._copy_to else None
        try:
            while raw := await self._stream.readline():
                line = raw.decode(errors="replace").rstrip("\r\n")
                self.lines.append(line)
                if copy:
                    copy.write(line + "\n")
                    copy.flush()
                if m := _INIT_LINE.search(line):
                    self.init_uptime = float(m.group(1))
                    self.init_seen = time.monotonic()
                    self.init_event.set()
                elif m := _DONE_LINE.search(line):
                    self.done = (int(m.group(1)), float(m.group(2)))
        finally:
            if copy:
                copy.close()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def _read_share(share: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for path in sorted(share.rglob("*")):
        rel = path.relative_to(share)
        if rel.parts[0] == CTL_DIR or not path.is_file() or path.stat().st_size > MAX_FILE:
            continue
        files[str(rel)] = path.read_bytes()
    return files


def _ctl_text(share: Path, name: str) -> str | None:
    try:
        return (share / CTL_DIR / name).read_text(errors="replace")
    except FileNotFoundError:
        return None


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the L1 QEMU (a TCG guest has nothing to flush) and wait."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
    await proc.wait()


async def run_in_l1(
    command: Sequence[str],
    *,
    kernel: Path,
    qemu: Path,
    edu: int = 1,
    timeout: float,
    boot_timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
    share: Path | None = None,
    console_log: Path | None = None,
    memory_mib: int = 2048,
    cpus: int = 2,
    kernel_args: Sequence[str] = ("quiet",),
) -> L1Result:
    """Boot L1, run *command* in it (argv, no shell), return its result.

    The command runs as root in L1 with cwd = the share, stdin /dev/null,
    environment = init's minimal one + *env*; ``$SEALVM_L1_SHARE`` names the
    share inside L1.  With *share* (an existing directory) the command's
    files stay there; without, a temporary directory is used and removed.
    *console_log* gets a live copy of L1's console.

    An L1 kernel that panics before init (L0 QEMU exits by itself, the
    console says "Kernel panic") is booted again, at most `BOOT_RETRIES`
    times, and each such panic is summarised in `BOOT_PANICS_SEEN`: about
    one boot in 200 here ends in an "Oops: int3" in the L1 kernel about
    1.9 s in (TCG), before anything of the command ran.

    :raise L1BootError: L1 did not reach init within *boot_timeout*, or
        panicked before init on every boot.
    :raise L1Timeout: the whole run exceeded *timeout* (L1 killed).
    :raise L1Error: L1 ended without reporting the command's exit status.
    On every path the L1 QEMU is gone when this returns or raises.
    """
    cfg = L1Config(kernel=kernel, qemu=qemu, edu=edu, memory_mib=memory_mib, cpus=cpus,
                   kernel_args=tuple(kernel_args))
    for path, what in ((kernel, "L1 kernel"), (qemu, "QEMU"), (cfg.init, "L1 init")):
        if not os.access(path, os.R_OK):
            raise L1BootError(f"{what} {path} is not readable")
    own_share = share is None
    share_dir = Path(tempfile.mkdtemp(prefix="sealvm-l1-")) if share is None else share
    try:
        ctl = share_dir / CTL_DIR
        script = command_script(command, env or {})
        panics = 0
        while True:
            shutil.rmtree(ctl, ignore_errors=True)
            ctl.mkdir(parents=True)
            (ctl / "command").write_text(script)
            try:
                result = await _run(cfg, list(command), share_dir, console_log, timeout,
                                    boot_timeout)
            except L1BootError as e:
                if not (_panicked_before_init(e) and panics < BOOT_RETRIES):
                    if panics:
                        e.add_note(f"after {panics} earlier boot(s) that panicked before "
                                   "init, the same way or not")
                    raise
                panics += 1
                summary = panic_summary(e.console)
                BOOT_PANICS_SEEN.append(summary)
                log.warning("L1 kernel panicked before init, booting again: %s", summary)
                continue
            return result
    finally:
        if own_share:
            shutil.rmtree(share_dir, ignore_errors=True)


def _panicked_before_init(e: L1BootError) -> bool:
    """L0 QEMU exited by itself (-no-reboot) after the L1 kernel panicked."""
    return e.qemu_status == 0 and bool(_PANIC_LINE.search(e.console))


def panic_summary(console: str) -> str:
    """The first oops line and the panic line of an L1 console."""
    lines = console.splitlines()
    oops = next((ln for ln in lines if "Oops:" in ln or "BUG:" in ln), "")
    panic = next((ln for ln in lines if _PANIC_LINE.search(ln)), "")
    return "; ".join(x.strip() for x in (oops, panic) if x)


async def _run(cfg: L1Config, command: list[str], share: Path, console_log: Path | None,
               timeout: float, boot_timeout: float) -> L1Result:
    argv = l1_argv(cfg, share=share)
    log.info("starting L1: %s", shlex.join(argv))
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    console = _Console(proc.stdout, console_log)
    pump = asyncio.create_task(console.pump(), name=f"sealvm-l1-console-{proc.pid}")
    exited = asyncio.ensure_future(proc.wait())
    try:
        booted = asyncio.ensure_future(console.init_event.wait())
        try:
            await asyncio.wait({booted, exited}, timeout=min(boot_timeout, timeout),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            booted.cancel()
        if not console.init_event.is_set():
            qemu_exited = exited.done()
            await _reap(proc)
            await pump
            why = (f"L0 QEMU exited with status {proc.returncode}" if qemu_exited
                   else f"no init within {min(boot_timeout, timeout):.0f} s")
            raise L1BootError(f"L1 did not reach init: {why}", console=console.text,
                              argv=argv, qemu_status=proc.returncode)
        remaining = timeout - (time.monotonic() - start)
        try:
            async with asyncio.timeout(max(remaining, 0.1)):
                await asyncio.shield(exited)
        except TimeoutError:
            await _reap(proc)
            await pump
            raise L1Timeout(f"L1 run exceeded {timeout:.0f} s and was killed",
                            console=console.text, output=_ctl_text(share, "output") or "",
                            argv=argv, qemu_status=proc.returncode) from None
        await pump
    except BaseException:
        await _reap(proc)
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        raise
    finally:
        if not exited.done():
            exited.cancel()
    wall = time.monotonic() - start
    status_text = _ctl_text(share, "status")
    output = _ctl_text(share, "output") or ""
    if status_text is None or not status_text.strip().isdigit():
        raise L1Error(f"L1 ended (L0 QEMU status {proc.returncode}) without the command's "
                      "exit status", console=console.text, output=output, argv=argv,
                      qemu_status=proc.returncode)
    assert console.init_uptime is not None and console.init_seen is not None
    done_uptime = console.done[1] if console.done else console.init_uptime
    result = L1Result(
        command=command,
        exit_status=int(status_text),
        output=output,
        console=console.text,
        boot_time=console.init_uptime,
        start_to_init=console.init_seen - start,
        run_time=done_uptime - console.init_uptime,
        wall_time=wall,
        files=_read_share(share),
    )
    log.info("L1: exit status %d, boot %.2f s, run %.2f s, wall %.2f s", result.exit_status,
             result.boot_time, result.run_time, result.wall_time)
    return result


__all__ = [
    "BOOT_PANICS_SEEN",
    "BOOT_RETRIES",
    "DEFAULT_INIT",
    "L1BootError",
    "L1Config",
    "L1Error",
    "L1Result",
    "L1Timeout",
    "L1_SHARE",
    "NestedError",
    "edu_addresses",
    "kernel_cmdline",
    "panic_summary",
    "l1_argv",
    "run_cancellable",
    "run_in_l1",
    "tree_python_env",
]
