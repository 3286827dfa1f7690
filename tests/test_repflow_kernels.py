"""The fused TV-L1 kernels: host emulation against the reference (values, gradients, float64 gradcheck),
checkpointing, backend selection, and CuPy-vs-reference on a GPU (``gpu`` marker).

Without a GPU the kernels run on CPU tensors through the public test backend ``backend="emulated"``,
which every test here enables with ``ops.kernel_host_emulation()`` (see ops/host_emulation.py). Every
test runs once per kernel variant ("fast": kernels/tvl1_plane.cu where a plane fits a block, "simple":
kernels/tvl1.cu); tests/test_repflow_fast_kernels.py compares the two directly.
"""

from __future__ import annotations

import math

import pytest
import torch

import ops
from ops.backends import KERNEL_VARIANTS, use_kernel_variant
from ops.library import is_kernel_node
from ops.repflow import FlowStencils, default_stencils
from ops.repflow.kernels import segment_length
from ops.repflow.modules import FCFBlock, FlowLayer


@pytest.fixture(autouse=True, params=KERNEL_VARIANTS)
def host_emulation(request):
    with ops.kernel_host_emulation(), use_kernel_variant(request.param):
        yield


def flow(i0, i1, n_iter, theta, lam, tau, stencils, *, kernels):
    """``ops.tvl1_flow`` on the reference (``kernels=False``) or the fused kernels; CPU tensors run the
    kernels through host emulation."""
    return ops.tvl1_flow(i0, i1, n_iter, theta, lam, tau, stencils, backend="emulated" if kernels else "torch")


def random_stencils(channels, generator=None, dtype=torch.float64, device=None):
    base = default_stencils(channels, dtype=dtype, device=device)
    return FlowStencils(*(s + 0.2 * torch.randn(s.shape, dtype=dtype, generator=generator).to(s.device) for s in base))


def both(i0, i1, n_iter, *args, **kwargs):
    """(reference, kernels) on the same inputs; CPU tensors run the kernels through host emulation."""
    ref = flow(i0, i1, n_iter, *args, kernels=False, **kwargs)
    ker = flow(i0, i1, n_iter, *args, kernels=True, **kwargs)
    return ref, ker


# ------------------------------------------------------------------------ emulated values


@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (1, 2, 1, 7), (1, 1, 6, 1), (3, 1, 2, 2)])
@pytest.mark.parametrize("n_iter", [1, 2, 5])
def test_emulated_kernels_match_reference_float64(shape, n_iter):
    g = torch.Generator().manual_seed(1)
    i0 = torch.randn(shape, dtype=torch.float64, generator=g) * 20
    i1 = torch.randn(shape, dtype=torch.float64, generator=g) * 20
    ref, ker = both(i0, i1, n_iter, 0.4, 0.2, 0.3, random_stencils(shape[1], g))
    torch.testing.assert_close(ker, ref, rtol=1e-12, atol=1e-12)


def test_emulated_kernels_match_reference_float32_defaults():
    i0 = torch.randn(2, 4, 7, 8) * 30
    i1 = i0 + torch.randn(2, 4, 7, 8) * 5
    ref, ker = both(i0, i1, 10, 0.3, 0.15, 0.25, None)
    assert ker.dtype == torch.float32
    torch.testing.assert_close(ker, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_kernels_16bit_inputs_compute_in_float32(dtype):
    i0 = (torch.randn(1, 2, 6, 6) * 30).to(dtype)
    i1 = (torch.randn(1, 2, 6, 6) * 30).to(dtype)
    ref, ker = both(i0, i1, 4, 0.3, 0.15, 0.25, None)
    assert ker.dtype == dtype and ref.dtype == dtype
    # Both compute in float32 and round once at the end: equal up to one unit in the last 16-bit place.
    expected = flow(i0.float(), i1.float(), 4, 0.3, 0.15, 0.25, None, kernels=False)
    ulp = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(ker.float(), expected, rtol=ulp, atol=ulp)
    torch.testing.assert_close(ker, ref, rtol=ulp, atol=ulp)


def test_emulated_kernels_non_contiguous_and_empty():
    i0 = torch.randn(2, 5, 6, 3, dtype=torch.float64).permute(0, 3, 1, 2)
    i1 = torch.randn(2, 5, 6, 3, dtype=torch.float64).permute(0, 3, 1, 2)
    ref, ker = both(i0, i1, 3, 0.3, 0.15, 0.25, None)
    torch.testing.assert_close(ker, ref, rtol=1e-12, atol=1e-12)
    empty = torch.zeros(0, 2, 3, 3, requires_grad=True)
    out = flow(empty, empty, 3, 0.3, 0.15, 0.25, None, kernels=True)
    assert out.shape == (0, 4, 3, 3)
    out.sum().backward()
    assert empty.grad.shape == empty.shape
    no_rows = torch.zeros(1, 2, 0, 3)
    assert flow(no_rows, no_rows, 3, 0.3, 0.15, 0.25, None, kernels=True).shape == (1, 4, 0, 3)


def test_emulated_kernels_known_answers():
    i0 = torch.randn(1, 2, 5, 5)
    assert torch.equal(flow(i0, i0, 5, 0.3, 0.15, 0.25, None, kernels=True), torch.zeros(1, 4, 5, 5))
    const0, const1 = torch.full((1, 1, 4, 4), 2.0), torch.full((1, 1, 4, 4), 9.0)
    out = flow(const0, const1, 5, 0.3, 0.15, 0.25, None, kernels=True)
    assert torch.isfinite(out).all() and torch.equal(out, torch.zeros_like(out))


# ------------------------------------------------------------------------ emulated gradients


def _leaves(channels, generator, h=4, w=5):
    i0 = (torch.randn(1, channels, h, w, dtype=torch.float64, generator=generator) * 3).requires_grad_()
    i1 = (torch.randn(1, channels, h, w, dtype=torch.float64, generator=generator) * 3).requires_grad_()
    scalars = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.35, 0.4, 0.3)]
    stencils = [s.requires_grad_() for s in random_stencils(channels, generator)]
    return i0, i1, scalars, stencils


@pytest.mark.parametrize("n_iter", [1, 4])
def test_emulated_kernels_gradcheck_every_input(n_iter):
    # n_iter = 4: checkpoint spacing 2, so the backward recomputes a segment from a stored checkpoint.
    g = torch.Generator().manual_seed(3)
    i0, i1, scalars, stencils = _leaves(2, g)

    def f(i0, i1, theta, lam, tau, *st):
        return flow(i0, i1, n_iter, theta, lam, tau, st, kernels=True)

    assert torch.autograd.gradcheck(f, (i0, i1, *scalars, *stencils), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_emulated_kernel_gradients_match_reference_over_many_iterations():
    # 10 iterations = segments of 4, 4 and 2; every branch of the threshold occurs (random images).
    g = torch.Generator().manual_seed(5)
    i0, i1, scalars, stencils = _leaves(3, g, h=6, w=7)
    leaves = (i0, i1, *scalars, *stencils)
    weight = torch.randn(1, 6, 6, 7, dtype=torch.float64, generator=g)
    grads = []
    for kernels in (False, True):
        out = flow(i0, i1, 10, *scalars, stencils, kernels=kernels)
        grads.append(torch.autograd.grad((out * weight).sum(), leaves))
    for name, ref, ker in zip(["i0", "i1", "theta", "lam", "tau", *FlowStencils._fields], *grads, strict=True):
        torch.testing.assert_close(ker, ref, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("shape", [(1, 2, 1, 7), (2, 1, 6, 1), (1, 1, 1, 1)])
def test_emulated_kernel_gradients_single_row_or_column(shape):
    # Degenerate borders: one row has no vertical differences, one column no horizontal ones. The
    # cotangent of .sum() is an expanded (stride-0) tensor, which the backward must accept.
    g = torch.Generator().manual_seed(2)
    i0 = (torch.randn(shape, dtype=torch.float64, generator=g) * 10).requires_grad_()
    i1 = (torch.randn(shape, dtype=torch.float64, generator=g) * 10).requires_grad_()
    stencils = [s.requires_grad_() for s in random_stencils(shape[1], g)]
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    leaves = (i0, i1, theta, *stencils)
    grads = []
    for kernels in (False, True):
        out = flow(i0, i1, 4, theta, 0.15, 0.25, stencils, kernels=kernels)
        grads.append(torch.autograd.grad(out.sum(), leaves, allow_unused=True, materialize_grads=True))
    for ref, ker in zip(*grads, strict=True):
        torch.testing.assert_close(ker, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("max_strip", [3, 8])
def test_emulated_kernel_gradients_with_multi_pixel_strips(monkeypatch, max_strip):
    # Large inputs sum several pixels per thread in the simple kernels' per-channel reductions; force
    # that on a tiny input (H·W = 35 is not a multiple of either strip length).
    from ops.repflow import kernels as tvl1_kernels

    monkeypatch.setattr(tvl1_kernels, "PLANE_MAX_PIXELS", {})  # no plane fits: the simple kernels in both variants
    monkeypatch.setattr(tvl1_kernels, "MIN_THREADS", 1)
    monkeypatch.setattr(tvl1_kernels, "MAX_STRIP", max_strip)
    assert tvl1_kernels.strip_length(2 * 3 * 35) == max_strip
    g = torch.Generator().manual_seed(11)
    i0, i1, scalars, stencils = _leaves(3, g, h=5, w=7)
    i0, i1 = (torch.cat([t.detach(), t.detach() * 0.5]).requires_grad_() for t in (i0, i1))
    leaves = (i0, i1, *scalars, *stencils)
    weight = torch.randn(2, 6, 5, 7, dtype=torch.float64, generator=g)
    grads = []
    for kernels in (False, True):
        out = flow(i0, i1, 5, *scalars, stencils, kernels=kernels)
        grads.append(torch.autograd.grad((out * weight).sum(), leaves))
    for ref, ker in zip(*grads, strict=True):
        torch.testing.assert_close(ker, ref, rtol=1e-9, atol=1e-9)


def test_emulated_kernel_gradients_float32_and_negative_theta():
    i0 = (torch.randn(2, 2, 5, 5) * 20).requires_grad_()
    i1 = (torch.randn(2, 2, 5, 5) * 20).requires_grad_()
    theta = torch.tensor(-0.3, requires_grad=True)
    grads = []
    for kernels in (False, True):
        out = flow(i0, i1, 6, theta, 0.15, 0.25, None, kernels=kernels)
        grads.append(torch.autograd.grad(out.square().sum(), (i0, i1, theta)))
    for ref, ker in zip(*grads, strict=True):
        torch.testing.assert_close(ker, ref, rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------------ NaN/Inf policy


def _assert_same_with_nan(ker, ref, name):
    assert torch.equal(ker.isnan(), ref.isnan()), f"{name}: NaN at different places"
    torch.testing.assert_close(ker, ref, rtol=1e-9, atol=1e-9, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["i0", "i1", "i0 on a flat i1"])
@pytest.mark.parametrize("n_iter", [1, 4])
def test_emulated_kernels_match_reference_on_non_finite_inputs(value, where, n_iter):
    # One policy for both backends (docs/repflow.md §1): NaN/Inf propagate; values and gradients equal
    # with NaN at exactly the same places, forward and backward.
    g = torch.Generator().manual_seed(13)
    i0 = torch.randn(2, 2, 5, 6, dtype=torch.float64, generator=g) * 10
    i1 = torch.randn(2, 2, 5, 6, dtype=torch.float64, generator=g) * 10
    if where == "i0 on a flat i1":
        i1[0, 1] = 3.0
    (i1 if where == "i1" else i0)[0, 1, 2, 3] = value
    weight = torch.randn(2, 4, 5, 6, dtype=torch.float64, generator=g)
    names = ["out", "i0", "i1", "theta", "lam", "tau", *FlowStencils._fields]
    results = []
    for kernels in (False, True):
        a, b = i0.clone().requires_grad_(), i1.clone().requires_grad_()
        scalars = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.3, 0.15, 0.25)]
        stencils = [s.clone().requires_grad_() for s in random_stencils(2, torch.Generator().manual_seed(4))]
        out = flow(a, b, n_iter, *scalars, stencils, kernels=kernels)
        leaves = (a, b, *scalars, *stencils)
        grads = torch.autograd.grad((out * weight).sum(), leaves, allow_unused=True, materialize_grads=True)
        results.append((out, *grads))
    ref, ker = results
    assert ref[0][0, [1, 3], 2, 3].isnan().all(), "the flow at the bad pixel must be NaN, not silently finite"
    assert torch.isfinite(ref[0][1]).all()  # the clean sample
    for name, r, k in zip(names, ref, ker, strict=True):
        _assert_same_with_nan(k, r, name)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_emulated_flow_layer_matches_reference_on_a_non_finite_voxel(value):
    # FlowLayer on the kernel path (host emulation: the layer's backend set to "emulated").
    torch.manual_seed(0)
    layer = FlowLayer(2, n_iter=3).double()
    x = torch.randn(2, 2, 3, 5, 5, dtype=torch.float64)
    x[0, 0, 1, 2, 2] = value
    results = []
    for backend in ("torch", "emulated"):
        layer.backend = backend
        xi = x.clone().requires_grad_()
        out = layer(xi)
        params = [p for _, p in sorted(layer.named_parameters())]
        results.append((out, *torch.autograd.grad(out.sum(), [xi, *params])))
    ref, ker = results
    assert ref[0][0].isnan().any() and torch.isfinite(ref[0][1]).all()
    for i, (r, k) in enumerate(zip(ref, ker, strict=True)):
        _assert_same_with_nan(k, r, f"result {i}")


# ------------------------------------------------------------------------ memory and backends


def test_checkpoints_grow_like_sqrt_n_iter_and_not_without_grad():
    i0 = torch.randn(1, 1, 3, 3, requires_grad=True)
    i1 = torch.randn(1, 1, 3, 3)
    for n_iter in (10, 20, 100):
        out = flow(i0, i1, n_iter, 0.3, 0.15, 0.25, None, kernels=True)
        node = out.grad_fn
        while not is_kernel_node(node, "tvl1_iterations"):
            node = node.next_functions[0][0]
        seg = segment_length(n_iter)
        # the checkpoints [S,B,2C,H,W] and [S,B,4C,H,W]: outputs of the custom op saved for its backward
        ckpt_u, ckpt_p = node.saved_tensors[-2:]
        assert ckpt_u.shape[0] == ckpt_p.shape[0] == math.ceil(n_iter / seg) - 1 <= math.isqrt(n_iter) + 1
        assert ckpt_u.shape[2] == 2 and ckpt_p.shape[2] == 4
    with torch.no_grad():
        assert flow(i0, i1, 10, 0.3, 0.15, 0.25, None, kernels=True).grad_fn is None


def test_backend_selection_on_cpu():
    i0, i1 = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    assert torch.equal(ops.tvl1_flow(i0, i1, 3), ops.tvl1_flow(i0, i1, 3, backend="torch"))
    with pytest.raises(ops.BackendError, match="needs CUDA tensors"):
        ops.tvl1_flow(i0, i1, 3, backend="cupy")
    # "auto" stays on the reference on CPU, also while host emulation is enabled
    i0.requires_grad_()
    assert not _has_kernel_node(ops.tvl1_flow(i0, i1, 3))
    assert _has_kernel_node(ops.tvl1_flow(i0, i1, 3, backend="emulated"))


def _has_kernel_node(out):
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        if is_kernel_node(node, "tvl1_iterations"):
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


# ------------------------------------------------------------------------ GPU (CuPy)


def _relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _cuda_inputs(dtype, shape=(3, 4, 14, 14), scale=30.0):
    g = torch.Generator().manual_seed(7)
    i0 = torch.randn(shape, generator=g) * scale
    i1 = i0 + torch.randn(shape, generator=g) * scale / 4
    return i0.to("cuda", dtype), i1.to("cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cupy_matches_reference_values_and_gradients(dtype):
    i0, i1 = _cuda_inputs(dtype)
    i0.requires_grad_()
    i1.requires_grad_()
    theta = torch.tensor(0.3, device="cuda", dtype=dtype, requires_grad=True)
    stencils = [s.requires_grad_() for s in random_stencils(4, dtype=dtype, device="cuda")]
    leaves = (i0, i1, theta, *stencils)
    weight = torch.randn(3, 8, 14, 14, device="cuda", dtype=dtype)
    outs, grads = [], []
    for backend in ("torch", "cupy"):
        out = ops.tvl1_flow(i0, i1, 10, theta, 0.15, 0.25, stencils=stencils, backend=backend)
        outs.append(out)
        grads.append(torch.autograd.grad((out * weight).sum(), leaves))
    if dtype == torch.float64:
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-9)
        for ref, ker in zip(*grads, strict=True):
            torch.testing.assert_close(ker, ref, rtol=1e-9, atol=1e-9)
    else:
        # float32: a pixel whose rho sits within rounding of a threshold may take the other branch in
        # one backend (the values are continuous there, the gradients are not), so compare norms.
        torch.testing.assert_close(outs[1], outs[0], rtol=2e-3, atol=2e-3)
        for ref, ker in zip(*grads, strict=True):
            assert _relative_error(ker, ref) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cupy_16bit_matches_float32_reference(dtype):
    i0, i1 = _cuda_inputs(dtype)
    ker = ops.tvl1_flow(i0, i1, 10, backend="cupy")
    ref = ops.tvl1_flow(i0.float(), i1.float(), 10, backend="torch")
    assert ker.dtype == dtype
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(ker.float(), ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))


@pytest.mark.gpu
def test_cupy_on_non_default_stream_and_auto_backend():
    i0, i1 = _cuda_inputs(torch.float32)
    i0.requires_grad_()
    expected = ops.tvl1_flow(i0, i1, 5, backend="torch")
    (g_expected,) = torch.autograd.grad(expected.sum(), i0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = ops.tvl1_flow(i0, i1, 5, backend="auto")
        (g,) = torch.autograd.grad(out.sum(), i0)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(g, g_expected, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
def test_cupy_flow_layer_non_contiguous_and_empty_batch():
    layer = FlowLayer(4, n_iter=5).cuda()
    x = torch.randn(2, 10, 3, 8, 4, device="cuda").permute(0, 4, 2, 3, 1)  # [2,4,3,8,10], non-contiguous
    ref_layer = FlowLayer(4, n_iter=5, backend="torch").cuda()
    torch.testing.assert_close(layer(x), ref_layer(x), rtol=2e-3, atol=2e-3)
    assert layer(torch.zeros(0, 4, 3, 8, 8, device="cuda")).shape == (0, 8, 2, 8, 8)


@pytest.mark.gpu
def test_cupy_flow_layer_gradients_at_network_shape():
    # FCF-(2+1)D-50 at 112²: bottleneck 32 at 14×14, 8 clips of 8 frames (56 frame pairs), n_iter 10.
    torch.manual_seed(0)
    layers = [FlowLayer(32, n_iter=10, backend=b).cuda() for b in ("torch", "cupy")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(8, 32, 8, 14, 14, device="cuda")
    x = (x + torch.roll(x, 1, dims=-1).cumsum(2) * 0.1).requires_grad_()
    cot = torch.randn(8, 64, 7, 14, 14, device="cuda")
    results = []
    for layer in layers:
        out = layer(x)
        params = [p for _, p in sorted(layer.named_parameters())]
        results.append((out, torch.autograd.grad(out, [x, *params], cot)))
    (ref_out, ref_grads), (ker_out, ker_grads) = results
    assert _relative_error(ker_out, ref_out) < 1e-4
    for ref, ker in zip(ref_grads, ker_grads, strict=True):
        assert _relative_error(ker, ref) < 1e-3


@pytest.mark.gpu
def test_cupy_fcf_block_gradients_reach_both_flow_layers():
    block = FCFBlock(8, bottleneck=4, n_iter=3).cuda()
    torch.nn.init.ones_(block.bn.weight)
    x = torch.randn(2, 8, 5, 10, 10, device="cuda")
    block(x).square().sum().backward()
    for layer in (block.flow1, block.flow2):
        assert layer.backend == "auto"
        for name, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.gpu
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_cupy_matches_reference_on_non_finite_inputs(value):
    # The NaN policy on the device kernels (NVRTC, no fast-math): NaN at the same places, values and
    # gradients, as the host-emulated test above checks on the CPU.
    g = torch.Generator().manual_seed(17)
    i0 = torch.randn(2, 3, 9, 10, dtype=torch.float64, generator=g) * 10
    i1 = torch.randn(2, 3, 9, 10, dtype=torch.float64, generator=g) * 10
    i1[0, 1, 4, 5] = value
    i0[0, 2, 2, 2] = value
    i1[0, 2] = 1.0  # a flat i1 under the bad i0 pixel
    weight = torch.randn(2, 6, 9, 10, dtype=torch.float64, generator=g).cuda()
    results = []
    for backend in ("torch", "cupy"):
        a, b = i0.cuda().requires_grad_(), i1.cuda().requires_grad_()
        lam = torch.tensor(0.15, dtype=torch.float64, device="cuda", requires_grad=True)
        out = ops.tvl1_flow(a, b, 5, 0.3, lam, 0.25, backend=backend)
        results.append((out, *torch.autograd.grad((out * weight).sum(), (a, b, lam))))
    assert results[0][0][0, [1, 4], 4, 5].isnan().all() and results[0][0][0, [2, 5], 2, 2].isnan().all()
    assert torch.isfinite(results[0][0][1]).all()
    for name, ref, ker in zip(("out", "i0", "i1", "lam"), *results, strict=True):
        _assert_same_with_nan(ker, ref, name)
