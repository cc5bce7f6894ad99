"""
The operator's VM the Linux tests, the demo and the TCP bench run: the Linux
test guest (images/linux-guest) with a virtio-net NIC on a tap in a network
namespace and a virtio-blk raw disk, its workload's settings on the kernel
command line (heartbeat, memory pattern, disk writer).
"""

from __future__ import annotations

from pathlib import Path

from sealvm import VmSpec, spec_from_dict

from .traffic import GUEST_IP, HOST_IP

HB_MS = 20
DISK_SIZE = 4 << 20
CMDLINE = (f"console=ttyS0 loglevel=1 panic=-1 sealvm.ip={GUEST_IP}/24 sealvm.hb_ms={HB_MS} "
           "sealvm.pattern=25% sealvm.disk_ms=10 sealvm.dpass_ms=1500")


def make_disk(path: Path) -> Path:
    """An empty raw image of DISK_SIZE for the guest's disk writer."""
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
    return path


def linux_spec(*, name: str, qemu: Path | str, kernel: Path | str, initrd: Path | str,
               ns: str, image: Path, memory: str = "256M",
               nic: dict[str, object] | None = None) -> VmSpec:
    """The VM: NIC on a tap in namespace *ns* (the host end HOST_IP),
    *image* as its disk (cache=none); *nic*: more of the NIC's spec."""
    return spec_from_dict({
        "name": name, "qemu": str(qemu), "memory": {"size": memory},
        "guest": {"kernel": str(kernel), "initrd": str(initrd), "cmdline": CMDLINE},
        "net": [{"netns": ns, "address": f"{HOST_IP}/24", **(nic or {})}],
        "disk": [{"path": str(image), "cache": "none"}]})
