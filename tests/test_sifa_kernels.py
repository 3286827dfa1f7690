"""SIFA's CUDA kernels, both variants ("fast": ops/kernels/sifa_fast.cu, "simple": ops/kernels/sifa.cu; every
test runs under each), against the pure-PyTorch reference. tests/test_sifa_fast_kernels.py compares the two.

Without a GPU the kernels run on CPU tensors through host emulation: the public ops with the test backend
``backend="emulated"``, which every test here enables with ``ops.kernel_host_emulation()`` (see
ops/host_emulation.py). The ``gpu`` tests launch the same sources through CuPy (``backend="cupy"``).
"""

from __future__ import annotations

import pytest
import torch
from helpers.sifa import CASES, TOL, cotangent, nan_cases, random_inputs

import ops
from ops.backends import use_kernel_variant
from ops.library import is_kernel_node
from ops.sifa.reference import (
    deform_aggregation_reference,
    deform_attention_reference,
    deform_correlation_reference,
)
from ops.sifa.simple_kernels import MIN_CHUNK, correlate, offset_grad, split_channels


@pytest.fixture(autouse=True)
def host_emulation():
    with ops.kernel_host_emulation():
        yield


@pytest.fixture(autouse=True, params=["fast", "simple"])
def kernel_variant(request):
    with use_kernel_variant(request.param):
        yield request.param


def correlation_emulated(*args, **kwargs):
    """``ops.deform_correlation`` on the kernels, run on CPU tensors through host emulation."""
    return ops.deform_correlation(*args, **kwargs, backend="emulated")


def aggregation_emulated(*args, **kwargs):
    """``ops.deform_aggregation`` on the kernels (host emulation on CPU)."""
    return ops.deform_aggregation(*args, **kwargs, backend="emulated")


def attention_emulated(*args, **kwargs):
    """``ops.deform_attention``, the fused SIFA step, on the kernels (host emulation on CPU)."""
    return ops.deform_attention(*args, **kwargs, backend="emulated")


def both_ops(fns, query, key, offset, attn, window):
    """Outputs and all six input gradients of both ops through ``fns`` = (correlation, aggregation)."""
    corr_fn, agg_fn = fns
    inputs = [t.detach().clone().requires_grad_() for t in (query, key, offset, attn)]
    q, k, o, a = inputs
    out_c = corr_fn(q, k, o, *window)
    g_c = torch.autograd.grad(out_c, (q, k, o), cotangent(out_c))
    out_a = agg_fn(k, a, o, *window)
    g_a = torch.autograd.grad(out_a, (k, a, o), cotangent(out_a))
    return (out_c, *g_c, out_a, *g_a)


KERNELS = (correlation_emulated, aggregation_emulated)
CUPY = (  # the kernels on CUDA tensors ("emulated" takes CPU tensors only)
    lambda q, k, o, *w: ops.deform_correlation(q, k, o, *w, backend="cupy"),
    lambda v, a, o, *w: ops.deform_aggregation(v, a, o, *w, backend="cupy"),
)
REFERENCE = (deform_correlation_reference, deform_aggregation_reference)
NAMES = ("attn", "d query", "d key", "d offset (corr)", "out", "d value", "d attn", "d offset (agg)")


def assert_all_close(got, expected, dtype):
    tol = TOL[dtype]
    for name, g, e in zip(NAMES, got, expected, strict=True):
        assert g.dtype == e.dtype == dtype, name
        torch.testing.assert_close(g.double(), e.double(), rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(("channels", "groups", "kernel_size", "dilation"), CASES)
@pytest.mark.parametrize("spread", [2, 6])
def test_emulated_kernels_match_reference_values_and_gradients(channels, groups, kernel_size, dilation, spread):
    inputs = random_inputs(channels, groups, kernel_size, spread=spread)
    window = (kernel_size, dilation, groups)
    assert_all_close(both_ops(KERNELS, *inputs, window), both_ops(REFERENCE, *inputs, window), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_emulated_kernels_low_precision(dtype):
    # Both sides read the same 16-bit inputs and compute in float32; they differ by summation order and
    # the final rounding, so the tolerance is a few units in the last place of the storage type.
    inputs = random_inputs(4, 2, 3, dtype=dtype)
    window = (3, 1, 2)
    assert_all_close(both_ops(KERNELS, *inputs, window), both_ops(REFERENCE, *inputs, window), dtype)


@pytest.mark.parametrize(("channels", "groups", "kernel_size", "dilation"), [(4, 2, 3, 1), (2, 1, 3, 2)])
def test_emulated_kernels_gradcheck(channels, groups, kernel_size, dilation):
    query, key, offset, attn = random_inputs(channels, groups, kernel_size, batch=1, height=3, width=4)
    query, key, offset, attn = (t.requires_grad_() for t in (query, key, offset, attn))

    def corr(q, k, o):
        return correlation_emulated(q, k, o, kernel_size, dilation, groups)

    def agg(v, a, o):
        return aggregation_emulated(v, a, o, kernel_size, dilation, groups)

    assert torch.autograd.gradcheck(corr, (query, key, offset))
    assert torch.autograd.gradcheck(agg, (key, attn, offset))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_emulated_kernels_integer_sample_points(dtype):
    # Zero or integer offsets put every sample point on the pixel grid (SIFA's zero-initialised offset
    # conv does exactly that), including y = -1 and x = W at the border. Bilinear is not differentiable
    # there; both backends must take the same one-sided derivative (that of floor-based interpolation).
    query, key, _, attn = random_inputs(4, 2, 3, height=7, width=6, dtype=dtype)
    offset = torch.randint(-2, 3, (2, 18, 7, 6)).to(dtype)
    offset[:, :, ::2] = 0
    window = (3, 1, 2)
    assert_all_close(
        both_ops(KERNELS, query, key, offset, attn, window),
        both_ops(REFERENCE, query, key, offset, attn, window),
        dtype,
    )


def test_emulated_kernels_non_contiguous_inputs_and_partial_gradients():
    query, key, offset, attn = random_inputs(4, 1, 3, height=5, width=5)
    q_nc, o_nc = query.transpose(2, 3), offset.transpose(2, 3)
    k_nc = torch.cat((key, key.flip(3)), dim=3)[..., ::2]  # strided along W
    assert not (q_nc.is_contiguous() or o_nc.is_contiguous() or k_nc.is_contiguous())
    k_nc.requires_grad_()
    out = correlation_emulated(q_nc, k_nc, o_nc, 3, 1, 1)
    expected = deform_correlation_reference(q_nc.contiguous(), k_nc.detach().contiguous(), o_nc.contiguous(), 3, 1, 1)
    torch.testing.assert_close(out, expected)
    # only key requires grad: the Function must return None for the others and a correct d key
    (g_key,) = torch.autograd.grad(out, (k_nc,), cotangent(out))
    k_ref = k_nc.detach().clone().requires_grad_()
    ref = deform_correlation_reference(q_nc, k_ref, o_nc, 3, 1, 1)
    (g_ref,) = torch.autograd.grad(ref, (k_ref,), cotangent(ref))
    torch.testing.assert_close(g_key, g_ref)


def test_emulated_kernels_batch_zero():
    query, key, offset, attn = (t[:0] for t in random_inputs(4, 2, 3))
    query.requires_grad_()
    attn_out = correlation_emulated(query, key, offset, 3, 1, 2)
    assert attn_out.shape == (0, 18, 4, 5)
    out = aggregation_emulated(key, attn_out, offset, 3, 1, 2)
    assert out.shape == (0, 4, 4, 5)
    out.sum().backward()
    assert query.grad.shape == query.shape


def fused_step(fn, query, kv, offset, window):
    """Output and the gradients w.r.t. query, kv and offset of the fused SIFA step ``fn``."""
    q, k, o = (t.detach().clone().requires_grad_() for t in (query, kv, offset))
    out = fn(q, k, o, *window)
    return (out, *torch.autograd.grad(out, (q, k, o), cotangent(out)))


@pytest.mark.parametrize(("channels", "groups", "kernel_size", "dilation"), CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_emulated_fused_attention_matches_reference(channels, groups, kernel_size, dilation, dtype):
    # The kernels' fused step (two-term scatter / offset_grad in the backward) against the reference's
    # two ops; spread 4 puts sample points partly and wholly off the 4x5 map.
    query, kv, offset, _ = random_inputs(channels, groups, kernel_size, spread=4, dtype=dtype)
    window = (kernel_size, dilation, groups)
    got = fused_step(attention_emulated, query, kv, offset, window)

    def two_ops(q, k, o, *w):
        return deform_aggregation_reference(k, deform_correlation_reference(q, k, o, *w), o, *w)

    expected = fused_step(two_ops, query, kv, offset, window)
    also = fused_step(deform_attention_reference, query, kv, offset, window)
    tol = TOL[dtype] * (4 if dtype == torch.bfloat16 else 1)  # bf16: attn is rounded before the aggregation
    for name, g, e, a in zip(("out", "d query", "d kv", "d offset"), got, expected, also, strict=True):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.double(), e.double(), rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(a.double(), e.double(), rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


def test_emulated_fused_attention_gradcheck():
    query, kv, offset, _ = random_inputs(4, 2, 3, batch=1, height=3, width=4)
    inputs = tuple(t.requires_grad_() for t in (query, kv, offset))
    assert torch.autograd.gradcheck(lambda q, k, o: attention_emulated(q, k, o, 3, 2, 2), inputs)


@pytest.mark.parametrize("chunks", [2, 3, 5])
def test_split_channel_sums_match_one_chunk(chunks):
    # The channel-split reductions (what a GPU uses for deep layers) against one chunk per group; 5 chunks of
    # 10 channels per group in 2 groups do not divide evenly.
    query, key, offset, attn = random_inputs(20, 2, 3, spread=4)
    window = (3, 2, 2, 0.1)
    torch.testing.assert_close(
        correlate(query, key, offset, *window, chunks=chunks), correlate(query, key, offset, *window, chunks=1)
    )
    torch.testing.assert_close(
        offset_grad(attn, query, key, offset, *window, chunks=chunks),
        offset_grad(attn, query, key, offset, *window, chunks=1),
    )


def test_split_channels_heuristic():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert split_channels(24 * 9 * 196, 256, cpu) == (1, 256)
    chunks, chunk = split_channels(24 * 9 * 196, 256, cuda)  # SIFA-R50 layer3, 8 clips: few outputs
    assert chunks > 1 and chunk >= MIN_CHUNK and (chunks - 1) * chunk < 256 <= chunks * chunk
    assert split_channels(96 * 9 * 784, 128, cuda) == (1, 128)  # enough outputs already
    assert split_channels(10, 8, cuda) == (1, 8)  # too few channels to split


def test_backend_auto_uses_reference_on_cpu():
    # On CPU "auto" is the differentiable reference: its graph has no kernel Function in it (also while
    # host emulation is enabled); "emulated" runs the kernels' custom op.
    query, key, offset, _ = random_inputs(2, 1, 3)
    attn = ops.deform_correlation(query.requires_grad_(), key, offset)
    assert not is_kernel_node(attn.grad_fn, "deform_correlation")
    assert is_kernel_node(correlation_emulated(query, key, offset).grad_fn, "deform_correlation")


# ------------------------------------------------------------- fused step returning attn (docs/sifa.md §5)


def fused_with_attn(fn, query, kv, offset, window, use=("out", "attn")):
    """(out, attn) of ``fn(..., return_attn=True)`` and the gradients w.r.t. query, kv and offset of a loss
    that uses the outputs named in ``use`` (random cotangents)."""
    q, k, o = (t.detach().clone().requires_grad_() for t in (query, kv, offset))
    out, attn = fn(q, k, o, *window, return_attn=True)
    used = [t for name, t in (("out", out), ("attn", attn)) if name in use]
    loss = sum((t.double() * cotangent(t).double()).sum() for t in used)
    return (out, attn, *torch.autograd.grad(loss, (q, k, o)))


FUSED_NAMES = ("out", "attn", "d query", "d kv", "d offset")


@pytest.mark.parametrize(("channels", "groups", "kernel_size", "dilation"), CASES)
@pytest.mark.parametrize("use", [("out", "attn"), ("attn",), ("out",)])
def test_emulated_fused_attention_returns_attn_and_takes_its_gradient(channels, groups, kernel_size, dilation, use):
    # attn from the fused Function is the correlation itself; a gradient on it (alone or with one on out)
    # flows like the reference's, without a second correlation pass.
    query, kv, offset, _ = random_inputs(channels, groups, kernel_size, spread=4)
    window = (kernel_size, dilation, groups)
    got = fused_with_attn(attention_emulated, query, kv, offset, window, use)
    expected = fused_with_attn(deform_attention_reference, query, kv, offset, window, use)
    torch.testing.assert_close(got[1], deform_correlation_reference(query, kv, offset, *window), rtol=0, atol=1e-12)
    for name, g, e in zip(FUSED_NAMES, got, expected, strict=True):
        assert g.dtype == torch.float64, name
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_emulated_fused_attention_with_attn_low_precision(dtype):
    query, kv, offset, _ = random_inputs(4, 2, 3, spread=4, dtype=dtype)
    got = fused_with_attn(attention_emulated, query, kv, offset, (3, 1, 2))
    expected = fused_with_attn(deform_attention_reference, query, kv, offset, (3, 1, 2))
    tol = TOL[dtype] * (1 if dtype == torch.float32 else 4)  # 16 bits: attn is rounded before the aggregation
    for name, g, e in zip(FUSED_NAMES, got, expected, strict=True):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.double(), e.double(), rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


def test_emulated_fused_attention_with_attn_gradcheck():
    query, kv, offset, _ = random_inputs(4, 2, 3, batch=1, height=3, width=4)
    inputs = tuple(t.requires_grad_() for t in (query, kv, offset))
    assert torch.autograd.gradcheck(lambda q, k, o: attention_emulated(q, k, o, 3, 2, 2, return_attn=True), inputs)


def test_emulated_fused_attention_with_attn_non_contiguous_and_batch_zero():
    query, kv, offset, _ = random_inputs(4, 1, 3, height=5, width=5)
    q_nc, o_nc = query.transpose(2, 3), offset.transpose(2, 3)
    k_nc = torch.cat((kv, kv.flip(3)), dim=3)[..., ::2]
    assert not (q_nc.is_contiguous() or o_nc.is_contiguous() or k_nc.is_contiguous())
    got = fused_with_attn(attention_emulated, q_nc, k_nc, o_nc, (3, 1, 1))
    expected = fused_with_attn(
        deform_attention_reference, q_nc.contiguous(), k_nc.contiguous(), o_nc.contiguous(), (3, 1, 1)
    )
    for name, g, e in zip(FUSED_NAMES, got, expected, strict=True):
        torch.testing.assert_close(g, e, msg=lambda m, n=name: f"{n}: {m}")
    empty = [t[:0].requires_grad_() for t in (query, kv, offset)]
    out, attn = attention_emulated(*empty, 3, 1, 2, return_attn=True)
    assert out.shape == (0, 4, 5, 5) and attn.shape == (0, 18, 5, 5)
    (out.sum() + attn.sum()).backward()
    assert all(t.grad.shape == t.shape for t in empty)


# ------------------------------------------------------------------------------- NaN / Inf (docs/sifa.md §1)


@pytest.mark.parametrize(("name", "which", "index", "value"), nan_cases(), ids=lambda v: str(v))
@pytest.mark.parametrize("off_map", [False, True])
def test_emulated_kernels_and_reference_agree_on_nan_and_inf(name, which, index, value, off_map):
    # One policy for both backends: NaN/Inf propagate as IEEE arithmetic on the bilinear formula (the
    # reference's grid_sample on CPU). Values and every gradient must match, NaN for NaN and Inf for Inf.
    query, key, offset, attn = random_inputs(4, 2, 3, spread=2)
    if off_map:  # every tap of pixel (1, 1) of both samples wholly off the 4x5 map
        offset[:, :, 1, 1] = 40.5
    inputs = {"query": query, "key": key, "offset": offset, "attn": attn}
    inputs[which][index] = value
    args = (inputs["query"], inputs["key"], inputs["offset"], inputs["attn"])
    window = (3, 1, 2)
    got = both_ops(KERNELS, *args, window) + fused_with_attn(attention_emulated, *args[:3], window)
    expected = both_ops(REFERENCE, *args, window) + fused_with_attn(deform_attention_reference, *args[:3], window)
    names = NAMES + tuple(f"fused {n}" for n in FUSED_NAMES)
    assert any(not torch.isfinite(e).all() for e in expected), "the corrupted input must reach some output"
    for n, g, e in zip(names, got, expected, strict=True):
        torch.testing.assert_close(g, e, equal_nan=True, msg=lambda m, n=n: f"{name}: {n}: {m}")


def test_kernels_nan_policy_on_offsets():
    # The policy spelled out on the kernels: a NaN or ±Inf offset makes its tap NaN (not "off the map", 0);
    # a huge finite offset is off the map (0); a NaN query stays NaN even against an off-map sample.
    query, key, offset, _ = random_inputs(2, 1, 3, height=3, width=3)
    offset.zero_()
    for value, expected_nan in ((float("nan"), True), (float("inf"), True), (-float("inf"), True), (1e30, False)):
        off = offset.clone()
        off[0, 2 * 4 + 1, 1, 1] = value  # Δx of the centre tap at pixel (1, 1)
        attn = correlation_emulated(query, key, off, 3, 1, 1)
        assert bool(attn[0, 4, 1, 1].isnan()) == expected_nan, value
        if not expected_nan:
            assert attn[0, 4, 1, 1] == 0
        assert torch.isfinite(attn[0, :4]).all() and torch.isfinite(attn[1]).all()  # only that tap
    q = query.clone()
    q[0, 0, 1, 1] = float("nan")
    far = torch.full_like(offset, 1e3)
    assert correlation_emulated(q, key, far, 3, 1, 1)[0, :, 1, 1].isnan().all()
    assert (correlation_emulated(query, key, far, 3, 1, 1) == 0).all()


# ------------------------------------------------------------------------------------------------ GPU


def _cuda_inputs(dtype, device="cuda", **kw):
    return random_inputs(16, 2, 3, batch=3, height=9, width=11, dtype=dtype, device=device, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spread", [2, 6])
def test_cupy_matches_reference(dtype, spread):
    inputs = _cuda_inputs(dtype, spread=spread)
    window = (3, 1, 2)
    cupy = (
        lambda q, k, o, *w: ops.deform_correlation(q, k, o, *w, backend="cupy"),
        lambda v, a, o, *w: ops.deform_aggregation(v, a, o, *w, backend="cupy"),
    )
    got = both_ops(cupy, *inputs, window)
    # 16-bit: the reference is evaluated on the same 16-bit inputs in float32, summation order differs.
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2}.get(dtype, TOL[dtype])
    expected = both_ops(REFERENCE, *inputs, window)
    for name, g, e in zip(NAMES, got, expected, strict=True):
        assert g.dtype == dtype and g.device == inputs[0].device, name
        torch.testing.assert_close(g.double(), e.double(), rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.gpu
def test_cupy_auto_backend_and_gradcheck():
    query, key, offset, attn = random_inputs(4, 2, 3, batch=1, height=3, width=4, device="cuda")
    out = ops.deform_correlation(query.requires_grad_(), key, offset, groups=2)
    assert is_kernel_node(out.grad_fn, "deform_correlation")
    key.requires_grad_()
    offset.requires_grad_()
    attn.requires_grad_()
    # atomicAdd makes repeated backward passes differ in the last bits: allow that in the reentrancy check
    tol = {"nondet_tol": 1e-12}
    assert torch.autograd.gradcheck(
        lambda q, k, o: ops.deform_correlation(q, k, o, groups=2), (query, key, offset), **tol
    )
    assert torch.autograd.gradcheck(
        lambda v, a, o: ops.deform_aggregation(v, a, o, groups=2), (key, attn, offset), **tol
    )


@pytest.mark.gpu
def test_cupy_sifa_block_matches_reference_block():
    torch.manual_seed(0)
    block = ops.SIFA(8, groups=2, offset_init="kaiming", backend="cupy").double().cuda()
    ref = ops.SIFA(8, groups=2, backend="torch").double().cuda()
    ref.load_state_dict(block.state_dict())
    x = torch.randn(2, 8, 4, 7, 9, dtype=torch.float64, device="cuda", requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = block(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref)
    cot = torch.randn_like(y)
    y.backward(cot)
    y_ref.backward(cot)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(block.conv_offset.weight.grad, ref.conv_offset.weight.grad)


@pytest.mark.gpu
def test_cupy_non_default_stream():
    inputs = _cuda_inputs(torch.float32)
    expected = both_ops(REFERENCE, *inputs, (3, 1, 2))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = both_ops(CUPY, *inputs, (3, 1, 2))
    stream.synchronize()
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cupy_second_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    inputs = _cuda_inputs(torch.float32, device="cuda:1")
    got = both_ops(CUPY, *inputs, (3, 1, 2))
    expected = both_ops(REFERENCE, *inputs, (3, 1, 2))
    for g, e in zip(got, expected, strict=True):
        assert g.device == torch.device("cuda:1")
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cupy_under_autocast_keeps_input_dtype():
    block = ops.SIFA(16, groups=2, offset_init="kaiming").cuda()
    x = torch.randn(2, 16, 3, 8, 8, device="cuda", dtype=torch.float16)
    with torch.autocast("cuda", dtype=torch.float16):
        y = block(x)
    assert y.dtype == torch.float16
    ref = ops.SIFA(16, groups=2, backend="torch").cuda()
    ref.load_state_dict(block.state_dict())
    with torch.autocast("cuda", dtype=torch.float16):
        y_ref = ref(x)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_cupy_backward_alerts_in_deterministic_mode():
    query, key, offset, _ = random_inputs(4, 1, 3, device="cuda", dtype=torch.float32)
    attn = ops.deform_correlation(query, key.requires_grad_(), offset)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="not deterministic"):
            attn.sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.gpu
@pytest.mark.slow
def test_cupy_beyond_int32_indexing():
    # value has 2^31 elements (4 GiB in float16): flat indices and channel offsets overflow 32 bits.
    # With groups = C/2 and K = 1 every output channel depends on two input channels only, so the last
    # ones can be checked against the reference on a slice.
    channels, size = 2**15, 256
    gen = torch.Generator(device="cuda").manual_seed(0)
    value = torch.randn(1, channels, size, size, device="cuda", dtype=torch.float16, generator=gen)
    offset = (torch.rand(1, 2, size, size, device="cuda", generator=gen) * 4 - 2).half()
    groups = channels // 2
    attn = ops.deform_correlation(value, value, offset, 1, 1, groups, backend="cupy")
    out = ops.deform_aggregation(value, attn, offset, 1, 1, groups, backend="cupy")
    tail = value[:, -4:].float()
    attn_ref = deform_correlation_reference(tail, tail, offset.float(), 1, 1, 2)
    torch.testing.assert_close(attn[:, -2:].float(), attn_ref, rtol=5e-3, atol=5e-3)
    out_ref = deform_aggregation_reference(tail, attn[:, -2:].float(), offset.float(), 1, 1, 2)
    torch.testing.assert_close(out[:, -4:].float(), out_ref, rtol=5e-3, atol=5e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_cupy_fused_attention_with_attn_matches_reference(dtype):
    query, kv, offset, _ = _cuda_inputs(dtype, spread=4)
    cupy = fused_with_attn(
        lambda *a, **k: ops.sifa.deform_attention(*a, **k, backend="cupy"), query, kv, offset, (3, 1, 2)
    )
    cpu = [t.cpu() for t in (query, kv, offset)]
    expected = fused_with_attn(deform_attention_reference, *cpu, (3, 1, 2))
    tol = {torch.float16: 2e-2}.get(dtype, TOL[dtype])
    for name, g, e in zip(FUSED_NAMES, cupy, expected, strict=True):
        assert g.dtype == dtype and g.is_cuda, name
        torch.testing.assert_close(g.cpu().double(), e.double(), rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "which", "index", "value"), nan_cases(), ids=lambda v: str(v))
def test_cupy_and_torch_on_cuda_follow_the_nan_policy(name, which, index, value):
    # The CPU reference defines the policy; the kernels on a GPU give its values and gradients, and the torch
    # backend on CUDA (grid_sample's CUDA kernel underneath) gives its values.
    query, key, offset, attn = random_inputs(4, 2, 3, spread=2)
    offset[:, :, 1, 1] = 40.5
    inputs = {"query": query, "key": key, "offset": offset, "attn": attn}
    inputs[which][index] = value
    args = (inputs["query"], inputs["key"], inputs["offset"], inputs["attn"])
    expected = both_ops(REFERENCE, *args, (3, 1, 2))
    cuda_args = [t.cuda() for t in args]
    got = both_ops(CUPY, *cuda_args, (3, 1, 2))
    for n, g, e in zip(NAMES, got, expected, strict=True):
        torch.testing.assert_close(g.cpu(), e, equal_nan=True, msg=lambda m, n=n: f"{name}: {n}: {m}")
    q, k, o, a = cuda_args
    torch.testing.assert_close(
        ops.deform_correlation(q, k, o, groups=2, backend="torch").cpu(), expected[0], equal_nan=True
    )
    torch.testing.assert_close(
        ops.deform_aggregation(k, a, o, groups=2, backend="torch").cpu(), expected[4], equal_nan=True
    )


@pytest.mark.gpu
def test_cupy_sifa_block_with_correlation_features_matches_reference_block():
    torch.manual_seed(0)
    block = ops.SIFA(8, groups=2, offset_init="kaiming", backend="cupy", correlation_features=True).double().cuda()
    with torch.no_grad():
        block.attn_proj.weight.normal_()
    ref = ops.SIFA(8, groups=2, backend="torch", correlation_features=True).double().cuda()
    ref.load_state_dict(block.state_dict())
    x = torch.randn(2, 8, 4, 7, 9, dtype=torch.float64, device="cuda", requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = block(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref)
    cot = torch.randn_like(y)
    y.backward(cot)
    y_ref.backward(cot)
    torch.testing.assert_close(x.grad, x_ref.grad)
    for name in ("conv_offset", "attn_proj"):
        torch.testing.assert_close(getattr(block, name).weight.grad, getattr(ref, name).weight.grad)
