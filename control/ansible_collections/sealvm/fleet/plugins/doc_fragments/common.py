# Copyright: sealvm developers
# GNU General Public License v2.0 or later (see https://www.gnu.org/licenses/gpl-2.0.txt)


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  run_dir:
    description:
      - The sealvm run root holding the VMs' run directories (C(sealvm --run-dir)).
      - Default as for the CLI, C($SEALVM_RUN_DIR), else C(/run/sealvm) as root, else
        C($XDG_RUNTIME_DIR/sealvm).
    type: path
  python:
    description:
      - A Python interpreter that can import the C(sealvm) package; the module runs
        C(PYTHON -m sealvm.cli).
      - Ignored when O(executable) is set. Without either, C(sealvm) from C(PATH) is used,
        else the module's own interpreter with C(-m sealvm.cli).
    type: path
  executable:
    description:
      - The C(sealvm) command to run.
    type: path
notes:
  - The module runs the sealvm CLI with C(--json) on the managed host and reports its exit
    code as RV(exit_code) with its meaning; see the sealvm README (The CLI) and docs/fleet.md.
  - Environment the CLI needs (C(SEALVM_RUN_DIR), C(SEALVM_QEMU), C(PYTHONPATH)) can be set
    with the task keyword C(environment).
requirements:
  - sealvm (the control plane) on the managed host
"""
