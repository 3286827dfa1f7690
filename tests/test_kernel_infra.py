"""The kernel infrastructure: dtype mapping, host emulation, nvcc / NVRTC compile checks, CuPy launch,
the "emulated" test backend's gate, the public API of ``ops`` and its error types.

Every ``.cu`` file in ops/kernels is compile-checked here; the trivial ``scale_add`` kernel is run
through all three paths (emulated on CPU, compiled by nvcc and NVRTC, launched by CuPy on a GPU).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import ops
from ops import compile_checks, host_emulation, kernel_loader
from ops.kernel_loader import KERNEL_DIR, KernelSource, ctype_of, expand_includes
from ops.scale_add import scale_add

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
KERNEL_FILES = sorted(p.name for p in KERNEL_DIR.glob("*.cu"))
# An nvcc build for two architectures takes from seconds (scale_add.cu, the fast tier's check) to tens
# of seconds (sifa_fast.cu) on a 2-core CPU; NVRTC takes seconds for sifa_fast.cu alone.
NVCC_FAST = {"scale_add.cu"}
NVRTC_SLOW = {"sifa_fast.cu"}


def test_ops_package_registers_every_kernel_file():
    assert ops.kernel_loader is kernel_loader
    registered = set(kernel_loader.registered_sources())
    assert set(KERNEL_FILES) <= registered, f"kernel files without a KernelSource: {set(KERNEL_FILES) - registered}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_ctype_mapping(dtype):
    assert ctype_of(dtype) in {"float", "double", "vmm_half", "vmm_bfloat16"}


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8])
def test_ctype_mapping_rejects_other_dtypes(dtype):
    with pytest.raises(TypeError, match=str(dtype)):
        ctype_of(dtype)


def test_expand_includes_inlines_local_headers_and_rejects_system_ones(tmp_path):
    (tmp_path / "a.cuh").write_text("int from_header;\n", encoding="utf-8")
    (tmp_path / "k.cu").write_text('#include "a.cuh"\n#include "a.cuh"\nint body;\n', encoding="utf-8")
    text = expand_includes(tmp_path / "k.cu")
    assert text.count("int from_header;") == 1 and "int body;" in text and "#include" not in text
    (tmp_path / "bad.cu").write_text("#include <cstdio>\n", encoding="utf-8")
    with pytest.raises(ValueError, match="system includes"):
        expand_includes(tmp_path / "bad.cu")


def test_kernel_source_requires_existing_file():
    with pytest.raises(FileNotFoundError):
        KernelSource("no_such_kernel.cu", ("k",))


def _tolerance(dtype):
    return {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(dtype, 1e-6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_scale_add_emulated_matches_torch(dtype):
    x = torch.randn(6, 9, dtype=torch.float64).to(dtype)
    y = torch.randn(9, 6, dtype=torch.float64).to(dtype).t()  # non-contiguous: strides are kernel args
    out = scale_add(x, y, alpha=1.37)
    # Both sides compute in the accumulation type and round once to the storage type (nearest even).
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expected = (1.37 * x.to(acc) + y.to(acc)).to(dtype)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=_tolerance(dtype), atol=_tolerance(dtype))


def test_scale_add_empty_and_bad_input():
    x = torch.zeros(0, 4)
    assert scale_add(x, x).shape == (0, 4)
    with pytest.raises(ValueError, match="same dtype"):
        scale_add(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        scale_add(torch.zeros(2, 2, 2), torch.zeros(2, 2, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_16bit_conversions_round_trip_every_value(dtype):
    """Every finite 16-bit pattern survives to-float-and-back exactly (the emulator's software
    conversions stand in for the GPU's conversion instructions)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype).reshape(256, 256)
    finite = torch.isfinite(values)
    out = scale_add(values, torch.full_like(values, -0.0), alpha=1.0)  # x + (-0) == x, also for x = -0
    assert torch.equal(out.view(torch.int16)[finite], values.view(torch.int16)[finite])
    assert torch.isnan(out[torch.isnan(values)]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_rounding_to_16bit_is_nearest_even(dtype):
    # Values spread over the whole range including subnormals and overflow to inf.
    x = torch.cat([torch.randn(4000) * 10.0 ** torch.randint(-9, 6, (4000,)), torch.tensor([7e4, -7e4, 1e-8])])
    x = x.reshape(1, -1)
    one, zero = torch.ones(1, 1, dtype=dtype), torch.zeros(1, 1, dtype=dtype)
    # alpha * 1 + 0 is computed in float32 and rounded once to the 16-bit type inside the kernel.
    got = torch.stack([scale_add(one, zero, alpha=float(v))[0, 0] for v in x[0]])
    expected = x[0].to(torch.float32).to(dtype)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize(
    "filename", [f if f in NVCC_FAST else pytest.param(f, marks=pytest.mark.slow) for f in KERNEL_FILES]
)
def test_nvcc_compiles_every_kernel_for_sm80_and_sm90(filename):
    src = kernel_loader.registered_sources()[filename]
    report = compile_checks.nvcc_compile_check(src, archs=("sm_80", "sm_90"))
    for kernel in src.kernels:
        assert kernel in report  # ptxas reported the entry function (name is mangled around it)
    assert "spill" in report


@pytest.mark.parametrize(
    "filename", [pytest.param(f, marks=pytest.mark.slow) if f in NVRTC_SLOW else f for f in KERNEL_FILES]
)
def test_nvrtc_compiles_every_kernel_as_cupy_would(filename):
    if compile_checks.find_nvrtc() is None:
        pytest.skip("libnvrtc not found (dev extra nvidia-cuda-nvrtc-cu12)")
    src = kernel_loader.registered_sources()[filename]
    lowered = compile_checks.nvrtc_compile_check(src)
    assert set(lowered) == {e for c in kernel_loader.CTYPES.values() for e in src.name_expressions(c)}
    assert all(name.startswith("_Z") for name in lowered.values())


def test_kernel_arguments_are_typed_explicitly():
    with pytest.raises(TypeError, match="bool"):
        host_emulation.ctypes_arg(True)
    with pytest.raises(TypeError, match="str"):
        host_emulation.ctypes_arg("x")
    assert isinstance(host_emulation.ctypes_arg(np.float32(1.0)), host_emulation.ctypes.c_float)


# ----------------------------------------------------------------- the "emulated" backend's gate


def test_emulated_backend_is_refused_outside_kernel_host_emulation():
    # A user cannot select the test backend by accident: only inside the context, only on CPU tensors.
    x = torch.randn(1, 2, 4, 4)
    clip = torch.randn(1, 4, 2, 5, 5)
    offset = torch.zeros(1, 18, 4, 4)
    assert not host_emulation.host_emulation_enabled()
    for call in (
        lambda: ops.tvl1_flow(x, x, 2, backend="emulated"),
        lambda: ops.deform_correlation(x, x, offset, backend="emulated"),
        lambda: ops.SIFA(4, backend="emulated"),
        lambda: ops.FlowLayer(2, backend="emulated"),
    ):
        with pytest.raises(ops.BackendError, match="kernel_host_emulation"):
            call()
    with ops.kernel_host_emulation():
        with ops.kernel_host_emulation():  # nests
            block = ops.SIFA(4, backend="emulated")
        assert host_emulation.host_emulation_enabled()
        assert block(clip).shape == clip.shape  # still inside the outer context
        with pytest.raises(ops.BackendError, match="CPU tensors"):
            ops.tvl1_flow(x.to("meta"), x.to("meta"), 2, backend="emulated")
    assert not host_emulation.host_emulation_enabled()
    with pytest.raises(ops.BackendError, match="kernel_host_emulation"):
        block(clip)  # built inside, refused outside


# ------------------------------------------------------------------------ public API and errors


def test_public_api_lists_what_users_call():
    assert {"deform_correlation", "deform_aggregation", "deform_attention", "SIFA"} <= set(ops.__all__)
    assert {"tvl1_flow", "FlowLayer", "FCFBlock", "kernel_host_emulation", "OpShapeError"} <= set(ops.__all__)
    # infrastructure stays importable as submodules, outside the user API
    assert not {"scale_add", "kernel_loader", "host_emulation", "compile_checks"} & set(ops.__all__)
    assert callable(ops.scale_add.scale_add) and ops.kernel_loader.KernelSource is KernelSource
    for name in ops.__all__:
        assert getattr(ops, name) is not None, name


def test_error_types_keep_the_builtin_bases():
    # One type per kind of mistake, each still a ValueError (dtype: also TypeError) as before.
    x = torch.zeros(1, 2, 4, 4)
    cases = [
        (lambda: ops.tvl1_flow(x[0], x), ops.OpShapeError, "i0 must be 4-D"),
        (lambda: ops.tvl1_flow(x, x.double()), ops.OpDtypeError, "same dtype"),
        (lambda: ops.tvl1_flow(x, x.to("meta")), ops.OpDeviceError, "same device"),
        (lambda: ops.tvl1_flow(x, x, n_iter=0), ops.OpArgumentError, "n_iter"),
        (lambda: ops.tvl1_flow(x, x, backend="numpy"), ops.BackendError, "backend must be one of"),
        (lambda: ops.deform_correlation(x, x, torch.zeros(1, 18, 4, 5)), ops.OpShapeError, "offset must have shape"),
        (lambda: ops.deform_correlation(x, x.long(), x), ops.OpDtypeError, "key must have a floating dtype"),
        (lambda: ops.deform_correlation(x, x, x, kernel_size=2), ops.OpArgumentError, "kernel_size must be odd"),
        (lambda: ops.SIFA(4)(torch.zeros(1, 4, 2, 3, 3, dtype=torch.float64)), ops.OpDtypeError, "SIFA's parameters"),
        (lambda: ops.FlowLayer(2)(torch.zeros(1, 3, 2, 4, 4)), ops.OpShapeError, r"\[N,2,T,H,W\]"),
        (lambda: ctype_of(torch.int32), ops.OpDtypeError, "int32"),
    ]
    for call, kind, match in cases:
        with pytest.raises(kind, match=match):
            call()
        with pytest.raises(ValueError):
            call()
    assert issubclass(ops.OpDtypeError, TypeError) and issubclass(ops.BackendUnavailableError, RuntimeError)
    assert all(issubclass(e, ops.OpError) for e in (ops.OpShapeError, ops.OpDeviceError, ops.BackendError))


# ----------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_scale_add_cupy_matches_torch(dtype):
    x = torch.randn(300, 257, device="cuda", dtype=torch.float64).to(dtype)
    y = torch.randn(257, 300, device="cuda", dtype=torch.float64).to(dtype).t()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    torch.testing.assert_close(
        scale_add(x, y, 0.5), (0.5 * x.to(acc) + y.to(acc)).to(dtype), rtol=_tolerance(dtype), atol=_tolerance(dtype)
    )


@pytest.mark.gpu
def test_scale_add_cupy_runs_on_the_current_stream():
    stream = torch.cuda.Stream()
    base = torch.randn(2048, 2048, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)  # keep the side stream busy so a wrong-stream launch reads stale x
        x = base * 2.0
        out = scale_add(x, base, 1.0)
    stream.synchronize()
    torch.testing.assert_close(out, base * 3.0)


@pytest.mark.gpu
def test_scale_add_cupy_on_second_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs a second CUDA device")
    x = torch.randn(64, 64, device="cuda:1")
    torch.testing.assert_close(scale_add(x, x, 1.0), 2 * x)
