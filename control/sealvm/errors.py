"""
sealvm's exceptions: one root, typed leaves.

Every error sealvm raises on purpose derives from `SealvmError`; wrappers
keep their cause (``raise ... from exc``).  Cancellation is never wrapped.

::

    SealvmError
     +-- SpecError            a VM spec is invalid (names the field and the fix)
     +-- HostError            the host lacks a capability or a probe failed
     +-- LaunchError          QEMU did not start, or died before QMP answered
     +-- StateError           an operation does not fit the VM's run state
     |    +-- InterruptedUpdateError  an earlier update did not finish
     |                                (run `recover`)
     +-- QMPReplyError        QEMU's reply to a command was an error or malformed
     +-- PreflightError       a live update was refused before the guest paused
     +-- UpdateError          a live update failed after it started
          (``outcome``: rolled back, completed with errors, or not resumed)
"""

from __future__ import annotations


class SealvmError(Exception):
    """Root of every error sealvm raises on purpose."""


class SpecError(SealvmError):
    """A VM spec is invalid.

    :param field: dotted path of the offending field (``memory.size``).
    :param problem: what is wrong.
    :param fix: what to write instead.
    """

    def __init__(self, field: str, problem: str, fix: str = "") -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        msg = f"{field}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


class HostError(SealvmError):
    """The host cannot do what was asked (missing capability, failed probe)."""


class LaunchError(SealvmError):
    """QEMU failed to start or died before its monitor answered.

    :param exitcode: QEMU's exit status, if it exited.
    :param output: the tail of QEMU's log.
    """

    def __init__(self, message: str, *, exitcode: int | None = None, output: str = "") -> None:
        self.message = message
        self.exitcode = exitcode
        self.output = output
        text = message
        if exitcode is not None:
            text += f" (exit status {exitcode})"
        if output:
            text += "\n--- QEMU output ---\n" + output.rstrip()
        super().__init__(text)


class StateError(SealvmError):
    """The VM is not in a state that allows this operation."""


class InterruptedUpdateError(StateError):
    """A live update of this VM was interrupted (its journal is still there).

    ``recover`` finishes or rolls it back; nothing else may touch the VM first.
    """


class QMPReplyError(SealvmError):
    """QEMU answered a QMP command with an error, or with a malformed reply."""

    def __init__(self, command: str, message: str) -> None:
        self.command = command
        super().__init__(f"{command}: {message}")


class PreflightError(SealvmError):
    """A live update was refused before the guest was paused.

    The VM is left exactly as it was.  ``reasons`` lists every problem found.
    """

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = list(reasons)
        super().__init__("live update refused: " + "; ".join(self.reasons))


class UpdateError(SealvmError):
    """A live update failed after it started.

    :param rolled_back: True when the old QEMU took the guest back (running
        again, or paused if it was paused).
    :param completed: True when the failure came after the fence: the new
        QEMU runs the guest, a later step (tidying up) failed.
    Neither: the guest was not resumed (``sealvm recover`` says what is left).
    """

    def __init__(self, message: str, *, rolled_back: bool, completed: bool = False) -> None:
        self.message = message
        self.rolled_back = rolled_back
        self.completed = completed and not rolled_back
        if self.rolled_back:
            state = "rolled back: the old QEMU has the guest"
        elif self.completed:
            state = "update completed with errors: the new QEMU runs the guest"
        else:
            state = "guest NOT resumed"
        super().__init__(f"{message} [{state}]")

    @property
    def outcome(self) -> str:
        """``rolled-back``, ``completed-with-errors`` or ``not-resumed``."""
        if self.rolled_back:
            return "rolled-back"
        return "completed-with-errors" if self.completed else "not-resumed"
