"""Pure-PyTorch reference of SIFA's two ops (docs/sifa.md §1): any device, any float dtype, autograd.

Bilinear sampling is ``F.grid_sample(mode="bilinear", padding_mode="zeros")``: each of the four
integer corners outside the map contributes 0, exactly the spec's ``bilinear``. Bilinear is not
differentiable at integer coordinates (where every sample point sits while SIFA's zero-initialised
offsets are zero), and which one-sided derivative grid_sample takes there depends on the rounding of
its [-1, 1] normalisation. So the map is first zero-padded (bottom/right) to a power-of-two canvas
``Hp × Wp``: with ``g = (2·x + 1) / Wp - 1`` (``align_corners=False``, defined for maps of size 1 too)
an integer x survives the round trip exactly, and the derivative is the one of ``floor``-based
interpolation, as in the CUDA kernels. The zeros of the canvas are the zero padding of the spec.

Memory: the ops loop over the K² taps, so a forward without autograd keeps one sampled map
``[B,C,H,W]`` live at a time instead of ``[B,C,K²,H,W]``. With autograd recording, each tap's
sampled map is saved for the backward (the correlation needs it for d/dquery, the aggregation for
d/dattn), i.e. K² feature maps per op in the compute dtype, plus the canvas (≤ 4 maps, usually
~1.3) — the reason the CUDA kernels exist. :func:`deform_attention_reference` (the SIFA block's
path, key = value) samples each tap once for both ops and so saves K² maps in all. Recomputing the
samples in the backward (checkpointing) would save them too, at about +30% CPU time; not done.
16-bit inputs are computed in float32 (sample coordinates in 16 bits would be off by up to
~0.03 px at 56²) and the result is cast back to the input dtype.

NaN / Inf (docs/sifa.md §1; the kernels follow the same rule): values propagate as IEEE arithmetic on
the bilinear formula makes them. A NaN/Inf in query, key, value or attn reaches every output that
multiplies it, even by a zero weight or a zero (off-map) sample; a NaN or ±Inf offset has undefined
bilinear weights (Inf - floor(Inf) is NaN), so that tap's sample, its attention value and its output
term are NaN. grid_sample's vectorised CPU kernel computes exactly that; its CUDA and scalar kernels
treat an Inf coordinate as off the map (0), so the forward adds :func:`undefined_taps` (0 or NaN,
outside autograd) to each tap's attention to give the same values on every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validation import compute_dtype


def canvas_size(n: int | torch.Tensor) -> int | torch.Tensor:
    """The power of two >= n: the padded size of a map dimension of size n (n >= 1).

    Under ``torch.jit.trace`` sizes arrive as 0-d tensors; the same power of two is then computed by
    torch ops (exact: log2 of an integer below 2^53 rounds up correctly in float64), so the trace
    records it instead of freezing the traced size.
    """
    if isinstance(n, torch.Tensor):
        return torch.pow(2, torch.ceil(torch.log2(n.to(torch.float64)))).to(n.dtype)
    return 1 << (n - 1).bit_length()


def to_canvas(img: torch.Tensor) -> torch.Tensor:
    """``img [B,C,H,W]`` zero-padded at the bottom and right to ``[B,C,Hp,Wp]`` (powers of two)."""
    height, width = img.shape[-2:]
    extra_h, extra_w = canvas_size(height) - height, canvas_size(width) - width
    if isinstance(extra_h, torch.Tensor):  # traced: always pad (by 0 where the size is a power of two)
        return F.pad(img, (0, extra_w, 0, extra_h))
    return F.pad(img, (0, extra_w, 0, extra_h)) if extra_h or extra_w else img


def tap_grids(offset: torch.Tensor, kernel_size: int, dilation: int) -> list[torch.Tensor]:
    """One ``grid_sample`` grid ``[B,H,W,2]`` (x, y in [-1, 1] of the :func:`to_canvas` canvas) per tap
    k = kh·K + kw.

    Tap k samples at ``y = h - pad + kh·dil + offset[:, 2k]``, ``x = w - pad + kw·dil + offset[:, 2k+1]``
    (pixel units, pad = dil·(K-1)//2), the DCN offset layout of docs/sifa.md §1.
    """
    _, _, height, width = offset.shape
    canvas_h, canvas_w = canvas_size(height), canvas_size(width)
    pad = dilation * (kernel_size - 1) // 2
    ys = torch.arange(height, dtype=offset.dtype, device=offset.device).view(1, height, 1)
    xs = torch.arange(width, dtype=offset.dtype, device=offset.device).view(1, 1, width)
    grids = []
    for k in range(kernel_size * kernel_size):
        kh, kw = divmod(k, kernel_size)
        y = ys + (kh * dilation - pad) + offset[:, 2 * k]
        x = xs + (kw * dilation - pad) + offset[:, 2 * k + 1]
        grids.append(torch.stack(((2 * x + 1) / canvas_w - 1, (2 * y + 1) / canvas_h - 1), dim=-1))
    return grids


def undefined_taps(offset: torch.Tensor) -> torch.Tensor:
    """``[B,K²,H,W]``: 0 where tap k's (Δy, Δx) are finite, NaN where either is NaN or ±Inf (detached)."""
    offset = offset.detach()
    nan_or_zero = offset - offset  # 0 for finite values, NaN for NaN and ±Inf
    return nan_or_zero[:, 0::2] + nan_or_zero[:, 1::2]


def _sample(img: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def deform_correlation_reference(
    query: torch.Tensor, key: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> torch.Tensor:
    """attn ``[B, G·K², H, W]``: ``attn[b, g·K²+k] = mean_{c ∈ g} query[b,c] · bilinear(key[b,c], y_k, x_k)``.

    Inputs already validated: query, key ``[B,C,H,W]``, offset ``[B,2K²,H,W]``, one dtype and device.
    """
    batch, channels, height, width = query.shape
    dtype = compute_dtype(query.dtype)
    q = query.to(dtype).reshape(batch, groups, channels // groups, height, width)
    kv = to_canvas(key.to(dtype))
    off = offset.to(dtype)
    undefined = undefined_taps(off).unsqueeze(1)  # [B,1,K²,H,W]
    taps = [
        (q * _sample(kv, grid).view_as(q)).mean(dim=2) + undefined[:, :, k]  # [B,G,H,W]
        for k, grid in enumerate(tap_grids(off, kernel_size, dilation))
    ]
    attn = torch.stack(taps, dim=2)  # [B,G,K²,H,W]: channel g·K²+k after the reshape
    return attn.reshape(batch, groups * kernel_size * kernel_size, height, width).to(query.dtype)


def deform_aggregation_reference(
    value: torch.Tensor, attn: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> torch.Tensor:
    """out ``[B,C,H,W]``: ``out[b,c] = Σ_k attn[b, g(c)·K²+k] · bilinear(value[b,c], y_k, x_k)``.

    Inputs already validated: value ``[B,C,H,W]``, attn ``[B,G·K²,H,W]``, offset ``[B,2K²,H,W]``.
    """
    batch, channels, height, width = value.shape
    dtype = compute_dtype(value.dtype)
    v = to_canvas(value.to(dtype))
    a = attn.to(dtype).reshape(batch, groups, kernel_size * kernel_size, 1, height, width)
    off = offset.to(dtype)
    out = None
    for k, grid in enumerate(tap_grids(off, kernel_size, dilation)):
        term = a[:, :, k] * _sample(v, grid).view(batch, groups, channels // groups, height, width)
        out = term if out is None else out + term
    out = out + undefined_taps(off).sum(dim=1).view(batch, 1, 1, height, width)  # after the products: no gradient
    return out.reshape(batch, channels, height, width).to(value.dtype)


def deform_attention_reference(
    query: torch.Tensor,
    kv: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    return_attn: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``deform_aggregation(kv, deform_correlation(query, kv, offset), offset)`` in one pass over the taps.

    SIFA samples the same map (key = value) at the same points in both ops, so each tap's sampled map is
    computed once and used twice: half the grid_sample work, and autograd saves K² sampled maps instead
    of 2·K². Inputs already validated as for the two ops; returns ``[B,C,H,W]``, or with ``return_attn``
    the pair (out, attn ``[B,G·K²,H,W]``), attn differentiable like the output (both in the input dtype).
    """
    batch, channels, height, width = query.shape
    dtype = compute_dtype(query.dtype)
    shape = (batch, groups, channels // groups, height, width)
    q = query.to(dtype).reshape(shape)
    v = to_canvas(kv.to(dtype))
    off = offset.to(dtype)
    undefined = undefined_taps(off).view(batch, 1, kernel_size * kernel_size, 1, height, width)
    out = None
    attn_taps = []
    for grid in tap_grids(off, kernel_size, dilation):
        sampled = _sample(v, grid).view(shape)
        attn = (q * sampled).mean(dim=2, keepdim=True)  # [B,G,1,H,W]: this tap's attn
        term = attn * sampled  # its aggregation term
        out = term if out is None else out + term
        if return_attn:
            attn_taps.append(attn)
    out = out + undefined.sum(dim=2)  # the NaN rule, added after the products (no gradient)
    out = out.reshape(batch, channels, height, width).to(query.dtype)
    if not return_attn:
        return out
    attn = torch.cat(attn_taps, dim=2) + undefined.squeeze(3)  # [B,G,K²,H,W]: channel g·K²+k after the reshape
    return out, attn.reshape(batch, groups * kernel_size * kernel_size, height, width).to(query.dtype)
