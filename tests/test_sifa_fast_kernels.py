"""SIFA's "fast" kernels (ops/kernels/sifa_fast.cu) against the "simple" ones (ops/kernels/sifa.cu) and the
pure-PyTorch reference.

Without a GPU both run on CPU tensors through host emulation (cooperative fibers: the shuffles and
``__syncwarp`` run as written). tests/test_sifa_kernels.py runs every op test under both variants; here
the two are compared directly (values and every gradient of the three ops), every launch plan of the
fast kernels is exercised on tiny shapes (lanes per point, vector or scalar loads, 32- or 64-bit indices,
several passes over a group's channels), and so are the memory formats, the three emulation orders and
misaligned inputs. The ``gpu`` tests compare fast, simple and reference on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from helpers.sifa import CASES, TOL, cotangent, nan_cases, random_inputs

import ops
from ops.backends import use_kernel_variant
from ops.host_emulation import host_has_fma
from ops.sifa import fast_kernels as fk
from ops.sifa import kernels as sk
from ops.sifa.reference import (
    deform_aggregation_reference,
    deform_attention_reference,
    deform_correlation_reference,
)

ALL = (True, True, True)


@pytest.fixture(autouse=True)
def host_emulation():
    with ops.kernel_host_emulation():
        yield


def op_results(query, kv, offset, attn, window, needs=ALL):
    """Every value and gradient of the three ops through the kernel dispatchers of ops.sifa.kernels (the
    kernel variant in effect), by name. The SIFA step's backward takes the given ``attn`` (not its own), so
    both variants differentiate at the same point."""
    cot_attn = cotangent(attn)
    cot_out = cotangent(kv)
    res = {"corr attn": sk.correlation_forward(query, kv, offset, *window)}
    res["agg out"] = sk.aggregation_forward(kv, attn, offset, *window)
    res["step out"], res["step attn"] = sk.attention_forward(query, kv, offset, *window)
    grads = sk.correlation_backward(cot_attn, query, kv, offset, *window, needs)
    res.update(zip(("corr d query", "corr d key", "corr d offset"), grads, strict=True))
    grads = sk.aggregation_backward(cot_out, kv, attn, offset, *window, needs)
    res.update(zip(("agg d value", "agg d attn", "agg d offset"), grads, strict=True))
    for used, (g_out, g_attn) in {
        "both": (cot_out, cot_attn),
        "out": (cot_out, None),
        "attn": (None, cot_attn),
    }.items():
        grads = sk.attention_backward(g_out, g_attn, query, kv, offset, attn, *window, needs)
        res.update(zip((f"step[{used}] d query", f"step[{used}] d kv", f"step[{used}] d offset"), grads, strict=True))
    return res


def fast_results(query, kv, offset, attn, window, plan, needs=ALL):
    """The same values and gradients as :func:`op_results`, through fast_forward / fast_backward with the
    launch ``plan`` (lanes, vectorize, index32)."""
    kernel_size, dilation, groups = window
    scale = groups / query.shape[1]
    cot_attn, cot_out = cotangent(attn), cotangent(kv)
    args = (kernel_size, dilation, groups)
    res = {"corr attn": fk.fast_forward(query, kv, offset, None, *args, scale, None, plan)[1]}
    res["agg out"] = fk.fast_forward(None, kv, offset, attn, *args, 1.0, 1.0, plan)[0]
    res["step out"], res["step attn"] = fk.fast_forward(query, kv, offset, None, *args, scale, 1.0, plan)
    need_q, need_kv, need_off = needs
    grads = fk.fast_backward(query, kv, offset, None, None, cot_attn, *args, (*needs, False), scale, plan)
    res.update(zip(("corr d query", "corr d key", "corr d offset"), grads[:3], strict=True))
    agg_needs = (False, need_kv, need_off, need_q)  # d attn stands in for d query
    grads = fk.fast_backward(None, kv, offset, attn, cot_out, None, *args, agg_needs, 1.0, plan)
    res.update(zip(("agg d value", "agg d offset", "agg d attn"), grads[1:], strict=True))
    for used, (g_out, g_attn) in {
        "both": (cot_out, cot_attn),
        "out": (cot_out, None),
        "attn": (None, cot_attn),
    }.items():
        a = attn if g_out is not None else None
        grads = fk.fast_backward(query, kv, offset, a, g_out, g_attn, *args, (*needs, False), scale, plan)
        res.update(
            zip((f"step[{used}] d query", f"step[{used}] d kv", f"step[{used}] d offset"), grads[:3], strict=True)
        )
    return res


def assert_same_results(got, expected, tol, what=""):
    assert got.keys() == expected.keys()
    for name in expected:
        g, e = got[name], expected[name]
        if e is None:
            assert g is None, f"{what}{name}"
            continue
        assert g.dtype == e.dtype and g.shape == e.shape, f"{what}{name}"
        torch.testing.assert_close(
            g.double(), e.double(), rtol=tol, atol=tol, equal_nan=True, msg=lambda m, n=name: f"{what}{n}: {m}"
        )


def assert_as_accurate_as_simple(fast, simple, exact, dtype, what=""):
    """Each output of the fast kernels is as accurate as the simple kernels' (the GPU-verified ones): its
    largest error against ``exact`` (the same op on the float64 inputs) is within a small factor of the
    simple output's, or of one unit in the last place of ``dtype`` at the output's largest magnitude.
    Scale-aware where a fixed tolerance is not: a float32 sum over 256 channels used a third of the 1e-5
    tolerance (emulated, fast vs simple), while 16-bit outputs used 5% of theirs (a bias of several units
    in the last place would have passed). Factors measured in emulation, 16 draws: float32 errors (sums
    of many roundings whose largest differs between summation orders) up to 2.0x the simple one's,
    16-bit ones (the final rounding) at most 0.74 ulp."""
    factor = 4.0 if dtype == torch.float32 else 2.0
    for name, e in exact.items():
        if e is None:
            assert fast[name] is None and simple[name] is None, f"{what}{name}"
            continue
        e = e.double()
        err_fast = (fast[name].double() - e).abs().max().item()
        err_simple = (simple[name].double() - e).abs().max().item()
        ulp = torch.finfo(dtype).eps * e.abs().max().item()
        assert err_fast <= factor * max(err_simple, ulp), (
            f"{what}{name}: fast error {err_fast:.3g}, simple {err_simple:.3g}, one ulp at scale {ulp:.3g}"
        )


def exact_results(query, kv, offset, attn, window, needs=ALL):
    """:func:`op_results` of the simple kernels on the float64 inputs: what both variants round."""
    with use_kernel_variant("simple"):
        return op_results(*(t.double() for t in (query, kv, offset, attn)), window, needs=needs)


def both_variants(*args, **kwargs):
    with use_kernel_variant("fast"):
        fast = op_results(*args, **kwargs)
    with use_kernel_variant("simple"):
        simple = op_results(*args, **kwargs)
    return fast, simple


# --------------------------------------------------------------------------------------- fast == simple


@pytest.mark.parametrize(("channels", "groups", "kernel_size", "dilation"), CASES)
@pytest.mark.parametrize("spread", [2, 6])
def test_fast_matches_simple_values_and_every_gradient(channels, groups, kernel_size, dilation, spread):
    query, kv, offset, attn = random_inputs(channels, groups, kernel_size, spread=spread)
    fast, simple = both_variants(query, kv, offset, attn, (kernel_size, dilation, groups))
    assert_same_results(fast, simple, 1e-12)


@pytest.mark.parametrize(
    ("channels", "groups", "kernel_size", "dilation"),
    [(16, 2, 3, 1), (12, 1, 3, 2), (6, 2, 5, 1), (10, 2, 1, 1)],  # vector loads in float64 (and some in float32)
)
def test_fast_matches_simple_and_reference_with_vector_loads(channels, groups, kernel_size, dilation):
    # Groups of 8, 12, 3 and 5 channels: vectors of two doubles where they divide the group, scalars where not.
    query, kv, offset, attn = random_inputs(channels, groups, kernel_size, spread=4)
    window = (kernel_size, dilation, groups)
    fast, simple = both_variants(query, kv, offset, attn, window)
    assert_same_results(fast, simple, 1e-12)
    torch.testing.assert_close(fast["corr attn"], deform_correlation_reference(query, kv, offset, *window))
    torch.testing.assert_close(fast["agg out"], deform_aggregation_reference(kv, attn, offset, *window))
    out, a = deform_attention_reference(query, kv, offset, *window, return_attn=True)
    torch.testing.assert_close(fast["step out"], out)
    torch.testing.assert_close(fast["step attn"], a)


@pytest.mark.parametrize(
    "needs", [(True, False, False), (False, True, False), (False, False, True), (True, False, True)]
)
def test_fast_partial_gradients_match_simple(needs):
    query, kv, offset, attn = random_inputs(8, 2, 3, spread=4)
    fast, simple = both_variants(query, kv, offset, attn, (3, 1, 2), needs=needs)
    assert_same_results(fast, simple, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels", [16, 6])  # 16 in 2 groups: vectors for every dtype; 6: scalar loads
def test_fast_matches_simple_and_reference_low_precision(dtype, channels):
    query, kv, offset, attn = random_inputs(channels, 2, 3, spread=4, dtype=dtype)
    window = (3, 1, 2)
    fast, simple = both_variants(query, kv, offset, attn, window)
    # The two differ in summation order and in where 16-bit rounding happens (the fast backward keeps the
    # step's d attn in float32, the simple one rounds it to the storage type): a few units in the last place.
    assert_same_results(fast, simple, TOL[dtype] * (1 if dtype == torch.float32 else 4))
    assert_as_accurate_as_simple(fast, simple, exact_results(query, kv, offset, attn, window), dtype)
    ref = deform_correlation_reference(query, kv, offset, *window)
    torch.testing.assert_close(fast["corr attn"].double(), ref.double(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.skipif(not host_has_fma(), reason="this CPU has no FMA instructions")
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float16, marks=pytest.mark.slow)])
def test_fast_and_simple_as_accurate_in_an_fma_build(dtype, monkeypatch):
    # nvcc and NVRTC contract a * b + c into FMAs; the default emulation build (GCC, one expression at a
    # time) mostly does not. The same accuracy criteria hold for the kernels built as a GPU rounds.
    monkeypatch.setenv("VMM_EMULATION_FMA", "1")
    test_fast_matches_simple_and_reference_low_precision(dtype, 16)


@pytest.mark.parametrize(("name", "which", "index", "value"), nan_cases(), ids=lambda v: str(v))
@pytest.mark.parametrize("off_map", [False, True])
def test_fast_and_simple_agree_on_nan_and_inf(name, which, index, value, off_map):
    # The NaN / Inf policy of docs/sifa.md §1 in every value and gradient, NaN for NaN and Inf for Inf.
    query, key, offset, attn = random_inputs(4, 2, 3, spread=2)
    if off_map:
        offset[:, :, 1, 1] = 40.5
    inputs = {"query": query, "key": key, "offset": offset, "attn": attn}
    inputs[which][index] = value
    fast, simple = both_variants(inputs["query"], inputs["key"], inputs["offset"], inputs["attn"], (3, 1, 2))
    assert any(not torch.isfinite(t).all() for t in simple.values()), "the corrupted input must reach some output"
    assert_same_results(fast, simple, 1e-12, what=f"{name}: ")


# ------------------------------------------------------------------------------------------ launch plans

PLANS = [  # (lanes, vectorize, index32): the automatic plan's alternatives
    (1, True, True),  # one thread per point; two doubles per lane: groups of 6 take 3 steps, 2 passes
    (2, False, True),
    (4, True, False),  # 64-bit indices
    (32, False, False),  # more lanes than channels: idle lanes join the shuffles with zeros
]


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize(("channels", "groups", "kernel_size", "dilation"), [(12, 2, 3, 2), (5, 1, 3, 1), (8, 4, 1, 1)])
def test_every_launch_plan_gives_the_same_results(plan, channels, groups, kernel_size, dilation):
    query, kv, offset, attn = random_inputs(channels, groups, kernel_size, spread=4)
    window = (kernel_size, dilation, groups)
    expected = fast_results(query, kv, offset, attn, window, fk.DEFAULT_PLAN)
    assert_same_results(fast_results(query, kv, offset, attn, window, plan), expected, 1e-12, what=f"{plan}: ")
    with use_kernel_variant("simple"):
        simple = op_results(query, kv, offset, attn, window)
    assert_same_results({n: simple[n] for n in expected}, expected, 1e-12, what="simple: ")


def test_fast_plan_choices():
    x = torch.zeros(2, 64, 3, 3).contiguous(memory_format=torch.channels_last)
    shape = (2, 64, 1, 3, 3, 3, 1)
    assert fk.fast_plan((x,), shape) == (16, True, True)  # 64 floats: 16 lanes of float4
    assert fk.fast_plan((x.double(),), shape) == (32, True, True)
    assert fk.fast_plan((x,), (2, 64, 4, 3, 3, 3, 1)) == (4, True, True)  # groups of 16
    assert fk.fast_plan((x,), (2, 64, 32, 3, 3, 3, 1)) == (2, False, True)  # groups of 2: no float4
    assert fk.fast_plan((x.half(),), (2, 64, 1, 3, 3, 3, 1)) == (8, True, True)
    assert fk.fast_plan((x,), shape, (None, False, None)) == (32, False, True)
    # a storage offset of one element: not 16-byte aligned, scalar loads
    shifted = torch.zeros(x.numel() + 1)[1:].view(2, 3, 3, 64).permute(0, 3, 1, 2)
    assert shifted.is_contiguous(memory_format=torch.channels_last) and shifted.data_ptr() % 16 != 0
    assert fk.fast_plan((x, shifted), shape) == (32, False, True)
    # indices past 2^31 - 1 take the 64-bit path
    assert fk.fast_plan((x,), (1 << 15, 256, 1, 16, 16, 3, 1))[2] is False
    with pytest.raises(ops.OpArgumentError, match="lanes"):
        fk.fast_plan((x,), shape, (3, True, None))


def _misaligned_like(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` [B,C,H,W], channels-last in memory, whose first element is not 16-byte aligned."""
    b, c, h, w = t.shape
    out = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(b, h, w, c).permute(0, 3, 1, 2)
    out.copy_(t)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.data_ptr() % 16 != 0
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_misaligned_inputs_take_the_scalar_path(dtype):
    # Groups of 8 channels: vector loads for every dtype when aligned; a storage offset of one element
    # makes the plan fall back to scalar loads (a vector load there would fault on a GPU, and fails the
    # emulated launch through VMM_EMU_CHECK).
    query, kv, offset, attn = random_inputs(16, 2, 3, spread=4, dtype=dtype)
    with use_kernel_variant("fast"):
        aligned = op_results(query, kv, offset, attn, (3, 1, 2))
        shifted = op_results(*(_misaligned_like(t) for t in (query, kv, offset, attn)), (3, 1, 2))
    assert_same_results(shifted, aligned, TOL[dtype] if dtype != torch.float64 else 1e-12)


def test_emulation_refuses_a_misaligned_vector_load():
    # The guard behind the scalar fallback: launched with vectors on a misaligned map, the emulated kernel
    # fails (VMM_EMU_CHECK) instead of reading what a GPU would fault on.
    from ops.host_emulation import EmulatedKernelError

    query, kv, offset, _ = (_misaligned_like(t) for t in random_inputs(8, 1, 1, dtype=torch.float32))
    attn = torch.empty(2, 1, 4, 5).contiguous(memory_format=torch.channels_last)
    out = torch.empty_like(kv, memory_format=torch.channels_last)
    geometry = (2 * 4 * 5, 8, 1, 4, 5, 1, 1)
    args = (query, kv, offset, attn, out, *geometry, fk.FAST_CORR | fk.FAST_AGG, 0.125, 1.0, 2)
    with pytest.raises(EmulatedKernelError, match="misaligned"):
        fk.FAST_SOURCE.launch("sifa_fast_forward_v32", args, dtype=torch.float32, grid=(1, 1, 1), block=(256, 1, 1))


def grid_stride_trips(n_points: int, lanes: int, blocks: int) -> list[int]:
    """How many grid-stride iterations each lane group of block 0 runs (the kernels' loop over points)."""
    per_block = fk.FAST_THREADS // lanes
    return [len(range(slot, n_points, blocks * per_block)) for slot in range(per_block)]


@pytest.mark.parametrize("plan", [(8, True, True), (16, False, True), (4, True, False)], ids=str)
def test_lane_groups_of_one_warp_with_different_trip_counts(plan, monkeypatch):
    # A one-block grid (MAX_BLOCKS = 1): every lane group walks several points, and the groups of one warp
    # leave the grid-stride loop at different iterations, so each shuffle and __syncwarp must name its
    # group's lanes only (a wider mask would wait for lanes that have left: divergent, caught here).
    monkeypatch.setattr(fk, "MAX_BLOCKS", 1)
    query, kv, offset, attn = random_inputs(12, 2, 3, batch=1, height=5, width=15, spread=4)
    lanes = plan[0]
    trips = grid_stride_trips(5 * 15, lanes, 1)
    warps = [trips[i : i + 32 // lanes] for i in range(0, len(trips), 32 // lanes)]
    assert max(trips) >= 2 and any(len(set(w)) > 1 for w in warps)  # the case this test is about
    window = (3, 1, 2)
    got = fast_results(query, kv, offset, attn, window, plan)
    with use_kernel_variant("simple"):
        simple = op_results(query, kv, offset, attn, window)
    assert_same_results(got, {n: simple[n] for n in got}, 1e-12, what=f"{plan}: ")


def test_block_size_fits_the_kernels_launch_bounds():
    # __launch_bounds__(N, M) in sifa_fast.cu: a launch with more than N threads per block fails on a GPU
    # ("too many resources requested"), which emulation does not check; lane groups must not straddle warps.
    import re

    bounds = re.findall(r"__launch_bounds__\((\d+),\s*(\d+)\)", fk.FAST_SOURCE.path.read_text(encoding="utf-8"))
    assert len(bounds) == 2
    for max_threads, _ in bounds:
        assert fk.FAST_THREADS <= int(max_threads)
    assert fk.FAST_THREADS % 32 == 0


# --------------------------------------------------------------------------------------- memory formats


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("variant", ["fast", "simple"])
def test_results_take_the_memory_format_of_their_inputs(variant):
    query, kv, offset, attn = random_inputs(8, 2, 3, spread=4)
    window = (3, 1, 2)
    with use_kernel_variant(variant):
        nchw = op_results(query, kv, offset, attn, window)
        nhwc = op_results(*(_channels_last(t) for t in (query, kv, offset, attn)), window)
    for name, t in nchw.items():
        assert t.is_contiguous(), name
    for name, t in nhwc.items():
        assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous(), name
    assert_same_results(nhwc, nchw, 1e-12)


def test_public_ops_with_channels_last_and_non_contiguous_inputs():
    query, kv, offset, _ = random_inputs(8, 2, 3, height=5, width=6, spread=4)
    window = (3, 1, 2)
    inputs = {
        "nchw": (query, kv, offset),
        "channels_last": tuple(_channels_last(t) for t in (query, kv, offset)),
        "strided": tuple(torch.cat((t, t), dim=3)[..., : t.shape[3]] for t in (query, kv, offset)),
    }
    expected = None
    for layout, (q, k, o) in inputs.items():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, o)]
        out, attn = ops.deform_attention(*leaves, *window, backend="emulated", return_attn=True)
        if layout == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        loss = (out * cotangent(out)).sum() + (attn * cotangent(attn)).sum()
        loss.backward()
        got = (out, attn, *(t.grad for t in leaves))
        if expected is None:
            expected = got
        for name, g, e in zip(("out", "attn", "d query", "d kv", "d offset"), got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=lambda m, n=f"{layout} {name}": f"{n}: {m}")


@pytest.mark.parametrize("variant", ["fast", "simple"])
@pytest.mark.parametrize(
    ("channels", "groups", "size", "layout"),
    [(8, 2, (3, 4), "channels_last"), (1, 1, (3, 4), "nchw"), (4, 2, (1, 1), "nchw"), (4, 2, (1, 1), "channels_last")],
)
def test_opcheck_with_channels_last_and_ambiguous_inputs(variant, channels, groups, size, layout):
    # The fake implementations give the real ops' strides (opcheck compares them) for channels-last inputs,
    # and for shapes that are dense in both formats (C = 1, H = W = 1: the size-1 dimensions' strides
    # differ), forward and backward ops, on both variants.
    query, kv, offset, attn = random_inputs(channels, groups, 3, batch=1, height=size[0], width=size[1])
    if layout == "channels_last":
        query, kv, offset, attn = (_channels_last(t) for t in (query, kv, offset, attn))
    grad_out = cotangent(kv).contiguous(memory_format=sk.memory_format_of(kv))
    window = (3, 1, groups)
    with use_kernel_variant(variant):
        for requires_grad in (False, True):
            q, k, o, a = (t.clone().requires_grad_(requires_grad) for t in (query, kv, offset, attn))
            torch.library.opcheck(torch.ops.vmm.deform_correlation, (q, k, o, *window))
            torch.library.opcheck(torch.ops.vmm.deform_aggregation, (k, a, o, *window))
            torch.library.opcheck(torch.ops.vmm.deform_attention, (q, k, o, *window))
        for needs in ([True, True, True], [False, True, False]):
            torch.library.opcheck(torch.ops.vmm.deform_correlation_backward, (attn, query, kv, offset, *window, needs))
            torch.library.opcheck(
                torch.ops.vmm.deform_aggregation_backward, (grad_out, kv, attn, offset, *window, needs)
            )
            for grads in ((grad_out, attn), (None, attn), (grad_out, None)):
                torch.library.opcheck(
                    torch.ops.vmm.deform_attention_backward, (*grads, query, kv, offset, attn, *window, needs)
                )


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fast_gradcheck(layout):
    # float64 gradcheck of the three ops on the fast kernels, groups of 2 (vectors of two doubles).
    query, kv, offset, attn = random_inputs(4, 2, 3, batch=1, height=3, width=4)
    if layout == "channels_last":
        query, kv, offset, attn = (_channels_last(t) for t in (query, kv, offset, attn))
    query, kv, offset, attn = (t.requires_grad_() for t in (query, kv, offset, attn))
    window = (3, 2, 2)
    with use_kernel_variant("fast"):
        assert torch.autograd.gradcheck(
            lambda q, k, o: ops.deform_correlation(q, k, o, *window, backend="emulated"), (query, kv, offset)
        )
        assert torch.autograd.gradcheck(
            lambda v, a, o: ops.deform_aggregation(v, a, o, *window, backend="emulated"), (kv, attn, offset)
        )
        assert torch.autograd.gradcheck(
            lambda q, k, o: ops.deform_attention(q, k, o, *window, backend="emulated", return_attn=True),
            (query, kv, offset),
        )


def test_fast_batch_zero_channels_last():
    query, kv, offset, _ = (_channels_last(t[:0]).requires_grad_() for t in random_inputs(8, 2, 3))
    with use_kernel_variant("fast"):
        out, attn = ops.deform_attention(query, kv, offset, 3, 1, 2, backend="emulated", return_attn=True)
    assert out.shape == (0, 8, 4, 5) and attn.shape == (0, 18, 4, 5)
    (out.sum() + attn.sum()).backward()
    assert all(t.grad.shape == t.shape for t in (query, kv, offset))


@pytest.mark.parametrize("variant", ["fast", "simple"])
@pytest.mark.parametrize("clip_layout", ["ncdhw", "channels_last_3d"])
def test_sifa_block_on_the_kernels_matches_the_reference_block(variant, clip_layout):
    # On the kernels the block hands the ops channels-last frame pairs (modules.py); values and gradients
    # (input, offset conv, attn projection) are those of the reference block.
    torch.manual_seed(0)
    block = ops.SIFA(4, groups=2, offset_init="kaiming", backend="emulated", correlation_features=True).double()
    with torch.no_grad():
        block.attn_proj.weight.normal_()
    ref = ops.SIFA(4, groups=2, backend="torch", correlation_features=True).double()
    ref.load_state_dict(block.state_dict())
    x = torch.randn(2, 4, 3, 5, 6, dtype=torch.float64)
    if clip_layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    results = []
    for module in (block, ref):
        xi = x.detach().clone().requires_grad_()
        with use_kernel_variant(variant):
            y = module(xi)
            y.backward(cotangent(y))
        results.append((y, xi.grad, module.conv_offset.weight.grad, module.attn_proj.weight.grad))
    for name, g, e in zip(("y", "d x", "d conv_offset", "d attn_proj"), *results, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


# ----------------------------------------------------------------------------------- emulation orders


@pytest.mark.parametrize("order", ["reverse", "shuffle", "warps", "warps_reverse"])
def test_fast_kernels_do_not_depend_on_the_thread_order(order, monkeypatch):
    # A missing __syncwarp between lane 0's write of attn / Ā and the other lanes' reads would show here: the
    # plans with several lanes and several channel steps per group take the two-pass paths, and a backward
    # without d offset has no shuffle in phase B that would hide the race.
    # Only d kv (atomicAdd: the order of the additions follows the threads') may differ in the last bits.
    query, kv, offset, attn = random_inputs(12, 2, 3, spread=4)
    runs = [
        (fk.DEFAULT_PLAN, ALL),  # one pass
        ((2, False, True), ALL),  # 3 steps of 2 lanes per group of 6: two passes
        ((2, False, True), (True, False, False)),
        ((2, True, False), (True, True, False)),
        ((32, False, True), ALL),
    ]
    window = (3, 1, 2)
    monkeypatch.setenv("VMM_EMULATION_ORDER", "forward")
    expected = [fast_results(query, kv, offset, attn, window, plan, needs) for plan, needs in runs]
    monkeypatch.setenv("VMM_EMULATION_ORDER", order)
    monkeypatch.setenv("VMM_EMULATION_SEED", "7")
    for (plan, needs), exp in zip(runs, expected, strict=True):
        got = fast_results(query, kv, offset, attn, window, plan, needs)
        for name in exp:
            if exp[name] is None:
                continue
            tol = 1e-13 if "d kv" in name or "d key" in name or "d value" in name else 0.0
            torch.testing.assert_close(
                got[name], exp[name], rtol=tol, atol=tol, msg=lambda m, n=f"{plan} {name}": f"{n}: {m}"
            )


# ------------------------------------------------------------------------------------------------ GPU


def _cuda_case(dtype, channels=64, groups=2, batch=3, height=9, width=11, spread=4):
    return random_inputs(
        channels, groups, 3, batch=batch, height=height, width=width, spread=spread, dtype=dtype, device="cuda"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("channels", "groups"), [(64, 2), (256, 1), (24, 3), (5, 1)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cupy_fast_matches_simple_and_reference(dtype, channels, groups, layout):
    query, kv, offset, attn = _cuda_case(dtype, channels, groups)
    if layout == "channels_last":
        query, kv, offset, attn = (_channels_last(t) for t in (query, kv, offset, attn))
    window = (3, 1, groups)
    fast, simple = both_variants(query, kv, offset, attn, window)
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2}.get(dtype, TOL[dtype])
    if dtype == torch.float64:
        assert_same_results(fast, simple, tol)
    else:  # not a fixed tolerance: sums over 256 channels need more in float32, 16-bit ones far less
        assert_as_accurate_as_simple(fast, simple, exact_results(query, kv, offset, attn, window), dtype)
    cpu = [t.cpu().double() for t in (query, kv, offset, attn)]
    ref = deform_correlation_reference(*cpu[:3], *window)
    torch.testing.assert_close(fast["corr attn"].cpu().double(), ref, rtol=tol, atol=tol)
    ref = deform_aggregation_reference(cpu[1], cpu[3], cpu[2], *window)
    torch.testing.assert_close(fast["agg out"].cpu().double(), ref, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("plan", [*PLANS, (16, True, None)], ids=str)
def test_cupy_fast_launch_plans(plan):
    query, kv, offset, attn = _cuda_case(torch.float32, 48, 2)
    window = (3, 2, 2)
    expected = fast_results(query, kv, offset, attn, window, fk.DEFAULT_PLAN)
    assert_same_results(fast_results(query, kv, offset, attn, window, plan), expected, 1e-5)


def two_pass_and_grid_stride_case(dtype, channels, groups, plan, blocks, device, monkeypatch):
    """fast_results with ``plan`` on a grid of at most ``blocks`` blocks (None: as launched) against the
    simple kernels: as accurate, or equal to 1e-10 in float64."""
    if blocks is not None:
        monkeypatch.setattr(fk, "MAX_BLOCKS", blocks)
    query, kv, offset, attn = random_inputs(
        channels, groups, 3, batch=3, height=9, width=11, spread=4, dtype=dtype, device=device
    )
    window = (3, 1, groups)
    got = fast_results(query, kv, offset, attn, window, plan)
    with use_kernel_variant("simple"):
        simple = {n: t for n, t in op_results(query, kv, offset, attn, window).items() if n in got}
    if dtype == torch.float64:
        assert_same_results(got, simple, 1e-10)
    else:
        exact = {n: t for n, t in exact_results(query, kv, offset, attn, window).items() if n in got}
        assert_as_accurate_as_simple(got, simple, exact, dtype)


TWO_PASS_CASES = [  # (dtype, channels, groups, plan, blocks)
    (torch.float32, 512, 1, fk.DEFAULT_PLAN, None),  # 32 lanes of float4, 4 steps: attn / Ā read back (__syncwarp)
    (torch.float16, 1024, 1, fk.DEFAULT_PLAN, None),  # 32 lanes of 8 halves, 4 steps
    (torch.float32, 96, 2, (4, True, None), 2),  # 8 groups a warp, 3 steps each; 297 points, 2 blocks of 64 groups
    (torch.float64, 24, 3, (8, True, None), 1),  # 4 groups a warp, 4 steps of one double2; one block
    (torch.bfloat16, 256, 1, (8, True, False), 1),  # the 64-bit vector build (ptxas spills in it), 4 steps
]


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "channels", "groups", "plan", "blocks"), TWO_PASS_CASES, ids=str)
def test_cupy_fast_two_pass_paths_and_grid_stride(dtype, channels, groups, plan, blocks, monkeypatch):
    # On the hardware (independent thread scheduling, real shuffles and __syncwarp): the paths that read back
    # what lane 0 wrote (groups of more than SIFA_FAST_MAX_STEPS channel steps), and lane groups of one
    # warp that run different numbers of grid-stride iterations (the capped grids: 297 points).
    if blocks is not None:
        lanes = plan[0]
        trips = grid_stride_trips(3 * 9 * 11, lanes, blocks)
        assert any(len(set(trips[i : i + 32 // lanes])) > 1 for i in range(0, len(trips), 32 // lanes))
    two_pass_and_grid_stride_case(dtype, channels, groups, plan, blocks, "cuda", monkeypatch)


@pytest.mark.gpu
def test_cupy_fast_gradcheck_and_misaligned_inputs():
    query, kv, offset, attn = random_inputs(4, 2, 3, batch=1, height=3, width=4, device="cuda")
    leaves = tuple(t.requires_grad_() for t in (query, kv, offset))
    with use_kernel_variant("fast"):
        assert torch.autograd.gradcheck(
            lambda q, k, o: ops.deform_attention(q, k, o, 3, 1, 2, backend="cupy", return_attn=True),
            leaves,
            nondet_tol=1e-12,
        )
        inputs = _cuda_case(torch.float32, 32, 2)
        aligned = op_results(*inputs, (3, 1, 2))
        shifted = op_results(*(_misaligned_like(t) for t in inputs), (3, 1, 2))
    assert_same_results(shifted, aligned, 1e-5)


@pytest.mark.gpu
def test_cupy_fast_sifa_block_matches_simple_and_reference():
    torch.manual_seed(0)
    block = ops.SIFA(16, groups=2, offset_init="kaiming", backend="cupy", correlation_features=True).cuda()
    with torch.no_grad():
        block.attn_proj.weight.normal_()
    ref = ops.SIFA(16, groups=2, backend="torch", correlation_features=True).cuda()
    ref.load_state_dict(block.state_dict())
    x = torch.randn(2, 16, 4, 14, 14, device="cuda")
    results = {}
    for name, module, variant in (("fast", block, "fast"), ("simple", block, "simple"), ("torch", ref, "fast")):
        xi = x.clone().requires_grad_()
        with use_kernel_variant(variant):
            y = module(xi)
            y.backward(torch.ones_like(y))
        results[name] = (y.detach(), xi.grad, module.conv_offset.weight.grad.clone())
        module.zero_grad(set_to_none=True)
    for name in ("simple", "torch"):
        for g, e in zip(results["fast"], results[name], strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_cupy_fast_backward_alerts_in_deterministic_mode():
    query, key, offset, _ = random_inputs(4, 1, 3, device="cuda", dtype=torch.float32)
    with use_kernel_variant("fast"):
        attn = ops.deform_correlation(query, key.requires_grad_(), offset)
        previous = torch.are_deterministic_algorithms_enabled()
        try:
            torch.use_deterministic_algorithms(True)
            with pytest.raises(RuntimeError, match="not deterministic"):
                attn.sum().backward()
        finally:
            torch.use_deterministic_algorithms(previous)
