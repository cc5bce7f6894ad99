#!/usr/bin/python
# Copyright: sealvm developers
# GNU General Public License v2.0 or later (see https://www.gnu.org/licenses/gpl-2.0.txt)
# The work is done on the controller by the action plugin of the same name
# (plugins/action/sealvm_roll_summary.py); this file documents it.

DOCUMENTATION = r"""
---
module: sealvm_roll_summary
short_description: Summary of a sealvm rolling update, per host and VM
version_added: "0.1.0"
description:
  - Runs on the controller. Collects what the rolling-update playbook recorded on each host
    (C(sealvm_precheck), C(sealvm_roll), C(sealvm_host_check), C(sealvm_roll_stop)), one row per
    host and VM (stage, mode, result, pause, generations, binary, message), writes them as JSON
    to O(path) and returns them with a text table.
  - A VM the roll did not reach is C(not-attempted); a VM whose dry run failed and that the roll
    did not reach keeps its precheck result.
author:
  - sealvm developers
options:
  hosts:
    description: The hosts of the roll, in order.
    type: list
    elements: str
    required: true
  path:
    description: The JSON file to write on the controller (written in check mode too).
    type: path
    required: true
  after:
    description: What the summary follows (C(precheck), C(batch host1,host2), ...).
    type: str
    default: ""
attributes:
  action:
    support: full
  check_mode:
    description: Writes the summary in check mode too; it changes no VM.
    support: full
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: Summary of the roll so far
  sealvm.fleet.sealvm_roll_summary:
    hosts: "{{ groups['all'] }}"
    path: /var/log/sealvm/roll.json
    after: precheck
  run_once: true
"""

RETURN = r"""
rows:
  description: One per host and VM, as written to O(path).
  returned: always
  type: list
  elements: dict
table:
  description: The rows as text lines (header first).
  returned: always
  type: list
  elements: str
stopped:
  description: Whether a host stopped the roll.
  returned: always
  type: bool
"""

#: the options (DOCUMENTATION lists the same, checked by tests/test_fleet.py)
ARGUMENT_SPEC = dict(
    hosts=dict(type="list", elements="str", required=True),
    path=dict(type="path", required=True),
    after=dict(type="str", default=""),
)
