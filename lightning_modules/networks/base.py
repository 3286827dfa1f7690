"""The ResNet skeleton shared by SIFA-ResNet and FCF-(2+1)D: stem, four stages, pooled linear head(s).

Subclasses choose the stem's temporal kernel, the block type, the per-block temporal kernel and
motion modules, and hook extra work after a stage (`_after_stage`) or extra heads (`_extra_heads`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ops.validation import OpArgumentError, OpArgumentTypeError, OpDtypeError, OpShapeError, check_bool, check_int

from .blocks import BasicBlock, Block, Bottleneck, MotionFactory, bn3d, conv3d, make_layer

# depth -> (block, blocks per stage)
RESNET_SPECS: dict[int, tuple[Block, tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}
BASE_PLANES = (64, 128, 256, 512)
STEM_CHANNELS = 64


def check_stages(name: str, stages: object) -> tuple[int, ...]:
    """A collection of distinct stage numbers in 1..4, returned sorted."""
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence):
        raise OpArgumentTypeError(f"{name}: expected a sequence of stage numbers in 1..4, got {stages!r}")
    out = tuple(stages)
    if any(isinstance(s, bool) or s not in (1, 2, 3, 4) for s in out) or len(set(out)) != len(out):
        raise OpArgumentError(f"{name}: expected distinct stage numbers in 1..4 (layer1..layer4), got {list(out)}")
    return tuple(sorted(out))


FLOW_GROUP = "flow"
"""Name of the parameter group of Representation Flow layers (`VideoClassifier(flow_lr_scale=...)`)."""


def flow_layer_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of every Representation Flow layer (`ops.FlowLayer`) inside `module`."""
    import ops  # only networks and the ops know the ops' classes

    return [p for m in module.modules() if isinstance(m, ops.FlowLayer) for p in m.parameters()]


def parameter_groups(net: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Named groups of `net`'s parameters that train with their own learning-rate factor.

    A network declares its groups with a method `parameter_groups() -> {name: [parameters]}` (the
    `VideoResNet` networks do); parameters in no group train at the base learning rate. For a
    network that declares none, the parameters of its `ops.FlowLayer`s form the `FLOW_GROUP`
    group, so hand-built networks with flow layers get `flow_lr_scale` too. Empty groups are
    dropped; a parameter in two groups is an error (OpArgumentError, a ValueError, naming both groups).
    """
    declared = getattr(net, "parameter_groups", None)
    groups = declared() if callable(declared) else {FLOW_GROUP: flow_layer_parameters(net)}
    owner: dict[int, str] = {}
    for name, params in groups.items():
        for p in params:
            if owner.setdefault(id(p), name) != name:
                raise OpArgumentError(
                    f"{type(net).__name__}.parameter_groups(): a parameter is in both {owner[id(p)]!r} and {name!r}"
                )
    return {name: list(params) for name, params in groups.items() if params}


def scaled_channels(channels: int, width_mult: float, divisor: int = 1) -> int:
    """`channels · width_mult` rounded to a multiple of `divisor`, at least `divisor` (so at least 1)."""
    return max(divisor, int(round(channels * width_mult / divisor)) * divisor)


class VideoResNet(nn.Module):
    """Stem → layer1..layer4 → mean over T·H·W → dropout → fc. Input `[N, C_in, T, H, W]` float.

    Attribute names match torchvision's 2D ResNet (conv1, bn1, maxpool, layer1..4, fc), which is
    what ImageNet inflation relies on. `forward_heads` returns one logits tensor `[N, num_classes]`
    per head; `forward` returns `log(mean_i softmax(head_i))`.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        depth: int,
        in_channels: int,
        width_mult: float,
        channel_divisor: int,
        stem_kernel: tuple[int, int, int],
        stem_stride: tuple[int, int, int],
        stem_padding: tuple[int, int, int],
        temporal_kernel: int,
        motion_at: Callable[[int, int], MotionFactory | None],
        gc_at: Callable[[int, int], int | None],
        dropout: float,
        zero_init_residual: bool,
        correlation_branch: bool = False,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes, minimum=1)
        check_int("in_channels", in_channels, minimum=1)
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
            raise OpArgumentError(f"width_mult: expected a float > 0, got {width_mult!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise OpArgumentError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        check_bool("zero_init_residual", zero_init_residual)
        block, counts = RESNET_SPECS[depth]
        self.depth = depth
        self.num_classes = num_classes
        self.in_channels = in_channels
        planes = [scaled_channels(p, width_mult, channel_divisor) for p in BASE_PLANES]
        self.stage_channels = tuple(p * block.expansion for p in planes)

        stem_channels = scaled_channels(STEM_CHANNELS, width_mult)
        self.conv1 = conv3d(in_channels, stem_channels, stem_kernel, stride=stem_stride, padding=stem_padding)
        self.bn1 = bn3d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

        channels = stem_channels
        for stage, (p, n) in enumerate(zip(planes, counts, strict=True), start=1):
            layer = make_layer(
                block,
                channels,
                p,
                n,
                1 if stage == 1 else 2,
                temporal_kernel=temporal_kernel,
                motion_at=lambda i, s=stage: motion_at(s, i),
                gc_at=lambda i, s=stage: gc_at(s, i),
                zero_init_residual=zero_init_residual,
                correlation_branch=correlation_branch,
            )
            self.add_module(f"layer{stage}", layer)
            channels = p * block.expansion
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        self._block = block
        self._planes = planes
        self._counts = counts

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named parameter groups with their own learning-rate factor (see `parameter_groups`);
        none in the plain backbone."""
        return {}

    # -- hooks for subclasses ------------------------------------------------------------------------
    def _min_frames(self) -> int:
        """Smallest clip length T the network accepts."""
        return 1

    def _after_stage(self, stage: int, x: Tensor) -> Tensor:
        return x

    def _extra_heads(self, stage_outputs: dict[int, Tensor]) -> list[Tensor]:
        return []

    # -- forward -------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            layout = f"[N,{self.in_channels},T,H,W]"
            raise OpArgumentTypeError(f"x: expected a torch.Tensor {layout}, got {type(x).__name__}")
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise OpShapeError(f"x: expected shape [N,{self.in_channels},T,H,W], got {list(x.shape)}")
        if not x.is_floating_point():
            raise OpDtypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
        if x.shape[2] < self._min_frames():
            raise OpShapeError(
                f"x: {type(self).__name__} needs at least {self._min_frames()} frames (T), got shape {list(x.shape)}"
            )

    def _head(self, x: Tensor, fc: nn.Linear) -> Tensor:
        return fc(self.dropout(x.mean(dim=(2, 3, 4))))

    def forward_heads(self, x: Tensor) -> list[Tensor]:
        """x `[N, C_in, T, H, W]` float → list of logits `[N, num_classes]`, one per head."""
        self._check_input(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stage_outputs: dict[int, Tensor] = {}
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
            x = self._after_stage(stage, x)
            stage_outputs[stage] = x
        return [self._head(x, self.fc), *self._extra_heads(stage_outputs)]

    def forward(self, x: Tensor) -> Tensor:
        """`log(mean_i softmax(head_i))` `[N, num_classes]`: log-probabilities of the averaged heads.

        For a single head this is that head's `log_softmax`.
        """
        heads = self.forward_heads(x)
        if len(heads) == 1:
            return F.log_softmax(heads[0], dim=1)
        log_probs = torch.stack([F.log_softmax(h, dim=1) for h in heads])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(heads))
