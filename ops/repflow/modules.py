"""``FlowLayer`` (docs/repflow.md §2) and the Flow-Conv-Flow block ``FCFBlock`` (§3)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..backends import check_backend
from ..validation import (
    OpArgumentError,
    OpDtypeError,
    OpShapeError,
    check_bool,
    check_input_dtype,
    check_int,
)
from .functional import DEFAULT_TAPS, tvl1_flow

#: Guards the per-sample normalisation's division when a sample is constant (max == min).
NORM_EPS = 1e-6

#: What a flow layer learns, as named flags, in the order of the deprecated ``learnable`` tuple:
#: the image-gradient stencils (image_x, image_y), the stencils applied to the flow and its dual
#: field (forward differences fwd_x, fwd_y and divergence div_x, div_y), θ, λ and τ.
LEARN_FLAGS: tuple[str, ...] = ("learn_image_stencils", "learn_flow_stencils", "learn_theta", "learn_lam", "learn_tau")
#: The paper's best setting: image stencils fixed, everything else learned.
DEFAULT_LEARN: tuple[bool, ...] = (False, True, True, True, True)


def resolve_learn_flags(owner: str, learnable: Sequence[bool] | None, flags: dict[str, bool]) -> dict[str, bool]:
    """The five learn flags of ``owner`` (a class name, for messages), by name.

    ``learnable`` is the deprecated five-tuple in :data:`LEARN_FLAGS` order: when given it replaces the
    flags (which must then be left at their defaults) and a DeprecationWarning names the flags to use.
    """
    if learnable is not None:
        warnings.warn(
            f"{owner}(learnable=(a, b, c, d, e)) is deprecated; pass the named flags learn_image_stencils=a, "
            "learn_flow_stencils=b, learn_theta=c, learn_lam=d, learn_tau=e",
            DeprecationWarning,
            stacklevel=3,
        )
        values = tuple(learnable) if isinstance(learnable, Sequence) and not isinstance(learnable, str) else ()
        if len(values) != 5 or not all(isinstance(v, (bool, int)) for v in values):
            raise OpArgumentError(
                "learnable must be five bools (image stencils, flow stencils, theta, lam, tau), i.e. "
                f"{', '.join(LEARN_FLAGS)}; got {learnable!r}"
            )
        changed = [name for name, default in zip(LEARN_FLAGS, DEFAULT_LEARN, strict=True) if flags[name] != default]
        if changed:
            raise OpArgumentError(f"pass either learnable (deprecated) or the named flags, not both: got {changed}")
        return {name: bool(v) for name, v in zip(LEARN_FLAGS, values, strict=True)}
    return {name: check_bool(name, flags[name]) for name in LEARN_FLAGS}


def _check_channels(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OpArgumentError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _check_clip(x: object, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise OpArgumentError(f"x must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != 5:
        raise OpShapeError(f"x must be a 5-D tensor {layout}, got shape {tuple(x.shape)}")


class FlowLayer(nn.Module):
    """One representation-flow layer: TV-L1 flow between consecutive frames of a feature clip.

    Input ``x [N,C,T,H,W]`` (T ≥ 2), output ``[N, 2C, T-1, H, W]``: for each t the flow from frame t
    to t+1, channels ``[u1 (x) of the C channels, u2 (y) of the C channels]``.

    Each sample is first normalised to [0, 255] over (C,T,H,W) on its own, so a sample's flow does not
    depend on its batch.

    Non-finite input (docs/repflow.md §1, both backends alike): NaN propagates as in torch ops. A NaN
    or ±Inf voxel makes that sample's whole normalised clip, and so its whole flow, NaN (never a
    silent zero), and the backward carries NaN along the same paths. Other samples are unaffected.

    ``x`` must have the layer's parameter dtype (float32 by default), or under ``torch.autocast`` the
    autocast dtype; 16-bit inputs are computed in float32 and returned in their dtype.

    Args:
        channels: C. n_iter: TV-L1 iterations (≥ 1).
        learn_image_stencils: learn the image-gradient stencils ``image_x``, ``image_y`` (default off).
        learn_flow_stencils: learn the stencils applied to the flow and its dual field, the forward
            differences ``fwd_x``, ``fwd_y`` and the divergence ``div_x``, ``div_y``.
        learn_theta, learn_lam, learn_tau: learn θ, λ, τ.
        learnable: deprecated five-tuple of the same flags in that order (DeprecationWarning); old
            configs keep working, and the state dict keys are the same either way.
        theta, lam, tau: initial θ, λ, τ. backend: of :func:`tvl1_flow`.

    A learned tensor is an ``nn.Parameter``, the others are buffers (state dict keys ``image_x``,
    ``image_y``, ``fwd_x``, ``fwd_y``, ``div_x``, ``div_y``, ``theta``, ``lam``, ``tau`` either way).
    Stencils are per channel (depthwise, docs/repflow.md §4); θ enters as ``|θ| + 1e-12`` so it stays
    positive whatever the optimiser does.
    """

    def __init__(
        self,
        channels: int,
        n_iter: int = 10,
        learnable: Sequence[bool] | None = None,
        *,
        learn_image_stencils: bool = False,
        learn_flow_stencils: bool = True,
        learn_theta: bool = True,
        learn_lam: bool = True,
        learn_tau: bool = True,
        theta: float = 0.3,
        lam: float = 0.15,
        tau: float = 0.25,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.channels = _check_channels("channels", channels)
        check_int("n_iter", n_iter, minimum=1)
        flags = resolve_learn_flags(
            "FlowLayer",
            learnable,
            {
                "learn_image_stencils": learn_image_stencils,
                "learn_flow_stencils": learn_flow_stencils,
                "learn_theta": learn_theta,
                "learn_lam": learn_lam,
                "learn_tau": learn_tau,
            },
        )
        check_backend(backend)
        self.n_iter = n_iter
        self.learn_image_stencils = flags["learn_image_stencils"]
        self.learn_flow_stencils = flags["learn_flow_stencils"]
        self.learn_theta = flags["learn_theta"]
        self.learn_lam = flags["learn_lam"]
        self.learn_tau = flags["learn_tau"]
        self.backend = backend

        def register(name: str, value: Tensor, trainable: bool) -> None:
            if trainable:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

        names = ("image_x", "image_y", "fwd_x", "fwd_y", "div_x", "div_y")
        image, flow = self.learn_image_stencils, self.learn_flow_stencils
        for name, taps, learned in zip(names, DEFAULT_TAPS, (image, image, flow, flow, flow, flow), strict=True):
            register(name, torch.tensor(taps).repeat(channels, 1), learned)
        register("theta", torch.tensor(float(theta)), self.learn_theta)
        register("lam", torch.tensor(float(lam)), self.learn_lam)
        register("tau", torch.tensor(float(tau)), self.learn_tau)

    @property
    def learnable(self) -> tuple[bool, bool, bool, bool, bool]:
        """The five learn flags in :data:`LEARN_FLAGS` order (the deprecated tuple's layout)."""
        return tuple(getattr(self, name) for name in LEARN_FLAGS)  # type: ignore[return-value]

    def stencils(self) -> tuple[Tensor, ...]:
        return (self.image_x, self.image_y, self.fwd_x, self.fwd_y, self.div_x, self.div_y)

    def extra_repr(self) -> str:
        flags = ", ".join(f"{name}={getattr(self, name)}" for name in LEARN_FLAGS)
        return f"channels={self.channels}, n_iter={self.n_iter}, {flags}, backend={self.backend!r}"

    def forward(self, x: Tensor) -> Tensor:
        _check_clip(x, "[N,C,T,H,W]")
        n, c, t, h, w = x.shape
        if c != self.channels:
            raise OpShapeError(f"x must be [N,{self.channels},T,H,W] ({self.channels} channels), got {tuple(x.shape)}")
        if t < 2:
            raise OpShapeError(f"x must have T >= 2 frames (flow needs a pair), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise OpDtypeError(f"x must be a float tensor, got {x.dtype}")
        check_input_dtype("x", x, self.theta.dtype, module="FlowLayer")
        if x.numel() == 0:
            # Empty in, empty out; the (zero) sum keeps the result in x's autograd graph.
            return x.new_zeros((n, 2 * c, t - 1, h, w)) + x.sum() * 0
        # Normalise each sample on its own, in at least float32 (a 16-bit eps would underflow). Any
        # non-finite voxel makes hi - lo non-finite, and the added (hi - lo)·0 then makes the whole
        # sample NaN: without it a +Inf max scaled the other voxels to exactly 0 (zero flow).
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        flat = xf.reshape(n, -1)
        lo = flat.amin(dim=1).reshape(n, 1, 1, 1, 1)
        hi = flat.amax(dim=1).reshape(n, 1, 1, 1, 1)
        xn = 255.0 * (xf - lo) / (hi - lo + NORM_EPS) + (hi - lo) * 0
        # Frame pairs (t, t+1) flattened into the batch: [N·(T-1), C, H, W].
        i0 = xn[:, :, :-1].transpose(1, 2).reshape(n * (t - 1), c, h, w)
        i1 = xn[:, :, 1:].transpose(1, 2).reshape(n * (t - 1), c, h, w)
        flow = tvl1_flow(
            i0, i1, self.n_iter, self.theta, self.lam, self.tau, stencils=self.stencils(), backend=self.backend
        )
        return flow.reshape(n, t - 1, 2 * c, h, w).transpose(1, 2).to(x.dtype)


class FCFBlock(nn.Module):
    """Flow-Conv-Flow block (docs/repflow.md §3): ``x [N,C,T,H,W] -> [N,C,T-2,H,W]`` (T ≥ 3).

    ``relu(avg_pool_T3(x) + BN(conv133(Flow(conv1(conv133(Flow(conv1(x))))))))`` with both flow layers
    on ``bottleneck`` channels (separate parameters) and the final BN's gamma zero-initialised, so
    the block starts as ``relu`` of the temporally average-pooled input. ``x`` must have the block's
    parameter dtype, or the autocast dtype under ``torch.autocast`` (OpDtypeError otherwise).

    The ``learn_*`` flags (and the deprecated ``learnable`` tuple) are those of :class:`FlowLayer`,
    applied to both flow layers.
    """

    def __init__(
        self,
        channels: int,
        bottleneck: int = 32,
        n_iter: int = 10,
        *,
        learn_image_stencils: bool = False,
        learn_flow_stencils: bool = True,
        learn_theta: bool = True,
        learn_lam: bool = True,
        learn_tau: bool = True,
        learnable: Sequence[bool] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.channels = _check_channels("channels", channels)
        _check_channels("bottleneck", bottleneck)
        flags = resolve_learn_flags(
            "FCFBlock",
            learnable,
            {
                "learn_image_stencils": learn_image_stencils,
                "learn_flow_stencils": learn_flow_stencils,
                "learn_theta": learn_theta,
                "learn_lam": learn_lam,
                "learn_tau": learn_tau,
            },
        )
        b = bottleneck
        self.reduce1 = nn.Conv3d(channels, b, 1, bias=False)
        self.flow1 = FlowLayer(b, n_iter, **flags, backend=backend)
        self.conv = nn.Conv3d(2 * b, 2 * b, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.reduce2 = nn.Conv3d(2 * b, b, 1, bias=False)
        self.flow2 = FlowLayer(b, n_iter, **flags, backend=backend)
        self.expand = nn.Conv3d(2 * b, channels, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.bn = nn.BatchNorm3d(channels)
        nn.init.zeros_(self.bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        _check_clip(x, f"[N,{self.channels},T,H,W] with T >= 3")
        if x.shape[1] != self.channels or x.shape[2] < 3:
            raise OpShapeError(f"x must be [N,{self.channels},T,H,W] with T >= 3, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise OpDtypeError(f"x must be a float tensor, got {x.dtype}")
        check_input_dtype("x", x, self.reduce1.weight.dtype, module="FCFBlock")
        res = nn.functional.avg_pool3d(x, (3, 1, 1), stride=1)
        f = self.flow1(self.reduce1(x))
        f = self.conv(f)
        f = self.flow2(self.reduce2(f))
        f = self.bn(self.expand(f))
        return torch.relu(res + f)
