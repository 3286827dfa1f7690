"""The SIFA ops on the CUDA kernels of ``kernels/sifa.cu``, as autograd Functions.

CUDA tensors launch through CuPy; CPU tensors run the same kernels through host emulation (the test
suite's way of executing them without a GPU — slow, not a CPU backend). Four kernels serve both ops
and their backward passes (see the header of ``sifa.cu``):

* correlation: forward ``sifa_correlate``; backward d query = ``sifa_aggregate`` of d attn,
  d key = ``sifa_scatter``, d offset = ``sifa_offset_grad``.
* aggregation: forward ``sifa_aggregate``; backward d attn = ``sifa_correlate`` of d out,
  d value = ``sifa_scatter``, d offset = ``sifa_offset_grad``.
* the SIFA step (correlation then aggregation of the same map, ``DeformAttentionFunction``): the same
  kernels, with both ops' contributions to d kv and to d offset taken in one two-term pass each.

Memory: the forward saves only its inputs (the reference saves K² sampled maps per op), and the
backward's temporaries are one accumulation-type map for d key / d value and the partial sums of the
channel-split reductions (output-sized, or about 2·TARGET_THREADS elements when split), so no tensor larger than
the inputs is needed. d key / d value are accumulated with atomicAdd, so on a GPU their last bits vary from run
to run (and ``torch.use_deterministic_algorithms(True)`` raises, as for grid_sample's CUDA backward);
every other gradient is written once per element by one thread, in a fixed order.
Double backward is not supported (the backward is not itself differentiable).

NaN / Inf: the reference's rule (see ``reference.py`` and ``sifa.cu``'s ``sifa_locate``): NaN/Inf values
propagate through every product, also with zero weights or off-map samples, and a NaN or ±Inf offset
makes its tap's sample NaN. Kernels and reference give the same NaN pattern in values and gradients.
"""

from __future__ import annotations

import warnings

import torch
from torch.autograd.function import once_differentiable

from ..kernel_loader import KernelSource
from .reference import compute_dtype

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


class DeformCorrelationFunction(torch.autograd.Function):
    """``deform_correlation`` on the kernels; inputs validated by the caller (one dtype and device)."""

    @staticmethod
    def forward(ctx, query, key, offset, kernel_size: int, dilation: int, groups: int):
        query, key, offset = query.contiguous(), key.contiguous(), offset.contiguous()
        ctx.save_for_backward(query, key, offset)
        ctx.window = (kernel_size, dilation, groups)
        scale = groups / query.shape[1]  # the channel mean within a group
        return correlate(query, key, offset, kernel_size, dilation, groups, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_attn):
        query, key, offset = ctx.saved_tensors
        kernel_size, dilation, groups = ctx.window
        grad_attn = grad_attn.contiguous()
        scale = groups / query.shape[1]
        window = (kernel_size, dilation, groups, scale)
        need_q, need_k, need_o = ctx.needs_input_grad[:3]
        grad_q = aggregate(key, grad_attn, offset, *window) if need_q else None
        grad_k = scatter(grad_attn, query, offset, *window) if need_k else None
        grad_o = offset_grad(grad_attn, query, key, offset, *window) if need_o else None
        return grad_q, grad_k, grad_o, None, None, None


class DeformAggregationFunction(torch.autograd.Function):
    """``deform_aggregation`` on the kernels; inputs validated by the caller (one dtype and device)."""

    @staticmethod
    def forward(ctx, value, attn, offset, kernel_size: int, dilation: int, groups: int):
        value, attn, offset = value.contiguous(), attn.contiguous(), offset.contiguous()
        ctx.save_for_backward(value, attn, offset)
        ctx.window = (kernel_size, dilation, groups)
        return aggregate(value, attn, offset, kernel_size, dilation, groups, 1.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        value, attn, offset = ctx.saved_tensors
        kernel_size, dilation, groups = ctx.window
        grad_out = grad_out.contiguous()
        window = (kernel_size, dilation, groups, 1.0)
        need_v, need_a, need_o = ctx.needs_input_grad[:3]
        grad_v = scatter(attn, grad_out, offset, *window) if need_v else None
        grad_a = correlate(grad_out, value, offset, *window) if need_a else None
        grad_o = offset_grad(attn, grad_out, value, offset, *window) if need_o else None
        return grad_v, grad_a, grad_o, None, None, None


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
        scale = groups / query.shape[1]
        attn = correlate(query, kv, offset, kernel_size, dilation, groups, scale)
        ctx.save_for_backward(query, kv, offset, attn)
        ctx.window = (kernel_size, dilation, groups)
        ctx.set_materialize_grads(False)  # an unused output sends None: no zero map, no work for it
        return aggregate(kv, attn, offset, kernel_size, dilation, groups, 1.0), attn

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_attn_in):
        if grad_out is None and grad_attn_in is None:
            return None, None, None, None, None, None
        query, kv, offset, attn = ctx.saved_tensors
        kernel_size, dilation, groups = ctx.window
        scale = groups / query.shape[1]
        geometry = (kernel_size, dilation, groups)
        need_q, need_kv, need_o = ctx.needs_input_grad[:3]
        # out = Σ_k attn_k · S_k(kv): d attn through the aggregation (plus any d attn from outside), then
        # the correlation's chain
        grad_attn, direct = None, None
        if grad_out is not None:
            grad_out = grad_out.contiguous()
            grad_attn = correlate(grad_out, kv, offset, *geometry, 1.0)
            direct = (attn, grad_out, 1.0)  # the aggregation's own dependence on kv and offset
        if grad_attn_in is not None:
            grad_attn_in = grad_attn_in.contiguous()
            grad_attn = grad_attn_in if grad_attn is None else grad_attn + grad_attn_in
        grad_q = aggregate(kv, grad_attn, offset, *geometry, scale) if need_q else None
        grad_kv = scatter(grad_attn, query, offset, *geometry, scale, second=direct) if need_kv else None
        grad_o = offset_grad(grad_attn, query, kv, offset, *geometry, scale, second=direct) if need_o else None
        return grad_q, grad_kv, grad_o, None, None, None


def deform_correlation_kernels(
    query: torch.Tensor, key: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> torch.Tensor:
    """The kernel path of ``deform_correlation`` for validated, non-empty inputs on any device the
    loader runs (CUDA through CuPy, CPU through host emulation)."""
    return DeformCorrelationFunction.apply(query, key, offset, kernel_size, dilation, groups)


def deform_aggregation_kernels(
    value: torch.Tensor, attn: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> torch.Tensor:
    """The kernel path of ``deform_aggregation`` (see :func:`deform_correlation_kernels`)."""
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
    or with ``return_attn`` the pair (out, attn ``[B,G·K²,H,W]``) from the same correlation pass."""
    out, attn = DeformAttentionFunction.apply(query, kv, offset, kernel_size, dilation, groups)
    return (out, attn) if return_attn else out
