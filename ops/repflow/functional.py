"""``tvl1_flow``: the TV-L1 iteration of Representation Flow (docs/repflow.md §1), with validation and
backend dispatch (reference in ``reference.py``, fused kernels in ``kernels.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..backends import use_kernels
from ..validation import (
    FLOAT_DTYPES,
    OpArgumentError,
    OpDeviceError,
    OpDtypeError,
    OpShapeError,
    check_int,
    compute_dtype,
)
from .kernels import tvl1_fused
from .reference import tvl1_reference


class FlowStencils(NamedTuple):
    """The six per-channel filters of the TV-L1 layer, each ``[C, taps]`` (or ``[taps]``, shared by all channels).

    ``image_x``/``image_y`` (3 taps, default ``[-0.5, 0, 0.5]``): gradient of i1 along W / H.
    ``fwd_x``/``fwd_y`` (2 taps, default ``[-1, 1]``): forward difference of the flow along W / H.
    ``div_x``/``div_y`` (2 taps, default ``[-1, 1]``): divergence of the dual field along W / H.
    """

    image_x: Tensor
    image_y: Tensor
    fwd_x: Tensor
    fwd_y: Tensor
    div_x: Tensor
    div_y: Tensor


STENCIL_TAPS = (3, 3, 2, 2, 2, 2)
DEFAULT_TAPS = ((-0.5, 0.0, 0.5), (-0.5, 0.0, 0.5), (-1.0, 1.0), (-1.0, 1.0), (-1.0, 1.0), (-1.0, 1.0))


def default_stencils(
    channels: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> FlowStencils:
    """The spec's default stencils, repeated per channel: ``[C,3]`` ×2 then ``[C,2]`` ×4."""
    return FlowStencils(*(torch.tensor(t, dtype=dtype, device=device).repeat(channels, 1) for t in DEFAULT_TAPS))


def _check_images(i0: Tensor, i1: Tensor) -> None:
    for name, t in (("i0", i0), ("i1", i1)):
        if not isinstance(t, Tensor):
            raise OpArgumentError(f"{name} must be a tensor [B,C,H,W], got {type(t).__name__}")
        if t.dim() != 4:
            raise OpShapeError(f"{name} must be 4-D [B,C,H,W], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise OpDtypeError(f"{name} must be a float tensor (float32/64, float16, bfloat16), got {t.dtype}")
    if i0.shape != i1.shape:
        raise OpShapeError(f"i0 and i1 must have the same shape, got i0 {tuple(i0.shape)} and i1 {tuple(i1.shape)}")
    if i0.dtype != i1.dtype:
        raise OpDtypeError(f"i0 and i1 must have the same dtype, got i0 {i0.dtype} and i1 {i1.dtype}")
    if i0.device != i1.device:
        raise OpDeviceError(f"i0 and i1 must be on the same device, got i0 on {i0.device} and i1 on {i1.device}")


def _check_scalar(name: str, value: Tensor | float, like: Tensor, dtype: torch.dtype) -> Tensor | float:
    if isinstance(value, Tensor):
        if value.dim() != 0:
            raise OpShapeError(f"{name} must be a Python float or a 0-d tensor, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise OpDtypeError(f"{name} must be a float tensor, got {value.dtype}")
        if value.device != like.device:
            raise OpDeviceError(f"{name} must be on the inputs' device {like.device}, got {value.device}")
        return value.to(dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OpArgumentError(f"{name} must be a Python float or a 0-d tensor, got {type(value).__name__}")
    return float(value)


def _check_stencils(stencils: Sequence[Tensor] | None, like: Tensor, dtype: torch.dtype) -> tuple[Tensor, ...]:
    channels = like.shape[1]
    if stencils is None:
        return tuple(default_stencils(channels, dtype=dtype, device=like.device))
    if isinstance(stencils, Tensor) or len(stencils) != 6:
        raise OpArgumentError(
            "stencils must be None or a sequence of six tensors (image_x, image_y, fwd_x, fwd_y, div_x, div_y)"
        )
    out = []
    for name, s, taps in zip(FlowStencils._fields, stencils, STENCIL_TAPS, strict=True):
        if not isinstance(s, Tensor):
            raise OpArgumentError(f"stencils.{name} must be a tensor [C,{taps}] or [{taps}], got {type(s).__name__}")
        if not s.is_floating_point():
            raise OpDtypeError(f"stencils.{name} must be a float tensor, got {s.dtype}")
        if s.device != like.device:
            raise OpDeviceError(f"stencils.{name} must be on the inputs' device {like.device}, got {s.device}")
        if s.dim() == 1 and s.shape[0] == taps:
            s = s.expand(channels, taps)
        elif s.shape != (channels, taps):
            raise OpShapeError(
                f"stencils.{name} must have shape [C={channels},{taps}] or [{taps}], got {tuple(s.shape)}"
            )
        out.append(s.to(dtype))
    return tuple(out)


def tvl1_flow(
    i0: Tensor,
    i1: Tensor,
    n_iter: int = 10,
    theta: Tensor | float = 0.3,
    lam: Tensor | float = 0.15,
    tau: Tensor | float = 0.25,
    stencils: Sequence[Tensor] | None = None,
    backend: str = "auto",
) -> Tensor:
    """TV-L1 flow from ``i0`` to ``i1`` by ``n_iter`` unrolled iterations (docs/repflow.md §1), per channel.

    Args:
        i0, i1: ``[B,C,H,W]`` feature maps of frames t and t+1 (same shape, dtype, device).
        n_iter: number of iterations, ≥ 1.
        theta, lam, tau: θ (used as ``|θ| + 1e-12``), λ, τ; Python floats or 0-d tensors (may require grad).
        stencils: six per-channel filters (see :class:`FlowStencils`), ``None`` for the spec's defaults.
        backend: ``"torch"`` (reference, any device), ``"cupy"`` (fused CUDA kernels; CUDA tensors and
            CuPy needed) or ``"auto"`` (cupy when both hold, else torch). Tests may also pass
            ``"emulated"`` inside :func:`ops.kernel_host_emulation` (the kernels on CPU tensors).

    Returns:
        ``[B, 2C, H, W]`` = ``cat([u1, u2], 1)``: u1 the x (column) displacement, u2 the y (row)
        displacement, in pixels, in the inputs' dtype (16-bit inputs are computed in float32).

    NaN/Inf (docs/repflow.md §1, the same in both backends): non-finite values propagate as in torch
    ops; a NaN or ±Inf residual or image gradient gives a NaN step in every branch of the threshold
    (never a silent zero or clipped step), and the backward is NaN along the same paths. See
    :func:`.reference.threshold_coefficient`.
    """
    _check_images(i0, i1)
    kernels = use_kernels(backend, i0)
    check_int("n_iter", n_iter, minimum=1)
    dtype = compute_dtype(i0.dtype)
    theta = _check_scalar("theta", theta, i0, dtype)
    lam = _check_scalar("lam", lam, i0, dtype)
    tau = _check_scalar("tau", tau, i0, dtype)
    taps = _check_stencils(stencils, i0, dtype)
    # Empty inputs take the reference (no launch to make): an empty result that is still part of the
    # autograd graph, so a backward through it works as for any other op.
    impl = tvl1_fused if kernels and i0.numel() > 0 else tvl1_reference
    out = impl(i0.to(dtype), i1.to(dtype), n_iter, theta, lam, tau, taps)
    return out.to(i0.dtype)
