"""The "fast" TV-L1 kernels (``kernels/tvl1_plane.cu``: one thread block per (b, c) plane) against the
"simple" kernels (``kernels/tvl1.cu``) and the PyTorch reference: values and gradients of every input,
float64 gradcheck, 16-bit and non-contiguous inputs, which path runs (planes too large for a block fall
back to the simple kernels), checkpoint layout shared by both variants, NaN/Inf policy, and the three
thread orders of the host emulation (a missing barrier shows as a difference between them).

Without a GPU the kernels run on CPU tensors through host emulation (``backend="emulated"`` inside
``ops.kernel_host_emulation()``); the ``gpu`` tests compare the variants on CUDA through CuPy.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

import ops
from ops.backends import use_kernel_variant
from ops.host_emulation import host_has_fma
from ops.kernel_loader import MAX_DYNAMIC_SHARED_BYTES
from ops.repflow import FlowStencils, default_stencils
from ops.repflow import kernels as tvl1_kernels
from ops.repflow.kernels import (
    PLANE_MAX_PIXELS,
    TVL1_PLANE_SOURCE,
    checkpoint_steps,
    plane_shared_bytes,
    segment_length,
    tvl1_backward,
    tvl1_forward,
    tvl1_path,
)

# "warps" orders let one warp run ahead to the next barrier: they catch a warp reading the other warps' shared
# sums before the barrier that publishes them (the lockstep orders cannot).
ORDERS = ("forward", "reverse", "shuffle", "warps", "warps_reverse")
NAMES = ["out", "i0", "i1", "theta", "lam", "tau", *FlowStencils._fields]


@pytest.fixture(autouse=True)
def host_emulation(monkeypatch):
    # The fast kernels are this file's subject; the default variant is the simple one (ops.backends).
    monkeypatch.setenv("VMM_KERNELS", "fast")
    with ops.kernel_host_emulation():
        yield


@pytest.fixture(params=ORDERS)
def order(request, monkeypatch):
    """Each emulated launch reads VMM_EMULATION_ORDER: the block's threads run in this order between barriers."""
    monkeypatch.setenv("VMM_EMULATION_ORDER", request.param)
    return request.param


def random_stencils(channels, generator, dtype=torch.float64):
    base = default_stencils(channels, dtype=dtype)
    return [s + 0.2 * torch.randn(s.shape, dtype=dtype, generator=generator) for s in base]


def inputs(shape, seed, dtype=torch.float64, scale=20.0):
    g = torch.Generator().manual_seed(seed)
    i0 = torch.randn(shape, dtype=dtype, generator=g) * scale
    i1 = torch.randn(shape, dtype=dtype, generator=g) * scale
    return i0, i1, random_stencils(shape[1], g, dtype), torch.randn(shape[0], 2 * shape[1], *shape[2:], generator=g)


def run(variant, i0, i1, n_iter, stencils, weight, scalars=(0.35, 0.2, 0.3)):
    """(out, d i0, d i1, d theta, d lam, d tau, d stencils...) of ``(out * weight).sum()``: ``variant``
    "torch" (the reference), "fast" or "simple" (the kernels through host emulation)."""
    a, b = i0.clone().requires_grad_(), i1.clone().requires_grad_()
    theta, lam, tau = (torch.tensor(v, dtype=i0.dtype, requires_grad=True) for v in scalars)
    st = [s.clone().requires_grad_() for s in stencils]
    leaves = (a, b, theta, lam, tau, *st)
    backend = "torch" if variant == "torch" else "emulated"
    with use_kernel_variant("fast" if variant == "torch" else variant):
        out = ops.tvl1_flow(a, b, n_iter, theta, lam, tau, st, backend=backend)
        grads = torch.autograd.grad(
            (out * weight.to(out.dtype)).sum(), leaves, allow_unused=True, materialize_grads=True
        )
    return (out.detach(), *grads)


def assert_all_close(got, expected, tol, label, equal_nan=False):
    for name, g, e in zip(NAMES, got, expected, strict=True):
        if equal_nan:
            assert torch.equal(g.isnan(), e.isnan()), f"{label} {name}: NaN at different places"
        torch.testing.assert_close(
            g, e, rtol=tol, atol=tol, equal_nan=equal_nan, msg=lambda m, name=name: f"{label} {name}: {m}"
        )


@pytest.fixture
def kernel_paths(monkeypatch):
    """Which kernel path each TV-L1 call took: counts of "forward:plane", "forward:simple",
    "backward:plane", "backward:simple", from the real launchers of ops.repflow.kernels wrapped to count
    their calls (tvl1_forward / tvl1_backward pick one per call)."""
    counts = Counter()

    def counted(name, key):
        launcher = getattr(tvl1_kernels, name)

        def run(*args, **kwargs):
            counts[key] += 1
            return launcher(*args, **kwargs)

        monkeypatch.setattr(tvl1_kernels, name, run)

    for direction in ("forward", "backward"):
        counted(f"plane_{direction}", f"{direction}:plane")
        counted(f"simple_{direction}", f"{direction}:simple")
    return counts


# ------------------------------------------------------------------------ which kernels run


def test_tvl1_path_follows_the_variant_and_the_plane_size(monkeypatch):
    with use_kernel_variant("fast"):
        assert tvl1_path(torch.float32, 28, 28) == "plane"
        assert tvl1_path(torch.float32, 32, 32) == "plane"  # 1024 pixels: the largest float32 plane
        assert tvl1_path(torch.float32, 33, 32) == "simple"
        assert tvl1_path(torch.float64, 16, 32) == "plane"  # 512
        assert tvl1_path(torch.float64, 23, 23) == "simple"
    with use_kernel_variant("simple"):
        assert tvl1_path(torch.float32, 5, 5) == "simple"
    monkeypatch.delenv("VMM_KERNELS", raising=False)
    assert tvl1_path(torch.float32, 5, 5) == "simple"  # the default: the variant that has run on a GPU
    assert PLANE_MAX_PIXELS == {torch.float32: 1024, torch.float64: 512}


def test_launcher_limits_mirror_the_kernel_source():
    # tvl1_plane.cu's tvl1_plane_limits<float / double>, TVL1_PLANE_THREADS and TVL1_PLANE_BACKWARD_THREADS,
    # read from the source.
    source = TVL1_PLANE_SOURCE.path.read_text(encoding="utf-8")
    limits = dict(
        re.findall(r"struct tvl1_plane_limits<(float|double)> \{\s*static const int MAX_PIXELS = (\d+);", source)
    )
    ctype = {torch.float32: "float", torch.float64: "double"}
    assert {d: int(limits[ctype[d]]) for d in ctype} == PLANE_MAX_PIXELS
    for kernel, prefix, threads in [
        ("tvl1_plane_forward", "FORWARD", "TVL1_PLANE_THREADS"),
        ("tvl1_plane_backward", "BACKWARD", "TVL1_PLANE_BACKWARD_THREADS"),
    ]:
        pattern = rf"struct tvl1_plane_limits<(float|double)> \{{[^}}]*{prefix}_PIXELS_PER_THREAD = (\d+);"
        per_thread = dict(re.findall(pattern, source))
        assert {d: int(per_thread[ctype[d]]) for d in ctype} == tvl1_kernels.PLANE_PIXELS_PER_THREAD[kernel]
        assert int(re.search(rf"#define {threads} (\d+)", source).group(1)) == tvl1_kernels.PLANE_MAX_THREADS[kernel]
        assert f"__launch_bounds__({threads}" in source
        for dtype, pixels in PLANE_MAX_PIXELS.items():  # the largest plane fits the largest block
            ppt = tvl1_kernels.PLANE_PIXELS_PER_THREAD[kernel][dtype]
            assert tvl1_kernels.plane_threads(pixels, dtype, kernel) * ppt >= pixels


@pytest.mark.parametrize(
    ("dtype", "shape", "path"),
    [
        (torch.float64, (2, 2, 16, 32), "plane"),  # exactly the float64 limit
        # exactly the float32 limit: a forward block of 1024 threads, a backward block of 512 with two pixels each
        (torch.float32, (1, 1, 32, 32), "plane"),
        (torch.float64, (1, 1, 23, 23), "simple"),  # 529 pixels: falls back
        (torch.float32, (1, 1, 33, 32), "simple"),  # 1056 pixels
    ],
)
def test_fast_variant_runs_the_plane_kernels_where_a_plane_fits_else_falls_back(dtype, shape, path, kernel_paths):
    i0, i1, stencils, weight = inputs(shape, 1, dtype)
    fast = run("fast", i0, i1, 3, stencils, weight)
    assert dict(kernel_paths) == {f"forward:{path}": 1, f"backward:{path}": 1}
    ref = run("torch", i0, i1, 3, stencils, weight)
    assert_all_close(fast, ref, 1e-9 if dtype == torch.float64 else 2e-3, path)


def test_simple_variant_never_runs_the_plane_kernels(kernel_paths):
    i0, i1, stencils, weight = inputs((1, 2, 4, 5), 2)
    run("simple", i0, i1, 3, stencils, weight)
    assert dict(kernel_paths) == {"forward:simple": 1, "backward:simple": 1}


@pytest.mark.parametrize("variant", ["simple", "fast"])
def test_variant_from_the_environment(monkeypatch, variant, kernel_paths):
    i0, i1, stencils, weight = inputs((1, 1, 3, 4), 3)
    monkeypatch.setenv("VMM_KERNELS", variant)
    path = "plane" if variant == "fast" else "simple"
    with ops.kernel_host_emulation():
        ops.tvl1_flow(i0, i1, 2, backend="emulated")
    assert dict(kernel_paths) == {f"forward:{path}": 1}
    a = i0.clone().requires_grad_()
    with ops.kernel_host_emulation():
        ops.tvl1_flow(a, i1, 2, backend="emulated").sum().backward()
    assert dict(kernel_paths) == {f"forward:{path}": 2, f"backward:{path}": 1}


# ------------------------------------------------------------------------ values and gradients


@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (1, 2, 1, 7), (1, 1, 6, 1), (3, 1, 2, 2), (1, 1, 1, 1)])
@pytest.mark.parametrize("n_iter", [1, 2, 4, 5, 9, 10])
def test_fast_equals_simple_equals_reference_float64(shape, n_iter, order):
    # n_iter 4 = L² (L = 2) and 5 = L² + 1 (L = 3, a short last segment); 9 = 3², 10 = 3² + 1 (L = 4).
    i0, i1, stencils, weight = inputs(shape, n_iter)
    results = {v: run(v, i0, i1, n_iter, stencils, weight) for v in ("torch", "simple", "fast")}
    assert_all_close(results["fast"], results["torch"], 1e-9, f"fast vs reference ({order})")
    assert_all_close(results["fast"], results["simple"], 1e-9, f"fast vs simple ({order})")
    assert_all_close(results["simple"], results["torch"], 1e-9, "simple vs reference")


@pytest.mark.parametrize("n_iter", [1, 5])
def test_fast_gradcheck_every_input(n_iter, kernel_paths):
    g = torch.Generator().manual_seed(3)
    i0 = (torch.randn(1, 2, 4, 5, dtype=torch.float64, generator=g) * 3).requires_grad_()
    i1 = (torch.randn(1, 2, 4, 5, dtype=torch.float64, generator=g) * 3).requires_grad_()
    scalars = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.35, 0.4, 0.3)]
    stencils = [s.requires_grad_() for s in random_stencils(2, g)]

    def f(i0, i1, theta, lam, tau, *st):
        return ops.tvl1_flow(i0, i1, n_iter, theta, lam, tau, st, backend="emulated")

    assert torch.autograd.gradcheck(f, (i0, i1, *scalars, *stencils), eps=1e-6, atol=1e-6, rtol=1e-5)
    assert dict(kernel_paths).get("backward:plane", 0) > 0


def test_fast_float32_defaults_match_reference_and_simple(order):
    g = torch.Generator().manual_seed(4)
    i0 = torch.randn(3, 4, 7, 8, generator=g) * 30
    i1 = i0 + torch.randn(3, 4, 7, 8, generator=g) * 5
    outs = {}
    for variant in ("fast", "simple"):
        with use_kernel_variant(variant):
            outs[variant] = ops.tvl1_flow(i0, i1, 10, backend="emulated")
    ref = ops.tvl1_flow(i0, i1, 10, backend="torch")
    assert outs["fast"].dtype == torch.float32
    torch.testing.assert_close(outs["fast"], ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs["fast"], outs["simple"], rtol=1e-4, atol=1e-4)


def _float32_errors(variant, shape, n_iter, seed, run_fn):
    """Relative error (norm) of each output of ``variant`` in float32 against the reference in float64."""
    i0, i1, stencils, weight = inputs(shape, seed)
    truth = run_fn("torch", i0, i1, n_iter, stencils, weight)
    got = run_fn(variant, i0.float(), i1.float(), n_iter, [s.float() for s in stencils], weight.float())
    return [_relative_error(g.double(), t) for g, t in zip(got, truth, strict=True)]


@pytest.mark.parametrize(("shape", "n_iter"), [((3, 4, 7, 8), 10), ((1, 2, 16, 32), 20)])
def test_float32_kernels_as_accurate_as_the_float32_reference(shape, n_iter):
    # A tolerance against the float32 reference (2e-3 above) would pass a kernel a thousand times less
    # accurate than the reference; here each output's error against float64 must stay within 10x the
    # float32 reference's own (1e-5 floor: a pixel within rounding of a threshold flips a branch).
    reference = _float32_errors("torch", shape, n_iter, 21, run)
    for variant in ("fast", "simple"):
        errors = _float32_errors(variant, shape, n_iter, 21, run)
        for name, err, ref in zip(NAMES, errors, reference, strict=True):
            assert err <= max(10 * ref, 1e-5), f"{variant} {name}: {err:.2e} vs reference {ref:.2e}"


@pytest.mark.skipif(not host_has_fma(), reason="this CPU has no FMA instructions")
def test_float32_kernels_as_accurate_in_an_fma_build(monkeypatch):
    # nvcc and NVRTC contract a * b + c into FMAs; the default emulation build (GCC, one expression at a
    # time) mostly does not. The same accuracy criterion holds for the kernels built as a GPU rounds.
    monkeypatch.setenv("VMM_EMULATION_FMA", "1")
    test_float32_kernels_as_accurate_as_the_float32_reference((3, 4, 7, 8), 10)


def test_fast_float32_gradients_and_negative_theta():
    g = torch.Generator().manual_seed(6)
    i0 = (torch.randn(2, 2, 5, 5, generator=g) * 20).requires_grad_()
    i1 = (torch.randn(2, 2, 5, 5, generator=g) * 20).requires_grad_()
    theta = torch.tensor(-0.3, requires_grad=True)
    grads = []
    for variant, backend in (("fast", "torch"), ("fast", "emulated"), ("simple", "emulated")):
        with use_kernel_variant(variant):
            out = ops.tvl1_flow(i0, i1, 6, theta, 0.15, 0.25, backend=backend)
            grads.append(torch.autograd.grad(out.square().sum(), (i0, i1, theta)))
    ref, fast, simple = grads
    for r, f, s in zip(ref, fast, simple, strict=True):
        torch.testing.assert_close(f, r, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(f, s, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fast_16bit_inputs_compute_in_float32(dtype, kernel_paths):
    g = torch.Generator().manual_seed(8)
    i0 = (torch.randn(1, 2, 6, 6, generator=g) * 30).to(dtype)
    i1 = (torch.randn(1, 2, 6, 6, generator=g) * 30).to(dtype)
    fast = ops.tvl1_flow(i0, i1, 4, backend="emulated")
    assert dict(kernel_paths) == {"forward:plane": 1}
    expected = ops.tvl1_flow(i0.float(), i1.float(), 4, backend="torch")
    assert fast.dtype == dtype
    ulp = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(fast.float(), expected, rtol=ulp, atol=ulp)


def test_fast_non_contiguous_inputs_and_cotangent():
    g = torch.Generator().manual_seed(9)
    i0 = torch.randn(2, 5, 6, 3, dtype=torch.float64, generator=g).permute(0, 3, 1, 2)
    i1 = torch.randn(2, 5, 6, 3, dtype=torch.float64, generator=g).permute(0, 3, 1, 2)
    stencils = random_stencils(3, g)
    # an expanded (stride-0) weight: the cotangent reaching the backward is not contiguous either
    weight = torch.randn(1, 6, 1, 6, dtype=torch.float64, generator=g).expand(2, 6, 5, 6)
    fast = run("fast", i0, i1, 4, stencils, weight)
    ref = run("torch", i0, i1, 4, stencils, weight)
    assert_all_close(fast, ref, 1e-9, "non-contiguous")


def test_fast_empty_batch_and_empty_plane():
    empty = torch.zeros(0, 2, 3, 3, requires_grad=True)
    out = ops.tvl1_flow(empty, empty, 3, backend="emulated")
    assert out.shape == (0, 4, 3, 3)
    out.sum().backward()
    assert empty.grad.shape == empty.shape
    no_rows = torch.zeros(1, 2, 0, 3)
    assert ops.tvl1_flow(no_rows, no_rows, 3, backend="emulated").shape == (1, 4, 0, 3)


def test_fast_known_answers():
    i0 = torch.randn(1, 2, 5, 5)
    assert torch.equal(ops.tvl1_flow(i0, i0, 5, backend="emulated"), torch.zeros(1, 4, 5, 5))
    const0, const1 = torch.full((1, 1, 4, 4), 2.0), torch.full((1, 1, 4, 4), 9.0)
    out = ops.tvl1_flow(const0, const1, 5, backend="emulated")
    assert torch.equal(out, torch.zeros_like(out))


def test_fast_gradients_are_deterministic():
    i0, i1, stencils, weight = inputs((3, 2, 6, 7), 10)
    first = run("fast", i0, i1, 7, stencils, weight)
    second = run("fast", i0, i1, 7, stencils, weight)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("blocks", [1, 3, 100])
def test_fast_backward_with_any_number_of_blocks(monkeypatch, blocks):
    # Blocks walk the planes (6 here) with a block-stride loop, reusing their scratch: 1 block does all,
    # 100 blocks leave most idle.
    monkeypatch.setattr(tvl1_kernels, "EMULATED_PLANE_BLOCKS", blocks)
    i0, i1, stencils, weight = inputs((2, 3, 4, 5), 11)
    fast = run("fast", i0, i1, 5, stencils, weight)
    ref = run("torch", i0, i1, 5, stencils, weight)
    assert_all_close(fast, ref, 1e-9, f"{blocks} blocks")


# ------------------------------------------------------------------------ checkpoints: one layout, two variants


def _kernel_inputs(shape, seed):
    i0, i1, stencils, _ = inputs(shape, seed)
    gx = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 3
    gy = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1)) * 3
    params = torch.tensor([0.3, 0.3 * 0.15, 0.25 / 0.3], dtype=torch.float64)
    st = torch.cat(stencils[2:], dim=1).contiguous()
    return gx, gy, (i1 - i0).contiguous(), params, st


@pytest.mark.parametrize("n_iter", [4, 10])
def test_fast_forward_writes_the_simple_forwards_checkpoints(n_iter, order):
    args = _kernel_inputs((2, 3, 5, 4), 12)
    outs = {}
    for variant in ("fast", "simple"):
        with use_kernel_variant(variant):
            outs[variant] = tvl1_forward(*args, n_iter, True)
    (u_f, cu_f, cp_f), (u_s, cu_s, cp_s) = outs["fast"], outs["simple"]
    assert cu_f.shape[0] == len(checkpoint_steps(n_iter)) > 0
    for fast, simple in ((u_f, u_s), (cu_f, cu_s), (cp_f, cp_s)):
        assert fast.shape == simple.shape
        torch.testing.assert_close(fast, simple, rtol=1e-12, atol=1e-12)
    with use_kernel_variant("fast"):
        u, cu, cp = tvl1_forward(*args, n_iter, False)
    assert cu.shape[0] == cp.shape[0] == 0
    torch.testing.assert_close(u, u_s, rtol=1e-12, atol=1e-12)


def test_forward_of_one_variant_differentiated_by_the_other():
    args = _kernel_inputs((1, 2, 4, 6), 13)
    n_iter = 5
    grad_u = torch.randn(1, 4, 4, 6, dtype=torch.float64)
    grads = {}
    for fwd in ("fast", "simple"):
        with use_kernel_variant(fwd):
            _, cu, cp = tvl1_forward(*args, n_iter, True)
        for bwd in ("fast", "simple"):
            with use_kernel_variant(bwd):
                grads[fwd, bwd] = tvl1_backward(grad_u, *args, cu, cp, n_iter)
    for key, value in grads.items():
        for a, b in zip(value, grads["simple", "simple"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, key=key: f"{key}: {m}")


def test_plane_kernel_refuses_a_plane_it_cannot_hold():
    # The launcher never sends one; a launch that does gets NaN, never a partial flow (given the shared
    # memory such a plane would take, so that the plane size is what the kernel refuses).
    gx, gy, rho_c, params, st = _kernel_inputs((1, 1, 2, 300), 14)  # 600 > 512 float64 pixels
    u = torch.zeros(1, 2, 2, 300, dtype=torch.float64)
    empty = gx.new_empty((0,))
    args = (gx, gy, rho_c, params, st, u, empty, empty, 1, 1, 2, 300, 3, segment_length(3), 0)
    shared = plane_shared_bytes("tvl1_plane_forward", 600, torch.float64)
    TVL1_PLANE_SOURCE.launch(
        "tvl1_plane_forward", args, dtype=torch.float64, grid=(1, 1, 1), block=(1024, 1, 1), shared_mem=shared
    )
    assert u.isnan().all()


def test_plane_backward_refuses_a_plane_it_cannot_hold():
    gx, gy, rho_c, params, st = _kernel_inputs((2, 1, 2, 300), 14)
    grads = [torch.zeros_like(gx) for _ in range(3)]
    acc = gx.new_zeros((tvl1_kernels.ACC_ROWS, 2))
    empty = gx.new_empty((0,))
    grad_u = torch.ones(2, 2, 2, 300, dtype=torch.float64)
    args = (gx, gy, rho_c, params, st, grad_u, empty, empty, empty, *grads, acc, 2, 1, 2, 300, 1, 1)
    block = (tvl1_kernels.PLANE_MAX_THREADS["tvl1_plane_backward"], 1, 1)
    shared = plane_shared_bytes("tvl1_plane_backward", 600, torch.float64)
    TVL1_PLANE_SOURCE.launch(
        "tvl1_plane_backward", args, dtype=torch.float64, grid=(1, 1, 1), block=block, shared_mem=shared
    )
    assert all(g.isnan().all() for g in grads) and acc.isnan().all()


# ------------------------------------------------------------------------ shared memory sized by the plane


def test_plane_shared_memory_per_block():
    # Bytes per block (tvl1_plane.cu's tvl1_plane_*_shared_bytes): the forward's 6 maps, the backward's 10
    # (its first 6 at least the reduction's 32 * 11 values, rounded to 4). The largest planes take what the
    # static arrays took (24 and 40 KiB), within the 48 KiB a block gets without cudaFuncSetAttribute.
    expected = {
        (torch.float32, 14 * 14): (4704, 7840),
        (torch.float32, 28 * 28): (18816, 31360),
        (torch.float32, 32 * 32): (24576, 40960),
        (torch.float64, 16 * 32): (24576, 40960),
        (torch.float32, 5): (120, (352 + 20) * 4),
        (torch.float32, 7): (168, (352 + 28) * 4),
        (torch.float64, 59): (2832, (356 + 236) * 8),  # 354 values of the first 6 maps, rounded to 356
    }
    for (dtype, pixels), sizes in expected.items():
        got = tuple(plane_shared_bytes(k, pixels, dtype) for k in ("tvl1_plane_forward", "tvl1_plane_backward"))
        assert got == sizes, (dtype, pixels)
    for dtype, pixels in PLANE_MAX_PIXELS.items():
        static = 8 * torch.finfo(dtype).bits // 8  # the backward's static stencil taps
        assert plane_shared_bytes("tvl1_plane_backward", pixels, dtype) + static <= MAX_DYNAMIC_SHARED_BYTES


class _RecordingSource:
    """TVL1_PLANE_SOURCE's stand-in that records each launch's dynamic shared memory."""

    def __init__(self, source):
        self.source, self.shared = source, []

    def launch(self, kernel, args, **kwargs):
        self.shared.append((kernel, kwargs.get("shared_mem", 0)))
        self.source.launch(kernel, args, **kwargs)


@pytest.mark.parametrize(("dtype", "shape"), [(torch.float64, (2, 2, 5, 6)), (torch.float32, (1, 2, 14, 14))])
def test_launches_pass_the_planes_shared_memory(monkeypatch, dtype, shape):
    recorder = _RecordingSource(TVL1_PLANE_SOURCE)
    monkeypatch.setattr(tvl1_kernels, "TVL1_PLANE_SOURCE", recorder)
    i0, i1, stencils, weight = inputs(shape, 21, dtype)
    fast = run("fast", i0, i1, 3, stencils, weight)
    pixels = shape[2] * shape[3]
    assert recorder.shared == [(k, plane_shared_bytes(k, pixels, dtype)) for k in TVL1_PLANE_SOURCE.kernels]
    ref = run("torch", i0, i1, 3, stencils, weight)
    assert_all_close(fast, ref, 1e-9 if dtype == torch.float64 else 2e-3, "recorded")


def _check_shared_memory_refusal(kernel: str, shape: tuple[int, int, int, int], device: str) -> None:
    """Launch ``kernel`` on ``shape`` with one byte less than the plane needs (NaN in every output) and
    with exactly that (no NaN)."""
    b, c, h, w = shape
    gx, gy, rho_c, params, st = (t.to(device) for t in _kernel_inputs(shape, 22))
    shared = plane_shared_bytes(kernel, h * w, torch.float64)
    block = (tvl1_kernels.plane_threads(h * w, torch.float64, kernel), 1, 1)
    empty = gx.new_empty((0,))
    if kernel == "tvl1_plane_forward":
        outs = [gx.new_zeros((b, 2 * c, h, w))]
        args = (gx, gy, rho_c, params, st, *outs, empty, empty, b, c, h, w, 3, segment_length(3), 0)
    else:
        outs = [torch.zeros_like(gx) for _ in range(3)] + [gx.new_zeros((tvl1_kernels.ACC_ROWS, b * c))]
        grad_u = gx.new_ones((b, 2 * c, h, w))
        scratch = gx.new_zeros((1, 2 * 6 * h * w))
        args = (gx, gy, rho_c, params, st, grad_u, empty, empty, scratch, *outs, b, c, h, w, 1, 1)
    for given, refused in ((shared - 1, True), (shared, False)):
        for out in outs:
            out.zero_()
        TVL1_PLANE_SOURCE.launch(kernel, args, dtype=torch.float64, grid=(1, 1, 1), block=block, shared_mem=given)
        assert all(bool(out.isnan().all()) == refused for out in outs), given


@pytest.mark.parametrize("kernel", ["tvl1_plane_forward", "tvl1_plane_backward"])
@pytest.mark.parametrize("shape", [(1, 2, 5, 6), (1, 1, 1, 59)])  # 59: the backward's rounding to 4 values
def test_plane_kernels_refuse_less_shared_memory_than_the_plane_needs(kernel, shape):
    # One byte short: NaN in every output, never a plane run past its shared memory. The kernel's size
    # (tvl1_plane_*_shared_bytes) and plane_shared_bytes agree where they meet.
    _check_shared_memory_refusal(kernel, shape, "cpu")


def test_resident_blocks_query_the_planes_shared_memory(monkeypatch):
    # The occupancy query gets the plane's dynamic shared memory, and its cache tells plane sizes apart.
    # No GPU: the CUDA calls are stand-ins.
    queries = []

    def fake_occupancy(source, kernel, dtype, index, threads, shared_bytes=0):
        queries.append((kernel, dtype, threads, shared_bytes))
        return max(1, 48 * 1024 // max(1, shared_bytes))

    class Properties:
        multi_processor_count = 10

    monkeypatch.setattr(tvl1_kernels, "max_active_blocks_per_sm", fake_occupancy)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Properties())
    monkeypatch.setattr(tvl1_kernels, "_resident_blocks", {})
    device = torch.device("cuda", 0)
    small = tvl1_kernels.plane_blocks(device, 10**6, 64, resident_only=True, pixels=14 * 14)
    large = tvl1_kernels.plane_blocks(device, 10**6, 512, resident_only=True, pixels=32 * 32)
    default = tvl1_kernels.plane_blocks(device, 10**6, 512, resident_only=True)  # the largest plane: cached
    backward = "tvl1_plane_backward"
    assert queries == [
        (backward, torch.float32, 64, plane_shared_bytes(backward, 196, torch.float32)),
        (backward, torch.float32, 512, plane_shared_bytes(backward, 1024, torch.float32)),
    ]
    assert small == 10 * (48 * 1024 // 7840) and large == default == 10


def test_plane_grid_is_never_empty():
    # CUDA refuses a launch with a zero grid dimension (the emulator runs nothing): B*C = 0 planes still
    # launch one block, whose plane loop runs no iteration. No GPU needed: the forward's grid on CUDA
    # does not read the device properties.
    for device in (torch.device("cpu"), torch.device("cuda")):
        assert tvl1_kernels.plane_blocks(device, 0, 32, resident_only=False) == 1
    assert tvl1_kernels.plane_blocks(torch.device("cpu"), 0, 32, resident_only=True) == 1


@pytest.mark.parametrize("variant", ["fast", "simple"])
def test_op_on_an_empty_batch(variant):
    # tvl1_flow never sends an empty batch to the kernels; the ops themselves take one.
    gx, gy, rho_c, params, st = (t[:0] if t.dim() == 4 else t for t in _kernel_inputs((1, 2, 4, 5), 15))
    with use_kernel_variant(variant):
        u, cu, cp = tvl1_forward(gx, gy, rho_c, params, st, 5, True)
        grads = tvl1_backward(torch.zeros_like(u), gx, gy, rho_c, params, st, cu, cp, 5)
    assert u.shape == (0, 4, 4, 5) and cu.shape == (1, 0, 4, 4, 5) and cp.shape == (1, 0, 8, 4, 5)
    assert [g.shape for g in grads] == [gx.shape, gx.shape, gx.shape, params.shape, st.shape]
    assert not grads[3].any() and not grads[4].any()


@pytest.mark.parametrize("variant", ["fast", "simple"])
def test_ops_refuse_fewer_than_one_iteration(variant):
    # The simple forward always ran one primal step (u_1 for n_iter 0), the fast one none (u_0 = 0).
    args = _kernel_inputs((1, 1, 3, 4), 16)
    with use_kernel_variant(variant), pytest.raises(ValueError, match="n_iter"):
        tvl1_forward(*args, 0, False)
    with use_kernel_variant(variant), pytest.raises(ValueError, match="n_iter"):
        tvl1_backward(torch.zeros(1, 2, 3, 4, dtype=torch.float64), *args, args[0][None], args[0][None], 0)


# ------------------------------------------------------------------------ NaN/Inf policy


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["i0", "i1", "i0 on a flat i1"])
@pytest.mark.parametrize("n_iter", [1, 4])
def test_fast_matches_reference_on_non_finite_inputs(value, where, n_iter):
    i0, i1, stencils, weight = inputs((2, 2, 5, 6), 13, scale=10.0)
    if where == "i0 on a flat i1":
        i1[0, 1] = 3.0
    (i1 if where == "i1" else i0)[0, 1, 2, 3] = value
    scalars = (0.3, 0.15, 0.25)
    ref = run("torch", i0, i1, n_iter, stencils, weight, scalars)
    fast = run("fast", i0, i1, n_iter, stencils, weight, scalars)
    simple = run("simple", i0, i1, n_iter, stencils, weight, scalars)
    assert ref[0][0, [1, 3], 2, 3].isnan().all() and torch.isfinite(ref[0][1]).all()
    assert_all_close(fast, ref, 1e-9, "fast vs reference", equal_nan=True)
    assert_all_close(fast, simple, 1e-9, "fast vs simple", equal_nan=True)


# ------------------------------------------------------------------------ GPU (CuPy): both variants


def _cuda_case(dtype, shape, seed=7, scale=30.0):
    g = torch.Generator().manual_seed(seed)
    i0 = torch.randn(shape, generator=g) * scale
    i1 = i0 + torch.randn(shape, generator=g) * scale / 4
    stencils = [s.cuda() for s in random_stencils(shape[1], g, torch.float64)]
    weight = torch.randn(shape[0], 2 * shape[1], *shape[2:], generator=g)
    return i0.to("cuda", dtype), i1.to("cuda", dtype), [s.to(dtype) for s in stencils], weight.to("cuda", dtype)


def _cuda_run(variant, i0, i1, n_iter, stencils, weight):
    a, b = i0.clone().requires_grad_(), i1.clone().requires_grad_()
    theta = torch.tensor(0.3, device="cuda", dtype=i0.dtype, requires_grad=True)
    st = [s.clone().requires_grad_() for s in stencils]
    backend = "torch" if variant == "torch" else "cupy"
    with use_kernel_variant("fast" if variant == "torch" else variant):
        out = ops.tvl1_flow(a, b, n_iter, theta, 0.15, 0.25, st, backend=backend)
        grads = torch.autograd.grad((out * weight).sum(), (a, b, theta, *st))
    return (out.detach(), *grads)


def _relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape", [(3, 4, 14, 14), (2, 4, 28, 28), (1, 2, 9, 100), (1, 2, 40, 40), (1, 2, 32, 32), (2, 3, 16, 32)]
)
def test_cupy_fast_equals_simple_equals_reference(dtype, shape, kernel_paths):
    # 28² float64 (784 > 512 pixels) and 40² fall back to the simple kernels in the fast variant. 32²
    # float32 is a block of 1024 threads (64 registers each: the whole register file of an SM), 16x32
    # float64 one of 512: the largest blocks the launcher sends, which only a GPU can refuse.
    i0, i1, stencils, weight = _cuda_case(dtype, shape)
    results = {v: _cuda_run(v, i0, i1, 10, stencils, weight) for v in ("torch", "simple", "fast")}
    fast_path = tvl1_path(dtype, *shape[2:])
    expected = {"forward:simple": 1, "backward:simple": 1}
    expected[f"forward:{fast_path}"] = expected.get(f"forward:{fast_path}", 0) + 1
    expected[f"backward:{fast_path}"] = expected.get(f"backward:{fast_path}", 0) + 1
    assert dict(kernel_paths) == expected
    for variant in ("fast", "simple"):
        for name, got, ref in zip(
            ["out", "i0", "i1", "theta", *FlowStencils._fields], results[variant], results["torch"], strict=True
        ):
            if dtype == torch.float64:
                torch.testing.assert_close(
                    got, ref, rtol=1e-9, atol=1e-9, msg=lambda m, name=name, variant=variant: f"{variant} {name}: {m}"
                )
            else:
                # float32: a pixel within rounding of a threshold may take the other branch in one
                # implementation (values continuous there, gradients not): compare norms.
                assert _relative_error(got, ref) < 1e-3, (variant, name)
        torch.testing.assert_close(results["fast"][0], results["simple"][0], rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3, 4, 14, 14), (2, 4, 28, 28), (1, 2, 32, 32)])
def test_cupy_float32_kernels_as_accurate_as_the_float32_reference(shape):
    # The norm test above allows 1e-3; the kernels' float32 error against float64 should be that of the
    # float32 reference (emulated: about 1e-6), within 10x (1e-5 floor: branch flips at thresholds).
    i0, i1, stencils, weight = _cuda_case(torch.float64, shape)
    truth = _cuda_run("torch", i0, i1, 10, stencils, weight)
    f32 = (i0.float(), i1.float(), 10, [s.float() for s in stencils], weight.float())
    reference = [_relative_error(g.double(), t) for g, t in zip(_cuda_run("torch", *f32), truth, strict=True)]
    names = ["out", "i0", "i1", "theta", *FlowStencils._fields]
    for variant in ("fast", "simple"):
        errors = [_relative_error(g.double(), t) for g, t in zip(_cuda_run(variant, *f32), truth, strict=True)]
        for name, err, ref in zip(names, errors, reference, strict=True):
            assert err <= max(10 * ref, 1e-5), f"{variant} {name}: {err:.2e} vs reference {ref:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cupy_fast_16bit_matches_float32_reference(dtype):
    i0, i1, _, _ = _cuda_case(dtype, (3, 4, 14, 14))
    with use_kernel_variant("fast"):
        fast = ops.tvl1_flow(i0, i1, 10, backend="cupy")
    ref = ops.tvl1_flow(i0.float(), i1.float(), 10, backend="torch")
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(fast.float(), ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))


@pytest.mark.gpu
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_cupy_fast_non_finite_inputs(value):
    i0, i1, stencils, weight = _cuda_case(torch.float64, (2, 3, 9, 10))
    i1[0, 1, 4, 5] = value
    i0[0, 2, 2, 2] = value
    i1[0, 2] = 1.0
    ref = _cuda_run("torch", i0, i1, 5, stencils, weight)
    fast = _cuda_run("fast", i0, i1, 5, stencils, weight)
    for got, expected in zip(fast, ref, strict=True):
        assert torch.equal(got.isnan(), expected.isnan())
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, equal_nan=True)


@pytest.mark.gpu
def test_cupy_fast_many_planes_and_deterministic():
    # More planes than the backward's grid (the resident blocks): the block-stride loop.
    i0, i1, stencils, weight = _cuda_case(torch.float32, (64, 32, 14, 14))
    first = _cuda_run("fast", i0, i1, 10, stencils, weight)
    second = _cuda_run("fast", i0, i1, 10, stencils, weight)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    simple = _cuda_run("simple", i0, i1, 10, stencils, weight)
    for a, b in zip(first, simple, strict=True):
        assert _relative_error(a, b) < 1e-3


@pytest.mark.gpu
def test_cupy_checkpoints_shared_by_the_variants():
    # The checkpoints one variant's forward writes on the device, the other's backward reads.
    args = tuple(t.cuda() for t in _kernel_inputs((2, 3, 14, 14), 17))
    n_iter = 10
    grad_u = torch.randn(2, 6, 14, 14, dtype=torch.float64, device="cuda")
    grads = {}
    for fwd in ("fast", "simple"):
        with use_kernel_variant(fwd):
            _, cu, cp = tvl1_forward(*args, n_iter, True)
        for bwd in ("fast", "simple"):
            with use_kernel_variant(bwd):
                grads[fwd, bwd] = tvl1_backward(grad_u, *args, cu, cp, n_iter)
    for key, value in grads.items():
        for a, b in zip(value, grads["simple", "simple"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.gpu
def test_cupy_fast_ops_on_an_empty_batch():
    # B*C = 0 planes: a grid of one block that does nothing (CUDA refuses an empty grid).
    gx, gy, rho_c, params, st = (t[:0].cuda() if t.dim() == 4 else t.cuda() for t in _kernel_inputs((1, 2, 4, 5), 15))
    with use_kernel_variant("fast"):
        u, cu, cp = tvl1_forward(gx, gy, rho_c, params, st, 5, True)
        grads = tvl1_backward(torch.zeros_like(u), gx, gy, rho_c, params, st, cu, cp, 5)
    torch.cuda.synchronize()
    assert u.shape == (0, 4, 4, 5) and not grads[3].any() and not grads[4].any()


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["tvl1_plane_forward", "tvl1_plane_backward"])
def test_cupy_plane_kernels_read_the_dynamic_shared_memory_they_were_given(kernel):
    # vmm_dynamic_shared_bytes() (the %dynamic_smem_size register) on a GPU: too little refused, enough run.
    _check_shared_memory_refusal(kernel, (1, 2, 5, 6), "cuda")


@pytest.mark.gpu
def test_cupy_plane_kernel_refuses_a_plane_it_cannot_hold():
    gx, gy, rho_c, params, st = (t.cuda() for t in _kernel_inputs((1, 1, 2, 300), 14))
    u = torch.zeros(1, 2, 2, 300, dtype=torch.float64, device="cuda")
    empty = gx.new_empty((0,))
    args = (gx, gy, rho_c, params, st, u, empty, empty, 1, 1, 2, 300, 3, segment_length(3), 0)
    TVL1_PLANE_SOURCE.launch("tvl1_plane_forward", args, dtype=torch.float64, grid=(1, 1, 1), block=(1024, 1, 1))
    assert u.isnan().all()
