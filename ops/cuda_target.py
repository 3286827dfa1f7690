"""What a GPU and the CuPy/NVRTC toolchain beside it can build: checked once, before the first compile.

CuPy compiles each kernel source with NVRTC for ``min(device architecture, newest architecture NVRTC
knows)``, as a cubin unless ``CUPY_CUDA_COMPILE_WITH_PTX=1``. A cubin only loads on its own major
architecture, so an NVRTC older than the GPU gives a module that cannot load, reported by the driver in
terms that do not name the fix. The floors below are the ones the kernels need; each refusal is one
line that names what to change. Pure functions of their arguments, so they are tested without a GPU.

Floors (docs/kernels.md §3, GPU support):

* float64 SIFA kernels need sm_60: their backward adds into ``double`` with ``atomicAdd``.
* the fast variant needs sm_70: its warp code uses ``__shfl_*_sync`` / ``__syncwarp`` with independent
  thread scheduling, which Volta introduced.
* CUDA 13 toolchains (NVRTC 13.x) build for sm_75 and newer only.
* every build needs sm_50 (CUDA 12's NVRTC floor).
"""

from __future__ import annotations

import os

#: Newest architecture each NVRTC release line can target (NVRTC's --gpu-architecture list), used when
#: CuPy cannot report the list itself. Keys are (major, minor) of the first release with that maximum.
NVRTC_MAX_ARCH: tuple[tuple[tuple[int, int], int], ...] = (
    ((11, 0), 80),
    ((11, 1), 86),
    ((11, 8), 90),
    ((12, 8), 120),
    ((13, 0), 121),
)
MIN_ARCH = 50
FAST_MIN_ARCH = 70
FLOAT64_ATOMIC_MIN_ARCH = 60
CUDA13_MIN_ARCH = 75
#: The kernel sources whose float64 build needs atomicAdd(double*).
FLOAT64_ATOMIC_SOURCES = frozenset({"sifa.cu", "sifa_fast.cu"})
#: The kernel sources of the fast variant.
FAST_SOURCES = frozenset({"sifa_fast.cu", "tvl1_plane.cu"})


class UnsupportedGPUError(RuntimeError):
    """This GPU, dtype and toolchain cannot build or load a kernel; the message says what to change."""


def nvrtc_max_arch(nvrtc_version: tuple[int, int], supported_archs: tuple[int, ...] | None = None) -> int:
    """Newest architecture NVRTC ``nvrtc_version`` targets: the largest of ``supported_archs`` when
    NVRTC reported them, else the table above."""
    if supported_archs:
        return max(supported_archs)
    best = NVRTC_MAX_ARCH[0][1]
    for first, arch in NVRTC_MAX_ARCH:
        if tuple(nvrtc_version) >= first:
            best = arch
    return best


def check_cuda_target(
    *,
    source: str,
    ctype: str,
    device_arch: int,
    nvrtc_version: tuple[int, int],
    supported_archs: tuple[int, ...] | None = None,
    ptx_allowed: bool | None = None,
) -> int:
    """The architecture CuPy will compile ``source`` (kernel file name) for, on a GPU of compute
    capability ``device_arch`` (e.g. 90 for 9.0) with NVRTC ``nvrtc_version``; raises
    :class:`UnsupportedGPUError` (one line naming the fix) where no build can run there.

    ``ptx_allowed`` (default: ``CUPY_CUDA_COMPILE_WITH_PTX=1`` in the environment): CuPy then compiles
    PTX, which the driver JIT-compiles for a newer GPU than NVRTC knows."""
    if ptx_allowed is None:
        ptx_allowed = os.environ.get("CUPY_CUDA_COMPILE_WITH_PTX", "") == "1"
    nvrtc = f"{nvrtc_version[0]}.{nvrtc_version[1]}"
    gpu = f"sm_{device_arch}"
    if device_arch < MIN_ARCH:
        raise UnsupportedGPUError(f"vmm's CUDA kernels need sm_{MIN_ARCH} or newer; this GPU is {gpu}")
    if nvrtc_version[0] >= 13 and device_arch < CUDA13_MIN_ARCH:
        raise UnsupportedGPUError(
            f"NVRTC {nvrtc} (CUDA 13) builds for sm_{CUDA13_MIN_ARCH} and newer; this GPU is {gpu}: "
            "install video-motion-modules[cuda12] (cupy-cuda12x) instead of [cuda13]"
        )
    if source in FAST_SOURCES and device_arch < FAST_MIN_ARCH:
        raise UnsupportedGPUError(
            f"{source}: the fast kernels need sm_{FAST_MIN_ARCH} or newer (independent thread scheduling); "
            f"this GPU is {gpu}: use the simple kernels (VMM_KERNELS=simple, the default)"
        )
    if ctype == "double" and source in FLOAT64_ATOMIC_SOURCES and device_arch < FLOAT64_ATOMIC_MIN_ARCH:
        raise UnsupportedGPUError(
            f"{source}: float64 SIFA kernels need sm_{FLOAT64_ATOMIC_MIN_ARCH} or newer (atomicAdd on double); "
            f"this GPU is {gpu}: run SIFA in float32 or on the PyTorch reference (backend='torch')"
        )
    newest = nvrtc_max_arch(nvrtc_version, supported_archs)
    if device_arch <= newest:
        return device_arch
    if ptx_allowed:
        return newest  # PTX for the newest architecture NVRTC knows; the driver compiles it for this GPU
    raise UnsupportedGPUError(
        f"NVRTC {nvrtc} targets at most sm_{newest}, older than this GPU ({gpu}), so CuPy's cubin would not "
        "load: install a CuPy whose CUDA toolkit knows this GPU (cupy-cuda12x with CUDA 12.8+ for sm_100/sm_120), "
        "or set CUPY_CUDA_COMPILE_WITH_PTX=1 to let the driver compile PTX"
    )
