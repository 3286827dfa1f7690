"""Host emulation of the CUDA kernels (test support, not a runtime path).

The same ``.cu`` source the GPU runs is compiled by the system C++ compiler with
``ops/kernels/host_emulation.h`` force-included (it maps ``__global__``, ``blockIdx``/``threadIdx``,
``atomicAdd`` and the 16-bit types to host code), and the grid runs on the CPU through ctypes: blocks
one after another, the threads of a block as cooperative fibers that switch at ``__syncthreads`` and
at the warp operations (shuffles, votes, ``__syncwarp``), so kernels that use ``__shared__`` memory
(fixed-size, or dynamic through ``VMM_DYNAMIC_SHARED``), barriers and warp shuffles run as written.
Divergent synchronisation raises :class:`EmulatedKernelError`; ``VMM_EMULATION_ORDER`` = ``forward`` |
``reverse`` | ``shuffle`` | ``warps`` | ``warps_reverse`` changes the order threads run between
synchronisation points, which exposes races (tests run the cooperative kernels under several).
This is how the test suite checks every kernel against the pure-PyTorch references, values
and float64 gradchecks included, on machines without a GPU. It is slow (tiny shapes only) and is not
a CPU backend: the references are that.

**Running an op's kernels on the CPU** (docs/architecture.md §6): inside
:func:`kernel_host_emulation` the ops and modules accept a fourth backend, ``"emulated"``, which
runs their kernel path (the same custom ops and launches as ``"cupy"``) on CPU tensors::

    import ops

    with ops.kernel_host_emulation():
        out = ops.tvl1_flow(i0, i1, 10, backend="emulated")           # the fused TV-L1 kernels
        attn = ops.deform_correlation(q, k, offset, backend="emulated")  # SIFA's kernels
        block = ops.SIFA(64, backend="emulated")                      # modules too

Outside the context ``backend="emulated"`` raises :class:`~ops.validation.BackendError`, so a user
cannot select it by accident (a module built with it inside the context refuses to run outside).
The context nests and is process-wide (not per thread). Compiled libraries are cached on disk under
``$VMM_CACHE/emulation`` (default ``~/.cache/vmm/emulation``), keyed by a hash of the source.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

# kernel_host_emulation and host_emulation_enabled live in ops.backends (which decides what runs);
# they stay importable from here, where the emulation they enable is.
from .backends import host_emulation_enabled, kernel_host_emulation  # noqa: F401
from .kernel_files import KERNEL_DIR, expand_includes
from .validation import BackendUnavailableError

if TYPE_CHECKING:  # annotations only: ops.kernel_loader imports this module to run CPU launches
    from .kernel_loader import KernelSource

EMULATION_HEADER = KERNEL_DIR / "host_emulation.h"

_lock = threading.Lock()  # guards the compile-and-load of a library
_launch_lock = threading.Lock()  # one emulated launch at a time (the scheduler state is global)


class EmulatedKernelError(RuntimeError):
    """An emulated launch found a kernel error a GPU would not report: divergent ``__syncthreads`` or warp
    operation, a shuffle from a lane outside the mask, a failed ``VMM_EMU_CHECK`` (e.g. a misaligned
    vector load), a write outside the launch's dynamic shared memory, a block of more than 1024 threads, a
    grid with a zero dimension."""


_emulated_libs: dict[tuple[str, str], ctypes.CDLL] = {}


def host_compiler() -> str | None:
    """The C++ compiler used for host emulation ($CXX, else c++/g++/clang++), or None."""
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return cand
    return None


def _cache_dir() -> Path:
    base = os.environ.get("VMM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vmm")
    path = Path(base) / "emulation"
    path.mkdir(parents=True, exist_ok=True)
    return path


_BOUNDS_MARKER = "vmm_launch_bounds_marker"


def launch_bounds(source: str, cxx: str) -> dict[str, str]:
    """Each kernel's ``__launch_bounds__`` maximum-threads expression in ``source`` (the kernel source with
    its includes inlined), macros expanded: the preprocessor runs with the emulation header defining the
    attribute as a marker, so kernels whose declarations come from macros are found too."""
    with tempfile.TemporaryDirectory() as tmp:
        cpp = Path(tmp) / "bounds.cpp"
        cpp.write_text(source, encoding="utf-8")
        cmd = [cxx, "-std=c++17", "-E", "-P", "-DVMM_EMULATION_MARK_LAUNCH_BOUNDS", "-include", str(EMULATION_HEADER)]
        proc = subprocess.run(
            [*cmd, str(cpp)], capture_output=True, text=True, encoding="utf-8", errors="replace", check=False
        )
    if proc.returncode != 0:
        raise RuntimeError(f"host emulation: preprocessing for launch bounds failed:\n{proc.stderr}")
    text, bounds, pos = proc.stdout, {}, 0
    while (start := text.find(_BOUNDS_MARKER + "(", pos)) >= 0:
        i = start + len(_BOUNDS_MARKER) + 1
        depth, args, current = 1, [], []
        while depth:
            ch = text[i]
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            if depth == 1 and ch == ",":
                args.append("".join(current))
                current = []
            elif depth:
                current.append(ch)
            i += 1
        args.append("".join(current))
        name = re.match(r"\s*(\w+)\s*\(", text[i:])
        if name:
            bounds[name.group(1)] = args[0].strip()
        pos = i
    return bounds


# Part of the library's cache key: a change of the wrapper's C signature must not load an older library.
_WRAPPER_ABI = "launch(grid, block, shared bytes, args)"


def _emulation_wrapper(src: KernelSource, ctype: str, bounds: dict[str, str]) -> str:
    lines = [expand_includes(src.path, line_markers=True), '#line 1 "vmm-emulation-wrapper"']
    for k in src.kernels:
        lines.append(
            f'extern "C" int vmm_emu_{k}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, '
            f"unsigned bz, unsigned long long shared, void** args) {{ return vmm_emulation::launch("
            f"&{k}<{ctype}>, dim3(gx, gy, gz), dim3(bx, by, bz), shared, args); }}"
        )
        # The bound as the compiler evaluates it (0: the kernel declares none; CUDA's 1024 applies).
        lines.append(f'extern "C" long long vmm_emu_bound_{k}() {{ return (long long)({bounds.get(k, "0")}); }}')
    lines.append('extern "C" const char* vmm_emu_last_error() { return vmm_emulation::sched.error; }')
    return "\n".join(lines) + "\n"


def fma_requested() -> bool:
    """Whether ``VMM_EMULATION_FMA=1``: build the emulation with fused multiply-add contraction, as nvcc and
    NVRTC contract ``a * b + c`` by default, so results round as they do on a GPU."""
    return os.environ.get("VMM_EMULATION_FMA", "").strip() == "1"


def host_has_fma() -> bool:
    """Whether this CPU executes FMA instructions (x86-64's 'fma' flag; aarch64 always has them)."""
    import platform

    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return any(line.startswith("flags") and " fma " in f"{line} " for line in fh)
    except OSError:
        return False


def emulated_library(src: KernelSource, ctype: str) -> ctypes.CDLL:
    """Compile (once, cached on disk by content hash) and load ``src`` for host emulation."""
    fma = fma_requested()
    key = (src.filename, ctype, fma)
    lib = _emulated_libs.get(key)
    if lib is not None:
        return lib
    with _lock:
        lib = _emulated_libs.get(key)
        if lib is not None:
            return lib
        cxx = host_compiler()
        if cxx is None:
            raise BackendUnavailableError(
                "host emulation of CUDA kernels needs a C++ compiler (set CXX or install g++)"
            )
        # -U_FORTIFY_SOURCE: the fibers switch stacks with _longjmp, which glibc's fortified build refuses.
        flags = ["-std=c++17", "-O2", "-U_FORTIFY_SOURCE", "-shared", "-fPIC", "-include", str(EMULATION_HEADER)]
        if fma:
            if not host_has_fma():
                raise BackendUnavailableError("VMM_EMULATION_FMA=1 needs a CPU with FMA instructions")
            # GCC contracts a * b + c only within one expression by default; nvcc wherever it can.
            flags += ["-mfma", "-ffp-contract=fast"]
        header = EMULATION_HEADER.read_text(encoding="utf-8")
        source = expand_includes(src.path)
        parts = [source, header, cxx, ctype, _WRAPPER_ABI, *flags]
        digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]
        out = _cache_dir() / f"{src.path.stem}_{ctype}_{digest}.so"
        if not out.exists():
            code = _emulation_wrapper(src, ctype, launch_bounds(source, cxx))
            with tempfile.TemporaryDirectory() as tmp:
                cpp = Path(tmp) / f"{src.path.stem}_{ctype}.cpp"
                cpp.write_text(code, encoding="utf-8")
                so = Path(tmp) / "out.so"
                proc = subprocess.run(
                    [cxx, *flags, str(cpp), "-o", str(so)],
                    capture_output=True,
                    text=True,
                    encoding="utf-8",
                    errors="replace",
                )
                if proc.returncode != 0:
                    raise RuntimeError(f"host emulation compile of {src.filename} ({ctype}) failed:\n{proc.stderr}")
                os.replace(so, out)  # atomic: a concurrent reader never sees half a library
        lib = ctypes.CDLL(str(out))
        _emulated_libs[key] = lib
        return lib


def ctypes_arg(a: object) -> ctypes._SimpleCData:
    """One kernel argument as ctypes passes it (the convention of :meth:`KernelSource.launch`)."""
    if isinstance(a, torch.Tensor):
        return ctypes.c_void_p(a.data_ptr())
    if isinstance(a, bool):
        raise TypeError("pass flags to kernels as int, not bool")
    if isinstance(a, (int, np.int64)):
        return ctypes.c_longlong(int(a))
    if isinstance(a, (float, np.float64)):
        return ctypes.c_double(float(a))
    if isinstance(a, np.float32):
        return ctypes.c_float(float(a))
    if isinstance(a, np.int32):
        return ctypes.c_int(int(a))
    raise TypeError(f"unsupported kernel argument type {type(a).__name__}")


def launch_emulated(
    src: KernelSource,
    kernel: str,
    ctype: str,
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    args: Sequence[object],
    shared_mem: int = 0,
) -> None:
    """Run ``kernel<ctype>`` of ``src`` over ``grid`` × ``block`` serially on the CPU (CPU tensors in
    ``args``), each block with ``shared_mem`` bytes of dynamic shared memory (poisoned and guarded: see
    host_emulation.h); called by :meth:`KernelSource.launch`."""
    lib = emulated_library(src, ctype)
    values = [ctypes_arg(a) for a in args]
    ptrs = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
    fn = getattr(lib, f"vmm_emu_{kernel}")
    fn.restype = ctypes.c_int
    bound_fn = getattr(lib, f"vmm_emu_bound_{kernel}")
    bound_fn.restype = ctypes.c_longlong
    bound = int(bound_fn())
    if bound:
        threads = int(block[0]) * int(block[1]) * int(block[2])
        if threads > bound:
            raise EmulatedKernelError(
                f"{src.filename}: {kernel}<{ctype}>: a block of {threads} threads exceeds its "
                f"__launch_bounds__({bound}); a GPU refuses this launch"
            )
    # The emulator's scheduler and the kernels' thread indices are process globals of the library.
    with _launch_lock:
        failed = fn(*(ctypes.c_uint(int(v)) for v in (*grid, *block)), ctypes.c_ulonglong(int(shared_mem)), ptrs)
        if failed:
            get_error = lib.vmm_emu_last_error
            get_error.restype = ctypes.c_char_p
            message = get_error().decode(errors="replace")
    if failed:
        where = f"{src.filename}: {kernel}<{ctype}> grid {tuple(grid)} block {tuple(block)}"
        raise EmulatedKernelError(f"{where}: {message}")
