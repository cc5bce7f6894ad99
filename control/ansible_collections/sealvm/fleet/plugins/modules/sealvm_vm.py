#!/usr/bin/python
# Copyright: sealvm developers
# GNU General Public License v2.0 or later (see https://www.gnu.org/licenses/gpl-2.0.txt)

DOCUMENTATION = r"""
---
module: sealvm_vm
short_description: Bring a sealvm VM up from its spec, or down
version_added: "0.1.0"
description:
  - O(state=up) launches the VM a TOML spec describes (C(sealvm up)) unless a VM of that name
    already runs; O(state=down) stops it (C(sealvm down)) unless there is none.
  - Idempotent; check mode reports what would change.
author:
  - sealvm developers
options:
  name:
    description:
      - The VM's name. Read from O(spec) when omitted; when both are given they must match.
      - One of O(name) and O(spec) is required.
    type: str
  spec:
    description:
      - The VM's TOML spec on the managed host. Required for O(state=up).
      - For O(state=down), only its C(name) is read.
    type: path
  state:
    description: C(up) (running) or C(down) (no such VM).
    type: str
    choices: [up, down]
    default: up
  timeout:
    description: Seconds to wait for QEMU to answer (up) or to quit (down).
    type: float
extends_documentation_fragment:
  - sealvm.fleet.common
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Launch a VM from its spec
  sealvm.fleet.sealvm_vm:
    spec: /etc/sealvm/web1.toml
    state: up

- name: Stop it
  sealvm.fleet.sealvm_vm:
    name: web1
    state: down
"""

RETURN = r"""
name:
  description: The VM's name.
  returned: always
  type: str
vm:
  description: C(sealvm status NAME --json) of the running VM (pid, status, qemu, generation,
    memfds), or the result of C(sealvm down).
  returned: when the VM exists or was stopped
  type: dict
exit_code:
  description: The exit code of the last sealvm command that failed (0 when none did).
  returned: always
  type: int
"""

import re

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.sealvm.fleet.plugins.module_utils.sealvm_cli import (
    COMMON_ARGS,
    fail,
    run_sealvm,
)

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None


def spec_name(module, path):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        module.fail_json(msg=f"cannot read spec {path}: {exc}", exit_code=3)
    if tomllib is not None:
        try:
            name = tomllib.loads(raw.decode("utf-8")).get("name")
        except (ValueError, UnicodeDecodeError) as exc:
            module.fail_json(msg=f"spec {path}: {exc}", exit_code=3)
    else:
        m = re.search(r'^\s*name\s*=\s*"([^"]*)"', raw.decode("utf-8", "replace"), re.M)
        name = m.group(1) if m else None
    if not name:
        module.fail_json(msg=f"spec {path} has no name", exit_code=3)
    return name


#: the options (DOCUMENTATION lists the same, checked by tests/test_fleet.py)
ARGUMENT_SPEC = dict(
    name=dict(type="str"),
    spec=dict(type="path"),
    state=dict(type="str", choices=["up", "down"], default="up"),
    timeout=dict(type="float"),
    **COMMON_ARGS,
)


def main():
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC, supports_check_mode=True,
        required_if=[("state", "up", ("spec",))], required_one_of=[("name", "spec")])
    p = module.params
    name = p["name"]
    if p["spec"]:
        from_spec = spec_name(module, p["spec"])
        if name and name != from_spec:
            module.fail_json(msg=f"name {name} does not match the spec's name {from_spec}",
                             exit_code=3)
        name = from_spec

    rc, current, out, err = run_sealvm(module, ["status", name])
    exists = rc == 0
    if rc not in (0, 7):
        fail(module, rc, current, out, err, f"sealvm status {name}", name=name)
    result = dict(changed=False, name=name, exit_code=0)

    if p["state"] == "up":
        if exists:
            module.exit_json(vm=current, **result)
        if module.check_mode:
            module.exit_json(**dict(result, changed=True))
        args = ["up", p["spec"]]
    else:
        if not exists:
            module.exit_json(**result)
        if module.check_mode:
            module.exit_json(vm=current, **dict(result, changed=True))
        args = ["down", name]
    if p["timeout"] is not None:
        args += ["--timeout", str(p["timeout"])]
    rc, data, out, err = run_sealvm(module, args)
    if rc != 0:
        fail(module, rc, data, out, err, "sealvm {}".format(" ".join(args)), name=name)
    module.exit_json(vm=data, **dict(result, changed=True))


if __name__ == "__main__":
    main()
