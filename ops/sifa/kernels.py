"""The SIFA ops on the CUDA kernels: the torch custom ops ``vmm::deform_correlation``,
``vmm::deform_aggregation`` and ``vmm::deform_attention`` with fake implementations and registered backward
ops (see ops/library.py), and their dispatch to the launchers of the kernel variant
(:func:`ops.backends.kernel_variant`, chosen inside each op at run time): "fast"
(:mod:`ops.sifa.fast_kernels`, ``kernels/sifa_fast.cu``) or "simple" (the default,
:mod:`ops.sifa.simple_kernels`, ``kernels/sifa.cu``).

CUDA tensors launch through CuPy; CPU tensors run the same kernels through host emulation (the test
suite's way of executing them without a GPU — slow, not a CPU backend).

Memory: the forward saves only its inputs (the SIFA step also its attn; the reference saves K² sampled
maps per op), and no backward temporary is larger than the inputs. d key / d value are accumulated with
atomicAdd, so on a GPU their last bits vary from run to run (and ``torch.use_deterministic_algorithms(True)``
raises, as for grid_sample's CUDA backward); every other gradient is written once per element by one
thread, in a fixed order.
Double backward is not supported (the backward ops have no autograd formula of their own).

Memory format of the results (both variants, and the fake implementations): each output and each gradient
has the memory format of the input it belongs to (:func:`memory_format_of`): channels-last when that input
is (query for attn and the SIFA step's out, value for the aggregation's out, every input for its own
gradient), else contiguous. A network that runs channels-last therefore pays no layout copy on the fast
kernels; NCHW inputs cost one copy in and one out.

NaN / Inf: the reference's rule (see ``reference.py`` and ``sifa.cu``'s ``sifa_locate``): NaN/Inf values
propagate through every product, also with zero weights or off-map samples, and a NaN or ±Inf offset
makes its tap's sample NaN. Kernels and reference give the same NaN pattern in values and gradients.
"""

from __future__ import annotations

import torch

from ..backends import check_kernel_device, kernel_variant
from ..library import needed, placeholder
from .fast_kernels import fast_backward, fast_forward
from .simple_kernels import aggregate, correlate, offset_grad, scatter


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The memory format the ops give the result that belongs to ``t`` (see the module docstring):
    ``torch.channels_last`` when ``t`` is channels-last and not also plainly contiguous, else
    ``torch.contiguous_format``. A function of shape and strides only, so fake tensors get the same."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _dense_strides(shape: tuple[int, ...], layout: torch.memory_format) -> tuple[int, ...]:
    """The strides torch.empty(shape, memory_format=layout) gives (4-D shapes for channels_last)."""
    order = (1, 3, 2, 0) if layout == torch.channels_last else tuple(range(len(shape) - 1, -1, -1))
    strides, step = [0] * len(shape), 1
    for dim in order:  # innermost first
        strides[dim] = step
        step *= max(shape[dim], 1)
    return tuple(strides)


def _in_format_of(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``result`` with exactly the strides of a new tensor in ``like``'s memory format (what the fake
    implementations give): a copy unless it has them already. Also for shapes where both formats are
    dense (C = 1, H = W = 1), whose size-1 dimensions' strides differ between the two."""
    layout = memory_format_of(like)
    if result.stride() == _dense_strides(tuple(result.shape), layout):
        return result
    return result.clone(memory_format=layout)


Needs = tuple[bool, bool, bool]
Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def correlation_forward(
    query: torch.Tensor, key: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> torch.Tensor:
    """attn ``[B,G·K²,H,W]`` of ``deform_correlation`` (validated inputs of one dtype and device), in the
    memory format of query."""
    scale = groups / query.shape[1]  # the channel mean within a group
    if kernel_variant() == "fast":
        _, attn = fast_forward(query, key, offset, None, kernel_size, dilation, groups, scale, None)
    else:
        attn = correlate(
            query.contiguous(), key.contiguous(), offset.contiguous(), kernel_size, dilation, groups, scale
        )
    return _in_format_of(attn, query)


def correlation_backward(
    grad_attn: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    needs: Needs,
) -> Grads:
    """(d query, d key, d offset) of ``deform_correlation``, None where ``needs`` says False."""
    need_q, need_k, need_o = needs
    scale = groups / query.shape[1]
    if kernel_variant() == "fast":
        window = (kernel_size, dilation, groups, (need_q, need_k, need_o, False), scale)
        grad_q, grad_k, grad_o, _ = fast_backward(query, key, offset, None, None, grad_attn, *window)
    else:
        q, k, o, ga = query.contiguous(), key.contiguous(), offset.contiguous(), grad_attn.contiguous()
        window = (kernel_size, dilation, groups, scale)
        grad_q = aggregate(k, ga, o, *window) if need_q else None
        grad_k = scatter(ga, q, o, *window) if need_k else None
        grad_o = offset_grad(ga, q, k, o, *window) if need_o else None
    return _formats((grad_q, grad_k, grad_o), (query, key, offset))


def _formats(grads: tuple[torch.Tensor | None, ...], inputs: tuple[torch.Tensor, ...]) -> Grads:
    """Each gradient in the memory format of its input."""
    return tuple(None if g is None else _in_format_of(g, x) for g, x in zip(grads, inputs, strict=True))


def aggregation_forward(
    value: torch.Tensor, attn: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> torch.Tensor:
    """out ``[B,C,H,W]`` of ``deform_aggregation`` (validated inputs of one dtype and device), in the memory
    format of value."""
    if kernel_variant() == "fast":
        out, _ = fast_forward(None, value, offset, attn, kernel_size, dilation, groups, 1.0, 1.0)
    else:
        out = aggregate(value.contiguous(), attn.contiguous(), offset.contiguous(), kernel_size, dilation, groups, 1.0)
    return _in_format_of(out, value)


def aggregation_backward(
    grad_out: torch.Tensor,
    value: torch.Tensor,
    attn: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    needs: Needs,
) -> Grads:
    """(d value, d attn, d offset) of ``deform_aggregation``, None where ``needs`` says False."""
    need_v, need_a, need_o = needs
    if kernel_variant() == "fast":
        window = (kernel_size, dilation, groups, (False, need_v, need_o, need_a), 1.0)
        _, grad_v, grad_o, grad_a = fast_backward(None, value, offset, attn, grad_out, None, *window)
    else:
        v, a, o, go = value.contiguous(), attn.contiguous(), offset.contiguous(), grad_out.contiguous()
        window = (kernel_size, dilation, groups, 1.0)
        grad_v = scatter(a, go, o, *window) if need_v else None
        grad_a = correlate(go, v, o, *window) if need_a else None
        grad_o = offset_grad(a, go, v, o, *window) if need_o else None
    return _formats((grad_v, grad_a, grad_o), (value, attn, offset))


def attention_forward(
    query: torch.Tensor, kv: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out ``[B,C,H,W]``, attn ``[B,G·K²,H,W]``) of the SIFA step, from one correlation pass, in the memory
    format of query."""
    scale = groups / query.shape[1]
    if kernel_variant() == "fast":
        out, attn = fast_forward(query, kv, offset, None, kernel_size, dilation, groups, scale, 1.0)
    else:
        q, kv, offset = query.contiguous(), kv.contiguous(), offset.contiguous()
        attn = correlate(q, kv, offset, kernel_size, dilation, groups, scale)
        out = aggregate(kv, attn, offset, kernel_size, dilation, groups, 1.0)
    return _in_format_of(out, query), _in_format_of(attn, query)


def attention_backward(
    grad_out: torch.Tensor | None,
    grad_attn_in: torch.Tensor | None,
    query: torch.Tensor,
    kv: torch.Tensor,
    offset: torch.Tensor,
    attn: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    needs: Needs,
) -> Grads:
    """(d query, d kv, d offset) of the SIFA step from the gradients on out and on attn (either may be None:
    an unused output costs no work). Fast: one launch for all three. Simple: d kv and d offset of both ops
    are taken in one two-term pass each."""
    if grad_out is None and grad_attn_in is None:
        return None, None, None
    scale = groups / query.shape[1]
    need_q, need_kv, need_o = needs
    if kernel_variant() == "fast":
        window = (kernel_size, dilation, groups, (need_q, need_kv, need_o, False), scale)
        grad_q, grad_kv, grad_o, _ = fast_backward(query, kv, offset, attn, grad_out, grad_attn_in, *window)
        return _formats((grad_q, grad_kv, grad_o), (query, kv, offset))
    inputs = (query, kv, offset)
    query, kv, offset = query.contiguous(), kv.contiguous(), offset.contiguous()
    geometry = (kernel_size, dilation, groups)
    # out = Σ_k attn_k · S_k(kv): d attn through the aggregation (plus any d attn from outside), then
    # the correlation's chain
    grad_attn, direct = None, None
    if grad_out is not None:
        grad_out = grad_out.contiguous()
        grad_attn = correlate(grad_out, kv, offset, *geometry, 1.0)
        direct = (attn.contiguous(), grad_out, 1.0)  # the aggregation's own dependence on kv and offset
    if grad_attn_in is not None:
        grad_attn_in = grad_attn_in.contiguous()
        grad_attn = grad_attn_in if grad_attn is None else grad_attn + grad_attn_in
    grad_q = aggregate(kv, grad_attn, offset, *geometry, scale) if need_q else None
    grad_kv = scatter(grad_attn, query, offset, *geometry, scale, second=direct) if need_kv else None
    grad_o = offset_grad(grad_attn, query, kv, offset, *geometry, scale, second=direct) if need_o else None
    return _formats((grad_q, grad_kv, grad_o), inputs)


# ------------------------------------------------------------------------- torch.library custom ops

# Schemas are given, not inferred: torch 2.4 / 2.5 cannot read them from this module's postponed
# annotations (strings) nor from list[bool] / Tensor | None (tests/test_custom_op_schemas.py).
# One node each for torch.compile / torch.export (docs/architecture.md §3.1); see ops/library.py.
# The backward ops return an empty placeholder for a gradient that is not needed.


def _fake_grads(needs: list[bool], inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(
        torch.empty_like(x, memory_format=memory_format_of(x)) if n else placeholder(x)
        for n, x in zip(needs, inputs, strict=True)
    )


def _real_or_placeholder(grads: Grads, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(placeholder(x) if g is None else g for g, x in zip(grads, inputs, strict=True))


def _save_inputs_and_window(ctx, inputs, output) -> None:
    # (three tensors, kernel_size, dilation, groups): the inputs of deform_correlation / deform_aggregation
    *tensors, kernel_size, dilation, groups = inputs
    ctx.save_for_backward(*tensors)
    ctx.window = (kernel_size, dilation, groups)


def _grad_through(backward_op):
    """The autograd formula of a three-input op whose backward is the custom op ``backward_op``."""

    def grad(ctx, grad_output):
        needs = [bool(n) for n in ctx.needs_input_grad[:3]]
        grads = backward_op(grad_output, *ctx.saved_tensors, *ctx.window, needs)
        return (*(needed(g, n) for g, n in zip(grads, needs, strict=True)), None, None, None)

    return grad


@torch.library.custom_op(
    "vmm::deform_correlation",
    mutates_args=(),
    schema=("(Tensor query, Tensor key, Tensor offset, SymInt kernel_size, SymInt dilation, SymInt groups) -> Tensor"),
)
def _correlation_op(
    query: torch.Tensor, key: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> torch.Tensor:
    check_kernel_device("deform_correlation", query)
    return correlation_forward(query, key, offset, kernel_size, dilation, groups)


@_correlation_op.register_fake
def _(query, key, offset, kernel_size, dilation, groups):
    batch, _, height, width = query.shape
    shape = (batch, groups * kernel_size**2, height, width)
    return torch.empty(shape, dtype=query.dtype, device=query.device, memory_format=memory_format_of(query))


@torch.library.custom_op(
    "vmm::deform_correlation_backward",
    mutates_args=(),
    schema=(
        "(Tensor grad_attn, Tensor query, Tensor key, Tensor offset, SymInt kernel_size, SymInt dilation, "
        "SymInt groups, bool[] needs) -> (Tensor, Tensor, Tensor)"
    ),
)
def _correlation_backward_op(
    grad_attn: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_kernel_device("deform_correlation_backward", query)
    grads = correlation_backward(grad_attn, query, key, offset, kernel_size, dilation, groups, tuple(needs))
    return _real_or_placeholder(grads, (query, key, offset))


@_correlation_backward_op.register_fake
def _(grad_attn, query, key, offset, kernel_size, dilation, groups, needs):
    return _fake_grads(needs, (query, key, offset))


_correlation_op.register_autograd(
    _grad_through(torch.ops.vmm.deform_correlation_backward), setup_context=_save_inputs_and_window
)


@torch.library.custom_op(
    "vmm::deform_aggregation",
    mutates_args=(),
    schema=("(Tensor value, Tensor attn, Tensor offset, SymInt kernel_size, SymInt dilation, SymInt groups) -> Tensor"),
)
def _aggregation_op(
    value: torch.Tensor, attn: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> torch.Tensor:
    check_kernel_device("deform_aggregation", value)
    return aggregation_forward(value, attn, offset, kernel_size, dilation, groups)


@_aggregation_op.register_fake
def _(value, attn, offset, kernel_size, dilation, groups):
    return torch.empty_like(value, memory_format=memory_format_of(value))


@torch.library.custom_op(
    "vmm::deform_aggregation_backward",
    mutates_args=(),
    schema=(
        "(Tensor grad_out, Tensor value, Tensor attn, Tensor offset, SymInt kernel_size, SymInt dilation, "
        "SymInt groups, bool[] needs) -> (Tensor, Tensor, Tensor)"
    ),
)
def _aggregation_backward_op(
    grad_out: torch.Tensor,
    value: torch.Tensor,
    attn: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_kernel_device("deform_aggregation_backward", value)
    grads = aggregation_backward(grad_out, value, attn, offset, kernel_size, dilation, groups, tuple(needs))
    return _real_or_placeholder(grads, (value, attn, offset))


@_aggregation_backward_op.register_fake
def _(grad_out, value, attn, offset, kernel_size, dilation, groups, needs):
    return _fake_grads(needs, (value, attn, offset))


_aggregation_op.register_autograd(
    _grad_through(torch.ops.vmm.deform_aggregation_backward), setup_context=_save_inputs_and_window
)


@torch.library.custom_op(
    "vmm::deform_attention",
    mutates_args=(),
    schema=(
        "(Tensor query, Tensor kv, Tensor offset, SymInt kernel_size, SymInt dilation, "
        "SymInt groups) -> (Tensor, Tensor)"
    ),
)
def _attention_op(
    query: torch.Tensor, kv: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    check_kernel_device("deform_attention", query)
    return attention_forward(query, kv, offset, kernel_size, dilation, groups)


@_attention_op.register_fake
def _(query, kv, offset, kernel_size, dilation, groups):
    batch, _, height, width = query.shape
    layout = memory_format_of(query)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device, memory_format=layout)
    shape = (batch, groups * kernel_size**2, height, width)
    return out, torch.empty(shape, dtype=query.dtype, device=query.device, memory_format=layout)


@torch.library.custom_op(
    "vmm::deform_attention_backward",
    mutates_args=(),
    schema=(
        "(Tensor? grad_out, Tensor? grad_attn, Tensor query, Tensor kv, Tensor offset, Tensor attn, "
        "SymInt kernel_size, SymInt dilation, SymInt groups, bool[] needs) -> (Tensor, Tensor, Tensor)"
    ),
)
def _attention_backward_op(
    grad_out: torch.Tensor | None,
    grad_attn: torch.Tensor | None,
    query: torch.Tensor,
    kv: torch.Tensor,
    offset: torch.Tensor,
    attn: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_kernel_device("deform_attention_backward", query)
    window = (kernel_size, dilation, groups, tuple(needs))
    grads = attention_backward(grad_out, grad_attn, query, kv, offset, attn, *window)
    return _real_or_placeholder(grads, (query, kv, offset))


@_attention_backward_op.register_fake
def _(grad_out, grad_attn, query, kv, offset, attn, kernel_size, dilation, groups, needs):
    some = grad_out is not None or grad_attn is not None
    return _fake_grads([n and some for n in needs], (query, kv, offset))


def _attention_setup(ctx, inputs, output) -> None:
    query, kv, offset, kernel_size, dilation, groups = inputs
    ctx.save_for_backward(query, kv, offset, output[1])
    ctx.window = (kernel_size, dilation, groups)
    ctx.set_materialize_grads(False)  # an unused output sends None: no zero map, no work for it


def _attention_grad(ctx, grad_out, grad_attn):
    if grad_out is None and grad_attn is None:
        return None, None, None, None, None, None
    query, kv, offset, attn = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grads = torch.ops.vmm.deform_attention_backward(grad_out, grad_attn, query, kv, offset, attn, *ctx.window, needs)
    return (*(needed(g, n) for g, n in zip(grads, needs, strict=True)), None, None, None)


_attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


def deform_correlation_kernels(
    query: torch.Tensor, key: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> torch.Tensor:
    """The kernel path of ``deform_correlation`` for validated, non-empty inputs on any device the
    loader runs (CUDA through CuPy, CPU through host emulation): the custom op ``vmm::deform_correlation``."""
    return torch.ops.vmm.deform_correlation(query, key, offset, kernel_size, dilation, groups)


def deform_aggregation_kernels(
    value: torch.Tensor, attn: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> torch.Tensor:
    """The kernel path of ``deform_aggregation`` (see :func:`deform_correlation_kernels`)."""
    return torch.ops.vmm.deform_aggregation(value, attn, offset, kernel_size, dilation, groups)


def deform_attention_kernels(
    query: torch.Tensor,
    kv: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    return_attn: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The kernel path of ``deform_attention`` (see :func:`deform_correlation_kernels`): out ``[B,C,H,W]``,
    or with ``return_attn`` the pair (out, attn ``[B,G·K²,H,W]``) from the same correlation pass. The op
    always returns both; an unused attn costs nothing in the backward."""
    out, attn = torch.ops.vmm.deform_attention(query, kv, offset, kernel_size, dilation, groups)
    return (out, attn) if return_attn else out
