"""
nested.harness.iommufd's cffi struct layouts against the 7.2 uapi headers.

The C compiler computes sizeof/offsetof of every struct and (nested) field
the bindings declare, from the headers the L1 kernel build installed from
the pinned source (scripts/build-kernel: ``make headers_install`` plus
drivers/iommu/iommufd/iommufd_test.h, kept in the cache entry beside
``$SEALVM_HOST_KERNEL``: include/linux/iommufd.h, include/iommufd_test.h);
cffi must agree on each.  The headers and the compiler come with the kernel
build, so their absence is a failure, never a skip.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import iommufd

pytestmark = pytest.mark.nested


def fields(ctype: Any, prefix: str = "") -> Iterator[tuple[str, int, int]]:
    """(dotted path, offset, size) of every field, recursing into structs."""
    for name, f in ctype.fields:
        path = f"{prefix}{name}"
        yield path, f.offset, iommufd.ffi.sizeof(f.type)
        if f.type.kind == "struct":
            for sub, off, size in fields(f.type, path + "."):
                yield sub, f.offset + off, size


def layout_table() -> list[tuple[str, str, int]]:
    """(C expression, struct, cffi value) for every size and offset."""
    rows = []
    for struct, size in iommufd.HEADER_SIZES.items():
        assert iommufd.ffi.sizeof(struct) == size
        rows.append((f"sizeof({struct})", struct, size))
        for path, off, fsize in fields(iommufd.ffi.typeof(struct)):
            rows.append((f"offsetof({struct}, {path})", struct, off))
            rows.append((f"sizeof((({struct} *)0)->{path})", struct, fsize))
    return rows


def test_layouts_match_the_uapi_headers(host_kernel: Path, tmp_path: Path) -> None:
    include = host_kernel.parent / "include"
    missing = [str(include / h) for h in ("linux/iommufd.h", "iommufd_test.h")
               if not (include / h).is_file()]
    assert not missing, (f"the L1 kernel's cache entry lacks the uapi headers {missing}: "
                         "scripts/build-kernel installs them with every kernel it builds")
    assert shutil.which("gcc"), "no gcc: the kernel build needs it, so does this check"
    rows = layout_table()
    src = tmp_path / "layout.c"
    body = "\n".join(f'    printf("%zu\\n", (size_t)({expr}));' for expr, _, _ in rows)
    src.write_text(
        "#include <stddef.h>\n#include <stdio.h>\n#include <linux/iommufd.h>\n"
        '#include "iommufd_test.h"\n'
        f"int main(void)\n{{\n{body}\n    return 0;\n}}\n")
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-std=gnu11", "-I", str(include), "-o", str(exe), str(src)],
                   check=True, capture_output=True, text=True)
    values = [int(v) for v in subprocess.run([str(exe)], check=True, capture_output=True,
                                             text=True).stdout.split()]
    assert len(values) == len(rows)
    wrong = [f"{expr}: header {c}, cffi {py}"
             for (expr, _, py), c in zip(rows, values, strict=True) if c != py]
    assert not wrong, "\n".join(wrong)
    assert len(rows) > 100  # every field of every struct, not just the sizes


def test_ioctl_numbers() -> None:
    """_IO(';', nr) as in iommufd.h / iommufd_test.h."""
    assert iommufd.IOMMU_IOAS_MAP_FILE == 0x3B8F
    assert iommufd.IOMMU_IOAS_CHANGE_PROCESS == 0x3B92
    assert iommufd.IOMMU_TEST_CMD == 0x3BA0
