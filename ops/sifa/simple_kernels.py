"""The SIFA ops' **simple** kernels (``kernels/sifa.cu``, the default variant, the kernels verified on a
GPU): NCHW, one thread per output element. Four kernels serve both ops and their backward passes (see
the header of ``sifa.cu``); :mod:`ops.sifa.kernels` combines them:

* correlation: forward ``sifa_correlate``; backward d query = ``sifa_aggregate`` of d attn,
  d key = ``sifa_scatter``, d offset = ``sifa_offset_grad``.
* aggregation: forward ``sifa_aggregate``; backward d attn = ``sifa_correlate`` of d out,
  d value = ``sifa_scatter``, d offset = ``sifa_offset_grad``.
* the SIFA step (correlation then aggregation of the same map, ``vmm::deform_attention``): the same
  kernels, with both ops' contributions to d kv and to d offset taken in one two-term pass each.

The backward's temporaries are one accumulation-type map for d key / d value and the partial sums of
the channel-split reductions (output-sized, or about 2·TARGET_THREADS elements when split), so no tensor
larger than the inputs is needed. Every launcher takes contiguous inputs of one dtype.
"""

from __future__ import annotations

import torch

from ..kernel_loader import KernelSource
from ..library import alert_not_deterministic
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
        alert_not_deterministic("the CuPy backward of deform_correlation / deform_aggregation (d key, d value)")
    buf = torch.zeros(q.shape, dtype=compute_dtype(q.dtype), device=q.device)
    pair, pairs, s1, s2 = _pair_args(attn, q, scale, second)
    SIFA_SOURCE.launch(
        "sifa_scatter",
        (*pair, offset, buf, *_geometry(q, groups, kernel_size, dilation), pairs, s1, s2),
        dtype=q.dtype,
        numel=q.numel(),
    )
    return buf.to(q.dtype)
