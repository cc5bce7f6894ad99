# Copyright: sealvm developers
# GNU General Public License v2.0 or later (see https://www.gnu.org/licenses/gpl-2.0.txt)
"""Run the sealvm CLI (``--json``) for the sealvm.fleet modules.

Every module runs ``sealvm [--run-dir DIR] --json VERB ...`` on the managed
host and reads the one JSON object it prints; the exit code says what
happened (the table is the CLI's own, README "The CLI").
"""

import json
import os
import sys

#: exit code -> (result name, meaning), as documented by ``sealvm --help``
EXIT_CODES = {
    0: ("ok", "success"),
    1: ("error", "other sealvm error"),
    2: ("usage", "usage error"),
    3: ("invalid-spec", "invalid spec"),
    4: ("refused", "live update refused before the guest paused; the VM is untouched"),
    5: ("rolled-back", "live update failed; the previous QEMU resumed the guest (rolled back)"),
    6: ("lost", "live update failed; the guest was NOT resumed"),
    7: ("state", "no such VM, not in a state for this verb, or busy (another sealvm holds "
                 "its lock)"),
    8: ("qmp-error", "QEMU rejected the command or answered nonsense"),
    9: ("launch-failed", "QEMU failed to launch"),
    10: ("host-lacks", "the host lacks a required capability"),
    11: ("completed-with-errors", "live update completed (the new QEMU runs the guest) but a "
                                  "later step failed"),
}

MODES = ("exec", "transfer", "migrate")


def result_name(rc):
    """The name of exit code *rc* ("refused", "rolled-back", ...)."""
    return EXIT_CODES.get(rc, ("error", ""))[0]


def meaning(rc):
    """What exit code *rc* means, in words."""
    return EXIT_CODES.get(rc, ("error", f"unexpected exit code {rc}"))[1]


def sealvm_command(module):
    """argv prefix running the sealvm CLI: ``executable``, else
    ``python -m sealvm.cli``, else ``sealvm`` from PATH, else this
    interpreter with ``-m sealvm.cli``."""
    params = module.params
    if params.get("executable"):
        return [params["executable"]]
    if params.get("python"):
        return [params["python"], "-m", "sealvm.cli"]
    found = module.get_bin_path("sealvm")
    if found:
        return [found]
    return [sys.executable, "-m", "sealvm.cli"]


def run_sealvm(module, args):
    """Run one sealvm verb with ``--json``.

    Returns ``(rc, data, stdout, stderr)``; *data* is the JSON object the CLI
    printed, or None when it printed none.
    """
    argv = sealvm_command(module)
    if module.params.get("run_dir"):
        argv += ["--run-dir", module.params["run_dir"]]
    argv += ["--json"] + list(args)
    rc, out, err = module.run_command(argv, check_rc=False)
    data = None
    text = out.strip()
    if text:
        try:
            data = json.loads(text)
        except ValueError:
            data = None
    return rc, data, out, err


def fail(module, rc, data, out, err, what, **extra):
    """fail_json naming the exit code's meaning and sealvm's message."""
    message = ""
    if isinstance(data, dict):
        message = data.get("message") or ""
    if not message:
        message = (err or out or "").strip().splitlines()[-1:] or [""]
        message = message[0]
    if isinstance(data, dict):  # what sealvm said, without what is returned anyway
        error = dict((k, v) for k, v in data.items() if k != "checks")
        extra.setdefault("stderr", err)
    else:  # no JSON: a crash or a usage error; keep everything it printed
        error = None
        extra.update(stdout=out, stderr=err)
    module.fail_json(
        msg=f"{what}: {meaning(rc)} (exit {rc}): {message}",
        rc=rc, exit_code=rc, result=result_name(rc), meaning=meaning(rc), error=error,
        **extra)


def same_file(pid, path):
    """Whether process *pid* runs the file at *path* now: same device and
    inode (a binary replaced on disk since QEMU started is not the same,
    even under the same name).  None when /proc/PID/exe cannot be read."""
    try:
        running = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return None
    try:
        target = os.stat(path)
    except OSError:
        return False
    return (running.st_dev, running.st_ino) == (target.st_dev, target.st_ino)


COMMON_ARGS = dict(
    run_dir=dict(type="path"),
    python=dict(type="path"),
    executable=dict(type="path"),
)
