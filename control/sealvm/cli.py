"""
sealvm: the command line for VM operators and scripts.

    sealvm [--run-dir DIR] [-v] VERB ...

    up SPEC                      launch the VM a TOML spec describes; returns
                                 once its monitor answers (QEMU keeps running)
    status [VM]                  one VM in detail, or every VM in the run dir
    update VM... [--qemu PATH] [--mode exec|transfer|migrate] [--dry-run]
                                 live-update the VM's QEMU (default: same binary,
                                 cpr-exec; migrate = classic, RAM copied);
                                 progress on stderr; --dry-run prints every
                                 preflight check (RAM, seals, devices, binary...);
                                 a paused guest stays paused; several VMs are
                                 updated each as alone, --parallel N at a time
                                 (default 1) ({"updates": [...], "wall": s};
                                 exit code: the most severe)
    recover VM                   finish or roll back an update whose controller
                                 died (every verb below does this first)
    pause VM / resume VM         stop / continue the guest's vCPUs
    down VM [--timeout S]        quit QEMU (then SIGTERM, SIGKILL)
    qmp VM COMMAND [JSON-ARGS]   run any QMP command, print its result as JSON
                                 (on sealvm's own monitor; scripts connect to
                                 the VM's endpoint instead: see `status VM`)
    endpoint VM                  (re)start the VM's QMP endpoint for scripts
                                 if it is down (QEMU reconnects to it)
    host-check [--require NAME,...] [--qemu PATH] [--vm-user USER]...
                                 what this host can do (memfd seals, noexec,
                                 iommufd, type1 VADDR; for an unprivileged
                                 QEMU: seccomp, user and mount namespaces,
                                 QEMU's -sandbox with --qemu, each VM user);
                                 exit 10 if a probe named in --require fails

Every verb takes --json: one JSON object on stdout (errors too).  Verbs that
change a VM (up, update, recover, pause, resume, down, qmp, endpoint) hold
its lock;
a second one fails at once (exit 7, naming the holder) unless --wait.

Exit codes:
    0   success
    1   other sealvm error
    2   usage error
    3   invalid spec (SpecError)
    4   live update refused before the guest paused; VM untouched (PreflightError)
    5   live update failed; the old QEMU resumed the guest (UpdateError, rolled back)
    6   live update failed; the guest was NOT resumed (UpdateError)
    7   no such VM, or not in a state for this verb (StateError)
    8   QEMU rejected the command or answered nonsense (QMPReplyError)
    9   QEMU failed to launch (LaunchError)
    10  the host lacks what was asked (HostError)
    11  live update completed (the new QEMU runs the guest), a later step failed
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import confine, endpoint, procfs
from .errors import (
    HostError,
    LaunchError,
    PreflightError,
    QMPReplyError,
    SealvmError,
    SpecError,
    StateError,
    UpdateError,
)
from .host import PARAMETRIC_PROBES, PROBES, host_check
from .lock import VmLock
from .machine import (
    Machine,
    VmState,
    cleanup_run_files,
    list_vms,
    read_state,
    release_host_resources,
)
from .plan import RunPaths
from .preflight import run_preflight
from .runroot import default_run_root
from .spec import load_spec, parse_size, spec_from_dict
from .update import RecoverReport, abandon, live_update, plan_recovery, recover
from .update.warm import DEFAULT_SIZE as WARM_DEFAULT
from .update.warm import MAX_SIZE as WARM_MAX

#: exit code of each `recover` outcome
RECOVER_EXIT = {"none": 0, "completed": 0, "rolled-back": 5, "lost": 6}


def exit_code(exc: SealvmError) -> int:
    if isinstance(exc, SpecError):
        return 3
    if isinstance(exc, PreflightError):
        return 4
    if isinstance(exc, UpdateError):
        return 5 if exc.rolled_back else 11 if exc.completed else 6
    if isinstance(exc, StateError):
        return 7
    if isinstance(exc, QMPReplyError):
        return 8
    if isinstance(exc, LaunchError):
        return 9
    if isinstance(exc, HostError):
        return 10
    return 1


def error_info(exc: SealvmError) -> dict[str, Any]:
    """What --json prints for a sealvm error."""
    return {"error": type(exc).__name__, "message": str(exc), "exit_code": exit_code(exc),
            **({"rolled_back": exc.rolled_back, "outcome": exc.outcome}
               if isinstance(exc, UpdateError) else {}),
            **({"reasons": exc.reasons} if isinstance(exc, PreflightError) else {})}


#: several VMs updated at once exit with the most severe of their codes, in
#: this order: the guest not resumed first, a refused update last
SEVERITY = (6, 11, 1, 9, 8, 10, 7, 3, 5, 4, 0)


class Output:
    """Human text on stdout, or one JSON object; progress on stderr."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def result(self, data: dict[str, Any], text: str) -> None:
        if self.as_json:
            print(json.dumps(data, indent=1, default=str))
        else:
            print(text)

    def progress(self, message: str) -> None:
        print(f"sealvm: {message}", file=sys.stderr, flush=True)


class Collected(Output):
    """An `Output` that keeps the result (one VM of several); progress
    still goes to stderr, each line naming the VM."""

    def __init__(self, name: str) -> None:
        super().__init__(as_json=True)
        self.name = name
        self.data: dict[str, Any] = {}
        self.text = ""

    def result(self, data: dict[str, Any], text: str) -> None:
        self.data, self.text = data, text

    def progress(self, message: str) -> None:
        named = message.startswith(f"{self.name}: ")
        super().progress(message if named else f"{self.name}: {message.strip()}")


async def _vm_info(vm: Machine) -> dict[str, Any]:
    assert vm.state is not None and vm.pid is not None
    status = await vm.status()
    return {
        "name": vm.name,
        "pid": vm.pid,
        "status": status,
        "qemu": procfs.exe_of(vm.pid),
        "generation": vm.state.generation,
        "qmp": str(vm.paths.qmp),
        "scripts": None if vm.script_socket is None else {
            "socket": str(vm.script_socket), "endpoint_pid": endpoint.pid_of(vm.paths)},
        "serial": str(vm.serial_log),
        "net": [{"id": n.id, "mac": n.mac, "tap": n.tap, "netns": n.netns, "bridge": n.bridge,
                 "vhost": n.vhost} for n in vm.spec.net],
        "disks": [{"id": d.id, "path": str(d.path), "format": d.format, "cache": d.cache,
                   "readonly": d.readonly} for d in vm.spec.disk],
        "memfds": [asdict(m) | {"seal_names": m.seal_names} for m in procfs.memfds(vm.pid)],
        "security": _security_info(vm),
    }


def _security_info(vm: Machine) -> dict[str, Any]:
    """How QEMU is confined: what sealvm set up and what /proc shows."""
    assert vm.pid is not None
    conf = vm.confinement
    info: dict[str, Any] = {"confined": conf is not None,
                            "summary": confine.describe(conf, vm.pid)}
    if conf is not None:
        info.update(uid=conf.uid, gid=conf.gid, seccomp=conf.seccomp, cpr_exec=conf.cpr_exec)
    with contextlib.suppress(ProcessLookupError, KeyError, ValueError):
        info["proc"] = asdict(confine.inspect(vm.pid))
    return info


def _info_text(info: dict[str, Any]) -> str:
    lines = [f"{info['name']}: {info['status']}, pid {info['pid']}, "
             f"{info['generation']} live update(s)",
             f"  qemu    {info['qemu']}", f"  qmp     {info['qmp']} (sealvm's own)"]
    sc = info["scripts"]
    lines.append("  scripts off ([scripts] enabled = false)" if sc is None else
                 f"  scripts {sc['socket']} (QMP for scripts; " +
                 (f"endpoint pid {sc['endpoint_pid']})" if sc["endpoint_pid"] else
                  "endpoint DOWN: restart the VM to get it back)"))
    lines.append(f"  serial  {info['serial']}")
    lines.append(f"  confined {info['security']['summary']}")
    for n in info["net"]:
        where = f"namespace {n['netns']}" if n["netns"] else "host namespace"
        lines.append(f"  nic     {n['id']}: tap {n['tap']} ({where}"
                     + (f", bridge {n['bridge']}" if n["bridge"] else "") + f"), mac {n['mac']}")
    for d in info["disks"]:
        lines.append(f"  disk    {d['id']}: {d['path']} ({d['format']}, cache {d['cache']}"
                     + (", read-only" if d["readonly"] else "") + ")")
    for m in info["memfds"]:
        lines.append(f"  memfd fd {m['fd']:<3} {m['name']:<28} inode {m['inode']:<8} "
                     f"{m['size'] >> 10:>9} KiB  seals {'|'.join(m['seal_names']) or '-'}"
                     f"{'' if not m['executable'] else '  EXECUTABLE'}")
    return "\n".join(lines)


def _paths(args: argparse.Namespace) -> RunPaths:
    return RunPaths((args.run_dir or default_run_root()) / args.vm)


@contextlib.asynccontextmanager
async def _locked(args: argparse.Namespace, out: Output, verb: str, *,
                  recover_first: bool = True) -> AsyncIterator[VmLock]:
    """Hold the VM's lock for the verb; finish an interrupted update first."""
    lock = VmLock(_paths(args).lock, args.vm)
    if getattr(args, "wait", False):
        await lock.acquire_wait(verb)
    else:
        lock.acquire(verb)
    try:
        if recover_first and _paths(args).journal.exists():
            out.progress(f"{args.vm}: an update was interrupted; recovering it first")
            rep = await recover(args.vm, run_root=args.run_dir, lock=lock)
            out.progress(f"{args.vm}: recovered: {rep.outcome} ({'; '.join(rep.actions)})")
            if rep.outcome == "lost":
                raise StateError(f"VM {args.vm}: the interrupted update lost the guest "
                                 f"({'; '.join(rep.actions)})")
        yield lock
    finally:
        lock.release()


@contextlib.asynccontextmanager
async def _attached(args: argparse.Namespace, out: Output, verb: str) -> AsyncIterator[Machine]:
    """The VM, locked and attached; detached (never stopped) afterwards."""
    async with _locked(args, out, verb) as lock:
        vm = await Machine.attach(args.vm, run_root=args.run_dir, lock=lock)
        try:
            yield vm
        finally:
            await vm.detach()


async def cmd_up(args: argparse.Namespace, out: Output) -> int:
    spec = load_spec(Path(args.spec))
    vm = Machine(spec, run_root=args.run_dir)
    out.progress(f"launching {spec.name}")
    await vm.launch(timeout=args.timeout)
    info = await _vm_info(vm)
    await vm.detach()
    out.result(info, _info_text(info))
    return 0


def _exe(state: VmState) -> str | None:
    """The binary a VM's QEMU runs now (from /proc, no monitor), None when it is gone."""
    if not state.alive():
        return None
    try:
        return procfs.exe_of(state.pid)
    except OSError:
        return None


async def cmd_status(args: argparse.Namespace, out: Output) -> int:
    if args.vm:
        paths = _paths(args)
        plan = plan_recovery(paths)
        lock = VmLock(paths.lock, args.vm)
        busy = None
        try:
            lock.acquire("status")
        except StateError:
            busy = lock.holder()
        try:
            if plan is not None or busy is not None:
                # do not take the monitor from whoever is working on the VM
                info = {"name": args.vm, "busy": busy, "interrupted_update": plan}
                text = f"{args.vm}: " + (f"busy, {busy} holds its lock" if busy else "") + (
                    f"\n  interrupted update: {plan}" if plan else "")
                out.result(info, text)
                return 0
            vm = await Machine.attach(args.vm, run_root=args.run_dir, lock=lock)
            try:
                info = await _vm_info(vm)
            finally:
                await vm.detach()
        finally:
            lock.release()
        out.result(info, _info_text(info))
        return 0
    vms = [{"name": s.name, "pid": s.pid, "alive": s.alive(), "qemu": _exe(s),
            "generation": s.generation,
            "interrupted_update": RunPaths((args.run_dir or default_run_root()) / s.name)
            .journal.exists()} for s in list_vms(args.run_dir)]
    text = "\n".join(f"{v['name']:<20} pid {v['pid']:<8} "
                     f"{'running' if v['alive'] else 'DEAD'}  {v['generation']} update(s)"
                     + ("  INTERRUPTED UPDATE (sealvm recover)" if v["interrupted_update"]
                        else "")
                     for v in vms) or f"no VMs in {args.run_dir or default_run_root()}"
    out.result({"vms": vms}, text)
    return 0


async def cmd_endpoint(args: argparse.Namespace, out: Output) -> int:
    """Start the script endpoint of a running VM whose endpoint died."""
    async with _locked(args, out, "endpoint"):
        paths = _paths(args)
        state = read_state(paths)
        if state is None or not state.alive():
            raise StateError(f"no running VM named {args.vm!r}")
        spec = spec_from_dict(state.spec)
        if not spec.scripts.enabled:
            raise StateError(f"VM {args.vm}: its spec turns the script endpoint off "
                             "([scripts] enabled = false)")
        pid = endpoint.pid_of(paths)
        started = pid is None
        if started:
            pid = endpoint.start(paths, args.vm, spec.scripts, owner=state.confinement())
    out.result({"name": args.vm, "socket": str(paths.scripts), "endpoint_pid": pid,
                "started": started},
               f"{args.vm}: script endpoint {'started' if started else 'already running'}, "
               f"pid {pid}, {paths.scripts}")
    return 0


async def cmd_update(args: argparse.Namespace, out: Output) -> int:
    mode = "migrate" if args.mode == "migrate" else f"cpr-{args.mode}"
    names: list[str] = args.vm
    if len(names) > 1:
        return await _update_many(args, out, mode, names)
    one = argparse.Namespace(**{**vars(args), "vm": names[0]})
    async with _attached(one, out, "update") as vm:
        return await _update(one, out, vm, mode)


async def _update_many(args: argparse.Namespace, out: Output, mode: str,
                       names: list[str]) -> int:
    """Update several VMs, at most ``--parallel`` at a time, each under its
    own lock, as `update VM` would; one VM's failure does not stop the
    others."""
    slots = asyncio.Semaphore(args.parallel)

    async def one(name: str) -> dict[str, Any]:
        a = argparse.Namespace(**{**vars(args), "vm": name})
        res = Collected(name)
        async with slots:
            try:
                async with _attached(a, res, "update") as vm:
                    code = await _update(a, res, vm, mode)
                return {"vm": name, "exit_code": code, **res.data, "text": res.text}
            except SealvmError as exc:
                return {"vm": name, **error_info(exc),
                        "text": f"{name}: {type(exc).__name__}: {exc}"}

    start = time.monotonic()
    results = await asyncio.gather(*(one(n) for n in names))
    wall = time.monotonic() - start
    code: int = min((r["exit_code"] for r in results), key=SEVERITY.index)
    failed = [r["vm"] for r in results if r["exit_code"] != 0]
    text = "\n".join(r.pop("text") for r in results) + (
        f"\n{len(names)} VMs in {1000 * wall:.0f} ms"
        + (f"; failed: {', '.join(failed)}" if failed else ""))
    out.result({"updates": results, "wall": wall, "parallel": args.parallel,
                "exit_code": code}, text)
    return code


async def _update(args: argparse.Namespace, out: Output, vm: Machine, mode: str) -> int:
    if args.dry_run:
        qemu = Path(args.qemu).resolve() if args.qemu else Path(vm.argv[0])
        checks = await run_preflight(vm, mode=mode, qemu=qemu, raise_on_failure=False)
        ok = all(c.ok for c in checks)
        text = "\n".join(f"{'NO ' if not c.ok else '!! ' if c.warning else 'ok '} "
                         f"{c.name:<16} {c.detail}" for c in checks)
        out.result({"mode": mode, "ok": ok, "checks": [asdict(c) for c in checks]},
                   text + f"\n{args.vm}: {mode} would be " + ("allowed" if ok else "REFUSED"))
        return 0 if ok else 4
    out.progress(f"{args.vm}: {args.mode} to {args.qemu or 'the same binary'}")
    report = await live_update(
        vm, qemu=Path(args.qemu) if args.qemu else None,
        mode=mode,
        heartbeat_interval=args.heartbeat_ms / 1000 if args.heartbeat_ms else None,
        timeout=args.timeout, warm_pages=args.warm,
        progress=lambda phase, s: out.progress(f"  {phase:<10} {1000 * s:8.1f} ms"))
    pause = f"{1000 * report.pause_qmp:.1f} ms" if report.pause_qmp is not None else "unknown"
    text = (f"{args.vm}: {report.mode} done in {1000 * report.total:.0f} ms, guest paused "
            f"{pause} (QMP STOP->RESUME); pid {report.pid_before} -> {report.pid_after}; "
            f"RAM inodes unchanged: {report.ram_inode_unchanged}")
    if report.pause_guest is not None:
        text += f"; pause seen by the guest {1000 * report.pause_guest:.1f} ms"
    out.result(report.to_dict(), text)
    return 0


async def cmd_recover(args: argparse.Namespace, out: Output) -> int:
    async with _locked(args, out, "recover", recover_first=False) as lock:
        rep: RecoverReport = await recover(args.vm, run_root=args.run_dir,
                                           timeout=args.timeout, lock=lock)
    text = (f"{args.vm}: nothing to recover" if rep.outcome == "none" else
            f"{args.vm}: {rep.mode} interrupted after '{rep.interrupted_at}': {rep.outcome}; "
            f"guest {rep.guest}" + (f", pid {rep.pid}" if rep.pid else "") +
            "".join(f"\n  {a}" for a in rep.actions))
    out.result(asdict(rep), text)
    return RECOVER_EXIT[rep.outcome]


async def _simple(args: argparse.Namespace, out: Output, action: str) -> int:
    async with _attached(args, out, action) as vm:
        if action == "pause":
            await vm.pause()
        else:
            await vm.resume()
        status = await vm.status()
    out.result({"name": args.vm, "status": status}, f"{args.vm}: {status}")
    return 0


async def cmd_down(args: argparse.Namespace, out: Output) -> int:
    """Stop the VM, whatever state an interrupted update left it in: recover
    first, and if even that fails, kill every process of the update."""
    async with _locked(args, out, "down", recover_first=False) as lock:
        if _paths(args).journal.exists():
            out.progress(f"{args.vm}: an update was interrupted; recovering it first")
            try:
                rep = await recover(args.vm, run_root=args.run_dir, lock=lock,
                                    timeout=args.timeout)
            except SealvmError as exc:
                out.progress(f"{args.vm}: recover failed ({exc}); stopping every process "
                             "of the update")
                killed = await abandon(args.vm, run_root=args.run_dir, lock=lock)
                out.result({"name": args.vm, "status": "down", "killed": killed},
                           f"{args.vm}: down (killed {', '.join(map(str, killed)) or 'nothing'})")
                return 0
            if rep.outcome == "lost":
                out.result({"name": args.vm, "status": "down", "killed": []},
                           f"{args.vm}: down (the interrupted update had lost the guest)")
                return 0
        paths = _paths(args)
        state = read_state(paths)
        if state is not None and not state.alive():
            # QEMU died (crash, OOM kill): clean up what it left
            removed = release_host_resources(state, paths)
            cleanup_run_files(paths)
            out.result({"name": args.vm, "pid": state.pid, "status": "down", "exitcode": None,
                        "already_exited": True, "removed": removed},
                       f"{args.vm}: down (QEMU pid {state.pid} had already exited; removed its "
                       f"run files{''.join(', ' + r for r in removed)})")
            return 0
        vm = await Machine.attach(args.vm, run_root=args.run_dir, lock=lock)
        pid = vm.pid
        await vm.shutdown(timeout=args.timeout)
    out.result({"name": args.vm, "pid": pid, "status": "down", "exitcode": vm.exitcode},
               f"{args.vm}: down (pid {pid})")
    return 0


def _json_args(value: str) -> dict[str, Any]:
    """argparse type of JSON-ARGS: a JSON object, else a usage error."""
    try:
        arguments = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(arguments, dict):
        raise argparse.ArgumentTypeError('must be a JSON object, e.g. \'{"path": "/machine"}\'')
    return arguments


def _positive(value: str) -> int:
    """argparse type of a count >= 1, else a usage error."""
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a count of at least 1")
    return int(value)


def _warm_size(value: str) -> int | None:
    """argparse type of --warm: auto (None), 0 or a size up to
    `warm.MAX_SIZE`, else a usage error."""
    if value.strip() == "auto":
        return None
    if value.strip() == "0":
        return 0
    try:
        size = parse_size(value, "--warm")
    except SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if size > WARM_MAX:
        raise argparse.ArgumentTypeError(f"{value!r} per CPU is more than "
                                         f"{WARM_MAX >> 20}M, the most it warms")
    return size


def _probe_names(value: str) -> list[str]:
    """argparse type of --require: known probe names, else a usage error."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    valid = [*PROBES, *PARAMETRIC_PROBES]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown capability {', '.join(unknown) or repr(value)}; "
            f"valid names: {', '.join(valid)}")
    return names


async def cmd_qmp(args: argparse.Namespace, out: Output) -> int:
    async with _attached(args, out, "qmp") as vm:
        result = await vm.execute(args.command, args.arguments)
    # the result is JSON whatever the output mode
    print(json.dumps({"return": result} if args.json else result, indent=1))
    return 0


async def cmd_host_check(args: argparse.Namespace, out: Output) -> int:
    probes = host_check(qemu=args.qemu, vm_users=tuple(args.vm_user))
    missing = list(dict.fromkeys(p.name for p in probes
                                 if p.name in args.require and not p.ok))
    text = "\n".join(f"{'ok ' if p.ok else 'NO '} {p.name:<20} {p.detail}" for p in probes)
    if missing:
        text += f"\nhost-check: this host lacks {', '.join(missing)}"
    out.result({"probes": [asdict(p) for p in probes], "required": args.require,
                "missing": missing}, text)
    return 10 if missing else 0


COMMANDS = {
    "up": cmd_up,
    "status": cmd_status,
    "update": cmd_update,
    "recover": cmd_recover,
    "pause": lambda a, o: _simple(a, o, "pause"),
    "resume": lambda a, o: _simple(a, o, "resume"),
    "down": cmd_down,
    "qmp": cmd_qmp,
    "endpoint": cmd_endpoint,
    "host-check": cmd_host_check,
}


def _common(suppress: bool) -> argparse.ArgumentParser:
    """Options valid before and after the verb (after it, they only
    override what was given before)."""
    common = argparse.ArgumentParser(add_help=False)

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    common.add_argument("--json", action="store_true", default=default(False),
                        help="print one JSON object")
    common.add_argument("--run-dir", type=Path, default=default(None),
                        help="VM run directories (default: $SEALVM_RUN_DIR, else "
                             "/run/sealvm as root, else $XDG_RUNTIME_DIR/sealvm)")
    common.add_argument("-v", "--verbose", action="count", default=default(0))
    common.add_argument("--wait", action="store_true", default=default(False),
                        help="wait for another sealvm working on the VM (its lock)")
    return common


def parser() -> argparse.ArgumentParser:
    common = _common(suppress=True)
    p = argparse.ArgumentParser(prog="sealvm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[_common(suppress=False)])
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    up = sub.add_parser("up", parents=[common], help="launch a VM from a TOML spec")
    up.add_argument("spec")
    up.add_argument("--timeout", type=float, default=30.0)
    st = sub.add_parser("status", parents=[common], help="show one VM or all")
    st.add_argument("vm", nargs="?")
    upd = sub.add_parser("update", parents=[common],
                         help="live-update a VM's QEMU (several VMs: --parallel N at a time)")
    upd.add_argument("vm", nargs="+", metavar="VM")
    upd.add_argument("--qemu", help="the new QEMU binary (default: the running one)")
    upd.add_argument("--mode", choices=("exec", "transfer", "migrate"), default="exec",
                     help="cpr-exec, cpr-transfer, or classic migration (RAM copied)")
    upd.add_argument("--heartbeat-ms", type=int, default=0,
                     help="the guest is the sealvm test guest with this heartbeat: "
                          "measure the pause it sees")
    upd.add_argument("--timeout", type=float, default=60.0)
    upd.add_argument("--parallel", type=_positive, default=1, metavar="N",
                     help="with several VMs: update at most N at a time (default 1: one "
                          "after the other; at once, updates share the host's CPUs and "
                          "each guest's pause grows)")
    upd.add_argument("--warm", type=_warm_size, default=None, metavar="auto|0|SIZE",
                     help="cpr-exec: memory per CPU touched and freed before the pause so "
                          "that the new QEMU starts on pages the host has backed (default "
                          f"auto: {WARM_DEFAULT >> 20}M where a virtio-balloon reports free "
                          "pages to the hypervisor, else off)")
    upd.add_argument("--dry-run", action="store_true",
                     help="run the preflight checks only and print them all (exit 4 if refused)")
    for verb in ("pause", "resume"):
        sub.add_parser(verb, parents=[common], help=f"{verb} the guest").add_argument("vm")
    dn = sub.add_parser("down", parents=[common], help="stop a VM")
    dn.add_argument("vm")
    dn.add_argument("--timeout", type=float, default=10.0)
    q = sub.add_parser("qmp", parents=[common], help="run a QMP command")
    q.add_argument("vm")
    q.add_argument("command")
    q.add_argument("arguments", nargs="?", metavar="JSON-ARGS", type=_json_args,
                   help="the command's arguments, a JSON object")
    ep = sub.add_parser("endpoint", parents=[common],
                        help="(re)start the VM's QMP endpoint for scripts")
    ep.add_argument("vm")
    rc = sub.add_parser("recover", parents=[common],
                        help="finish or roll back an interrupted update")
    rc.add_argument("vm")
    rc.add_argument("--timeout", type=float, default=60.0)
    hc = sub.add_parser("host-check", parents=[common], help="probe this host's capabilities")
    hc.add_argument("--require", type=_probe_names, action="extend", default=[],
                    metavar="NAME,...",
                    help="exit 10 unless these probes pass "
                    f"({', '.join([*PROBES, *PARAMETRIC_PROBES])})")
    hc.add_argument("--qemu", type=Path, metavar="PATH",
                    help="also start this QEMU under -sandbox (probe qemu-sandbox) and "
                    "check each --vm-user can run it")
    hc.add_argument("--vm-user", action="append", default=[], metavar="NAME|UID:GID",
                    help="a user QEMU would run as: exists, not root (probe vm-user)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.verb == "host-check":
        if "qemu-sandbox" in args.require and args.qemu is None:
            p.error("--require qemu-sandbox needs --qemu PATH")
        if "vm-user" in args.require and not args.vm_user:
            p.error("--require vm-user needs --vm-user NAME")
    if args.verb == "update" and len(set(args.vm)) < len(args.vm):
        p.error("update: a VM named twice")
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(levelname)s %(name)s: %(message)s")
    out = Output(args.json)
    try:
        return asyncio.run(COMMANDS[args.verb](args, out))
    except SealvmError as exc:
        if args.json:
            print(json.dumps(error_info(exc)))
        print(f"sealvm: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug or an unexpected OS error: still no traceback
        logging.getLogger("sealvm").debug("unexpected error", exc_info=True)
        if args.json:
            print(json.dumps({"error": type(exc).__name__, "message": str(exc),
                              "exit_code": 1}))
        print(f"sealvm: unexpected {type(exc).__name__}: {exc} (-vv for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
