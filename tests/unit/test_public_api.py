"""
Every public name of sealvm (`sealvm.__all__`, `sealvm.pytest_plugin.__all__`
and the plugin's fixtures) has a docstring of its own and type annotations;
so do the public methods and properties of its classes.  docs/api.md lists
them.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sealvm
import sealvm.pytest_plugin

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"

FIXTURES = ["sealvm_config", "sealvm_run_root", "sealvm_spec", "sealvm_launch", "sealvm_vm",
            "sealvm_update", "sealvm_check_guest"]


def _own_doc(obj: Any) -> str | None:
    """*obj*'s docstring unless it is missing or generated (a dataclass's
    signature, an inherited one)."""
    doc = obj.__doc__ if isinstance(obj, type) else inspect.getdoc(obj)
    if isinstance(obj, type):
        if "__doc__" not in vars(obj) or not doc:
            return None
        if doc.startswith(f"{obj.__name__}("):  # dataclass default
            return None
    return doc.strip() if doc else None


def _untyped(fn: Any) -> list[str]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    missing = [p.name for p in sig.parameters.values()
               if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
    if sig.return_annotation is inspect.Signature.empty and fn.__name__ != "__init__":
        missing.append("return")
    return missing


def _members(cls: type) -> Iterator[tuple[str, Any]]:
    """Public methods and properties *cls* defines itself."""
    for name, value in vars(cls).items():
        if name.startswith("_") and name not in ("__call__",):
            continue
        if isinstance(value, staticmethod | classmethod):
            yield name, value.__func__
        elif isinstance(value, property):
            yield name, value.fget
        elif inspect.isfunction(value):
            yield name, value


def problems(module: types.ModuleType, names: list[str]) -> list[str]:
    """Public names of *module* without a docstring or with an unannotated
    parameter or return, as ``module.name: what``."""
    found = []
    for name in names:
        obj = getattr(module, name)
        where = f"{module.__name__}.{name}"
        if hasattr(obj, "_fixture_function"):  # a pytest fixture
            obj = obj._fixture_function
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # constants: documented in docs/api.md
        if not _own_doc(obj):
            found.append(f"{where}: no docstring")
        if inspect.isfunction(obj):
            found += [f"{where}: {p} not annotated" for p in _untyped(obj)]
        if inspect.isclass(obj):
            for mname, member in _members(obj):
                if not _own_doc(member):
                    found.append(f"{where}.{mname}: no docstring")
                found += [f"{where}.{mname}: {p} not annotated" for p in _untyped(member)]
    return found


def test_every_public_name_is_documented_and_typed() -> None:
    found = problems(sealvm, sealvm.__all__)
    found += problems(sealvm.pytest_plugin, [*sealvm.pytest_plugin.__all__, *FIXTURES])
    assert not found, "\n".join(found)


def test_report_types_are_public() -> None:
    for name in ("UpdateReport", "RecoverReport", "GuestCheck", "RamBlock"):
        assert name in sealvm.__all__


def test_docs_api_lists_every_public_name() -> None:
    text = DOCS.read_text()
    missing = [n for n in [*sealvm.__all__, *sealvm.pytest_plugin.__all__, *FIXTURES]
               if f"`{n}`" not in text]
    assert not missing, f"docs/api.md does not list: {missing}"


def test_the_walk_finds_what_is_missing() -> None:
    """Negative control: an undocumented, untyped function and a class
    with an undocumented method are reported."""
    fake = types.ModuleType("fake")

    def bare(x, y: int):  # type: ignore[no-untyped-def]
        return x

    @pytest.mark.skip  # any decorator keeping the function
    def documented(x: int) -> int:
        """Documented."""
        return x

    class Thing:
        """A thing."""

        def method(self) -> None:
            pass

    from dataclasses import dataclass

    @dataclass
    class Record:
        field: int

    fake.bare, fake.documented, fake.Thing, fake.Record = bare, documented, Thing, Record  # type: ignore[attr-defined]
    assert problems(fake, ["bare", "documented", "Thing", "Record"]) == [
        "fake.bare: no docstring", "fake.bare: x not annotated", "fake.bare: return not annotated",
        "fake.Thing.method: no docstring", "fake.Record: no docstring"]
