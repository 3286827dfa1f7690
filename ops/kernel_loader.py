"""The kernel registry and launch (runtime): the CUDA kernels in ``ops/kernels``.

Which backend and which kernel variant run is decided in :mod:`ops.backends`; the names
:func:`use_kernels`, :func:`kernel_variant`, :func:`use_kernel_variant`, :data:`KERNEL_VARIANTS`,
:data:`DEFAULT_KERNEL_VARIANT` and :func:`cupy_available` stay importable from here. The files, their
template types and :func:`expand_includes` live in :mod:`ops.kernel_files`.

One kernel source serves three ways of running it, each in its own module:

* **CuPy** (CUDA tensors, here): the source is compiled with NVRTC once per (file, dtype, device),
  cached, and launched on the tensor's device and on torch's *current* CUDA stream, passed as the
  launch's ``stream`` argument (no CuPy context managers on the hot path).
* **Host emulation** (CPU tensors, :mod:`ops.host_emulation`, test support): the same source is
  compiled by the system C++ compiler and the grid runs on the CPU through ctypes (blocks one after
  another, a block's threads as cooperative fibers that switch at barriers and warp operations). This is
  how the test suite executes every kernel on machines without a GPU; it is a test vehicle, not a
  fast CPU backend (the pure-PyTorch references are that). :meth:`KernelSource.launch` hands CPU
  tensors to it; the ops reach it only through ``backend="emulated"`` inside
  :func:`ops.kernel_host_emulation`.
* **Compile checks** (:mod:`ops.compile_checks`, test tooling): nvcc and NVRTC compile every source
  without a GPU.

Kernels are templates over the storage type (``float``, ``double``, ``vmm_half``, ``vmm_bfloat16``);
sizes and strides are kernel arguments, never formatted into the source, so a new clip size does
not recompile anything.

Argument convention for :meth:`KernelSource.launch`: a ``torch.Tensor`` is passed as a pointer to
its first element (the kernel receives strides separately, or the caller makes it contiguous), a
Python ``int`` as ``long long`` (``vmm_i64``), a Python ``float`` as ``double``; ``numpy.float32`` /
``numpy.int32`` scalars are passed as ``float`` / ``int``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import host_emulation
from .backends import (  # noqa: F401  (re-exported for benchmarks and tests that import them from here)
    DEFAULT_KERNEL_VARIANT,
    KERNEL_VARIANTS,
    cupy_available,
    kernel_variant,
    use_kernel_variant,
    use_kernels,
)
from .cuda_target import check_cuda_target
from .kernel_files import CTYPES, KERNEL_DIR, ctype_of, expand_includes  # noqa: F401  (re-exported)
from .validation import BackendUnavailableError, OpArgumentError, OpDeviceError

DEFAULT_THREADS = 256
#: The most dynamic shared memory a launch may ask for: 48 KiB per block, static shared memory included,
#: is what every GPU since sm_20 gives without cudaFuncSetAttribute(MaxDynamicSharedMemorySize), which
#: the launcher does not call.
MAX_DYNAMIC_SHARED_BYTES = 48 * 1024
# Enough blocks to fill any current GPU several times over; grid-stride loops cover the rest.
MAX_BLOCKS = 65535

_REGISTRY: dict[str, KernelSource] = {}
_lock = threading.Lock()


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
        shared_mem: int = 0,
    ) -> None:
        """Launch ``kernel<ctype_of(dtype)>`` with ``args``.

        The tensors in ``args`` pick the path: CUDA tensors launch through CuPy on their device and
        torch's current stream, CPU tensors run through host emulation. Give ``numel`` for a
        grid-stride 1-D launch, or an explicit ``grid``. ``shared_mem``: bytes of dynamic shared memory
        per block (``VMM_DYNAMIC_SHARED`` in the kernel), at most :data:`MAX_DYNAMIC_SHARED_BYTES`.
        """
        if kernel not in self.kernels:
            raise OpArgumentError(f"{self.filename} has no kernel {kernel!r}; it defines {self.kernels}")
        if isinstance(shared_mem, bool) or not isinstance(shared_mem, int) or shared_mem < 0:
            raise OpArgumentError(
                f"kernel {kernel}: shared_mem must be a non-negative int of bytes, got {shared_mem!r}"
            )
        if shared_mem > MAX_DYNAMIC_SHARED_BYTES:
            raise OpArgumentError(
                f"kernel {kernel}: {shared_mem} bytes of dynamic shared memory exceed the "
                f"{MAX_DYNAMIC_SHARED_BYTES} a block gets without cudaFuncSetAttribute"
            )
        if grid is None:
            if numel is None:
                raise OpArgumentError("launch needs numel (for a grid-stride grid) or an explicit grid")
            if numel == 0:
                return
            grid = grid_for(numel, block[0] * block[1] * block[2])
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not tensors:
            raise OpArgumentError("launch needs at least one tensor argument to choose the device")
        device = tensors[0].device
        for t in tensors:
            if t.device != device:
                raise OpDeviceError(f"kernel {kernel}: tensor arguments on {device} and {t.device}")
        ctype = ctype_of(dtype)
        if device.type == "cuda":
            _launch_cupy(self, kernel, ctype, device, grid, block, args, shared_mem)
        elif device.type == "cpu":
            host_emulation.launch_emulated(self, kernel, ctype, grid, block, args, shared_mem)
        else:
            raise OpDeviceError(f"kernel {kernel}: tensors on {device}; CUDA kernels run on cuda (or cpu, emulated)")


def registered_sources() -> dict[str, KernelSource]:
    """Every KernelSource created so far, by file name (import ``ops`` first to register all)."""
    return dict(_REGISTRY)


# ----------------------------------------------------------------------------------------- CuPy

_cupy_modules: dict[tuple[str, str, int], object] = {}
_cupy_kernels: dict[tuple[str, str, str, int], object] = {}
_cupy_streams: dict[tuple[int, int], object] = {}
_cupy_block_limits: dict[int, int] = {}


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
                _cupy_target(src.filename, ctype, device_index)
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


def _cupy_target(source: str, ctype: str, device_index: int) -> int:
    """The architecture CuPy will build ``source`` for on device ``device_index``; UnsupportedGPUError
    (one line naming the fix) where this GPU and toolchain cannot run it (ops/cuda_target.py)."""
    import cupy

    device_arch = int(cupy.cuda.Device(device_index).compute_capability)
    nvrtc_version = tuple(cupy.cuda.nvrtc.getVersion())
    try:
        supported = tuple(int(a) for a in cupy.cuda.nvrtc.getSupportedArchs())
    except Exception:  # older CuPy or NVRTC without the query: the table in cuda_target
        supported = None
    return check_cuda_target(
        source=source,
        ctype=ctype,
        device_arch=device_arch,
        nvrtc_version=(int(nvrtc_version[0]), int(nvrtc_version[1])),
        supported_archs=supported,
    )


def max_active_blocks_per_sm(
    src: KernelSource, kernel: str, dtype: torch.dtype, device_index: int, threads: int, shared_bytes: int = 0
) -> int:
    """CUDA's occupancy calculator on the compiled ``kernel<dtype>`` of ``src``: how many blocks of
    ``threads`` (and ``shared_bytes`` of dynamic shared memory) fit on one SM of device ``device_index``
    at once, given the kernel's registers and static shared memory. Compiles the kernel if needed."""
    import cupy

    fn = _cupy_function(src, kernel, ctype_of(dtype), device_index)
    with cupy.cuda.Device(device_index):
        return int(cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads, shared_bytes))


def compiled_kernel_report() -> list[dict[str, object]]:
    """One entry per kernel compiled through CuPy so far in this process: source, kernel, dtype, device,
    the architecture built for, registers and local memory per thread (spills show as local memory),
    the launch bound. For the GPU suite's log."""
    import cupy

    rows = []
    for (filename, kernel, ctype, device_index), fn in sorted(_cupy_kernels.items()):
        rows.append(
            {
                "source": filename,
                "kernel": kernel,
                "dtype": ctype,
                "device": device_index,
                "arch": _cupy_target(filename, ctype, device_index),
                "nvrtc": ".".join(str(v) for v in cupy.cuda.nvrtc.getVersion()),
                "num_regs": fn.num_regs,
                "local_size_bytes": fn.local_size_bytes,
                "shared_size_bytes": fn.shared_size_bytes,
                "max_threads_per_block": fn.max_threads_per_block,
            }
        )
    return rows


def check_block_size(kernel: str, block: tuple[int, int, int], max_threads: int) -> None:
    """A block larger than the kernel allows (its ``__launch_bounds__``, or what its registers permit)
    fails to launch on a GPU; refuse it here with the numbers."""
    threads = int(block[0]) * int(block[1]) * int(block[2])
    if threads > max_threads:
        raise OpArgumentError(
            f"kernel {kernel}: a block of {threads} threads exceeds the kernel's limit of {max_threads} "
            "(its __launch_bounds__ or register use)"
        )


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


def _launch_cupy(src, kernel, ctype, device, grid, block, args, shared_mem: int = 0) -> None:
    try:
        import cupy
    except Exception as exc:
        raise BackendUnavailableError(
            "backend 'cupy' needs CuPy: pip install 'video-motion-modules[cuda12]' (or [cuda13])"
        ) from exc
    current = torch.cuda.current_device()
    index = device.index if device.index is not None else current
    fn = _cupy_function(src, kernel, ctype, index)
    # The stream is a launch argument of the compiled cupy.cuda.Function (RawKernel.kernel; its
    # `stream=` parameter exists in every CuPy release we support), not a context manager: entering
    # CuPy's stream and device contexts on every launch was a fixed host cost of each kernel call.
    # RawKernel.kernel looks the function up for the *current* device, so a device context is entered
    # only when the tensors live on another device than the current one.
    stream = _cupy_stream(torch.cuda.current_stream(index).cuda_stream, index)
    launch_args = tuple(_cupy_args(args))
    limit = _cupy_block_limits.get(id(fn))
    if limit is None:
        limit = _cupy_block_limits[id(fn)] = int(fn.max_threads_per_block)
    check_block_size(kernel, block, limit)
    # cupy.cuda.Function.__call__(grid, block, args, shared_mem=0, stream=None): dynamic shared bytes.
    if index == current:
        fn.kernel(tuple(grid), tuple(block), launch_args, shared_mem=shared_mem, stream=stream)
    else:
        with cupy.cuda.Device(index):
            fn.kernel(tuple(grid), tuple(block), launch_args, shared_mem=shared_mem, stream=stream)
