"""``deform_correlation``, ``deform_aggregation`` (docs/sifa.md §1) and their composition ``deform_attention``
used by the SIFA block: validation and backend dispatch (reference in ``reference.py``, CUDA kernels in
``kernels.py``).

``backend`` is "torch", "cupy" or "auto" (docs/architecture.md §3.1); tests may also pass "emulated"
inside :func:`ops.kernel_host_emulation` to run the kernels on CPU tensors.
"""

from __future__ import annotations

import torch

from ..backends import use_kernels
from ..validation import OpArgumentError, check_bool, check_int, check_same_dtype_device, check_shape, check_tensor
from .kernels import deform_aggregation_kernels, deform_attention_kernels, deform_correlation_kernels
from .reference import deform_aggregation_reference, deform_attention_reference, deform_correlation_reference


def _check_window(kernel_size: int, dilation: int, groups: int, channels: int) -> None:
    check_int("kernel_size", kernel_size, minimum=1, odd=True)
    check_int("dilation", dilation, minimum=1)
    check_int("groups", groups, minimum=1)
    if channels < 1 or channels % groups != 0:
        raise OpArgumentError(f"groups ({groups}) must divide the channel count C = {channels} (C >= 1)")


def _empty_result(shape: tuple[int, ...], *inputs: torch.Tensor) -> torch.Tensor:
    # An empty output still joins the graph, so backward yields (empty) zero gradients for every input.
    out = inputs[0].new_zeros(shape)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        out = out + sum(t.sum() for t in inputs).to(out.dtype) * 0
    return out


def validate_correlation(
    query: torch.Tensor, key: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> None:
    """An error naming the argument (ops.validation's types, all ValueErrors) unless the shapes, dtypes,
    devices and window fit ``deform_correlation``."""
    check_tensor("query", query, ndim=4, layout="[B,C,H,W]")
    check_tensor("key", key, ndim=4, layout="[B,C,H,W]")
    check_tensor("offset", offset, ndim=4, layout="[B,2K²,H,W]")
    check_same_dtype_device(query=query, key=key, offset=offset)
    batch, channels, height, width = query.shape
    _check_window(kernel_size, dilation, groups, channels)
    check_shape("key", key, tuple(query.shape), "[B,C,H,W] of query")
    check_shape("offset", offset, (batch, 2 * kernel_size**2, height, width), "[B,2K²,H,W]")


def validate_aggregation(
    value: torch.Tensor, attn: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> None:
    """An error naming the argument (ops.validation's types, all ValueErrors) unless the shapes, dtypes,
    devices and window fit ``deform_aggregation``."""
    check_tensor("value", value, ndim=4, layout="[B,C,H,W]")
    check_tensor("attn", attn, ndim=4, layout="[B,G·K²,H,W]")
    check_tensor("offset", offset, ndim=4, layout="[B,2K²,H,W]")
    check_same_dtype_device(value=value, attn=attn, offset=offset)
    batch, channels, height, width = value.shape
    _check_window(kernel_size, dilation, groups, channels)
    check_shape("attn", attn, (batch, groups * kernel_size**2, height, width), "[B,G·K²,H,W]")
    check_shape("offset", offset, (batch, 2 * kernel_size**2, height, width), "[B,2K²,H,W]")


def deform_correlation(
    query: torch.Tensor,
    key: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int = 3,
    dilation: int = 1,
    groups: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """Deformable inter-frame correlation (docs/sifa.md §1).

    ``attn[b, g·K²+k, h, w] = 1/|g| · Σ_{c∈g} query[b,c,h,w] · bilinear(key[b,c], y_k, x_k)`` with
    ``y_k = h - pad + kh·dil + offset[b,2k,h,w]``, ``x_k = w - pad + kw·dil + offset[b,2k+1,h,w]``
    (k = kh·K + kw, pad = dil·(K-1)//2, zero padding outside the map).

    Args:
        query, key: ``[B,C,H,W]``; the query is read at integer pixels, the key is sampled.
        offset: ``[B,2K²,H,W]`` in pixels, Δy then Δx per tap (DCN layout), shared by all groups.
        kernel_size: K, odd. dilation: spacing of the taps. groups: G, divides C.
        backend: "torch" (reference), "cupy" (CUDA kernels) or "auto" (cupy for CUDA tensors when
            CuPy imports).

    Returns:
        attn ``[B, G·K², H, W]`` in the input dtype (no softmax).

    Both backends compute 16-bit inputs in float32. Bilinear sampling is not differentiable at integer
    coordinates; there both use the one-sided derivative of ``floor``-based interpolation. On the
    "cupy" backend the gradient w.r.t. ``key`` is accumulated with atomicAdd (last bits vary between
    runs); the reference saves K² sampled maps for the backward, the kernels only the inputs.

    NaN / Inf (one rule for both backends, docs/sifa.md §1): they propagate as IEEE arithmetic on the
    formula above does, as torch ops do. A NaN/Inf in query or key reaches every output it is multiplied
    into, also by a zero bilinear weight or a zero (off-map) sample (0 · Inf is NaN); a NaN or ±Inf
    offset has undefined bilinear weights (Inf - floor(Inf) is NaN), so that tap's attn is NaN (never 0
    for "off the map"), and so are the gradients that go through it. A large finite offset is simply off
    the map (0).
    """
    validate_correlation(query, key, offset, kernel_size, dilation, groups)
    batch, _, height, width = query.shape
    out_shape = (batch, groups * kernel_size**2, height, width)
    cupy = use_kernels(backend, query)
    if batch * height * width == 0:
        return _empty_result(out_shape, query, key, offset)
    if cupy:
        return deform_correlation_kernels(query, key, offset, kernel_size, dilation, groups)
    return deform_correlation_reference(query, key, offset, kernel_size, dilation, groups)


def deform_aggregation(
    value: torch.Tensor,
    attn: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int = 3,
    dilation: int = 1,
    groups: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """Deformable aggregation (docs/sifa.md §1).

    ``out[b, c, h, w] = Σ_k attn[b, g(c)·K²+k, h, w] · bilinear(value[b,c], y_k, x_k)`` with the sample
    points of :func:`deform_correlation`; g(c) = c // (C/G).

    Args:
        value: ``[B,C,H,W]``, sampled. attn: ``[B,G·K²,H,W]`` (e.g. from :func:`deform_correlation`).
        offset: ``[B,2K²,H,W]`` in pixels, Δy then Δx per tap.
        kernel_size, dilation, groups, backend: as :func:`deform_correlation`.

    Returns:
        out ``[B,C,H,W]`` in the input dtype.

    NaN / Inf: as :func:`deform_correlation` (a NaN/±Inf offset makes its tap's sample NaN, so every
    channel of out at that pixel is NaN; a NaN/Inf attn is NaN even where its sample is off the map).
    """
    validate_aggregation(value, attn, offset, kernel_size, dilation, groups)
    batch, _, height, width = value.shape
    cupy = use_kernels(backend, value)
    if batch * height * width == 0:
        return _empty_result(tuple(value.shape), value, attn, offset)
    if cupy:
        return deform_aggregation_kernels(value, attn, offset, kernel_size, dilation, groups)
    return deform_aggregation_reference(value, attn, offset, kernel_size, dilation, groups)


def deform_attention(
    query: torch.Tensor,
    kv: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int = 3,
    dilation: int = 1,
    groups: int = 1,
    backend: str = "auto",
    return_attn: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``deform_aggregation(kv, deform_correlation(query, kv, offset), offset)``: SIFA's step with key =
    value (docs/sifa.md §2.3), ``[B,C,H,W]`` in the input dtype.

    The reference samples each tap once for both ops (half the work and half the saved maps of calling
    them in turn); the kernels' backward takes both ops' d kv and d offset in one pass each.
    Arguments as :func:`deform_correlation`.

    Args:
        return_attn: also return the correlation ``attn [B,G·K²,H,W]`` (input dtype) that weighted the
            aggregation, differentiable: ``(out, attn)``. No second correlation pass on either backend; on
            the kernels a gradient on attn joins the aggregation's d attn before the correlation's backward
            (the SIFA block's correlation features, docs/sifa.md §5).

    NaN / Inf: as :func:`deform_correlation`.
    """
    validate_correlation(query, kv, offset, kernel_size, dilation, groups)
    check_bool("return_attn", return_attn)
    batch, _, height, width = query.shape
    cupy = use_kernels(backend, query)
    if batch * height * width == 0:
        out = _empty_result(tuple(query.shape), query, kv, offset)
        if not return_attn:
            return out
        return out, _empty_result((batch, groups * kernel_size**2, height, width), query, kv, offset)
    if cupy:
        return deform_attention_kernels(query, kv, offset, kernel_size, dilation, groups, return_attn)
    return deform_attention_reference(query, kv, offset, kernel_size, dilation, groups, return_attn)
