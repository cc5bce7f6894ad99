"""
Inside L1: iommufd's CHANGE_PROCESS across a real exec(), on IOMMUFD_TEST.

Stage 1 (fresh process):
  - /dev/iommu, an IOAS with a mock domain (a mock device: mappings pinned);
  - a sealed memfd (GROW|SHRINK|SEAL) filled with a pattern, IOMMU_IOAS_MAP_FILE;
  - the mock domain maps the memfd's pages; resize is refused (EPERM);
  - a second iommufd context with a mapping by vaddr: CHANGE_PROCESS EINVAL;
  - an emulated-device access pins part of the file mapping;
  - exec() the same script, keeping iommufd, memfd and access fds.

Stage 2 (after exec, same pid, new mm):
  - CHANGE_PROCESS succeeds on the by-file context, fails (EINVAL) on the
    vaddr one;
  - the pin taken before exec still reads the pattern (ACCESS_RW);
  - a new access pins the range (ACCESS_PAGES checks the pinned pages are
    the memfd's pages behind a fresh mmap) and writes through it;
  - the write is visible through the memfd; resize still EPERM;
  - teardown: unmap, destroy, a fresh /dev/iommu still opens.

Writes results/iommufd.json (see l1_lib.Checks).
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import sys
from typing import Any

from sealvm import procfs

from .harness import iommufd as iofd
from .l1_lib import Check, Checks

SIZE = 2 << 20
PIN = 64 << 10
SEALS = procfs.F_SEAL_GROW | procfs.F_SEAL_SHRINK | procfs.F_SEAL_SEAL


def pattern(gen: int, size: int = SIZE) -> bytes:
    word = gen.to_bytes(4, "little")
    return b"".join(word + i.to_bytes(4, "little") for i in range(size // 8))


def errname(err: int) -> str:
    """errno as a name; 0 is "success"."""
    return errno.errorcode.get(err, str(err)) if err else "success"


def errno_of(fn: Any, *args: Any) -> int:
    """The errno *fn* fails with, 0 when it succeeds."""
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno or -1
    return 0


def expect(checks: Checks, name: str, err: int, fn: Any, *args: Any) -> bool:
    """Check that *fn* fails with *err*: the errno it returned is the evidence."""
    got = errno_of(fn, *args)
    return checks.check(name, got == err, f"expected {errname(err)}, got {errname(got)}")


def succeeded(checks: Checks, name: str, err: int, detail: object = "") -> bool:
    """Check a raw ioctl's errno (the triad's ``_name()`` result) is 0."""
    return checks.check(name, err == 0, f"{errname(err)} {detail}".strip())


def resize_refused(checks: Checks, mfd: int, when: str) -> None:
    expect(checks, f"{when}: ftruncate shrink of the mapped sealed memfd", errno.EPERM,
           os.ftruncate, mfd, SIZE // 2)
    expect(checks, f"{when}: ftruncate grow of the mapped sealed memfd", errno.EPERM,
           os.ftruncate, mfd, SIZE * 2)


def stage1(checks: Checks) -> None:
    fd = iofd.open_iommufd()
    ioas = iofd.ioas_alloc(fd)
    md, err = iofd._mock_domain(fd, ioas)
    if not succeeded(checks, "mock domain attached", err, md) or md is None:
        return

    mfd = os.memfd_create("sealvm-iommufd-test", os.MFD_ALLOW_SEALING)
    os.ftruncate(mfd, SIZE)
    with mmap.mmap(mfd, SIZE) as m:
        m[:] = pattern(1)
    fcntl.fcntl(mfd, fcntl.F_ADD_SEALS, SEALS)
    checks.check("memfd sealed", procfs.get_seals(mfd) == SEALS,
                 "|".join(procfs.seal_names(procfs.get_seals(mfd))))

    iova, err = iofd._ioas_map_file(fd, ioas, mfd, 0, SIZE)
    if not succeeded(checks, "IOMMU_IOAS_MAP_FILE", err, f"iova {iova:#x}"):
        return
    with mmap.mmap(mfd, SIZE) as m:
        err = iofd._md_check_map(fd, md.hwpt_id, iova, m)
    succeeded(checks, "mock domain maps the memfd's pages (MD_CHECK_MAP)", err)
    resize_refused(checks, mfd, "before exec")

    # A second context mapped by vaddr: it cannot change process.
    vfd = iofd.open_iommufd()
    vioas = iofd.ioas_alloc(vfd)
    iofd.mock_domain(vfd, vioas)
    anon = mmap.mmap(-1, SIZE)
    anon[:] = pattern(7)
    viova = iofd.ioas_map(vfd, vioas, anon)
    expect(checks, "before exec: CHANGE_PROCESS with a vaddr mapping", errno.EINVAL,
           iofd.ioas_change_process, vfd)
    succeeded(checks, "before exec: CHANGE_PROCESS in the same process (by file)",
              iofd._ioas_change_process(fd), "(a no-op)")

    afd = iofd.create_access(fd, ioas)
    pages, err = iofd._access_pages(fd, afd, iova, PIN)
    if not succeeded(checks, "access pins the file mapping before exec", err,
                     f"pages id {pages}"):
        return

    state = {"fd": fd, "ioas": ioas, "hwpt": md.hwpt_id, "stdev": md.stdev_id, "mfd": mfd,
             "iova": iova, "vfd": vfd, "vioas": vioas, "viova": viova, "afd": afd, "pages": pages,
             "pid": os.getpid(), "checks": [c.__dict__ for c in checks.checks]}
    for keep in (fd, mfd, vfd, afd):
        os.set_inheritable(keep, True)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", __spec__.name, "--after-exec",
                              json.dumps(state)])


def stage2(checks: Checks, state: dict[str, Any]) -> None:
    fd, ioas, iova, mfd = state["fd"], state["ioas"], state["iova"], state["mfd"]
    vfd, afd = state["vfd"], state["afd"]
    checks.check("same pid after exec", os.getpid() == state["pid"],
                 f"{state['pid']} -> {os.getpid()}")
    succeeded(checks, "after exec: IOMMU_IOAS_CHANGE_PROCESS (by file)",
              iofd._ioas_change_process(fd))
    expect(checks, "after exec: CHANGE_PROCESS with a vaddr mapping", errno.EINVAL,
           iofd.ioas_change_process, vfd)

    data = iofd.access_read(fd, afd, iova, PIN)
    checks.check("after exec: pin taken before exec reads the pattern (ACCESS_RW)",
                 data == pattern(1)[:PIN])

    afd2 = iofd.create_access(fd, ioas)
    with mmap.mmap(mfd, SIZE) as m:
        pages2, err = iofd._access_pages(fd, afd2, iova, SIZE, m)
        if not succeeded(checks,
                         "after exec: new access pins the memfd's own pages (ACCESS_PAGES)",
                         err, f"pages id {pages2}"):
            return
        succeeded(checks, "after exec: mock domain still maps the memfd's pages",
                  iofd._md_check_map(fd, state["hwpt"], iova, m))
        new = pattern(2, PIN)
        iofd.access_write(fd, afd2, iova + PIN, new)
        checks.check("after exec: write through the access lands in the memfd",
                     m[PIN:2 * PIN] == new)
        checks.check("after exec: rest of the memfd untouched",
                     m[:PIN] == pattern(1)[:PIN] and m[2 * PIN:] == pattern(1)[2 * PIN:])
        iofd.destroy_access_pages(fd, afd2, pages2)
    resize_refused(checks, mfd, "after exec")

    # Observed, not required: what a vaddr mapping does for an access now.
    vafd = iofd.create_access(vfd, state["vioas"])
    vbuf = bytearray(4096)
    err = iofd._access_rw(vfd, vafd, state["viova"], vbuf)
    checks.figures["vaddr_access_rw_after_exec"] = errno.errorcode.get(err, "ok")
    os.close(vafd)

    iofd.destroy_access_pages(fd, afd, state["pages"])
    os.close(afd)
    os.close(afd2)
    unmapped = iofd.ioas_unmap(fd, ioas, iova, SIZE)
    checks.check("unmap returns the whole mapping", unmapped == SIZE, unmapped)
    iofd.destroy(fd, state["stdev"])  # the mock device first: it holds the IOAS
    iofd.destroy(fd, ioas)
    for f in (fd, vfd, mfd):
        os.close(f)
    # A fresh context works: open, allocate an IOAS, destroy it.
    probe = iofd.open_iommufd()
    try:
        pioas, err = iofd._ioas_alloc(probe)
        derr = iofd._destroy(probe, pioas) if err == 0 else err
    finally:
        os.close(probe)
    succeeded(checks, "teardown: /dev/iommu reopens, a new IOAS allocates and goes",
              err or derr, f"ioas {pioas}")


def main() -> int:
    checks = Checks("iommufd")

    def body() -> None:
        if len(sys.argv) == 3 and sys.argv[1] == "--after-exec":
            state = json.loads(sys.argv[2])
            checks.checks = [Check(**c) for c in state["checks"]]
            stage2(checks, state)
        else:
            stage1(checks)  # execs on success

    return checks.finish(body)


if __name__ == "__main__":
    sys.exit(main())
