"""Loading and launching the CUDA kernels in ``ops/kernels``.

One kernel source serves three ways of running it:

* **CuPy** (CUDA tensors): the source is compiled with NVRTC once per (file, dtype, device), cached,
  and launched on the tensor's device and on torch's *current* CUDA stream.
* **Host emulation** (CPU tensors): the same source is compiled by the system C++ compiler with
  ``kernels/host_emulation.h`` force-included, and the grid runs serially on the CPU through ctypes.
  This is how the test suite executes every kernel on machines without a GPU; it is a test
  vehicle, not a fast CPU backend (the pure-PyTorch references are that).
* **nvcc** compile check (tests only): see :func:`nvcc_compile_check`.

Kernels are templates over the storage type (``float``, ``double``, ``vmm_half``, ``vmm_bfloat16``);
sizes and strides are kernel arguments, never formatted into the source, so a new clip size does
not recompile anything.

Argument convention for :meth:`KernelSource.launch`: a ``torch.Tensor`` is passed as a pointer to
its first element (the kernel receives strides separately, or the caller makes it contiguous), a
Python ``int`` as ``long long`` (``vmm_i64``), a Python ``float`` as ``double``; ``numpy.float32`` /
``numpy.int32`` scalars are passed as ``float`` / ``int``.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
EMULATION_HEADER = KERNEL_DIR / "host_emulation.h"

#: torch dtype -> C++ storage type used as the kernels' template argument.
CTYPES: dict[torch.dtype, str] = {
    torch.float32: "float",
    torch.float64: "double",
    torch.float16: "vmm_half",
    torch.bfloat16: "vmm_bfloat16",
}

DEFAULT_THREADS = 256
# Enough blocks to fill any current GPU several times over; grid-stride loops cover the rest.
MAX_BLOCKS = 65535

_REGISTRY: dict[str, KernelSource] = {}
_lock = threading.Lock()


def ctype_of(dtype: torch.dtype) -> str:
    """The kernels' template argument for ``dtype``; TypeError for anything but the four float types."""
    try:
        return CTYPES[dtype]
    except KeyError:
        supported = ", ".join(str(d) for d in CTYPES)
        raise TypeError(f"CUDA kernels support dtypes {supported}; got {dtype}") from None


def expand_includes(path: Path, _seen: set[Path] | None = None) -> str:
    """The source of ``path`` with its local ``#include "..."`` lines inlined (once each).

    Inlining makes the text handed to NVRTC self-contained, so CuPy's on-disk cache (keyed by the
    source text) can never serve a module built from an older header.
    """
    seen = set() if _seen is None else _seen
    out = []
    for line in path.read_text().splitlines():
        m = re.match(r'\s*#\s*include\s+"([^"]+)"', line)
        if m:
            inc = (path.parent / m.group(1)).resolve()
            if inc not in seen:
                seen.add(inc)
                out.append(expand_includes(inc, seen))
            continue
        if re.match(r"\s*#\s*include\s*<", line):
            raise ValueError(f"{path.name}: system includes are not available to NVRTC: {line.strip()!r}")
        out.append(line)
    return "\n".join(out) + "\n"


def grid_for(numel: int, threads: int = DEFAULT_THREADS) -> tuple[int, int, int]:
    """A 1-D grid for a grid-stride loop over ``numel`` items (at least one block)."""
    blocks = max(1, min(MAX_BLOCKS, -(-int(numel) // threads)))
    return (blocks, 1, 1)


@dataclass(frozen=True)
class KernelSource:
    """A ``.cu`` file in ``ops/kernels`` and the kernel templates it defines.

    Every kernel is instantiated for each of the four storage types; creating a KernelSource
    registers it so the test suite can compile-check every file.
    """

    filename: str
    kernels: tuple[str, ...]

    def __post_init__(self) -> None:
        if not (KERNEL_DIR / self.filename).is_file():
            raise FileNotFoundError(f"kernel source {KERNEL_DIR / self.filename} does not exist")
        _REGISTRY[self.filename] = self

    @property
    def path(self) -> Path:
        return KERNEL_DIR / self.filename

    def name_expressions(self, ctype: str) -> list[str]:
        return [f"{k}<{ctype}>" for k in self.kernels]

    def launch(
        self,
        kernel: str,
        args: Sequence[object],
        *,
        dtype: torch.dtype,
        numel: int | None = None,
        grid: tuple[int, int, int] | None = None,
        block: tuple[int, int, int] = (DEFAULT_THREADS, 1, 1),
    ) -> None:
        """Launch ``kernel<ctype_of(dtype)>`` with ``args``.

        The tensors in ``args`` pick the path: CUDA tensors launch through CuPy on their device and
        torch's current stream, CPU tensors run through host emulation. Give ``numel`` for a
        grid-stride 1-D launch, or an explicit ``grid``.
        """
        if kernel not in self.kernels:
            raise ValueError(f"{self.filename} has no kernel {kernel!r}; it defines {self.kernels}")
        if grid is None:
            if numel is None:
                raise ValueError("launch needs numel (for a grid-stride grid) or an explicit grid")
            if numel == 0:
                return
            grid = grid_for(numel, block[0] * block[1] * block[2])
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not tensors:
            raise ValueError("launch needs at least one tensor argument to choose the device")
        device = tensors[0].device
        for t in tensors:
            if t.device != device:
                raise ValueError(f"kernel {kernel}: tensor arguments on {device} and {t.device}")
        ctype = ctype_of(dtype)
        if device.type == "cuda":
            _launch_cupy(self, kernel, ctype, device, grid, block, args)
        elif device.type == "cpu":
            _launch_emulated(self, kernel, ctype, grid, block, args)
        else:
            raise ValueError(f"kernel {kernel}: tensors on {device}; CUDA kernels run on cuda (or cpu, emulated)")


#: The ``backend`` argument every op takes (DESIGN.md).
BACKENDS: tuple[str, ...] = ("auto", "torch", "cupy")


def check_backend(backend: object) -> str:
    """``backend`` itself when it is one of :data:`BACKENDS`, else ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend  # type: ignore[return-value]


def use_kernels(backend: str, t: torch.Tensor) -> bool:
    """Whether an op called with ``backend`` runs the CUDA kernels for tensors like ``t``: "torch" never,
    "auto" for CUDA tensors when CuPy imports, "cupy" always (a clear error when it cannot)."""
    backend = check_backend(backend)
    if backend == "torch":
        return False
    if backend == "auto":
        return t.device.type == "cuda" and cupy_available()
    if t.device.type != "cuda":
        raise ValueError(f"backend 'cupy' needs CUDA tensors, got tensors on {t.device}")
    if not cupy_available():
        raise RuntimeError("backend 'cupy' needs CuPy: pip install 'video-motion-modules[cuda12]' (or [cuda13])")
    return True


def registered_sources() -> dict[str, KernelSource]:
    """Every KernelSource created so far, by file name (import ``ops`` first to register all)."""
    return dict(_REGISTRY)


# ----------------------------------------------------------------------------------------- CuPy

_cupy_modules: dict[tuple[str, str, int], object] = {}
_cupy_kernels: dict[tuple[str, str, str, int], object] = {}
_cupy_streams: dict[tuple[int, int], object] = {}


def cupy_available() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def _cupy_function(src: KernelSource, kernel: str, ctype: str, device_index: int):
    """The compiled kernel for (file, kernel, dtype, device), cached: CuPy's RawModule.get_function
    builds a new RawKernel object on every call, which would cost every launch."""
    key = (src.filename, kernel, ctype, device_index)
    fn = _cupy_kernels.get(key)
    if fn is not None:
        return fn
    import cupy

    with _lock:
        mkey = (src.filename, ctype, device_index)
        module = _cupy_modules.get(mkey)
        with cupy.cuda.Device(device_index):
            if module is None:
                module = cupy.RawModule(
                    code=expand_includes(src.path),
                    options=("-std=c++17",),
                    name_expressions=src.name_expressions(ctype),
                )
                module.compile()
                _cupy_modules[mkey] = module
            fn = module.get_function(f"{kernel}<{ctype}>")
        _cupy_kernels[key] = fn
    return fn


def _cupy_stream(handle: int, device_index: int):
    """A CuPy view of torch's stream ``handle`` (cached; ExternalStream does not own the stream)."""
    key = (handle, device_index)
    stream = _cupy_streams.get(key)
    if stream is None:
        import cupy

        stream = cupy.cuda.ExternalStream(handle, device_index)
        _cupy_streams[key] = stream
    return stream


def _cupy_args(args: Sequence[object]) -> list[object]:
    out: list[object] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(np.uint64(a.data_ptr()))
        elif isinstance(a, bool):
            raise TypeError("pass flags to kernels as int, not bool")
        elif isinstance(a, int):
            out.append(np.int64(a))
        elif isinstance(a, float):
            out.append(np.float64(a))
        elif isinstance(a, (np.float32, np.float64, np.int32, np.int64)):
            out.append(a)
        else:
            raise TypeError(f"unsupported kernel argument type {type(a).__name__}")
    return out


def _launch_cupy(src, kernel, ctype, device, grid, block, args) -> None:
    try:
        import cupy
    except Exception as exc:
        raise RuntimeError(
            "backend 'cupy' needs CuPy: pip install 'video-motion-modules[cuda12]' (or [cuda13])"
        ) from exc
    index = device.index if device.index is not None else torch.cuda.current_device()
    fn = _cupy_function(src, kernel, ctype, index)
    # RawKernel resolves its compiled function for the *current* device, so the device context is
    # needed as well as the stream.
    with cupy.cuda.Device(index), _cupy_stream(torch.cuda.current_stream(index).cuda_stream, index):
        fn(tuple(grid), tuple(block), tuple(_cupy_args(args)))


# ------------------------------------------------------------------------------ host emulation

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


def _emulation_wrapper(src: KernelSource, ctype: str) -> str:
    lines = [expand_includes(src.path)]
    for k in src.kernels:
        lines.append(
            f'extern "C" void vmm_emu_{k}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, '
            f"unsigned bz, void** args) {{ vmm_emulation::launch(&{k}<{ctype}>, dim3(gx, gy, gz), "
            f"dim3(bx, by, bz), args); }}"
        )
    return "\n".join(lines) + "\n"


def emulated_library(src: KernelSource, ctype: str) -> ctypes.CDLL:
    """Compile (once, cached on disk by content hash) and load ``src`` for host emulation."""
    key = (src.filename, ctype)
    lib = _emulated_libs.get(key)
    if lib is not None:
        return lib
    with _lock:
        lib = _emulated_libs.get(key)
        if lib is not None:
            return lib
        cxx = host_compiler()
        if cxx is None:
            raise RuntimeError("host emulation of CUDA kernels needs a C++ compiler (set CXX or install g++)")
        code = _emulation_wrapper(src, ctype)
        flags = ["-std=c++17", "-O2", "-shared", "-fPIC", "-include", str(EMULATION_HEADER)]
        digest = hashlib.sha256(
            "\0".join([code, EMULATION_HEADER.read_text(), cxx, *flags]).encode()
        ).hexdigest()[:20]
        out = _cache_dir() / f"{src.path.stem}_{ctype}_{digest}.so"
        if not out.exists():
            with tempfile.TemporaryDirectory() as tmp:
                cpp = Path(tmp) / f"{src.path.stem}_{ctype}.cpp"
                cpp.write_text(code)
                so = Path(tmp) / "out.so"
                proc = subprocess.run([cxx, *flags, str(cpp), "-o", str(so)], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"host emulation compile of {src.filename} ({ctype}) failed:\n{proc.stderr}")
                os.replace(so, out)  # atomic: a concurrent reader never sees half a library
        lib = ctypes.CDLL(str(out))
        _emulated_libs[key] = lib
        return lib


def _ctypes_arg(a: object) -> ctypes._SimpleCData:
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


def _launch_emulated(src, kernel, ctype, grid, block, args) -> None:
    lib = emulated_library(src, ctype)
    values = [_ctypes_arg(a) for a in args]
    ptrs = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
    getattr(lib, f"vmm_emu_{kernel}")(*(ctypes.c_uint(int(v)) for v in (*grid, *block)), ptrs)


# ----------------------------------------------------------------------------- nvcc compile check


def nvcc_compile_check(src: KernelSource, archs: Sequence[str] = ("sm_80", "sm_90")) -> str:
    """Compile every instantiation of ``src`` with nvcc for ``archs``; return nvcc's resource report.

    Raises RuntimeError with nvcc's output on failure. Taking each instantiation's address in host
    code forces nvcc to generate its device code for every architecture.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found on PATH")
    body = [expand_includes(src.path)]
    for ctype in CTYPES.values():
        addrs = ", ".join(f"(const void*)&{e}" for e in src.name_expressions(ctype))
        body.append(f"const void* const vmm_instances_{ctype}[] = {{{addrs}}};")
    gencode = []
    for arch in archs:
        num = arch.removeprefix("sm_")
        gencode += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    with tempfile.TemporaryDirectory() as tmp:
        cu = Path(tmp) / src.filename
        cu.write_text("\n".join(body) + "\n")
        cmd = [nvcc, "-std=c++17", "-Xptxas", "-v", *gencode, "-c", str(cu), "-o", str(Path(tmp) / "out.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed for {src.filename}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


# ---------------------------------------------------------------------------- NVRTC compile check


def _find_nvrtc() -> str | None:
    """Path of libnvrtc: $VMM_NVRTC, the nvidia-cuda-nvrtc wheel, or the CUDA toolkit's."""
    env = os.environ.get("VMM_NVRTC")
    if env:
        return env
    candidates: list[Path] = []
    try:
        import nvidia.cuda_nvrtc as wheel  # the nvidia-cuda-nvrtc-cu12 package (a namespace package)

        for base in wheel.__path__:
            candidates += sorted((Path(base) / "lib").glob("libnvrtc.so*"))
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates += sorted((Path(home) / "lib64").glob("libnvrtc.so*"))
    for c in candidates:
        if "alt" not in c.name and "builtins" not in c.name:
            return str(c)
    return None


def nvrtc_compile_check(src: KernelSource, arch: str = "compute_80") -> dict[str, str]:
    """Compile ``src`` with NVRTC exactly as the CuPy path hands it over (inlined includes,
    ``-std=c++17``, one name expression per kernel and dtype); no GPU needed.

    Returns {name expression: lowered (mangled) name}; RuntimeError with NVRTC's log on failure.
    """
    path = _find_nvrtc()
    if path is None:
        raise RuntimeError("libnvrtc not found (pip install nvidia-cuda-nvrtc-cu12, or set VMM_NVRTC)")
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"NVRTC {what} failed: {lib.nvrtcGetErrorString(status).decode()}")

    code = expand_includes(src.path).encode()
    exprs = [e for ctype in CTYPES.values() for e in src.name_expressions(ctype)]
    prog = ctypes.c_void_p()
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), code, src.filename.encode(), 0, None, None), "create")
    try:
        for e in exprs:
            check(lib.nvrtcAddNameExpression(prog, e.encode()), f"add name expression {e}")
        opts = [b"-std=c++17", f"--gpu-architecture={arch}".encode()]
        status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if status != 0:
            raise RuntimeError(f"NVRTC failed for {src.filename}:\n{log.value.decode(errors='replace')}")
        lowered = {}
        for e in exprs:
            name = ctypes.c_char_p()
            check(lib.nvrtcGetLoweredName(prog, e.encode(), ctypes.byref(name)), f"lowered name of {e}")
            lowered[e] = name.value.decode()
        return lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
