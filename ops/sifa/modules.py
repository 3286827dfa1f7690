"""``SIFA``: the stand-alone inter-frame attention block of docs/sifa.md §2, with the optional correlation
features of docs/sifa.md §5."""

from __future__ import annotations

import torch
from torch import nn

from ..backends import check_backend, kernel_variant, use_kernels
from ..validation import (
    OpArgumentError,
    OpShapeError,
    check_bool,
    check_input_dtype,
    check_int,
    check_tensor,
)
from .functional import deform_attention

OFFSET_INITS: tuple[str, ...] = ("zeros", "kaiming", "default")


class SIFA(nn.Module):
    """Deformable inter-frame attention from each frame t to frame t+1, added to frame t (docs/sifa.md §2).

    1. Motion map ``M[t] = (1 + sigmoid(x[t] - x[t-1])) · x[t]`` with ``x[-1] := x[0]``.
    2. ``offset = conv_offset(M)``: Conv3d(C, 2K², (1,3,3), padding (0,1,1), no bias).
    3. Each pair (t, t+1), flattened into the batch: ``attn = deform_correlation(x[t], x[t+1],
       offset[t+1])``, ``agg = deform_aggregation(x[t+1], attn, offset[t+1])``.
    4. ``y[t] = x[t] + agg[t]`` for t < T-1; ``y[T-1] = x[T-1]``.

    With ``correlation_features=True`` (ours, not the paper's; docs/sifa.md §5) step 4 becomes
    ``y[t] = x[t] + agg[t] + P(attn[t])`` for t < T-1, ``attn[t]`` the ``[N,G·K²,H,W]`` correlation of
    pair (t, t+1) from step 3 (the same pass, not a second one) and ``P`` = ``attn_proj``, a bias-free
    1×1 conv G·K² → C initialised to zero: a new block computes exactly the paper's block, and learns
    to use which tap matched (the direction of motion), which the sum over taps in ``agg`` discards.
    The last frame has no pair, so ``y[T-1] = x[T-1]`` still.

    Args:
        channels: C of the input ``[N,C,T,H,W]``.
        kernel_size, dilation, groups: the window of the two ops (K odd, G divides C).
        offset_init: "zeros" (default: the block starts as plain K×K inter-frame attention),
            "kaiming" (Kaiming-normal, fan_out, as the released network-wide init leaves it) or
            "default" (PyTorch's Conv3d init). A network-wide init that touches every Conv3d should
            call :meth:`reset_parameters` afterwards to restore this choice.
        backend: passed to the ops ("auto", "torch" or "cupy").
        correlation_features: add ``P(attn)`` (see above); False is the paper's block (no ``attn_proj``
            parameter, so state dicts of either kind load into a block built the same way).

    Shapes: x ``[N,C,T,H,W]`` -> ``[N,C,T,H,W]``, any T >= 1 (T = 1 or an empty map returns x unchanged).
    x must have the parameters' dtype (OpDtypeError, a ValueError, naming both otherwise), except under
    torch.autocast.
    NaN / Inf in x or in the offsets propagate as in :func:`ops.deform_correlation`.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        dilation: int = 1,
        groups: int = 1,
        offset_init: str = "zeros",
        backend: str = "auto",
        correlation_features: bool = False,
    ) -> None:
        super().__init__()
        check_int("channels", channels, minimum=1)
        check_int("kernel_size", kernel_size, minimum=1, odd=True)
        check_int("dilation", dilation, minimum=1)
        check_int("groups", groups, minimum=1)
        if channels % groups != 0:
            raise OpArgumentError(f"groups ({groups}) must divide channels ({channels})")
        check_bool("correlation_features", correlation_features)
        if offset_init not in OFFSET_INITS:
            raise OpArgumentError(f"offset_init must be one of {OFFSET_INITS}, got {offset_init!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.groups = groups
        self.offset_init = offset_init
        self.backend = check_backend(backend)
        self.correlation_features = correlation_features
        self.conv_offset = nn.Conv3d(
            channels, 2 * kernel_size * kernel_size, kernel_size=(1, 3, 3), padding=(0, 1, 1), bias=False
        )
        self.attn_proj: nn.Conv2d | None = None
        if correlation_features:
            # P of docs/sifa.md §5, per frame pair: attn [N·(T-1), G·K², H, W] -> [N·(T-1), C, H, W]. Built
            # under a forked RNG (its init is zero anyway) so the offset conv's init matches the paper's block.
            with torch.random.fork_rng(devices=[]):
                self.attn_proj = nn.Conv2d(groups * kernel_size * kernel_size, channels, kernel_size=1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise ``conv_offset`` as ``offset_init`` says, and ``attn_proj`` (if any) to zero."""
        if self.offset_init == "zeros":
            nn.init.zeros_(self.conv_offset.weight)
        elif self.offset_init == "kaiming":
            nn.init.kaiming_normal_(self.conv_offset.weight, mode="fan_out", nonlinearity="relu")
        else:
            self.conv_offset.reset_parameters()
        if self.attn_proj is not None:
            nn.init.zeros_(self.attn_proj.weight)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, kernel_size={self.kernel_size}, dilation={self.dilation}, groups={self.groups}, "
            f"offset_init={self.offset_init!r}" + (", correlation_features=True" if self.correlation_features else "")
        )

    def forward(self, x: torch.Tensor, return_attn: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``y`` as above; with ``return_attn`` also the correlation of every frame pair, ``[N, G·K², T-1, H, W]``
        (pair t at index t: the ``attn`` of step 3, from the same pass), for a network that uses it beside
        the block (e.g. as a residual branch of its own, docs/sifa.md §5)."""
        check_tensor("x", x, ndim=5, layout="[N,C,T,H,W]")
        n, c, t, h, w = x.shape
        if c != self.channels:
            raise OpShapeError(f"x must have {self.channels} channels ([N,C,T,H,W]), got shape {tuple(x.shape)}")
        if t < 1:
            raise OpShapeError(f"x must have T >= 1 frames ([N,C,T,H,W]), got shape {tuple(x.shape)}")
        check_input_dtype("x", x, self.conv_offset.weight.dtype, module="SIFA")
        if t == 1 or h == 0 or w == 0:  # no frame pair, or empty maps (as the functional ops take them)
            if return_attn:
                taps = self.groups * self.kernel_size * self.kernel_size
                return x, x.new_zeros((n, taps, t - 1, h, w))
            return x
        # Only the key frames t = 1..T-1 use their motion map and offsets, and conv_offset is per frame
        # (kernel 1×3×3), so frame 0's (where x[-1] := x[0]) is never computed. Out-of-place slices, not
        # the released code's overlapping in-place shift (docs/sifa.md §2.1).
        motion = (1 + torch.sigmoid(x[:, :, 1:] - x[:, :, :-1])) * x[:, :, 1:]
        # Under autocast the conv may return another dtype than x; the ops want one dtype.
        offset = self.conv_offset(motion).to(x.dtype)  # [N,2K²,T-1,H,W]: offsets of frames 1..T-1

        # The frame pairs are copied out of the clip either way; for the fast kernels they are copied
        # channels-last ([N·(T-1),H,W,C'] in memory), their layout, so the ops copy nothing more and return
        # channels-last results (ops/sifa/kernels.py). The reference and the simple kernels take NCHW pairs.
        channels_last = use_kernels(self.backend, x) and kernel_variant() == "fast"

        def pairs(v: torch.Tensor) -> torch.Tensor:  # [N,C',T-1,H,W] -> [N·(T-1),C',H,W]
            if channels_last:
                return v.permute(0, 2, 3, 4, 1).reshape(n * (t - 1), h, w, v.shape[1]).permute(0, 3, 1, 2)
            return v.transpose(1, 2).reshape(n * (t - 1), v.shape[1], h, w)

        query = pairs(x[:, :, :-1])
        key = pairs(x[:, :, 1:])
        off = pairs(offset)  # each pair uses its key frame's offsets
        k, d, g = self.kernel_size, self.dilation, self.groups
        # deform_aggregation(key, deform_correlation(query, key, off), off), fused on the reference path
        if self.attn_proj is None and not return_attn:
            agg = deform_attention(query, key, off, k, d, g, backend=self.backend)
        else:
            agg, attn = deform_attention(query, key, off, k, d, g, backend=self.backend, return_attn=True)
            if self.attn_proj is not None:
                # agg + P(attn): with P = 0 (a new block) this is agg itself, bit for bit
                agg = agg + self.attn_proj(attn).to(agg.dtype)
        agg = agg.reshape(n, t - 1, c, h, w).transpose(1, 2)
        y = torch.cat((x[:, :, :-1] + agg, x[:, :, -1:]), dim=2)
        if return_attn:
            return y, attn.reshape(n, t - 1, attn.shape[1], h, w).transpose(1, 2)
        return y
