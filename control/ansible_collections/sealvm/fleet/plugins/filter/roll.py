# Copyright: sealvm developers
# GNU General Public License v2.0 or later (see https://www.gnu.org/licenses/gpl-2.0.txt)
"""Filters of the rolling-update playbook: one record per VM update, the
roll's state across hosts, and its summary (rows and a text table).

Per host the playbook keeps, with set_fact:
  sealvm_precheck   records of the dry run of every VM (stage "precheck")
  sealvm_roll       records of the updates done in the roll (stage "roll")
  sealvm_roll_stop  a refused, rolled-back, lost or completed-with-errors update: stop the roll
"""

import os

DOCUMENTATION = r"""
name: roll
short_description: Records and summary of a sealvm rolling update
description:
  - C(sealvm_record), C(sealvm_roll_stopped), C(sealvm_roll_rows), C(sealvm_roll_table); see
    the rolling-update playbook.
"""

#: results (module_utils.sealvm_cli.EXIT_CODES names) that stop the roll at
#: once, whatever max_fail_percentage says: the update was refused, or it
#: failed with the guest back on the old binary, lost, or suspect
STOP_RESULTS = ("refused", "rolled-back", "lost", "completed-with-errors")
#: precheck results that let the roll go on
PRECHECK_OK = ("would-update", "unchanged")


def sealvm_record(res, vm, stage="roll"):
    """A compact record of one sealvm_update result (a loop item or
    ansible_failed_result)."""
    res = res or {}
    failed = bool(res.get("failed"))
    result = res.get("result") or ("error" if failed else "ok")
    msg = res.get("msg", "") if failed else ""
    return dict(
        vm=vm, stage=stage, result=result, failed=failed, changed=bool(res.get("changed")),
        stop=failed and result in STOP_RESULTS,
        exit_code=res.get("exit_code", res.get("rc")),
        mode=res.get("mode"), pause_ms=res.get("pause_ms"),
        generation_before=res.get("generation_before"),
        generation_after=res.get("generation_after"),
        qemu_before=res.get("qemu_before"), qemu_after=res.get("qemu_after"),
        pid_before=res.get("pid_before"), pid_after=res.get("pid_after"),
        target=res.get("target"), msg=msg)


def sealvm_pair_record(pair, stage="roll"):
    """sealvm_record of a (result, vm) pair (a loop's results zipped with its items)."""
    res, vm = pair
    return sealvm_record(res, vm, stage)


def sealvm_row_text(row):
    """One record or row in words: "host/vm: result (exit N): message"."""
    where = "{}/{}".format(row["host"], row["vm"]) if row.get("host") else row["vm"]
    text = "{}: {}".format(where, row["result"])
    if row.get("exit_code") not in (None, 0):
        text += " (exit {})".format(row["exit_code"])
    if row.get("msg"):
        text += ": " + row["msg"]
    return text


def _get(hostvars, host, key, default=None):
    try:
        value = hostvars[host].get(key, default)
    except KeyError:
        return default
    return default if value is None else value


def sealvm_roll_stopped(hostvars, hosts):
    """True once any host stopped the roll."""
    return any(bool(_get(hostvars, h, "sealvm_roll_stop", False)) for h in hosts)


def sealvm_roll_rows(hostvars, hosts):
    """One row per host and VM: the roll's record of it, else the precheck's
    if that failed, else "not-attempted" (the roll stopped before it)."""
    rows = []
    for host in hosts:
        precheck = list(_get(hostvars, host, "sealvm_precheck", []))
        if not precheck and _get(hostvars, host, "sealvm_roll_vms") is None:
            continue  # the precheck never ran there
        roll = dict((r["vm"], r) for r in _get(hostvars, host, "sealvm_roll", []))
        missing = (_get(hostvars, host, "sealvm_host_check", {}) or {}).get("missing") or []
        if missing:
            rows.append(dict(host=host, vm="(host)", stage="precheck", result="host-lacks",
                             failed=True, stop=False, exit_code=10,
                             msg="host-check: missing " + ", ".join(missing)))
        for pre in precheck:
            vm = pre["vm"]
            if vm in roll:
                row = dict(roll[vm])
            elif pre["result"] not in PRECHECK_OK:
                row = dict(pre)
            else:
                row = dict(pre, stage="-", result="not-attempted", failed=False, stop=False,
                           exit_code=None, pause_ms=None,
                           generation_after=pre.get("generation_before"),
                           qemu_after=pre.get("qemu_before"), msg="")
            row["host"] = host
            rows.append(row)
    return rows


def _short_path(path):
    """The binary's directory and name ("build/qemu-system-x86_64"): enough to
    tell builds apart in a table; the JSON rows have the whole path."""
    return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))


def _cell(value):
    return "-" if value is None or value == "" else str(value)


def sealvm_roll_table(rows):
    """The rows as text lines: host, VM, stage, mode, result, pause,
    generation before -> after, binary after, detail."""
    head = ("host", "vm", "stage", "mode", "result", "pause", "gen", "qemu now", "detail")
    lines = []
    for r in rows:
        pause = r.get("pause_ms")
        before, after = r.get("generation_before"), r.get("generation_after")
        gen = "-" if before is None and after is None else f"{_cell(before)}->{_cell(after)}"
        qemu = r.get("qemu_after") or r.get("qemu_before")
        msg = (r.get("msg") or "").replace("\n", " ")
        lines.append((r["host"], r["vm"], r.get("stage") or "-", _cell(r.get("mode")),
                      r["result"], "-" if pause is None else f"{pause:.1f}ms", gen,
                      _short_path(qemu) if qemu else "-",
                      msg if len(msg) <= 90 else msg[:87] + "..."))
    widths = [max([len(head[i])] + [len(row[i]) for row in lines]) for i in range(len(head) - 1)]

    def line(cells):
        padded = [c.ljust(w) for c, w in zip(cells[:-1], widths, strict=True)]
        return "  ".join(padded + [cells[-1]]).rstrip()

    return [line(head)] + [line(row) for row in lines]


class FilterModule:
    def filters(self):
        return {
            "sealvm_record": sealvm_record,
            "sealvm_pair_record": sealvm_pair_record,
            "sealvm_row_text": sealvm_row_text,
            "sealvm_roll_stopped": sealvm_roll_stopped,
            "sealvm_roll_rows": sealvm_roll_rows,
            "sealvm_roll_table": sealvm_roll_table,
        }
