"""The SIFA ops on the CUDA kernels of ``kernels/sifa.cu``: torch custom ops ``vmm::deform_correlation``,
``vmm::deform_aggregation`` and ``vmm::deform_attention`` with fake implementations and registered backward
ops (torch >= 2.4, see ops/library.py), autograd Functions on older torch.

CUDA tensors launch through CuPy; CPU tensors run the same kernels through host emulation (the test
suite's way of executing them without a GPU — slow, not a CPU backend). Four kernels serve both ops
and their backward passes (see the header of ``sifa.cu``):

* correlation: forward ``sifa_correlate``; backward d query = ``sifa_aggregate`` of d attn,
  d key = ``sifa_scatter``, d offset = ``sifa_offset_grad``.
* aggregation: forward ``sifa_aggregate``; backward d attn = ``sifa_correlate`` of d out,
  d value = ``sifa_scatter``, d offset = ``sifa_offset_grad``.
* the SIFA step (correlation then aggregation of the same map, ``vmm::deform_attention``): the same
  kernels, with both ops' contributions to d kv and to d offset taken in one two-term pass each.

Memory: the forward saves only its inputs (the reference saves K² sampled maps per op), and the
backward's temporaries are one accumulation-type map for d key / d value and the partial sums of the
channel-split reductions (output-sized, or about 2·TARGET_THREADS elements when split), so no tensor larger than
the inputs is needed. d key / d value are accumulated with atomicAdd, so on a GPU their last bits vary from run
to run (and ``torch.use_deterministic_algorithms(True)`` raises, as for grid_sample's CUDA backward);
every other gradient is written once per element by one thread, in a fixed order.
Double backward is not supported (the backward ops have no autograd formula of their own).

NaN / Inf: the reference's rule (see ``reference.py`` and ``sifa.cu``'s ``sifa_locate``): NaN/Inf values
propagate through every product, also with zero weights or off-map samples, and a NaN or ±Inf offset
makes its tap's sample NaN. Kernels and reference give the same NaN pattern in values and gradients.
"""

from __future__ import annotations

import warnings

import torch
from torch.autograd.function import once_differentiable

from ..kernel_loader import KernelSource
from ..library import CUSTOM_OPS, check_kernel_device, needed, placeholder
from ..validation import compute_dtype

SIFA_SOURCE = KernelSource("sifa.cu", ("sifa_correlate", "sifa_aggregate", "sifa_offset_grad", "sifa_scatter"))


def _geometry(x: torch.Tensor, groups: int, kernel_size: int, dilation: int) -> tuple[int, ...]:
    batch, channels, height, width = x.shape
    return (batch, channels, groups, height, width, kernel_size, dilation)


#: Threads a reduction kernel aims for: about one full wave of a large GPU (132 SMs × 2048 threads).
TARGET_THREADS = 1 << 18
#: Fewest channels a chunk of a split channel sum gets (below that the partial sums cost more than they save).
MIN_CHUNK = 16


def split_channels(outputs: int, channels: int, device: torch.device) -> tuple[int, int]:
    """(chunks, chunk): how to split a sum over ``channels`` computed for ``outputs`` output elements, so a
    GPU runs about TARGET_THREADS threads. One chunk off CUDA (host emulation gains nothing by it)."""
    if device.type != "cuda" or channels <= MIN_CHUNK:
        return 1, channels
    wanted = min(-(-TARGET_THREADS // max(outputs, 1)), channels // MIN_CHUNK)
    chunk = -(-channels // max(wanted, 1))
    return -(-channels // chunk), chunk


def _chunked(chunks: int | None, channels: int, outputs: int, device: torch.device) -> tuple[int, int]:
    if chunks is None:
        return split_channels(outputs, channels, device)
    chunk = -(-channels // chunks)
    return -(-channels // chunk), chunk


def _sum_partials(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (buf[0] if buf.shape[0] == 1 else buf.sum(0)).to(dtype)


def correlate(
    q: torch.Tensor,
    img: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    scale: float,
    chunks: int | None = None,
) -> torch.Tensor:
    """``[B,G·K²,H,W]``: scale · Σ_{c∈g} q · bilinear(img) per tap (contiguous inputs of one dtype).

    ``chunks`` splits each group's channel sum into that many partial sums (None: chosen for the device).
    """
    batch, channels, height, width = q.shape
    shape = (batch, groups * kernel_size**2, height, width)
    n_chunks, chunk = _chunked(chunks, channels // groups, shape[0] * shape[1] * height * width, q.device)
    buf = torch.empty((n_chunks, *shape), dtype=compute_dtype(q.dtype), device=q.device)
    SIFA_SOURCE.launch(
        "sifa_correlate",
        (q, img, offset, buf, *_geometry(q, groups, kernel_size, dilation), n_chunks, chunk, float(scale)),
        dtype=q.dtype,
        numel=buf.numel(),
    )
    return _sum_partials(buf, q.dtype)


def aggregate(
    img: torch.Tensor,
    attn: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    scale: float,
) -> torch.Tensor:
    """``[B,C,H,W]``: scale · Σ_k attn[g(c), k] · bilinear(img[c]) (contiguous inputs of one dtype)."""
    out = torch.empty_like(img)
    SIFA_SOURCE.launch(
        "sifa_aggregate",
        (img, attn, offset, out, *_geometry(img, groups, kernel_size, dilation), float(scale)),
        dtype=img.dtype,
        numel=out.numel(),
    )
    return out


#: An optional second (attn, q, scale) term of offset_grad / scatter (the fused SIFA step's backward).
Second = tuple[torch.Tensor, torch.Tensor, float] | None


def _pair_args(attn: torch.Tensor, q: torch.Tensor, scale: float, second: Second) -> tuple:
    if second is None:  # the kernel does not read the second pair; any tensor of the right device will do
        return (attn, q, attn, q), 1, float(scale), 0.0
    attn2, q2, scale2 = second
    return (attn, q, attn2, q2), 2, float(scale), float(scale2)


def offset_grad(
    attn: torch.Tensor,
    q: torch.Tensor,
    img: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    scale: float,
    chunks: int | None = None,
    second: Second = None,
) -> torch.Tensor:
    """``[B,2K²,H,W]``: Σ_c (scale · attn[g(c),k] · q[c] (+ scale2 · attn2[g(c),k] · q2[c])) ·
    ∇_(Δy,Δx) bilinear(img[c]) per tap.

    ``chunks`` splits the channel sum into that many partial sums (None: chosen for the device);
    ``second`` = (attn2, q2, scale2) adds a second term in the same pass.
    """
    batch, channels, height, width = q.shape
    n_chunks, chunk = _chunked(chunks, channels, batch * kernel_size**2 * height * width, q.device)
    buf = torch.empty((n_chunks, *offset.shape), dtype=compute_dtype(q.dtype), device=q.device)
    pair, pairs, s1, s2 = _pair_args(attn, q, scale, second)
    SIFA_SOURCE.launch(
        "sifa_offset_grad",
        (*pair, img, offset, buf, *_geometry(q, groups, kernel_size, dilation), n_chunks, chunk, pairs, s1, s2),
        dtype=q.dtype,
        numel=buf.numel() // 2,
    )
    return _sum_partials(buf, q.dtype)


def _alert_not_deterministic(what: str) -> None:
    # The same contract as torch's own atomicAdd backwards (e.g. grid_sample's on CUDA).
    if torch.are_deterministic_algorithms_enabled():
        message = f"{what} uses atomicAdd and is not deterministic (nor is the reference's grid_sample on CUDA)"
        if torch.is_deterministic_algorithms_warn_only_enabled():
            warnings.warn(message, stacklevel=3)
        else:
            raise RuntimeError(message)


def scatter(
    attn: torch.Tensor,
    q: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    scale: float,
    second: Second = None,
) -> torch.Tensor:
    """``[B,C,H,W]``: the transpose of sampling — each (b,c,h,w) sends scale · attn · q (+ scale2 · attn2 ·
    q2 for ``second`` = (attn2, q2, scale2)) through the bilinear corners of its K² sample points
    (atomicAdd into an accumulation-type buffer)."""
    if q.device.type == "cuda":
        _alert_not_deterministic("the CuPy backward of deform_correlation / deform_aggregation (d key, d value)")
    buf = torch.zeros(q.shape, dtype=compute_dtype(q.dtype), device=q.device)
    pair, pairs, s1, s2 = _pair_args(attn, q, scale, second)
    SIFA_SOURCE.launch(
        "sifa_scatter",
        (*pair, offset, buf, *_geometry(q, groups, kernel_size, dilation), pairs, s1, s2),
        dtype=q.dtype,
        numel=q.numel(),
    )
    return buf.to(q.dtype)


Needs = tuple[bool, bool, bool]
Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def correlation_forward(
    query: torch.Tensor, key: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> torch.Tensor:
    """attn ``[B,G·K²,H,W]`` of ``deform_correlation`` (validated inputs of one dtype and device)."""
    scale = groups / query.shape[1]  # the channel mean within a group
    return correlate(query.contiguous(), key.contiguous(), offset.contiguous(), kernel_size, dilation, groups, scale)


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
    query, key, offset, grad_attn = query.contiguous(), key.contiguous(), offset.contiguous(), grad_attn.contiguous()
    window = (kernel_size, dilation, groups, groups / query.shape[1])
    need_q, need_k, need_o = needs
    grad_q = aggregate(key, grad_attn, offset, *window) if need_q else None
    grad_k = scatter(grad_attn, query, offset, *window) if need_k else None
    grad_o = offset_grad(grad_attn, query, key, offset, *window) if need_o else None
    return grad_q, grad_k, grad_o


def aggregation_forward(
    value: torch.Tensor, attn: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> torch.Tensor:
    """out ``[B,C,H,W]`` of ``deform_aggregation`` (validated inputs of one dtype and device)."""
    return aggregate(value.contiguous(), attn.contiguous(), offset.contiguous(), kernel_size, dilation, groups, 1.0)


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
    value, attn, offset, grad_out = value.contiguous(), attn.contiguous(), offset.contiguous(), grad_out.contiguous()
    window = (kernel_size, dilation, groups, 1.0)
    need_v, need_a, need_o = needs
    grad_v = scatter(attn, grad_out, offset, *window) if need_v else None
    grad_a = correlate(grad_out, value, offset, *window) if need_a else None
    grad_o = offset_grad(attn, grad_out, value, offset, *window) if need_o else None
    return grad_v, grad_a, grad_o


def attention_forward(
    query: torch.Tensor, kv: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out ``[B,C,H,W]``, attn ``[B,G·K²,H,W]``) of the SIFA step, from one correlation pass."""
    query, kv, offset = query.contiguous(), kv.contiguous(), offset.contiguous()
    attn = correlate(query, kv, offset, kernel_size, dilation, groups, groups / query.shape[1])
    return aggregate(kv, attn, offset, kernel_size, dilation, groups, 1.0), attn


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
    an unused output costs no work). d kv and d offset of both ops are taken in one two-term pass each."""
    if grad_out is None and grad_attn_in is None:
        return None, None, None
    query, kv, offset = query.contiguous(), kv.contiguous(), offset.contiguous()
    scale = groups / query.shape[1]
    geometry = (kernel_size, dilation, groups)
    need_q, need_kv, need_o = needs
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
    return grad_q, grad_kv, grad_o


# ------------------------------------------------------------------ autograd Functions (torch < 2.4)


class DeformCorrelationFunction(torch.autograd.Function):
    """``deform_correlation`` on the kernels; inputs validated by the caller (one dtype and device). The
    path on torch without ``torch.library.custom_op`` (eager only: torch.compile breaks the graph here)."""

    @staticmethod
    def forward(ctx, query, key, offset, kernel_size: int, dilation: int, groups: int):
        query, key, offset = query.contiguous(), key.contiguous(), offset.contiguous()
        ctx.save_for_backward(query, key, offset)
        ctx.window = (kernel_size, dilation, groups)
        return correlation_forward(query, key, offset, kernel_size, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_attn):
        query, key, offset = ctx.saved_tensors
        grads = correlation_backward(grad_attn, query, key, offset, *ctx.window, ctx.needs_input_grad[:3])
        return (*grads, None, None, None)


class DeformAggregationFunction(torch.autograd.Function):
    """``deform_aggregation`` on the kernels (see :class:`DeformCorrelationFunction`)."""

    @staticmethod
    def forward(ctx, value, attn, offset, kernel_size: int, dilation: int, groups: int):
        value, attn, offset = value.contiguous(), attn.contiguous(), offset.contiguous()
        ctx.save_for_backward(value, attn, offset)
        ctx.window = (kernel_size, dilation, groups)
        return aggregation_forward(value, attn, offset, kernel_size, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        value, attn, offset = ctx.saved_tensors
        grads = aggregation_backward(grad_out, value, attn, offset, *ctx.window, ctx.needs_input_grad[:3])
        return (*grads, None, None, None)


class DeformAttentionFunction(torch.autograd.Function):
    """``deform_aggregation(kv, deform_correlation(query, kv, offset), offset)`` on the kernels (the SIFA
    step, key = value), returning ``(out, attn)``. The backward takes d kv and d offset of both ops in one
    pass each (two-term sifa_scatter / sifa_offset_grad): half the atomics and corner reads of running the
    two Functions. A gradient arriving on ``attn`` itself (e.g. from the block's correlation features) is
    added to the aggregation's d attn before the correlation's backward, so it costs one addition, not a
    second correlation pass."""

    @staticmethod
    def forward(ctx, query, kv, offset, kernel_size: int, dilation: int, groups: int):
        query, kv, offset = query.contiguous(), kv.contiguous(), offset.contiguous()
        out, attn = attention_forward(query, kv, offset, kernel_size, dilation, groups)
        ctx.save_for_backward(query, kv, offset, attn)
        ctx.window = (kernel_size, dilation, groups)
        ctx.set_materialize_grads(False)  # an unused output sends None: no zero map, no work for it
        return out, attn

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_attn_in):
        query, kv, offset, attn = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        grads = attention_backward(grad_out, grad_attn_in, query, kv, offset, attn, *ctx.window, needs)
        return (*grads, None, None, None)


# ------------------------------------------------------------ torch.library custom ops (torch >= 2.4)

if CUSTOM_OPS:
    # Schemas are given, not inferred: torch 2.4 / 2.5 cannot read them from this module's postponed
    # annotations (strings) nor from list[bool] / Tensor | None (tests/test_custom_op_schemas.py).
    # One node each for torch.compile / torch.export (docs/architecture.md §3.1); see ops/library.py.
    # The backward ops return an empty placeholder for a gradient that is not needed.

    def _fake_grads(needs: list[bool], inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(
            torch.empty_like(x, memory_format=torch.contiguous_format) if n else placeholder(x)
            for n, x in zip(needs, inputs, strict=True)
        )

    @torch.library.custom_op(
        "vmm::deform_correlation",
        mutates_args=(),
        schema=(
            "(Tensor query, Tensor key, Tensor offset, SymInt kernel_size, SymInt dilation, SymInt groups) -> Tensor"
        ),
    )
    def _correlation_op(
        query: torch.Tensor, key: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
    ) -> torch.Tensor:
        check_kernel_device("deform_correlation", query)
        return correlation_forward(query, key, offset, kernel_size, dilation, groups)

    @_correlation_op.register_fake
    def _(query, key, offset, kernel_size, dilation, groups):
        batch, _, height, width = query.shape
        return query.new_empty((batch, groups * kernel_size**2, height, width))

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
        return tuple(placeholder(x) if g is None else g for g, x in zip(grads, (query, key, offset), strict=True))

    @_correlation_backward_op.register_fake
    def _(grad_attn, query, key, offset, kernel_size, dilation, groups, needs):
        return _fake_grads(needs, (query, key, offset))

    def _correlation_setup(ctx, inputs, output) -> None:
        query, key, offset, kernel_size, dilation, groups = inputs
        ctx.save_for_backward(query, key, offset)
        ctx.window = (kernel_size, dilation, groups)

    def _correlation_grad(ctx, grad_attn):
        query, key, offset = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[:3]]
        grads = torch.ops.vmm.deform_correlation_backward(grad_attn, query, key, offset, *ctx.window, needs)
        return (*(needed(g, n) for g, n in zip(grads, needs, strict=True)), None, None, None)

    _correlation_op.register_autograd(_correlation_grad, setup_context=_correlation_setup)

    @torch.library.custom_op(
        "vmm::deform_aggregation",
        mutates_args=(),
        schema=(
            "(Tensor value, Tensor attn, Tensor offset, SymInt kernel_size, SymInt dilation, SymInt groups) -> Tensor"
        ),
    )
    def _aggregation_op(
        value: torch.Tensor, attn: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
    ) -> torch.Tensor:
        check_kernel_device("deform_aggregation", value)
        return aggregation_forward(value, attn, offset, kernel_size, dilation, groups)

    @_aggregation_op.register_fake
    def _(value, attn, offset, kernel_size, dilation, groups):
        return torch.empty_like(value, memory_format=torch.contiguous_format)

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
        return tuple(placeholder(x) if g is None else g for g, x in zip(grads, (value, attn, offset), strict=True))

    @_aggregation_backward_op.register_fake
    def _(grad_out, value, attn, offset, kernel_size, dilation, groups, needs):
        return _fake_grads(needs, (value, attn, offset))

    def _aggregation_setup(ctx, inputs, output) -> None:
        value, attn, offset, kernel_size, dilation, groups = inputs
        ctx.save_for_backward(value, attn, offset)
        ctx.window = (kernel_size, dilation, groups)

    def _aggregation_grad(ctx, grad_out):
        value, attn, offset = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[:3]]
        grads = torch.ops.vmm.deform_aggregation_backward(grad_out, value, attn, offset, *ctx.window, needs)
        return (*(needed(g, n) for g, n in zip(grads, needs, strict=True)), None, None, None)

    _aggregation_op.register_autograd(_aggregation_grad, setup_context=_aggregation_setup)

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
        out = torch.empty_like(kv, memory_format=torch.contiguous_format)
        return out, query.new_empty((batch, groups * kernel_size**2, height, width))

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
        return tuple(placeholder(x) if g is None else g for g, x in zip(grads, (query, kv, offset), strict=True))

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
        grads = torch.ops.vmm.deform_attention_backward(
            grad_out, grad_attn, query, kv, offset, attn, *ctx.window, needs
        )
        return (*(needed(g, n) for g, n in zip(grads, needs, strict=True)), None, None, None)

    _attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


def deform_correlation_kernels(
    query: torch.Tensor, key: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> torch.Tensor:
    """The kernel path of ``deform_correlation`` for validated, non-empty inputs on any device the
    loader runs (CUDA through CuPy, CPU through host emulation): the custom op ``vmm::deform_correlation``
    (torch >= 2.4), else :class:`DeformCorrelationFunction`."""
    if CUSTOM_OPS:
        return torch.ops.vmm.deform_correlation(query, key, offset, kernel_size, dilation, groups)
    return DeformCorrelationFunction.apply(query, key, offset, kernel_size, dilation, groups)


def deform_aggregation_kernels(
    value: torch.Tensor, attn: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> torch.Tensor:
    """The kernel path of ``deform_aggregation`` (see :func:`deform_correlation_kernels`)."""
    if CUSTOM_OPS:
        return torch.ops.vmm.deform_aggregation(value, attn, offset, kernel_size, dilation, groups)
    return DeformAggregationFunction.apply(value, attn, offset, kernel_size, dilation, groups)


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
    if CUSTOM_OPS:
        out, attn = torch.ops.vmm.deform_attention(query, kv, offset, kernel_size, dilation, groups)
    else:
        out, attn = DeformAttentionFunction.apply(query, kv, offset, kernel_size, dilation, groups)
    return (out, attn) if return_attn else out
