"""torch.compile, torch.export and FakeTensor tracing of the ops (docs/architecture.md §3.1).

The kernel paths are ``torch.library`` custom ops (``vmm::*``, ops/library.py). On CPU
they run through host emulation (``backend="emulated"`` inside :func:`ops.kernel_host_emulation`), so
these tests exercise the registration, the fake implementations and the autograd wiring without a GPU;
the ``gpu`` variants run the same checks on the CuPy kernels. The reference backend ("torch") is plain
PyTorch, which torch.compile traces through.

torch.compile with the default (inductor) backend generates and compiles C++ on CPU, tens of seconds
per graph on a cold cache: those tests are marked ``slow``. Graph capture itself (``fullgraph=True``, no
graph break; the custom op as one node) is checked with a recording backend, which is fast.

The last section compiles kernels with nvcc instead: register spills that ``ptxas -v`` reports for the
float32 builds of the TV-L1 plane kernels (there must be none).
"""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from torch import nn

import ops


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def emulation():
    with ops.kernel_host_emulation():
        yield


class GraphRecorder:
    """A torch.compile backend that keeps the FX graphs dynamo captured and runs them eagerly."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def targets(self) -> set[str]:
        return {str(n.target) for g in self.graphs for n in g.graph.nodes if n.op == "call_function"}

    def calls(self, op: str) -> int:
        """How many nodes call ``vmm::op`` (dynamo records the op packet, AOT graphs its overload)."""
        names = (f"vmm.{op}", f"vmm.{op}.default")
        return sum(str(n.target) in names for g in self.graphs for n in g.graph.nodes if n.op == "call_function")


def sifa_inputs(channels=4, groups=2, kernel_size=3, batch=2, height=4, width=5):
    g = torch.Generator().manual_seed(3)
    shape = (batch, channels, height, width)
    query = torch.randn(shape, generator=g, dtype=torch.float64)
    kv = torch.randn(shape, generator=g, dtype=torch.float64)
    # fractional offsets: away from the integer points where bilinear sampling is not differentiable
    whole = torch.randint(-2, 3, (batch, 2 * kernel_size**2, height, width), generator=g)
    offset = whole + 0.2 + 0.6 * torch.rand(whole.shape, generator=g, dtype=torch.float64)
    window = dict(kernel_size=kernel_size, groups=groups)
    return query, kv, offset, window


def clip(channels, frames=3, size=5, batch=1, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, frames, size, size, generator=g, dtype=torch.float64) * 4


def sifa_block(backend, correlation_features=False):
    torch.manual_seed(1)
    block = ops.SIFA(4, groups=2, offset_init="kaiming", backend=backend, correlation_features=correlation_features)
    if correlation_features:
        nn.init.normal_(block.attn_proj.weight)  # nonzero, so attn's gradient path matters
    return block.double()


def flow_layer(backend, n_iter=3):
    torch.manual_seed(1)
    return ops.FlowLayer(2, n_iter=n_iter, backend=backend).double()


def outputs_and_grads(module, x):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    # a non-uniform upstream gradient, so every output element's gradient counts
    weight = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    (y * weight).sum().backward()
    # a compiled module names its parameters "_orig_mod.<name>"
    params = {name.removeprefix("_orig_mod."): p for name, p in module.named_parameters()}
    grads = {"x": x.grad, **{name: p.grad for name, p in params.items() if p.grad is not None}}
    module.zero_grad(set_to_none=True)
    return y.detach(), grads


def assert_same(got, expected, tol=1e-10):
    (y, grads), (y_ref, grads_ref) = got, expected
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------ registration


def test_custom_ops_are_registered_in_the_vmm_namespace():
    for name in ("deform_correlation", "deform_aggregation", "deform_attention", "tvl1_iterations"):
        assert hasattr(torch.ops.vmm, name), name
        assert hasattr(torch.ops.vmm, f"{name}_backward"), name


def test_custom_ops_refuse_cpu_tensors_outside_host_emulation():
    query, kv, offset, window = sifa_inputs()
    with pytest.raises(ops.BackendError, match="kernel_host_emulation"):
        torch.ops.vmm.deform_correlation(query, kv, offset, 3, 1, 2)
    x = torch.zeros(1, 1, 3, 3)
    with pytest.raises(ops.BackendError, match="vmm::tvl1_iterations"):
        torch.ops.vmm.tvl1_iterations(x, x, x, torch.ones(3), torch.ones(1, 8), 2, False)
    # the backward ops are reachable by name too, and must refuse just the same
    attn = torch.zeros(query.shape[0], 2 * 9, *query.shape[2:])
    with pytest.raises(ops.BackendError, match="vmm::deform_correlation_backward"):
        torch.ops.vmm.deform_correlation_backward(attn, query, kv, offset, 3, 1, 2, [True, True, True])
    with pytest.raises(ops.BackendError, match="vmm::deform_aggregation_backward"):
        torch.ops.vmm.deform_aggregation_backward(kv, kv, attn, offset, 3, 1, 2, [True, True, True])
    with pytest.raises(ops.BackendError, match="vmm::deform_attention_backward"):
        torch.ops.vmm.deform_attention_backward(kv, attn, query, kv, offset, attn, 3, 1, 2, [True, True, True])


def test_emulated_ops_run_the_custom_ops(emulation):
    from ops.library import is_kernel_node

    query, kv, offset, window = sifa_inputs()
    query.requires_grad_()
    assert is_kernel_node(
        ops.deform_correlation(query, kv, offset, **window, backend="emulated").grad_fn, "deform_correlation"
    )
    assert type(ops.deform_attention(query, kv, offset, **window, backend="emulated").grad_fn).__name__.startswith(
        "GeneratedBackwardFor_vmm_deform_attention"
    )


# -------------------------------------------------------------------------------------- opcheck


def _sifa_op_samples():
    query, kv, offset, window = sifa_inputs(batch=1, height=3, width=4)
    attn = torch.randn(1, 2 * 9, 3, 4, dtype=torch.float64)
    args = (3, 1, 2)
    return {
        "deform_correlation": (query, kv, offset, *args),
        "deform_aggregation": (kv, attn, offset, *args),
        "deform_attention": (query, kv, offset, *args),
    }


@pytest.mark.parametrize("name", ["deform_correlation", "deform_aggregation", "deform_attention"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_sifa_ops(emulation, name, requires_grad):
    sample = _sifa_op_samples()[name]
    tensors = [t.clone().requires_grad_(requires_grad) if isinstance(t, torch.Tensor) else t for t in sample]
    torch.library.opcheck(getattr(torch.ops.vmm, name), tuple(tensors))


def test_opcheck_sifa_backward_ops(emulation):
    query, kv, offset, _ = sifa_inputs(batch=1, height=3, width=4)
    attn = torch.randn(1, 18, 3, 4, dtype=torch.float64)
    out_grad = torch.randn_like(query)
    for needs in ([True, True, True], [False, True, False]):
        torch.library.opcheck(torch.ops.vmm.deform_correlation_backward, (attn, query, kv, offset, 3, 1, 2, needs))
        torch.library.opcheck(torch.ops.vmm.deform_aggregation_backward, (out_grad, kv, attn, offset, 3, 1, 2, needs))
        for grads in ((out_grad, attn), (None, attn), (out_grad, None), (None, None)):
            torch.library.opcheck(
                torch.ops.vmm.deform_attention_backward, (*grads, query, kv, offset, attn, 3, 1, 2, needs)
            )


def _tvl1_sample(requires_grad, keep, n_iter=5):
    g = torch.Generator().manual_seed(4)
    shape = (1, 2, 3, 4)
    gx, gy, rho_c = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    params = torch.tensor([0.3, 0.045, 0.8], dtype=torch.float64)
    st = torch.tensor([[-1.0, 1.0] * 4] * 2, dtype=torch.float64)
    tensors = [t.requires_grad_(requires_grad) for t in (gx, gy, rho_c, params, st)]
    return (*tensors, n_iter, keep)


@pytest.mark.parametrize(("requires_grad", "keep"), [(False, False), (False, True), (True, True)])
def test_opcheck_tvl1_ops(emulation, requires_grad, keep):
    torch.library.opcheck(torch.ops.vmm.tvl1_iterations, _tvl1_sample(requires_grad, keep))


def test_opcheck_tvl1_backward_op(emulation):
    gx, gy, rho_c, params, st, n_iter, _ = _tvl1_sample(False, True)
    _, ckpt_u, ckpt_p = torch.ops.vmm.tvl1_iterations(gx, gy, rho_c, params, st, n_iter, True)
    assert ckpt_u.shape[0] == ckpt_p.shape[0] == 1  # n_iter 5: one checkpoint, after iteration 3
    grad_u = torch.randn(1, 4, 3, 4, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.vmm.tvl1_iterations_backward, (grad_u, gx, gy, rho_c, params, st, ckpt_u, ckpt_p, n_iter)
    )


# ---------------------------------------------------------------------------------- FakeTensor


def test_fake_tensor_mode_gives_the_shapes(emulation):
    from torch._subclasses.fake_tensor import FakeTensorMode

    block = sifa_block("emulated", correlation_features=True)
    flow = flow_layer("emulated")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        query, kv, offset, window = (mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in sifa_inputs())
        out, attn = ops.deform_attention(query, kv, offset, **window, backend="emulated", return_attn=True)
        assert out.shape == (2, 4, 4, 5) and attn.shape == (2, 18, 4, 5) and out.dtype == torch.float64
        assert ops.deform_correlation(query, kv, offset, **window, backend="emulated").shape == (2, 18, 4, 5)
        assert ops.deform_aggregation(kv, attn, offset, **window, backend="emulated").shape == (2, 4, 4, 5)
        i0 = mode.from_tensor(torch.zeros(3, 2, 6, 7))
        assert ops.tvl1_flow(i0, i0, 4, backend="emulated").shape == (3, 4, 6, 7)
        x = mode.from_tensor(clip(4, frames=4))
        assert block(x).shape == (1, 4, 4, 5, 5)
        assert flow(mode.from_tensor(clip(2, frames=4))).shape == (1, 4, 3, 5, 5)


# ---------------------------------------------------------------- graph capture (fast backend)


@pytest.mark.parametrize("correlation_features", [False, True])
def test_compile_captures_the_sifa_block_in_one_graph_with_the_custom_op(emulation, correlation_features):
    block = sifa_block("emulated", correlation_features)
    x = clip(4)
    recorder = GraphRecorder()
    compiled = torch.compile(block, backend=recorder, fullgraph=True)
    assert_same(outputs_and_grads(compiled, x), outputs_and_grads(block, x), tol=0)
    assert len(recorder.graphs) == 1
    assert recorder.calls("deform_attention") == 1, recorder.targets()


def test_compile_captures_flow_layer_in_one_graph_with_the_custom_op(emulation):
    layer = flow_layer("emulated")
    x = clip(2)
    recorder = GraphRecorder()
    compiled = torch.compile(layer, backend=recorder, fullgraph=True)
    assert_same(outputs_and_grads(compiled, x), outputs_and_grads(layer, x), tol=0)
    assert len(recorder.graphs) == 1
    assert recorder.calls("tvl1_iterations") == 1, recorder.targets()


@pytest.mark.parametrize("op", ["deform_correlation", "deform_aggregation"])
def test_compile_aot_eager_traces_each_sifa_op_forward_and_backward(emulation, op):
    # aot_eager: AOTAutograd traces the joint forward/backward graph through the fake impls and the
    # registered autograd formula (the backward ops as nodes), then runs it eagerly.
    query, kv, offset, window = sifa_inputs()
    if op == "deform_aggregation":
        query = torch.randn(2, 18, 4, 5, dtype=torch.float64)

    def fn(a, b, o):
        return (
            getattr(ops, op)(b, a, o, **window, backend="emulated")
            if op == "deform_aggregation"
            else getattr(ops, op)(a, b, o, **window, backend="emulated")
        )

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    inputs = [t.clone().requires_grad_() for t in (query, kv, offset)]
    ref_inputs = [t.clone().requires_grad_() for t in (query, kv, offset)]
    out, ref = compiled(*inputs), fn(*ref_inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    weight = torch.randn_like(ref)
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * weight).sum(), ref_inputs)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------- inductor (slow on CPU)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["sifa", "flow"])
def test_compile_fullgraph_reference_backend_matches_eager(module):
    build, x = (sifa_block, clip(4)) if module == "sifa" else (flow_layer, clip(2))
    model = build("torch")
    compiled = torch.compile(model, fullgraph=True)
    assert_same(outputs_and_grads(compiled, x), outputs_and_grads(model, x), tol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["sifa", "sifa_features", "flow"])
def test_compile_fullgraph_emulated_kernels_match_eager(emulation, module):
    if module == "flow":
        model, x = flow_layer("emulated"), clip(2)
    else:
        model, x = sifa_block("emulated", correlation_features=module == "sifa_features"), clip(4)
    compiled = torch.compile(model, fullgraph=True)
    assert_same(outputs_and_grads(compiled, x), outputs_and_grads(model, x), tol=1e-10)


# ------------------------------------------------------------------------------------ torch.export


@pytest.mark.parametrize("module", ["sifa", "flow"])
def test_export_keeps_the_custom_op_as_one_node(emulation, module):
    model, x, name = (
        (sifa_block("emulated", True), clip(4), "vmm.deform_attention.default")
        if module == "sifa"
        else (flow_layer("emulated"), clip(2), "vmm.tvl1_iterations.default")
    )
    exported = torch.export.export(model, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count(name) == 1, targets
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------- GPU (CuPy)


@pytest.mark.gpu
@pytest.mark.parametrize("module", ["sifa", "sifa_features", "flow"])
def test_cupy_compile_fullgraph_matches_eager(module):
    if module == "flow":
        model, x = flow_layer("cupy"), clip(2, frames=4, size=14, batch=2)
    else:
        model, x = sifa_block("cupy", correlation_features=module == "sifa_features"), clip(4, 4, 14, 2)
    model, x = model.cuda(), x.cuda()
    recorder = GraphRecorder()
    captured = torch.compile(model, backend=recorder, fullgraph=True)
    captured(x)
    assert recorder.calls("tvl1_iterations" if module == "flow" else "deform_attention") == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    # atomicAdd in the kernels' backward: gradients agree to rounding, not bit for bit
    assert_same(outputs_and_grads(compiled, x), outputs_and_grads(model, x), tol=1e-9)


@pytest.mark.gpu
def test_cupy_export_and_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    model, x = sifa_block("cupy", True).cuda(), clip(4).cuda()
    exported = torch.export.export(model, (x,))
    assert any(str(n.target) == "vmm.deform_attention.default" for n in exported.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-12, atol=1e-12)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        i0 = mode.from_tensor(torch.zeros(3, 2, 6, 7, device="cuda"))
        out = ops.tvl1_flow(i0, i0, 4, backend="cupy")
        assert out.shape == (3, 4, 6, 7) and out.device.type == "cuda"


def test_backend_rule_traces_without_graph_break():
    # "auto" asks whether CuPy imports: a constant at trace time, not an import traced into the graph
    from ops.backends import cupy_available

    def fn(x):
        return x + 1 if cupy_available() else x - 1

    x = torch.zeros(2)
    torch.testing.assert_close(torch.compile(fn, backend="eager", fullgraph=True)(x), fn(x))


@pytest.mark.parametrize("module", ["sifa", "flow"])
def test_aot_autograd_graphs_hold_the_forward_and_backward_ops(emulation, module):
    # AOTAutograd splits the captured graph into forward and backward graphs: each kernel call is one
    # node in each (the backward op traced through its fake implementation)
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    forward, backward = GraphRecorder(), GraphRecorder()

    def keep(recorder):
        def compiler(gm, example_inputs):
            recorder.graphs.append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    model, x, op = (
        (sifa_block("emulated", True), clip(4), "deform_attention")
        if module == "sifa"
        else (flow_layer("emulated"), clip(2), "tvl1_iterations")
    )
    compiled = torch.compile(
        model, backend=aot_autograd(fw_compiler=keep(forward), bw_compiler=keep(backward)), fullgraph=True
    )
    assert_same(outputs_and_grads(compiled, x), outputs_and_grads(model, x), tol=0)
    assert forward.calls(op) == 1, forward.targets()
    assert backward.calls(f"{op}_backward") == 1, backward.targets()
    assert backward.calls(op) == 0  # the backward does not rerun the forward op


@pytest.mark.parametrize("module", ["sifa", "flow"])
def test_compile_dynamic_shapes_one_graph_for_several_clip_sizes(emulation, module):
    # dynamic=True: the fake implementations see symbolic sizes; one graph serves both clip sizes
    model, channels = (sifa_block("emulated", True), 4) if module == "sifa" else (flow_layer("emulated"), 2)
    recorder = GraphRecorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True, dynamic=True)
    for size, frames in ((5, 3), (6, 4)):
        x = clip(channels, frames=frames, size=size)
        assert_same(outputs_and_grads(compiled, x), outputs_and_grads(model, x), tol=0)
    assert len(recorder.graphs) == 1


# ---------------------------------------------------------------------------------- nvcc: register spills


def ptxas_spills(report: str) -> dict[tuple[str, str, str], tuple[int, int]]:
    """{(kernel, ctype, arch): (spill store bytes, spill load bytes)} from ``nvcc -Xptxas -v`` output."""
    ctypes = {"f": "float", "d": "double", "8vmm_half": "vmm_half", "12vmm_bfloat16": "vmm_bfloat16"}
    spills, entry = {}, None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '_Z\d+(\w+?)I(f|d|8vmm_half|12vmm_bfloat16)E\w*' for '(sm_\d+)'", line)
        if m:
            entry = (m.group(1), ctypes[m.group(2)], m.group(3))
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and entry is not None:
            spills[entry] = (int(m.group(1)), int(m.group(2)))
            entry = None
    return spills


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_tvl1_plane_kernels_float32_builds_do_not_spill():
    # The backward's blocks (TVL1_PLANE_BACKWARD_THREADS) leave 128 registers per thread for two float
    # pixels; a spill here means a change put more state in registers than that.
    from ops.compile_checks import nvcc_compile_check
    from ops.repflow.kernels import TVL1_PLANE_SOURCE

    archs = ("sm_80", "sm_90")
    spills = ptxas_spills(nvcc_compile_check(TVL1_PLANE_SOURCE, archs=archs))
    for kernel in TVL1_PLANE_SOURCE.kernels:
        for arch in archs:
            assert spills[kernel, "float", arch] == (0, 0), f"{kernel}<float> on {arch} spills {spills}"
