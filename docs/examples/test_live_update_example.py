"""
Does this QEMU build live-update from the one in production, in both modes?

A complete test file for sealvm's pytest plugin (`sealvm.pytest_plugin`,
installed with sealvm).  Run it against two builds::

    pip install 'sealvm[pytest]'
    pytest docs/examples/test_live_update_example.py \\
        --sealvm-qemu /usr/local/bin/qemu-system-x86_64 \\
        --sealvm-update-to ./build/qemu-system-x86_64 \\
        --sealvm-guest "$(make print-guest)"

``--sealvm-qemu`` is the binary the VMs start with (production),
``--sealvm-update-to`` the build under test (default: the same binary),
``--sealvm-guest`` sealvm's test guest (``make guest``), which prints a
heartbeat and verifies a memory pattern over all of its RAM: the checks
below need it, or a guest printing the same console format.  Without a
QEMU or a guest configured, the tests skip, saying which option is missing.

Works in pytest-asyncio's ``auto`` and ``strict`` modes (``pytestmark``
below is what strict mode needs).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sealvm import Machine
from sealvm.pytest_plugin import MODES, GuestChecker, SealvmConfig, Updater, VmLauncher

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize("mode", MODES)
async def test_update_keeps_the_guest(sealvm_vm: Machine, sealvm_update: Updater,
                                      sealvm_check_guest: GuestChecker,
                                      sealvm_config: SealvmConfig, mode: str) -> None:
    """The build under test takes over a running guest from production."""
    await sealvm_check_guest(sealvm_vm)  # all of guest RAM written and verified once
    report = await sealvm_update(sealvm_vm, mode)
    assert Path(report.qemu_after) == sealvm_config.require_update_to().resolve()
    assert report.ram_inode_unchanged  # the same guest RAM, not a copy
    assert report.heartbeat_continuous and report.mismatches == 0
    assert report.pause_qmp is not None and report.pause_qmp < 10  # generous bound
    # heartbeat continuous since boot, no reboot, no mismatching word, and a
    # complete verified pass over guest RAM after the update
    check = await sealvm_check_guest(sealvm_vm)
    assert check.verified_pass is not None


async def test_there_and_back(sealvm_launch: VmLauncher, sealvm_update: Updater,
                              sealvm_check_guest: GuestChecker,
                              sealvm_config: SealvmConfig) -> None:
    """From production to the build under test and back, in both modes, on
    a VM described by a dict (a TOML-shaped spec; `qemu` and `name` default
    to --sealvm-qemu and "vm")."""
    vm = await sealvm_launch({
        "memory": {"size": "128M"},
        "guest": {"kernel": str(sealvm_config.require_guest()), "cmdline": "hb_ms=10"},
    })
    production = sealvm_config.require_qemu()
    for mode in MODES:
        await sealvm_update(vm, mode)  # to --sealvm-update-to
        back = await sealvm_update(vm, mode, qemu=production)
        assert Path(back.qemu_after) == production.resolve()
    await sealvm_check_guest(vm)


async def test_paused_guest_stays_paused(sealvm_launch: VmLauncher, sealvm_update: Updater,
                                         sealvm_check_guest: GuestChecker,
                                         sealvm_config: SealvmConfig, tmp_path: Path) -> None:
    """A VM from a spec file: a paused guest is updated and stays paused."""
    spec = tmp_path / "paused.toml"
    spec.write_text(f'name = "paused"\n[memory]\nsize = "64M"\n'
                    f'[guest]\nkernel = "{sealvm_config.require_guest()}"\n')
    vm = await sealvm_launch(spec)
    await sealvm_check_guest(vm)
    await vm.pause()
    report = await sealvm_update(vm, "cpr-transfer")
    assert report.guest_state == "paused" and await vm.status() == "paused"
    await vm.resume()
    await sealvm_check_guest(vm)
