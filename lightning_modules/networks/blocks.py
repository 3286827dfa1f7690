"""Residual building blocks shared by every network in this package.

All layers are `Conv3d`/`BatchNorm3d` on `[N, C, T, H, W]` tensors. A temporal kernel of 1 makes a
block purely per-frame (a 2D ResNet block applied frame by frame); SIFA-ResNet and the 2D variant of
FCF-(2+1)D both build their backbones from these classes with temporal kernel 1, so those backbones
are the same modules with the same parameter names and shapes.

Parameter names follow torchvision's 2D ResNet (`conv1`, `bn1`, ..., `downsample.0/1`) so ImageNet
weights map key for key (see `pretrained.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

# Builds the motion module for a block, given the channel count at its insertion point.
MotionFactory = Callable[[int], nn.Module]


def _cpu_bfloat16(x: Tensor) -> bool:
    """Whether a conv on `x` runs in bfloat16 on the CPU (a bfloat16 input, or CPU autocast to bfloat16)."""
    if x.device.type != "cpu":
        return False
    return x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


class GuardedConv3d(nn.Conv3d):
    """`nn.Conv3d` that runs in float32 where torch's CPU bfloat16 conv goes wrong.

    Measured on torch 2.13.0+cpu (docs/reliability.md): with an input smaller than the kernel along
    a dimension, torch's oneDNN bfloat16 conv3d on the CPU can return a wrong weight gradient (NaN, or
    entries near 1e37, differing from run to run: 2 frames into a (3, 1, 1) conv, as in the last
    stage of a (2+1)D ResNet on 16-frame clips) or corrupt the heap in its backward (a 1×1 map into
    a 3×3 conv at stride 2: abort, bus error or segfault). Such a call computes in float32 and
    returns bfloat16, as autocast would; every other call, and every call on a GPU, is
    `nn.Conv3d`'s own.
    """

    def forward(self, x: Tensor) -> Tensor:
        # the device test first: on a GPU this costs one attribute read per call
        if _cpu_bfloat16(x) and any(n < k for n, k in zip(x.shape[2:], self.kernel_size, strict=True)):
            with torch.autocast("cpu", enabled=False):
                bias = None if self.bias is None else self.bias.float()
                y = self._conv_forward(x.float(), self.weight.float(), bias)
            return y.to(torch.bfloat16)
        return super().forward(x)


def conv3d(
    in_channels: int,
    out_channels: int,
    kernel: tuple[int, int, int],
    stride: tuple[int, int, int] = (1, 1, 1),
    padding: tuple[int, int, int] | None = None,
) -> GuardedConv3d:
    """Bias-free conv, Kaiming-normal (fan_out) initialised as in torchvision's ResNet (a
    `GuardedConv3d`: right under CPU bfloat16 for inputs smaller than its kernel).

    `padding=None` pads every dimension by `k // 2` ("same" for odd kernels at stride 1).
    """
    if padding is None:
        padding = tuple(k // 2 for k in kernel)
    conv = GuardedConv3d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def bn3d(channels: int, zero_gamma: bool = False) -> nn.BatchNorm3d:
    """BatchNorm with gamma 1 (or 0 for the last BN of a residual branch) and beta 0."""
    bn = nn.BatchNorm3d(channels)
    nn.init.constant_(bn.weight, 0.0 if zero_gamma else 1.0)
    nn.init.zeros_(bn.bias)
    return bn


def r2plus1d_mid_channels(in_channels: int, out_channels: int, temporal_kernel: int, spatial_kernel: int = 3) -> int:
    """Tran et al. (2018) rule: the (2+1)D factorisation has the parameter count of the full t×d×d conv.

    M = floor(t·d²·N_in·N_out / (d²·N_in + t·N_out)), at least 1.
    """
    t, d2 = temporal_kernel, spatial_kernel * spatial_kernel
    return max(1, (t * d2 * in_channels * out_channels) // (d2 * in_channels + t * out_channels))


class Conv2Plus1D(nn.Module):
    """(2+1)D factorised conv: spatial (1,3,3) → BN → ReLU → temporal (t,1,1).

    x `[N, C_in, T, H, W]` → `[N, C_out, T, H/s, W/s]` (temporal padding t // 2 keeps T).
    The spatial conv carries the stride; mid channels follow `r2plus1d_mid_channels`.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, temporal_kernel: int) -> None:
        super().__init__()
        mid = r2plus1d_mid_channels(in_channels, out_channels, temporal_kernel)
        self.spatial = conv3d(in_channels, mid, (1, 3, 3), stride=(1, stride, stride))
        self.bn = bn3d(mid)
        self.relu = nn.ReLU(inplace=True)
        self.temporal = conv3d(mid, out_channels, (temporal_kernel, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.temporal(self.relu(self.bn(self.spatial(x))))


def spatiotemporal_conv3x3(in_channels: int, out_channels: int, stride: int, temporal_kernel: int) -> nn.Module:
    """A 3×3 spatial conv, factorised (2+1)D when `temporal_kernel > 1`, else a plain (1,3,3) conv."""
    if temporal_kernel == 1:
        return conv3d(in_channels, out_channels, (1, 3, 3), stride=(1, stride, stride))
    return Conv2Plus1D(in_channels, out_channels, stride, temporal_kernel)


class GlobalContext(nn.Module):
    """Global-context branch of SIFA-Net's even-index blocks (docs/sifa.md §3).

    x `[N, C, T, H, W]` → `[N, C, 1, 1, 1]`: `fc2(relu(fc1(mean_THW(x))))`, C → max(1, C // reduction) → C,
    with biases; the block broadcast-adds it to its residual output.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        return self.fc2(self.relu(self.fc1(x.mean(dim=(2, 3, 4))))).view(n, c, 1, 1, 1)


class CorrelationBranch(nn.Module):
    """A SIFA block's per-tap correlation as a residual branch of its own (docs/sifa.md §5, ours).

    attn `[N, G·K², T-1, H, W]` (one map per frame pair, from the SIFA module) → `BN(conv1x1(attn))`
    `[N, C, T, H, W]`, the last frame (no pair) zero. The 1×1 conv is Kaiming-initialised and the BN's
    gamma starts at 1, so the branch carries the direction of motion, at the scale of the block's other
    terms, from the first step (measured: with gamma 0, or with the correlation added inside SIFA's
    output before the block's second conv, it sat at chance for hundreds of steps).
    """

    def __init__(self, taps: int, out_channels: int) -> None:
        super().__init__()
        self.proj = conv3d(taps, out_channels, (1, 1, 1))
        self.bn = bn3d(out_channels)

    def forward(self, attn: Tensor) -> Tensor:
        n, _, pairs, h, w = attn.shape
        if pairs == 0:  # a one-frame clip has no pair
            return attn.new_zeros((n, self.bn.num_features, 1, h, w))
        y = self.bn(self.proj(attn))
        return torch.cat((y, y.new_zeros((n, y.shape[1], 1, h, w))), dim=2)


def _correlation_branch(motion: nn.Module | None, out_channels: int, enabled: bool) -> CorrelationBranch | None:
    if not enabled or motion is None:
        return None
    taps = motion.groups * motion.kernel_size * motion.kernel_size
    return build_forked(lambda: CorrelationBranch(taps, out_channels))


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        conv3d(in_channels, out_channels, (1, 1, 1), stride=(1, stride, stride)),
        bn3d(out_channels),
    )


class BasicBlock(nn.Module):
    """ResNet-18/34 block: conv3x3 → BN → ReLU → [motion] → conv3x3 → BN → [+gc] → +identity → ReLU.

    With `temporal_kernel > 1` each conv3x3 is a (2+1)D factorised conv (R(2+1)D basic block);
    with 1 it is a (1,3,3) conv, i.e. torchvision's 2D BasicBlock applied per frame. The motion
    module (SIFA) sits after the first conv → BN → ReLU (docs/sifa.md §3). Keeps T.
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        temporal_kernel: int = 1,
        motion: MotionFactory | None = None,
        gc_reduction: int | None = None,
        zero_init_residual: bool = True,
        correlation_branch: bool = False,
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = spatiotemporal_conv3x3(in_channels, planes, stride, temporal_kernel)
        self.bn1 = bn3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.motion = motion(planes) if motion is not None else None
        self.conv2 = spatiotemporal_conv3x3(planes, out_channels, 1, temporal_kernel)
        self.bn2 = bn3d(out_channels, zero_gamma=zero_init_residual)
        self.gc = GlobalContext(out_channels, gc_reduction) if gc_reduction is not None else None
        self.downsample = _downsample(in_channels, out_channels, stride)
        self.correlation = _correlation_branch(self.motion, out_channels, correlation_branch)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out, corr = _motion(self, out)
        out = self.bn2(self.conv2(out))
        if self.gc is not None:
            out = out + self.gc(out)
        if corr is not None:
            out = out + corr
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50/101 block: conv1 → BN → ReLU → conv(1,3,3) → BN → ReLU → [motion] → 1×1×1 ×4 → BN → [+gc]
    → +identity → ReLU.

    conv1 has kernel (t,1,1): t = 1 for C2D / SIFA-Net (torchvision's 2D Bottleneck per frame), t = 3
    for the (2+1)D bottleneck of docs/repflow.md §3 (temporal first conv, spatial second conv carrying
    the stride). The motion module (SIFA) sits after the 3×3 conv → BN → ReLU. Keeps T.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        temporal_kernel: int = 1,
        motion: MotionFactory | None = None,
        gc_reduction: int | None = None,
        zero_init_residual: bool = True,
        correlation_branch: bool = False,
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv3d(in_channels, planes, (temporal_kernel, 1, 1))
        self.bn1 = bn3d(planes)
        self.conv2 = conv3d(planes, planes, (1, 3, 3), stride=(1, stride, stride))
        self.bn2 = bn3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.motion = motion(planes) if motion is not None else None
        self.conv3 = conv3d(planes, out_channels, (1, 1, 1))
        self.bn3 = bn3d(out_channels, zero_gamma=zero_init_residual)
        self.gc = GlobalContext(out_channels, gc_reduction) if gc_reduction is not None else None
        self.downsample = _downsample(in_channels, out_channels, stride)
        self.correlation = _correlation_branch(self.motion, out_channels, correlation_branch)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out, corr = _motion(self, out)
        out = self.bn3(self.conv3(out))
        if self.gc is not None:
            out = out + self.gc(out)
        if corr is not None:
            out = out + corr
        return self.relu(out + identity)


def _motion(block: BasicBlock | Bottleneck, out: Tensor) -> tuple[Tensor, Tensor | None]:
    """The block's motion module applied to `out`, and its correlation branch's term (None without one)."""
    if block.motion is None:
        return out, None
    if block.correlation is None:
        return block.motion(out), None
    out, attn = block.motion(out, return_attn=True)
    return out, block.correlation(attn)


Block = type[BasicBlock] | type[Bottleneck]


def make_layer(
    block: Block,
    in_channels: int,
    planes: int,
    blocks: int,
    stride: int,
    *,
    temporal_kernel: int,
    motion_at: Callable[[int], MotionFactory | None],
    gc_at: Callable[[int], int | None],
    zero_init_residual: bool,
    correlation_branch: bool = False,
) -> nn.Sequential:
    """One ResNet stage of `blocks` blocks; the first carries the spatial stride.

    `motion_at(i)` / `gc_at(i)` give block i's motion factory / global-context reduction (None = none);
    `correlation_branch` adds a CorrelationBranch to every block with a motion module.
    """
    layers = []
    for i in range(blocks):
        layers.append(
            block(
                in_channels if i == 0 else planes * block.expansion,
                planes,
                stride if i == 0 else 1,
                temporal_kernel=temporal_kernel,
                motion=motion_at(i),
                gc_reduction=gc_at(i),
                zero_init_residual=zero_init_residual,
                correlation_branch=correlation_branch,
            )
        )
    return nn.Sequential(*layers)


def build_forked(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a module under a forked CPU RNG, so adding it leaves the rest of the network's init unchanged.

    With the same seed, a network with a motion module then has exactly the backbone weights of the
    same network without it: the comparison differs only by the module.
    """
    with torch.random.fork_rng(devices=[]):
        return factory()
