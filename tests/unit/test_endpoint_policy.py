"""The script endpoint's policy and its spec table (pure logic)."""

from __future__ import annotations

from typing import Any

import pytest

from sealvm.endpoint.policy import DEFAULT_DENY, Policy
from sealvm.endpoint.server import _incomplete
from sealvm.errors import SpecError
from sealvm.spec import spec_from_dict


def spec(**scripts: Any) -> dict[str, Any]:
    return {"name": "t", "qemu": "/q", "memory": {"size": "64M"},
            "guest": {"kernel": "/k"}, "scripts": scripts}


def test_default_policy_names_the_verb() -> None:
    p = Policy()
    assert p.refusal("query-status") is None
    assert "sealvm down" in str(p.refusal("quit"))
    assert "sealvm update" in str(p.refusal("migrate"))
    for cmd in ("migrate-set-parameters", "migrate-incoming", "human-monitor-command"):
        assert p.refusal(cmd) is not None, cmd


def test_spec_widens_and_narrows() -> None:
    p = Policy(allow=["human-monitor-command"], deny=["system_reset"])
    assert p.refusal("human-monitor-command") is None
    assert "deny" in str(p.refusal("system_reset"))
    assert p.refusal("quit") is not None  # untouched by allow of another
    assert set(DEFAULT_DENY) - {"human-monitor-command"} <= set(p.deny)


def test_scripts_table() -> None:
    s = spec_from_dict(spec(allow=["human-monitor-command"], deny=["query-kvm"]))
    assert s.scripts.enabled and s.scripts.allow == ("human-monitor-command",)
    assert spec_from_dict(s.to_dict()) == s
    assert not spec_from_dict(spec(enabled=False)).scripts.enabled


@pytest.mark.parametrize(("table", "field"), [
    ({"allow": ["quit;rm"]}, "scripts.allow"),
    ({"deny": [3]}, "scripts.deny"),
    ({"allow": ["quit"], "deny": ["quit"]}, "scripts.deny"),
    ({"group": "no-such-group-here"}, "scripts.group"),
    ({"enabled": "yes"}, "scripts.enabled"),
    ({"alow": []}, "scripts.alow"),
])
def test_bad_scripts_table(table: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as exc:
        spec_from_dict(spec(**table))
    assert exc.value.field == field


@pytest.mark.parametrize(("text", "more"), [
    ('{"execute": "q', True), ('{"a": [1, 2', True), ('{"a": "}"', True),
    ('{"a": "\\"', True), ("}", False), ("{not json}", False), ("nope", False),
])
def test_incomplete_input(text: str, more: bool) -> None:
    assert _incomplete(text) is more
