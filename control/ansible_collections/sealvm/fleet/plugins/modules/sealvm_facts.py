#!/usr/bin/python
# Copyright: sealvm developers
# GNU General Public License v2.0 or later (see https://www.gnu.org/licenses/gpl-2.0.txt)

DOCUMENTATION = r"""
---
module: sealvm_facts
short_description: The sealvm VMs of a host, their QEMU binaries and generations, host-check
version_added: "0.1.0"
description:
  - Reads C(sealvm status) for every VM in the run root and C(sealvm host-check), and sets
    them as the fact C(ansible_facts.sealvm). Changes nothing.
author:
  - sealvm developers
options:
  details:
    description:
      - Also attach to each running VM (C(sealvm status NAME)) for its guest run state
        (C(status)) and who holds its lock (C(busy)). Without it, C(status) is C(null) for a
        running VM.
    type: bool
    default: false
  host_check:
    description: Run C(sealvm host-check) and include its probes.
    type: bool
    default: true
  require:
    description:
      - Capabilities (host-check probe names) the host must have, for example
        C(memfd-seals), C(iommufd). Missing ones are listed in
        C(ansible_facts.sealvm.host_check.missing); the module does not fail for them.
    type: list
    elements: str
    default: []
extends_documentation_fragment:
  - sealvm.fleet.common
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  facts:
    support: full
"""

EXAMPLES = r"""
- name: Learn the VMs of each host
  sealvm.fleet.sealvm_facts:
    run_dir: /run/sealvm
    require: [memfd-seals]

- name: Show which binary each VM runs
  ansible.builtin.debug:
    msg: "{{ item.key }}: {{ item.value.qemu }} ({{ item.value.generation }} updates)"
  loop: "{{ ansible_facts.sealvm.vms | dict2items }}"
"""

RETURN = r"""
ansible_facts:
  description: Facts under the key C(sealvm).
  returned: always
  type: complex
  contains:
    sealvm:
      description: The host's sealvm VMs and capabilities.
      type: dict
      returned: always
      contains:
        run_dir:
          description: The run root (as given; null for the CLI's default).
          type: str
        vm_names:
          description: The VMs' names, sorted.
          type: list
          elements: str
        vms:
          description:
            - Per VM name, C(pid), C(alive), C(qemu) (the binary its QEMU process runs
              now), C(generation) (live updates completed), C(interrupted_update); with
              O(details=true) also C(status) (guest run state) and C(busy) (who holds its
              lock). C(status) is C(dead) when the QEMU process is gone.
          type: dict
        binaries:
          description: Per QEMU binary in use, the VMs running it.
          type: dict
        host_check:
          description: C(probes) (name, ok, detail), C(required), C(missing).
          type: dict
exit_code:
  description: Exit code of the last failing sealvm command (0 when none failed).
  returned: always
  type: int
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.sealvm.fleet.plugins.module_utils.sealvm_cli import (
    COMMON_ARGS,
    fail,
    meaning,
    run_sealvm,
)

#: the options (DOCUMENTATION lists the same, checked by tests/test_fleet.py)
ARGUMENT_SPEC = dict(
    details=dict(type="bool", default=False),
    host_check=dict(type="bool", default=True),
    require=dict(type="list", elements="str", default=[]),
    **COMMON_ARGS,
)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params

    rc, data, out, err = run_sealvm(module, ["status"])
    if rc != 0 or not isinstance(data, dict):
        fail(module, rc, data, out, err, "sealvm status")
    vms = {}
    binaries = {}
    for entry in data.get("vms", []):
        name = entry["name"]
        vm = dict(name=name, pid=entry["pid"], alive=entry["alive"],
                  generation=entry["generation"],
                  interrupted_update=bool(entry["interrupted_update"]),
                  busy=None, status=None, qemu=entry.get("qemu"))
        if entry["alive"] and p["details"]:
            rc, detail, out, err = run_sealvm(module, ["status", name])
            if rc == 0 and isinstance(detail, dict):
                if "pid" in detail:
                    vm.update(status=detail["status"], qemu=detail["qemu"],
                              generation=detail["generation"], pid=detail["pid"])
                else:  # busy or an interrupted update: status does not attach
                    vm.update(busy=detail.get("busy"),
                              interrupted_update=bool(detail.get("interrupted_update")))
            else:
                vm.update(status=f"unknown: {meaning(rc)} (exit {rc})")
        elif not entry["alive"]:
            vm.update(status="dead")
        if vm["qemu"]:
            binaries.setdefault(vm["qemu"], []).append(name)
        vms[name] = vm

    facts = dict(run_dir=p["run_dir"], vms=vms, vm_names=sorted(vms), binaries=binaries)
    if p["host_check"]:
        args = ["host-check"]
        if p["require"]:
            args += ["--require", ",".join(p["require"])]
        rc, data, out, err = run_sealvm(module, args)
        if rc not in (0, 10) or not isinstance(data, dict):
            fail(module, rc, data, out, err, "sealvm host-check")
        facts["host_check"] = data
    module.exit_json(changed=False, exit_code=0, ansible_facts=dict(sealvm=facts))


if __name__ == "__main__":
    main()
