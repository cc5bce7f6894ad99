"""argv and fd plan: pure logic, no QEMU."""

from __future__ import annotations

from pathlib import Path

import pytest

from sealvm.plan import (
    FdPlan,
    RunPaths,
    incoming_argv,
    opt_value,
    option_value,
    qemu_argv,
    serial_path,
)
from sealvm.spec import spec_from_dict


def spec(**over: object):  # type: ignore[no-untyped-def]
    data: dict[str, object] = {
        "name": "t",
        "qemu": "/opt/q/qemu-system-x86_64",
        "memory": {"size": "1G"},
        "guest": {"kernel": "/opt/g/guest.bin", "cmdline": "hb_ms=10 pattern=on"},
    }
    data.update(over)
    return spec_from_dict(data)


PATHS = RunPaths(Path("/run/sealvm/t"))


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_memfd_ram_is_shared_sealed_and_aux_shared() -> None:
    argv = qemu_argv(spec(), PATHS, FdPlan(qmp_listen=7))
    assert argv[0] == "/opt/q/qemu-system-x86_64"
    assert "memory-backend-memfd,id=ram0,size=1073741824,share=on,seal=on" in opt(argv, "-object")
    assert opt(argv, "-machine") == ["q35,memory-backend=ram0,aux-ram-share=on"]
    assert opt(argv, "-m") == ["1024M"]


def test_ram_backend_has_no_aux_share() -> None:
    argv = qemu_argv(spec(memory={"size": "64M", "backend": "ram"}), PATHS, FdPlan(qmp_listen=7))
    assert opt(argv, "-object") == ["memory-backend-ram,id=ram0,size=67108864"]
    assert opt(argv, "-machine") == ["q35,memory-backend=ram0"]


def test_hugetlb_options() -> None:
    s = spec(memory={"size": "1G", "hugetlb": True, "hugetlbsize": "2M"})
    obj = opt(qemu_argv(s, PATHS, FdPlan(qmp_listen=7)), "-object")[0]
    assert obj.endswith(",hugetlb=on,hugetlbsize=2097152")


def test_qmp_socket_is_passed_by_fd_and_serial_appends() -> None:
    argv = qemu_argv(spec(), PATHS, FdPlan(qmp_listen=9))
    chardevs = opt(argv, "-chardev")
    assert "socket,id=qmp,fd=9,server=on,wait=off" in chardevs
    assert "file,id=serial0,path=/run/sealvm/t/qemu/serial.log,append=on" in chardevs
    assert opt(argv, "-mon") == ["chardev=qmp,mode=control", "chardev=scripts,mode=control"]
    assert opt(argv, "-append") == ["hb_ms=10 pattern=on"]  # one argv element, no shell


def test_script_monitor_connects_out_and_retries() -> None:
    """QEMU connects to the script endpoint itself, never waiting for it."""
    argv = qemu_argv(spec(), PATHS, FdPlan(qmp_listen=9))
    assert ("socket,id=scripts,path=/run/sealvm/t/qemu/endpoint-qemu.sock,server=off,"
            "reconnect-ms=100") in opt(argv, "-chardev")
    off = qemu_argv(spec(scripts={"enabled": False}), PATHS, FdPlan(qmp_listen=9))
    assert opt(off, "-mon") == ["chardev=qmp,mode=control"]
    assert not any("scripts" in a for a in off)


def test_vfio_iommufd_devices_use_passed_fds() -> None:
    s = spec(vfio=[{"host": "0000:00:03.0", "id": "edu0"},
                   {"sysfsdev": "/sys/bus/mdev/devices/u", "id": "m0", "backend": "legacy"}],
             security={"confine": False})
    fds = FdPlan(qmp_listen=5, iommufd=6, vfio={"edu0": 8})
    argv = qemu_argv(s, PATHS, fds)
    assert "iommufd,id=iommufd0,fd=6" in opt(argv, "-object")
    assert opt(argv, "-device") == [
        "vfio-pci,id=edu0,iommufd=iommufd0,fd=8",
        "vfio-pci,id=m0,sysfsdev=/sys/bus/mdev/devices/u",
    ]
    assert fds.all() == [5, 6, 8]


def test_vfio_iommufd_mdev_names_its_sysfs_path() -> None:
    s = spec(vfio=[{"sysfsdev": "/sys/bus/mdev/devices/u", "id": "m0"}])
    argv = qemu_argv(s, PATHS, FdPlan(qmp_listen=5, iommufd=6, vfio={"m0": 8}))
    assert opt(argv, "-device") == [
        "vfio-pci,id=m0,iommufd=iommufd0,fd=8,sysfsdev=/sys/bus/mdev/devices/u"]


def test_vfio_iommufd_without_fd_is_a_bug() -> None:
    s = spec(vfio=[{"host": "0000:00:03.0"}])
    with pytest.raises(ValueError):
        qemu_argv(s, PATHS, FdPlan(qmp_listen=5))


def test_incoming_argv_replaces_binary_and_previous_incoming() -> None:
    argv = qemu_argv(spec(), PATHS, FdPlan(qmp_listen=7))
    once = incoming_argv(argv, Path("/new/qemu"))
    assert once[0] == "/new/qemu"
    # loaded, then paused until the controller resumes it (the fence)
    assert once[-3:] == ["-S", "-incoming", "defer"]
    twice = incoming_argv(once)
    assert twice == once
    assert twice.count("-incoming") == 1 and twice.count("-S") == 1
    assert twice[1:-3] == argv[1:]


def test_incoming_argv_marks_the_new_process() -> None:
    argv = qemu_argv(spec(), PATHS, FdPlan(qmp_listen=7))
    first = incoming_argv(argv, marker="sealvm-aaaa")
    second = incoming_argv(first, marker="sealvm-bbbb")
    name = second[second.index("-name") + 1]
    assert name == "t,debug-threads=on,process=sealvm-bbbb"
    assert first != second and len(first) == len(second)


def test_commas_in_paths_are_escaped_where_qemu_parses_options() -> None:
    s = spec(guest={"kernel": "/opt/a,b/guest.bin"}, serial_log="/var/log/a,b/serial.log",
             vfio=[{"sysfsdev": "/sys/bus/mdev/devices/x,y", "backend": "legacy"}],
             security={"confine": False})
    argv = qemu_argv(s, RunPaths(Path("/run/a,b/t")), FdPlan(qmp_listen=7))
    assert "file,id=serial0,path=/var/log/a,,b/serial.log,append=on" in opt(argv, "-chardev")
    assert opt(argv, "-device") == ["vfio-pci,id=vfio0,sysfsdev=/sys/bus/mdev/devices/x,,y"]
    assert opt(argv, "-kernel") == ["/opt/a,b/guest.bin"]  # a whole argument: literal
    default = qemu_argv(spec(), RunPaths(Path("/run/a,b/t")), FdPlan(qmp_listen=7))
    assert "file,id=serial0,path=/run/a,,b/t/qemu/serial.log,append=on" in opt(default, "-chardev")


def test_option_value_reads_what_opt_value_wrote() -> None:
    opts = f"file,id=serial0,path={opt_value('/var/log/a,b,,c/serial.log')},append=on"
    assert option_value(opts, "path") == "/var/log/a,b,,c/serial.log"
    assert option_value(opts, "id") == "serial0" and option_value(opts, "append") == "on"
    assert option_value(opts, "size") is None and option_value("file", "file") is None
    argv = qemu_argv(spec(serial_log="/l/a,b.log"), PATHS, FdPlan(qmp_listen=3))
    assert serial_path(argv) == Path("/l/a,b.log")
    assert serial_path(qemu_argv(spec(), PATHS, FdPlan(qmp_listen=3))) == PATHS.serial
    assert serial_path(["qemu", "-chardev", "file,id=other,path=/x"]) is None
