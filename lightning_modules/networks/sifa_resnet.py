"""SIFA-Net: the C2D SIFA ResNet of docs/sifa.md §3, and its plain C2D baseline (`sifa=False`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from ops.backends import Backend, check_backend
from ops.validation import check_bool, check_choice, check_int

from .base import RESNET_SPECS, VideoResNet, check_stages
from .blocks import MotionFactory, build_forked, make_layer
from .pretrained import check_pretrained_path, load_pretrained_2d


def _sifa_factory(kernel_size: int, dilation: int, groups: int, offset_init: str, backend: str) -> MotionFactory:
    def factory(channels: int) -> nn.Module:
        import ops  # the ops package is only needed when a SIFA block is built

        return build_forked(
            lambda: ops.SIFA(
                channels,
                kernel_size=kernel_size,
                dilation=dilation,
                groups=groups,
                offset_init=offset_init,
                backend=backend,
            )
        )

    return factory


class SIFAResNet(VideoResNet):
    """C2D ResNet with Stand-Alone Inter-Frame Attention (SIFA-Net, docs/sifa.md §3).

    Input `[N, in_channels, T, H, W]` float. Every conv is 1×k×k except the stem
    `(stem_temporal_kernel, 7, 7)` with temporal stride `stem_temporal_stride` and no temporal
    padding, so T' = (T - kernel) // stride + 1 frames go through the rest (16 → 4 at the default 4/4;
    1/1 gives a per-frame 2D ResNet).

    - Stages `sifa_stages` (default layer2-4): blocks with odd index carry a SIFA module (after the
      3×3 conv → BN → ReLU); `sifa=False` gives the plain C2D baseline with everything else equal.
    - `global_context`: even-index blocks of layer2-4 add the global-context branch.
    - `dual_path`: a second head on max-pooled frame pairs of layer3's output through
      `layer4_dual` (layer4's structure with stride 1) → mean → dropout → `fc_dual`; needs T' >= 2.
    - `sifa_offset_init`: init of SIFA's offset conv ("zeros" per docs/sifa.md §2; "kaiming" is what the
      released network-wide init left). The network's own init never touches it.
    - `correlation_features` (ours, docs/sifa.md §5; default False = the paper's network): every block
      with a SIFA module also gets a residual branch of its own from SIFA's per-tap correlation,
      `BN(conv1x1(attn))` added beside the block's output (`blocks.CorrelationBranch`), so the network can
      use which tap matched (the direction of motion), which SIFA's sum over taps discards. Live from the
      first step (BN gamma 1). Ignored when `sifa=False`; networks and checkpoints without it are unchanged.
    - `zero_init_residual`: the last BN of every residual branch starts with gamma 0.
    - `width_mult` scales every channel count (rounded to a multiple of `sifa_groups` when SIFA is on).
    - `pretrained`: path to a torchvision-layout 2D ResNet state dict, inflated as in docs/sifa.md §3
      (see `pretrained.inflate_2d_state_dict`); the report is kept in `self.pretrained_report`.
    - `backend`: the SIFA ops' backend ("auto": CuPy kernels for CUDA tensors when CuPy imports).

    `forward_heads(x)` returns `[main_logits]` or `[main_logits, dual_logits]`, each `[N, num_classes]`.
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 50,
        *,
        in_channels: int = 3,
        width_mult: float = 1.0,
        stem_temporal_kernel: int = 4,
        stem_temporal_stride: int = 4,
        sifa: bool = True,
        sifa_stages: Sequence[int] = (2, 3, 4),
        sifa_kernel_size: int = 3,
        sifa_dilation: int = 1,
        sifa_groups: int = 1,
        sifa_offset_init: Literal["zeros", "kaiming", "default"] = "zeros",
        correlation_features: bool = False,
        global_context: bool = True,
        gc_reduction: int = 16,
        dual_path: bool = True,
        dropout: float = 0.5,
        zero_init_residual: bool = True,
        pretrained: str | None = None,
        backend: Backend = "auto",
    ) -> None:
        check_choice("depth", depth, tuple(RESNET_SPECS))
        check_pretrained_path(pretrained)
        check_int("stem_temporal_kernel", stem_temporal_kernel, minimum=1)
        check_int("stem_temporal_stride", stem_temporal_stride, minimum=1)
        for name, value in (
            ("sifa", sifa),
            ("correlation_features", correlation_features),
            ("global_context", global_context),
            ("dual_path", dual_path),
        ):
            check_bool(name, value)
        stages = check_stages("sifa_stages", sifa_stages)
        check_int("sifa_kernel_size", sifa_kernel_size, minimum=1, odd=True)
        check_int("sifa_dilation", sifa_dilation, minimum=1)
        check_int("sifa_groups", sifa_groups, minimum=1)
        check_int("gc_reduction", gc_reduction, minimum=1)
        check_choice("sifa_offset_init", sifa_offset_init, ("zeros", "kaiming", "default"))
        check_backend(backend)

        sifa_factory = (
            _sifa_factory(sifa_kernel_size, sifa_dilation, sifa_groups, sifa_offset_init, backend) if sifa else None
        )

        def motion_at(stage: int, index: int) -> MotionFactory | None:
            return sifa_factory if stage in stages and index % 2 == 1 else None

        def gc_at(stage: int, index: int) -> int | None:
            return gc_reduction if global_context and stage >= 2 and index % 2 == 0 else None

        super().__init__(
            num_classes=num_classes,
            depth=depth,
            in_channels=in_channels,
            width_mult=width_mult,
            channel_divisor=sifa_groups if sifa else 1,
            stem_kernel=(stem_temporal_kernel, 7, 7),
            stem_stride=(stem_temporal_stride, 2, 2),
            stem_padding=(0, 3, 3),
            temporal_kernel=1,
            motion_at=motion_at,
            gc_at=gc_at,
            dropout=dropout,
            zero_init_residual=zero_init_residual,
            correlation_branch=sifa and correlation_features,
        )
        self.stem_temporal_kernel = stem_temporal_kernel
        self.stem_temporal_stride = stem_temporal_stride
        self.dual_path = dual_path
        if dual_path:
            # Frame pairs max-pooled, then layer4's structure at stride 1 (14×14 at 224 input).
            self.dual_pool = nn.MaxPool3d((2, 1, 1), stride=(2, 1, 1))
            self.layer4_dual = make_layer(
                self._block,
                self.stage_channels[2],
                self._planes[3],
                self._counts[3],
                1,
                temporal_kernel=1,
                motion_at=lambda i: motion_at(4, i),
                gc_at=lambda i: gc_at(4, i),
                zero_init_residual=zero_init_residual,
                correlation_branch=sifa and correlation_features,
            )
            self.fc_dual = nn.Linear(self.fc.in_features, num_classes)
        self.pretrained_report = None
        if pretrained is not None:
            self.pretrained_report = load_pretrained_2d(self, pretrained)

    def _frames_after_stem(self, t: int) -> int:
        return (t - self.stem_temporal_kernel) // self.stem_temporal_stride + 1

    def _min_frames(self) -> int:
        # The stem has no temporal padding; the dual path max-pools frame pairs, so needs 2 frames.
        return self.stem_temporal_kernel + (self.stem_temporal_stride if self.dual_path else 0)

    def _extra_heads(self, stage_outputs: dict[int, Tensor]) -> list[Tensor]:
        if not self.dual_path:
            return []
        return [self._head(self.layer4_dual(self.dual_pool(stage_outputs[3])), self.fc_dual)]


def sifa_resnet18(num_classes: int, *, correlation_features: bool = False, **kwargs) -> SIFAResNet:
    """SIFA-ResNet-18 (basic blocks) for small experiments; keyword arguments as `SIFAResNet`.

    `correlation_features=True` adds a correlation branch to every SIFA block (docs/sifa.md §5)."""
    return SIFAResNet(num_classes, depth=18, correlation_features=correlation_features, **kwargs)


def sifa_resnet34(num_classes: int, *, correlation_features: bool = False, **kwargs) -> SIFAResNet:
    """SIFA-ResNet-34 (basic blocks); keyword arguments as `SIFAResNet`.

    `correlation_features=True` adds a correlation branch to every SIFA block (docs/sifa.md §5)."""
    return SIFAResNet(num_classes, depth=34, correlation_features=correlation_features, **kwargs)


def sifa_resnet50(num_classes: int, *, correlation_features: bool = False, **kwargs) -> SIFAResNet:
    """SIFA-ResNet-50, the paper's network (≈ 43 M parameters with the dual path at 400 classes).

    `correlation_features=True` adds a correlation branch to every SIFA block (docs/sifa.md §5)."""
    return SIFAResNet(num_classes, depth=50, correlation_features=correlation_features, **kwargs)


def sifa_resnet101(num_classes: int, *, correlation_features: bool = False, **kwargs) -> SIFAResNet:
    """SIFA-ResNet-101; keyword arguments as `SIFAResNet`.

    `correlation_features=True` adds a correlation branch to every SIFA block (docs/sifa.md §5)."""
    return SIFAResNet(num_classes, depth=101, correlation_features=correlation_features, **kwargs)


def c2d_resnet18(num_classes: int, **kwargs) -> SIFAResNet:
    """Plain C2D ResNet-18 baseline: `SIFAResNet(depth=18, sifa=False)`, everything else equal."""
    return SIFAResNet(num_classes, depth=18, sifa=False, **kwargs)


def c2d_resnet50(num_classes: int, **kwargs) -> SIFAResNet:
    """Plain C2D ResNet-50 baseline: `SIFAResNet(depth=50, sifa=False)`, everything else equal."""
    return SIFAResNet(num_classes, depth=50, sifa=False, **kwargs)
