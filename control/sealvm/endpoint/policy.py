"""
What a script may ask of QEMU through the endpoint.

sealvm owns the VM's lifecycle: a script that quits QEMU, starts a
migration or changes the migration parameters would break the next live
update (or the one in progress), so by default these commands are refused
with a QMP error naming the sealvm verb to use instead.  The spec's
``[scripts]`` table can widen (``allow``) or narrow (``deny``) the list.
"""

from __future__ import annotations

from collections.abc import Iterable

#: the sealvm verb (or reason) for each command refused by default
DEFAULT_DENY: dict[str, str] = {
    "quit": "use `sealvm down VM`",
    "migrate": "use `sealvm update VM`",
    "migrate-incoming": "use `sealvm update VM`",
    "migrate_cancel": "sealvm cancels a failed update itself (`sealvm recover VM`)",
    "migrate-continue": "use `sealvm update VM`",
    "migrate-pause": "use `sealvm update VM`",
    "migrate-recover": "use `sealvm recover VM`",
    "migrate-start-postcopy": "sealvm's updates do not use postcopy",
    "migrate-set-capabilities": "sealvm sets the migration capabilities for each update",
    "migrate-set-parameters": "sealvm sets the migration parameters for each update",
    "x-exit-preconfig": "sealvm starts QEMU",
    "object-del": "guest RAM and iommufd objects are sealvm's (`sealvm down VM`)",
    "object-add": "objects sealvm must keep across updates are created from the spec",
    "human-monitor-command": "HMP would bypass this policy; use the QMP command",
    "add-fd": "fds QEMU holds across updates are passed by sealvm",
    "getfd": "fds QEMU holds across updates are passed by sealvm",
    "closefd": "fds QEMU holds across updates are passed by sealvm",
    "remove-fd": "fds QEMU holds across updates are passed by sealvm",
    "chardev-remove": "the monitors are sealvm's",
    "chardev-change": "the monitors are sealvm's",
    "system_powerdown": "use `sealvm down VM`",
}


class Policy:
    """Commands refused on the script endpoint, each with its reason."""

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self.deny = {k: v for k, v in DEFAULT_DENY.items() if k not in set(allow)}
        for cmd in deny:
            self.deny.setdefault(cmd, "denied by the VM's spec ([scripts] deny)")

    def refusal(self, command: str) -> str | None:
        """The QMP error text for *command*, or None when it is allowed."""
        why = self.deny.get(command)
        if why is None:
            return None
        return f"sealvm: '{command}' is not allowed on the script endpoint: {why}"
