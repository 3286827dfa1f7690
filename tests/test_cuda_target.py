"""What a GPU and its CuPy/NVRTC can build (ops/cuda_target.py), checked before the first compile, and the
kernel variant that runs by default. Pure functions: no GPU needed."""

from __future__ import annotations

import pytest

from ops.backends import DEFAULT_KERNEL_VARIANT, kernel_variant, use_kernel_variant
from ops.cuda_target import UnsupportedGPUError, check_cuda_target, nvrtc_max_arch
from ops.kernel_loader import check_block_size
from ops.validation import OpArgumentError


def target(source="sifa.cu", ctype="float", arch=90, nvrtc=(12, 4), supported=None, ptx=False):
    return check_cuda_target(
        source=source, ctype=ctype, device_arch=arch, nvrtc_version=nvrtc, supported_archs=supported, ptx_allowed=ptx
    )


def test_a_gpu_nvrtc_knows_is_built_for_its_own_architecture():
    assert target(arch=90, nvrtc=(12, 4)) == 90
    assert target(arch=80, nvrtc=(11, 2)) == 80
    assert target(arch=120, nvrtc=(12, 8)) == 120
    assert target(arch=86, nvrtc=(12, 0), supported=(50, 60, 70, 80, 86, 89, 90)) == 86


def test_nvrtc_older_than_the_gpu_is_refused_in_one_line_or_built_as_ptx():
    with pytest.raises(UnsupportedGPUError, match=r"NVRTC 11\.4 targets at most sm_86, older than this GPU \(sm_90\)"):
        target(arch=90, nvrtc=(11, 4))
    with pytest.raises(UnsupportedGPUError, match="CUPY_CUDA_COMPILE_WITH_PTX=1") as info:
        target(arch=100, nvrtc=(12, 4))
    assert "\n" not in str(info.value)
    # With PTX allowed, CuPy builds for the newest architecture NVRTC knows and the driver JIT-compiles it.
    assert target(arch=100, nvrtc=(12, 4), ptx=True) == 90
    # NVRTC's own list wins over the table.
    assert target(arch=100, nvrtc=(12, 4), supported=(75, 80, 90, 100), ptx=False) == 100


def test_ptx_is_allowed_by_cupys_environment_variable(monkeypatch):
    kwargs = {"source": "sifa.cu", "ctype": "float", "device_arch": 100, "nvrtc_version": (12, 4)}
    monkeypatch.setenv("CUPY_CUDA_COMPILE_WITH_PTX", "1")
    assert check_cuda_target(**kwargs) == 90
    monkeypatch.setenv("CUPY_CUDA_COMPILE_WITH_PTX", "0")
    with pytest.raises(UnsupportedGPUError):
        check_cuda_target(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "sifa.cu", "ctype": "double", "arch": 52}, r"float64 SIFA kernels need sm_60.*backend='torch'"),
        ({"source": "sifa_fast.cu", "ctype": "double", "arch": 61}, r"fast kernels need sm_70.*VMM_KERNELS=simple"),
        ({"source": "tvl1_plane.cu", "ctype": "float", "arch": 61}, r"fast kernels need sm_70"),
        ({"source": "tvl1.cu", "ctype": "float", "arch": 70, "nvrtc": (13, 0)}, r"CUDA 13.*sm_75.*\[cuda12\]"),
        ({"source": "tvl1.cu", "ctype": "float", "arch": 37}, r"need sm_50 or newer"),
    ],
)
def test_floors_are_refused_with_the_fix(kwargs, match):
    with pytest.raises(UnsupportedGPUError, match=match):
        target(**kwargs)


def test_what_the_floors_allow():
    assert target(source="sifa.cu", ctype="double", arch=60) == 60  # atomicAdd(double*) from sm_60
    assert target(source="tvl1.cu", ctype="double", arch=52) == 52  # no double atomics in TV-L1
    assert target(source="sifa.cu", ctype="float", arch=61) == 61  # the simple kernels below sm_70
    assert target(source="tvl1_plane.cu", ctype="float", arch=75, nvrtc=(13, 0)) == 75


def test_nvrtc_table():
    assert nvrtc_max_arch((11, 0)) == 80
    assert nvrtc_max_arch((11, 7)) == 86
    assert nvrtc_max_arch((11, 8)) == 90
    assert nvrtc_max_arch((12, 6)) == 90
    assert nvrtc_max_arch((12, 9)) == 120
    assert nvrtc_max_arch((12, 6), (52, 90, 100)) == 100


def test_block_size_beyond_the_kernels_limit_is_refused_with_numbers():
    check_block_size("k", (256, 1, 1), 256)
    with pytest.raises(OpArgumentError, match="a block of 512 threads exceeds the kernel's limit of 256"):
        check_block_size("k", (256, 2, 1), 256)


def test_the_default_variant_is_the_one_that_has_run_on_a_gpu(monkeypatch):
    monkeypatch.delenv("VMM_KERNELS", raising=False)
    assert DEFAULT_KERNEL_VARIANT == "simple"
    assert kernel_variant() == "simple"
    monkeypatch.setenv("VMM_KERNELS", "fast")
    assert kernel_variant() == "fast"
    with use_kernel_variant("simple"):
        assert kernel_variant() == "simple"
