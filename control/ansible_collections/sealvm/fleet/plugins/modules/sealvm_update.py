#!/usr/bin/python
# Copyright: sealvm developers
# GNU General Public License v2.0 or later (see https://www.gnu.org/licenses/gpl-2.0.txt)

DOCUMENTATION = r"""
---
module: sealvm_update
short_description: Live-update the QEMU of one sealvm VM
version_added: "0.1.0"
description:
  - Replaces the QEMU binary running a VM without stopping the guest, with C(sealvm update)
    (cpr-exec, cpr-transfer or classic migration).
  - In check mode only the preflight runs (C(sealvm update --dry-run)); every check is
    returned, nothing is changed, and the task fails if the update would be refused.
  - Idempotent. A VM whose QEMU process already runs the target binary (the same file, by
    device and inode) is reported C(ok) and not updated, unless O(force=true).
  - Fails, with the exit code's meaning, when sealvm refuses the update (exit 4, the VM
    untouched), rolls it back (exit 5, the guest resumed on the previous QEMU), loses the guest
    (exit 6), or completes it with a failed check (exit 11); RV(result) names the outcome.
author:
  - sealvm developers
options:
  name:
    description: The VM's name (its run directory under the run root).
    type: str
    required: true
  qemu:
    description:
      - The QEMU binary to update to.
      - Default the binary at the path the VM runs now; then the VM is updated only if that
        file was replaced since its QEMU started (for example by a package upgrade), or with
        O(force=true).
    type: path
  mode:
    description: C(exec) (cpr-exec), C(transfer) (cpr-transfer) or C(migrate) (classic).
    type: str
    choices: [exec, transfer, migrate]
    default: exec
  force:
    description: Update even if the VM already runs the target binary.
    type: bool
    default: false
  heartbeat_ms:
    description:
      - The guest is the sealvm test guest with this heartbeat interval; measure the pause it
        sees. 0 for any other guest.
    type: int
    default: 0
  timeout:
    description: Seconds for the update (C(sealvm update --timeout)).
    type: float
    default: 60
  wait:
    description: Wait for another sealvm holding the VM's lock instead of failing (exit 7).
    type: bool
    default: false
extends_documentation_fragment:
  - sealvm.fleet.common
attributes:
  check_mode:
    description: Preflight only (C(sealvm update --dry-run)).
    support: full
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Preflight (dry run) of an update to a new QEMU
  sealvm.fleet.sealvm_update:
    name: web1
    qemu: /opt/qemu-10.2.3/bin/qemu-system-x86_64
  check_mode: true

- name: Update by cpr-transfer, the run root given explicitly
  sealvm.fleet.sealvm_update:
    name: web1
    qemu: /opt/qemu-10.2.3/bin/qemu-system-x86_64
    mode: transfer
    run_dir: /run/sealvm
    python: /opt/sealvm/venv/bin/python
  register: update

- name: Re-exec VMs whose QEMU binary was replaced on disk by a package upgrade
  sealvm.fleet.sealvm_update:
    name: "{{ item }}"
  loop: "{{ ansible_facts.sealvm.vm_names }}"
"""

RETURN = r"""
result:
  description:
    - C(updated), C(unchanged) (already on the target binary), C(would-update) (check mode);
      on failure C(refused), C(rolled-back), C(lost), C(completed-with-errors), C(state),
      C(qmp-error), C(error), ...
  returned: always
  type: str
  sample: updated
exit_code:
  description: The exit code of C(sealvm update) (0 when it was not run).
  returned: always
  type: int
  sample: 0
meaning:
  description: What the exit code means.
  returned: failure
  type: str
  sample: live update refused before the guest paused; the VM is untouched
mode:
  description: The migration mode (C(cpr-exec), C(cpr-transfer), C(migrate)).
  returned: always
  type: str
  sample: cpr-exec
target:
  description: The binary updated to (resolved path).
  returned: always
  type: str
qemu_before:
  description: The binary the VM's QEMU ran before.
  returned: when the VM exists
  type: str
qemu_after:
  description: The binary it runs afterwards.
  returned: when the VM exists
  type: str
generation_before:
  description: Live updates the VM had completed before.
  returned: when the VM exists
  type: int
generation_after:
  description: Live updates the VM has completed afterwards.
  returned: when the VM exists
  type: int
pid_before:
  description: The QEMU process before.
  returned: when the VM exists
  type: int
pid_after:
  description: The QEMU process afterwards (the same one after cpr-exec).
  returned: when the VM exists
  type: int
pause_ms:
  description: The guest's pause, QMP STOP to RESUME, in milliseconds (null for a paused guest).
  returned: when updated
  type: float
  sample: 31.5
report:
  description: The report of C(sealvm update --json) (phases, RAM blocks, checks).
  returned: when updated
  type: dict
checks:
  description: Every preflight check (name, ok, detail).
  returned: in check mode
  type: list
  elements: dict
error:
  description: The error object sealvm printed (error, message, exit_code, reasons, outcome).
  returned: failure
  type: dict
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.sealvm.fleet.plugins.module_utils.sealvm_cli import (
    COMMON_ARGS,
    fail,
    run_sealvm,
    same_file,
)


def shorten(text, limit=120):
    return text if len(text) <= limit else text[:limit - 3] + "..."


REPORT_MODES = {"exec": "cpr-exec", "transfer": "cpr-transfer", "migrate": "migrate"}


def vm_status(module, name):
    rc, data, out, err = run_sealvm(module, ["status", name])
    if rc != 0 or not isinstance(data, dict):
        fail(module, rc, data, out, err, f"sealvm status {name}",
             mode=REPORT_MODES[module.params["mode"]], target=module.params["qemu"] or "")
    return data


#: the options (DOCUMENTATION lists the same, checked by tests/test_fleet.py)
ARGUMENT_SPEC = dict(
    name=dict(type="str", required=True),
    qemu=dict(type="path"),
    mode=dict(type="str", choices=["exec", "transfer", "migrate"], default="exec"),
    force=dict(type="bool", default=False),
    heartbeat_ms=dict(type="int", default=0),
    timeout=dict(type="float", default=60.0),
    wait=dict(type="bool", default=False),
    **COMMON_ARGS,
)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    name = p["name"]
    mode = REPORT_MODES[p["mode"]]

    before = vm_status(module, name)
    if before.get("busy") or before.get("interrupted_update"):
        # another sealvm works on it, or an update was interrupted: only the
        # update itself (which recovers first, or waits) may go further
        current = None
    else:
        current = before
    target = os.path.realpath(p["qemu"]) if p["qemu"] else (current or {}).get("qemu", "")
    result = dict(changed=False, mode=mode, target=target, exit_code=0)
    if current is not None:
        result.update(qemu_before=current["qemu"], generation_before=current["generation"],
                      pid_before=current["pid"])
        on_target = same_file(current["pid"], target)
        if on_target is None:  # /proc/PID/exe unreadable: compare names
            on_target = os.path.realpath(current["qemu"]) == target
        if on_target and not p["force"]:
            result.update(result="unchanged", qemu_after=current["qemu"],
                          generation_after=current["generation"], pid_after=current["pid"])
            module.exit_json(**result)

    args = ["update", name, "--mode", p["mode"]]
    if p["qemu"]:
        args += ["--qemu", target]
    if module.check_mode:
        rc, data, out, err = run_sealvm(module, args + ["--dry-run"])
        checks = data.get("checks", []) if isinstance(data, dict) else []
        result.update(checks=checks)
        if current is not None:
            result.update(qemu_after=current["qemu"], generation_after=current["generation"],
                          pid_after=current["pid"])
        if rc != 0:
            if rc == 4:
                failed = ["{}: {}".format(c["name"], shorten(c["detail"]))
                          for c in checks if not c["ok"]]
                data = dict(data or {}, message="; ".join(failed))
            result.pop("exit_code")
            fail(module, rc, data, out, err, f"sealvm update {name} --dry-run", **result)
        result.update(changed=True, result="would-update")
        module.exit_json(**result)

    if p["heartbeat_ms"]:
        args += ["--heartbeat-ms", str(p["heartbeat_ms"])]
    args += ["--timeout", str(p["timeout"])]
    if p["wait"]:
        args += ["--wait"]
    rc, data, out, err = run_sealvm(module, args)
    after_rc, after, _out, _err = run_sealvm(module, ["status", name])
    if after_rc == 0 and isinstance(after, dict) and "pid" in after:
        result.update(qemu_after=after["qemu"], generation_after=after["generation"],
                      pid_after=after["pid"])
    if rc != 0:
        result.pop("exit_code")
        fail(module, rc, data, out, err, f"sealvm update {name}", **result)
    report = data if isinstance(data, dict) else {}
    pause = report.get("pause_qmp")
    result.update(changed=True, result="updated", report=report,
                  pause_ms=None if pause is None else round(1000 * pause, 1))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
