"""The kernel files: where the ``.cu`` sources live, their template types and their self-contained text.

Shared by every way of running a source (CuPy in :mod:`ops.kernel_loader`, host emulation in
:mod:`ops.host_emulation`, the compile checks in :mod:`ops.compile_checks`); imports nothing from
``ops`` but :mod:`ops.validation`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .validation import OpDtypeError

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"

#: torch dtype -> C++ storage type used as the kernels' template argument.
CTYPES: dict[torch.dtype, str] = {
    torch.float32: "float",
    torch.float64: "double",
    torch.float16: "vmm_half",
    torch.bfloat16: "vmm_bfloat16",
}


def ctype_of(dtype: torch.dtype) -> str:
    """The kernels' template argument for ``dtype``; OpDtypeError (a TypeError) for anything but the four
    float types."""
    try:
        return CTYPES[dtype]
    except KeyError:
        supported = ", ".join(str(d) for d in CTYPES)
        raise OpDtypeError(f"CUDA kernels support dtypes {supported}; got {dtype}") from None


def expand_includes(path: Path, _seen: set[Path] | None = None, line_markers: bool = False) -> str:
    """The source of ``path`` with its local ``#include "..."`` lines inlined (once each).

    Inlining makes the text handed to NVRTC self-contained, so CuPy's on-disk cache (keyed by the
    source text) can never serve a module built from an older header. ``line_markers`` adds ``#line``
    directives, so compiler messages and ``__LINE__`` / ``__FILE__`` name the original files (the host
    emulation's error messages use them).
    """
    seen = set() if _seen is None else _seen
    out = [f'#line 1 "{path.name}"'] if line_markers else []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        m = re.match(r'\s*#\s*include\s+"([^"]+)"', line)
        if m:
            inc = (path.parent / m.group(1)).resolve()
            if inc not in seen:
                seen.add(inc)
                out.append(expand_includes(inc, seen, line_markers))
                if line_markers:
                    out.append(f'#line {number + 1} "{path.name}"')
            continue
        if re.match(r"\s*#\s*pragma\s+once\b", line):
            out.append("")  # inlined once already; in the single inlined text it would only draw a warning
            continue
        if re.match(r"\s*#\s*include\s*<", line):
            raise ValueError(f"{path.name}: system includes are not available to NVRTC: {line.strip()!r}")
        out.append(line)
    return "\n".join(out) + "\n"
