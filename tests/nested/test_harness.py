"""nested.harness.l1's pure parts: the L1 command line and the command script."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from .harness.l1 import L1Config, command_script, edu_addresses, kernel_cmdline, l1_argv

CFG = L1Config(kernel=Path("/k/bzImage"), qemu=Path("/q/qemu-system-x86_64"), edu=2)


def opts(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_l1_machine() -> None:
    argv = l1_argv(CFG, share=Path("/tmp/share"))
    assert argv[0] == "/q/qemu-system-x86_64"
    assert "-nodefaults" in argv and "-no-reboot" in argv
    assert opts(argv, "-accel") == ["tcg"]
    assert opts(argv, "-machine") == ["q35,kernel-irqchip=split"]
    devices = opts(argv, "-device")
    assert "intel-iommu,intremap=on,caching-mode=on" in devices
    edu = [d for d in devices if d.startswith("edu,")]
    assert edu == ["edu,id=edu0,addr=0x10,dma_mask=0x7fffffffff",
                   "edu,id=edu1,addr=0x11,dma_mask=0x7fffffffff"]
    assert edu_addresses(2) == ["0000:00:10.0", "0000:00:11.0"]


def test_l1_root_is_read_only_and_share_writable() -> None:
    fsdevs = opts(l1_argv(CFG, share=Path("/tmp/share")), "-fsdev")
    root = next(f for f in fsdevs if "id=root" in f)
    out = next(f for f in fsdevs if "id=out" in f)
    assert "path=/," in root and "readonly=on" in root
    assert "path=/tmp/share," in out and "readonly" not in out


def test_kernel_cmdline() -> None:
    line = kernel_cmdline(CFG)
    assert "rootfstype=9p" in line and " ro " in line and "intel_iommu=on" in line
    assert f"init={CFG.init}" in line and "panic=-1" in line


def test_unsafe_paths_are_refused() -> None:
    with pytest.raises(ValueError, match="commas"):
        l1_argv(CFG, share=Path("/tmp/a,b"))
    with pytest.raises(ValueError, match="devices"):
        l1_argv(L1Config(kernel=CFG.kernel, qemu=CFG.qemu, edu=0), share=Path("/s"))


def test_command_script_quotes_everything() -> None:
    script = command_script(["python3", "-c", "print('a b; $x')"], {"K": "v w$"})
    lines = script.splitlines()
    assert lines[1] == "export K='v w$'"
    assert shlex.split(lines[2]) == ["exec", "python3", "-c", "print('a b; $x')"]
    with pytest.raises(ValueError, match="variable"):
        command_script(["true"], {"A-B": "x"})
