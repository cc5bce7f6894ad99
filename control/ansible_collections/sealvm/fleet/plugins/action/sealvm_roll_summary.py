# Copyright: sealvm developers
# GNU General Public License v2.0 or later (see https://www.gnu.org/licenses/gpl-2.0.txt)
"""sealvm_roll_summary: the roll's summary, made and written on the
controller (no module runs on a host)."""

import json
import os

from ansible.plugins.action import ActionBase

from ansible_collections.sealvm.fleet.plugins.filter.roll import (
    sealvm_roll_rows,
    sealvm_roll_stopped,
    sealvm_roll_table,
)
from ansible_collections.sealvm.fleet.plugins.modules.sealvm_roll_summary import ARGUMENT_SPEC


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        _validation, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        hostvars = task_vars["hostvars"]
        rows = sealvm_roll_rows(hostvars, args["hosts"])
        stopped = sealvm_roll_stopped(hostvars, args["hosts"])
        summary = dict(after=args["after"], check_mode=bool(task_vars.get("ansible_check_mode")),
                       stopped=stopped, rows=rows)
        path = os.path.expanduser(args["path"])
        tmp_path = path + ".tmp"
        with open(tmp_path, "w") as f:
            json.dump(summary, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp_path, path)
        table = sealvm_roll_table(rows)
        result.update(changed=False, rows=rows, table=table, stopped=stopped, path=path,
                      msg=["after " + args["after"], *table])
        return result
