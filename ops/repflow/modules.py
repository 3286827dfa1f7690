"""``FlowLayer`` (repflow.md §2) and the Flow-Conv-Flow block ``FCFBlock`` (§3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..kernel_loader import check_backend
from .functional import DEFAULT_TAPS, tvl1_flow

#: Guards the per-sample normalisation's division when a sample is constant (max == min).
NORM_EPS = 1e-6


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype for ``device_type`` when autocast is on there, else None."""
    try:  # torch >= 2.4
        enabled = torch.is_autocast_enabled(device_type)
        return torch.get_autocast_dtype(device_type) if enabled else None
    except (TypeError, AttributeError):  # older torch: per-device functions, CPU and CUDA only
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None


def check_input_dtype(module: str, x: Tensor, param_dtype: torch.dtype) -> None:
    """``x`` must have the module's parameter dtype, or, under ``torch.autocast`` for x's device, the
    autocast dtype (the convolutions before a flow layer return it there). A clear ValueError
    instead of a raw convolution error, or a silent cast of the parameters, on a mismatch.
    """
    if x.dtype == param_dtype or x.dtype == _autocast_dtype(x.device.type):
        return
    raise ValueError(
        f"x has dtype {x.dtype} but the {module}'s parameters are {param_dtype}: convert the module "
        f"(.to({x.dtype})) or the input (.to({param_dtype})), or run under torch.autocast"
    )


def _check_channels(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class FlowLayer(nn.Module):
    """One representation-flow layer: TV-L1 flow between consecutive frames of a feature clip.

    Input ``x [N,C,T,H,W]`` (T ≥ 2), output ``[N, 2C, T-1, H, W]``: for each t the flow from frame t
    to t+1, channels ``[u1 (x) of the C channels, u2 (y) of the C channels]``.

    Each sample is first normalised to [0, 255] over (C,T,H,W) on its own, so a sample's flow does not
    depend on its batch.

    Non-finite input (docs/repflow.md §1, both backends alike): NaN propagates as in torch ops. A NaN
    or -Inf voxel makes that sample's normalised clip NaN (its min/max are NaN or infinite), a +Inf
    voxel makes its own voxel NaN; the flow is then NaN wherever that value reaches, never a silent
    zero, and the backward carries NaN along the same paths. Other samples are unaffected.

    ``x`` must have the layer's parameter dtype (float32 by default), or under ``torch.autocast`` the
    autocast dtype; 16-bit inputs are computed in float32 and returned in their dtype.

    ``learnable`` switches (image-gradient stencils, forward-difference and divergence stencils, θ,
    λ, τ) make the corresponding tensors ``nn.Parameter`` s; the others are buffers. Stencils are per
    channel (depthwise, spec §4); θ enters as ``|θ| + 1e-12`` so it stays positive whatever the
    optimiser does.
    """

    def __init__(
        self,
        channels: int,
        n_iter: int = 10,
        learnable: Sequence[bool] = (False, True, True, True, True),
        *,
        theta: float = 0.3,
        lam: float = 0.15,
        tau: float = 0.25,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.channels = _check_channels("channels", channels)
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
            raise ValueError(f"n_iter must be an int >= 1, got {n_iter!r}")
        learnable = tuple(learnable)
        if len(learnable) != 5 or not all(isinstance(v, (bool, int)) for v in learnable):
            raise ValueError(
                f"learnable must be five bools (image stencils, fwd/div stencils, theta, lam, tau), got {learnable!r}"
            )
        check_backend(backend)
        self.n_iter = n_iter
        self.learnable = tuple(bool(v) for v in learnable)
        self.backend = backend

        def register(name: str, value: Tensor, trainable: bool) -> None:
            if trainable:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

        names = ("image_x", "image_y", "fwd_x", "fwd_y", "div_x", "div_y")
        switch = (0, 0, 1, 1, 1, 1)
        for name, taps, s in zip(names, DEFAULT_TAPS, switch, strict=True):
            register(name, torch.tensor(taps).repeat(channels, 1), self.learnable[s])
        register("theta", torch.tensor(float(theta)), self.learnable[2])
        register("lam", torch.tensor(float(lam)), self.learnable[3])
        register("tau", torch.tensor(float(tau)), self.learnable[4])

    def stencils(self) -> tuple[Tensor, ...]:
        return (self.image_x, self.image_y, self.fwd_x, self.fwd_y, self.div_x, self.div_y)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, n_iter={self.n_iter}, learnable={self.learnable}, backend={self.backend!r}"

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 5:
            raise ValueError(f"x must be a 5-D tensor [N,C,T,H,W], got shape {tuple(getattr(x, 'shape', ()))}")
        n, c, t, h, w = x.shape
        if c != self.channels:
            raise ValueError(f"x must be [N,{self.channels},T,H,W] ({self.channels} channels), got {tuple(x.shape)}")
        if t < 2:
            raise ValueError(f"x must have T >= 2 frames (flow needs a pair), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a float tensor, got {x.dtype}")
        check_input_dtype("FlowLayer", x, self.theta.dtype)
        if x.numel() == 0:
            # Empty in, empty out; the (zero) sum keeps the result in x's autograd graph.
            return x.new_zeros((n, 2 * c, t - 1, h, w)) + x.sum() * 0
        # Normalise each sample on its own, in at least float32 (a 16-bit eps would underflow). amin and
        # amax propagate NaN, so a NaN voxel makes its whole sample NaN rather than zero flow.
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        flat = xf.reshape(n, -1)
        lo = flat.amin(dim=1).reshape(n, 1, 1, 1, 1)
        hi = flat.amax(dim=1).reshape(n, 1, 1, 1, 1)
        xn = 255.0 * (xf - lo) / (hi - lo + NORM_EPS)
        # Frame pairs (t, t+1) flattened into the batch: [N·(T-1), C, H, W].
        i0 = xn[:, :, :-1].transpose(1, 2).reshape(n * (t - 1), c, h, w)
        i1 = xn[:, :, 1:].transpose(1, 2).reshape(n * (t - 1), c, h, w)
        flow = tvl1_flow(
            i0, i1, self.n_iter, self.theta, self.lam, self.tau, stencils=self.stencils(), backend=self.backend
        )
        return flow.reshape(n, t - 1, 2 * c, h, w).transpose(1, 2).to(x.dtype)


class FCFBlock(nn.Module):
    """Flow-Conv-Flow block (repflow.md §3): ``x [N,C,T,H,W] -> [N,C,T-2,H,W]`` (T ≥ 3).

    ``relu(avg_pool_T3(x) + BN(conv133(Flow(conv1(conv133(Flow(conv1(x))))))))`` with both flow layers
    on ``bottleneck`` channels (separate parameters) and the final BN's gamma zero-initialised, so
    the block starts as ``relu`` of the temporally average-pooled input. ``x`` must have the block's
    parameter dtype, or the autocast dtype under ``torch.autocast`` (ValueError otherwise).
    """

    def __init__(
        self,
        channels: int,
        bottleneck: int = 32,
        n_iter: int = 10,
        *,
        learnable: Sequence[bool] = (False, True, True, True, True),
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.channels = _check_channels("channels", channels)
        _check_channels("bottleneck", bottleneck)
        b = bottleneck
        self.reduce1 = nn.Conv3d(channels, b, 1, bias=False)
        self.flow1 = FlowLayer(b, n_iter, learnable, backend=backend)
        self.conv = nn.Conv3d(2 * b, 2 * b, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.reduce2 = nn.Conv3d(2 * b, b, 1, bias=False)
        self.flow2 = FlowLayer(b, n_iter, learnable, backend=backend)
        self.expand = nn.Conv3d(2 * b, channels, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.bn = nn.BatchNorm3d(channels)
        nn.init.zeros_(self.bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 5 or x.shape[1] != self.channels or x.shape[2] < 3:
            raise ValueError(
                f"x must be [N,{self.channels},T,H,W] with T >= 3, got shape {tuple(getattr(x, 'shape', ()))}"
            )
        if not x.is_floating_point():
            raise ValueError(f"x must be a float tensor, got {x.dtype}")
        check_input_dtype("FCFBlock", x, self.reduce1.weight.dtype)
        res = nn.functional.avg_pool3d(x, (3, 1, 1), stride=1)
        f = self.flow1(self.reduce1(x))
        f = self.conv(f)
        f = self.flow2(self.reduce2(f))
        f = self.bn(self.expand(f))
        return torch.relu(res + f)
