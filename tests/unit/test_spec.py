"""Spec validation: every error names the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from sealvm.errors import SpecError
from sealvm.spec import load_spec, parse_size, spec_from_dict

BASE: dict[str, object] = {
    "name": "t",
    "qemu": "/q",
    "memory": {"size": "1G"},
    "guest": {"kernel": "/g"},
}


def with_(**over: object) -> dict[str, object]:
    d = dict(BASE)
    d.update(over)
    return d


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1G", 1 << 30), ("512M", 512 << 20), ("512MiB", 512 << 20), (4096, 4096), ("2k", 2048)],
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value, "f") == expected


@pytest.mark.parametrize("value", ["lots", "-1G", True, 0, "1.5G"])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(SpecError) as ei:
        parse_size(value, "memory.size")
    assert ei.value.field == "memory.size"


@pytest.mark.parametrize(
    ("data", "field", "needle"),
    [
        (with_(memroy={"size": "1G"}), "memroy", "did you mean 'memory'"),
        ({k: v for k, v in BASE.items() if k != "name"}, "name", "missing"),
        (with_(name="bad name"), "name", "not a valid"),
        (with_(cpus=0), "cpus", "out of range"),
        (with_(cpus="2"), "cpus", "expected int"),
        (with_(machine="virt"), "machine", "not one of"),
        (with_(memory={"size": "1G", "backend": "file"}), "memory.backend", "not one of"),
        (with_(memory={"size": "3M"}), "memory.size", "too small"),
        (with_(memory={"size": "17M"}), "memory.size", "multiple of 2 MiB"),
        (with_(memory={"size": "1G", "backend": "ram", "hugetlb": True}), "memory.hugetlb",
         "memfd"),
        (with_(vfio=[{"host": "00:01.0"}]), "vfio[0].host", "not a PCI address"),
        (with_(vfio=[{"id": "x"}]), "vfio[0]", "exactly one of host or sysfsdev"),
        (with_(vfio=[{"host": "0000:00:01.0", "backend": "vfio"}]), "vfio[0].backend",
         "not one of"),
        (with_(vfio=[{"host": "0000:00:01.0", "id": "a"}, {"host": "0000:00:02.0", "id": "a"}]),
         "vfio", "unique"),
        (with_(extra_args=["-d", 3]), "extra_args", "list of strings"),
        (with_(guest={"kernel": "/g", "cmdlne": ""}), "guest.cmdlne", "did you mean 'cmdline'"),
    ],
)
def test_invalid_specs_name_the_field(data: dict[str, object], field: str, needle: str) -> None:
    with pytest.raises(SpecError) as ei:
        spec_from_dict(data)
    assert ei.value.field == field
    assert needle in str(ei.value)


def test_qemu_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEALVM_QEMU", "/env/qemu")
    data = {k: v for k, v in BASE.items() if k != "qemu"}
    assert spec_from_dict(data).qemu == Path("/env/qemu")
    monkeypatch.delenv("SEALVM_QEMU")
    with pytest.raises(SpecError, match="qemu"):
        spec_from_dict(data)


def test_round_trip_through_dict() -> None:
    s = spec_from_dict(with_(vfio=[{"host": "0000:00:01.0", "id": "edu0"}], cpus=2,
                             extra_args=["-d", "guest_errors"]))
    assert spec_from_dict(s.to_dict()) == s


def test_load_toml_resolves_relative_paths(tmp_path: Path) -> None:
    f = tmp_path / "vm.toml"
    f.write_text('name = "a"\nqemu = "bin/qemu"\n[memory]\nsize = "64M"\n'
                 '[guest]\nkernel = "guest.bin"\n')
    s = load_spec(f)
    assert s.qemu == tmp_path / "bin/qemu"
    assert s.guest.kernel == tmp_path / "guest.bin"
    assert s.memory.size == 64 << 20


def test_load_toml_syntax_error(tmp_path: Path) -> None:
    f = tmp_path / "vm.toml"
    f.write_text("name = \n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(f)
