"""
`qemu_steps` on log text shaped like L2 QEMU's (no L1): the steps of a
cpr-exec and of a cpr-transfer, and nothing from a log without timestamps
or without the update's end -- the scenarios' "steps read" check fails then.
"""

from __future__ import annotations

from .qemu_steps import timed_events, update_steps

# an earlier update's end, then one cpr-exec (old QEMU, then the new one);
# "@" is the date and the first digits of the time
EXEC_LOG = """\
@0.000000Z vmstate_downtime_checkpoint dst-precopy-bh-vm-started
some line without a timestamp
@1.000000Z vmstate_downtime_checkpoint src-downtime-start
@1.010000Z vmstate_downtime_checkpoint src-vm-stopped
@1.011000Z vmstate_downtime_save type=non-iterable idstr=iommufd instance_id=0 downtime=150
@1.030000Z vmstate_downtime_checkpoint src-non-iterable-saved
@1.035000Z cpr_exec
@1.200000Z cpr_state_load cpr-exec mode
@1.300000Z iommufd_cdev_connect_and_bind  [iommufd=5] Successfully bound device x
@1.310000Z vfio_cpr_find_device ioas_id 2, devid 1, hwpt_id 3
@1.340000Z vfio_listener_region_add_ram region_add [ram] 0x0 - 0x9ffff [0x7f]
@1.370000Z qemu_loadvm_state_section_startfull 0(timer) 0 2
@1.380000Z vmstate_downtime_load type=non-iterable idstr=iommufd instance_id=0 downtime=200
@1.390000Z vmstate_downtime_checkpoint dst-precopy-loadvm-completed
@1.392000Z vmstate_downtime_checkpoint dst-precopy-bh-enter
@1.394000Z vmstate_downtime_checkpoint dst-precopy-bh-vm-started
""".replace("@", "2026-12-01T00:00:0")

# cpr-transfer: the new QEMU started and bound the device before the pause,
# and loads while the old one still saves
TRANSFER_LOG = """\
@0.500000Z cpr_state_load cpr-transfer mode
@0.600000Z iommufd_cdev_connect_and_bind  [iommufd=5] Successfully bound device x
@1.000000Z vmstate_downtime_checkpoint src-vm-stopped
@1.010000Z qemu_loadvm_state_section_startfull 0(timer) 0 2
@1.030000Z vmstate_downtime_checkpoint src-non-iterable-saved
@1.050000Z vmstate_downtime_checkpoint dst-precopy-loadvm-completed
@1.051000Z vmstate_downtime_checkpoint dst-precopy-bh-vm-started
""".replace("@", "2026-12-01T00:00:0")


def ms(steps: dict[str, float]) -> dict[str, float]:
    return {k: round(v * 1000, 3) for k, v in steps.items()}


def test_a_cpr_exec_step_by_step() -> None:
    assert ms(update_steps(timed_events(EXEC_LOG))) == {
        "save": 20.0, "hand-off": 5.0, "exec": 165.0, "start-up": 100.0, "vfio": 40.0,
        "init": 30.0, "load": 20.0, "resume": 4.0, "total": 384.0,
        "change_process": 0.2, "probe": 0.15}


def test_a_cpr_transfer_has_only_the_steps_inside_its_pause() -> None:
    assert ms(update_steps(timed_events(TRANSFER_LOG))) == {
        "save": 30.0, "load": 40.0, "resume": 1.0, "total": 51.0}


def test_no_steps_without_timestamps_or_without_the_resume() -> None:
    untimed = "\n".join(line.split(" ", 1)[1] for line in EXEC_LOG.splitlines())
    assert update_steps(timed_events(untimed)) == {}
    unfinished = EXEC_LOG.rsplit("\n", 2)[0]
    assert update_steps(timed_events(unfinished)) == {}
