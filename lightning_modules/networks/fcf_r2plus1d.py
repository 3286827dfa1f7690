"""FCF-(2+1)D ResNet of docs/repflow.md §3, and its plain (2+1)D / per-frame 2D baselines."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ops.backends import Backend, check_backend
from ops.validation import OpArgumentError, check_bool, check_choice, check_int

from .base import (
    FLOW_GROUP,
    VideoResNet,
    check_stages,
    flow_layer_parameters,
)
from .blocks import build_forked
from .pretrained import check_pretrained_path, load_pretrained_2d

FCF_DEPTHS = (18, 34, 50)


class FCFR2Plus1D(VideoResNet):
    """(2+1)D ResNet with Flow-Conv-Flow blocks (docs/repflow.md §3).

    Input `[N, in_channels, T, H, W]` float. Stem `Conv3d(3, 64, (3,7,7), stride (1,2,2), padding
    (1,3,3))` → BN → ReLU → MaxPool (1,3,3)/(1,2,2); depth 50 uses bottlenecks whose first conv is
    temporal (3,1,1), depths 18/34 use (2+1)D basic blocks (spatial (1,3,3) → BN → ReLU → temporal
    (3,1,1), Tran et al. mid channels). No temporal striding anywhere, so T is kept until an FCF block.

    - `fcf_stages`: an FCF block (`ops.FCFBlock`) after each listed stage (default: after layer2,
      as in the paper). Each removes 2 frames, so the input needs T >= 2·len(fcf_stages) + 1.
      `fcf_bottleneck` (absolute channel count, not scaled by `width_mult`), `fcf_n_iter` and
      `fcf_learnable` (image-gradient stencils, difference/divergence stencils, θ, λ, τ) are passed
      to both flow layers of each block. `fcf=False` gives the plain (2+1)D baseline.
    - `temporal=False`: every temporal conv is removed and the stem is (1,7,7), giving the per-frame
      2D ResNet of the paper's "2D + rep-flow" rows. The (2+1)D convs then collapse to their spatial
      conv with the block's own output width (a 1×1×1 "temporal" conv after BN-ReLU would only add
      a pointwise layer that a 2D ResNet does not have), so the backbone is exactly torchvision's 2D
      ResNet per frame, the same modules as `SIFAResNet` with a 1/1 stem and no SIFA, GC or dual path.
    - `pretrained`: torchvision-layout 2D ResNet state dict, spatial kernels inflated (see
      `pretrained.inflate_2d_state_dict`); temporal convs of the basic (2+1)D blocks have no 2D
      counterpart and keep their Kaiming init.
    - `backend`: the flow layers' TV-L1 backend ("auto": CuPy kernels for CUDA tensors when CuPy imports).

    `forward_heads(x)` returns `[logits]` `[N, num_classes]`.
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 50,
        *,
        in_channels: int = 3,
        width_mult: float = 1.0,
        temporal: bool = True,
        fcf: bool = True,
        fcf_stages: Sequence[int] = (2,),
        fcf_bottleneck: int = 32,
        fcf_n_iter: int = 10,
        fcf_learnable: tuple[bool, bool, bool, bool, bool] = (False, True, True, True, True),
        dropout: float = 0.5,
        zero_init_residual: bool = True,
        pretrained: str | None = None,
        backend: Backend = "auto",
    ) -> None:
        check_choice("depth", depth, FCF_DEPTHS)
        check_pretrained_path(pretrained)
        check_bool("temporal", temporal)
        check_bool("fcf", fcf)
        stages = check_stages("fcf_stages", fcf_stages)
        check_int("fcf_bottleneck", fcf_bottleneck, minimum=1)
        check_int("fcf_n_iter", fcf_n_iter, minimum=1)
        check_backend(backend)
        learnable = tuple(fcf_learnable)
        if len(learnable) != 5 or not all(isinstance(v, bool) for v in learnable):
            raise OpArgumentError(
                "fcf_learnable: expected 5 bools (image-gradient stencils, difference/divergence stencils, "
                f"theta, lambda, tau), got {fcf_learnable!r}"
            )
        kt = 3 if temporal else 1
        super().__init__(
            num_classes=num_classes,
            depth=depth,
            in_channels=in_channels,
            width_mult=width_mult,
            channel_divisor=1,
            stem_kernel=(kt, 7, 7),
            stem_stride=(1, 2, 2),
            stem_padding=(kt // 2, 3, 3),
            temporal_kernel=kt,
            motion_at=lambda stage, index: None,
            gc_at=lambda stage, index: None,
            dropout=dropout,
            zero_init_residual=zero_init_residual,
        )
        self.temporal = temporal
        self.fcf_stages = stages if fcf else ()
        # Built after the backbone and under a forked RNG: same seed, same backbone as with fcf=False.
        self.fcf = nn.ModuleDict()
        if fcf:
            import ops  # the ops package is only needed when an FCF block is built

            # fcf_learnable's order is that of the flow layers' named flags
            names = ("learn_image_stencils", "learn_flow_stencils", "learn_theta", "learn_lam", "learn_tau")
            flags = dict(zip(names, learnable, strict=True))
            for stage in stages:
                channels = self.stage_channels[stage - 1]
                self.fcf[f"layer{stage}"] = build_forked(
                    lambda c=channels: ops.FCFBlock(
                        c, bottleneck=fcf_bottleneck, n_iter=fcf_n_iter, **flags, backend=backend
                    )
                )
        self.pretrained_report = None
        if pretrained is not None:
            self.pretrained_report = load_pretrained_2d(self, pretrained)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """`{"flow": ...}`: the parameters of the FCF blocks' flow layers (the recipe of docs/repflow.md
        trains them at `flow_lr_scale` × lr, §2); the blocks' convolutions are not in it."""
        return {FLOW_GROUP: flow_layer_parameters(self.fcf) if len(self.fcf) else []}

    def _min_frames(self) -> int:
        # Each FCF block removes 2 frames and needs 3 at its input.
        return 2 * len(self.fcf_stages) + 1

    def _after_stage(self, stage: int, x: Tensor) -> Tensor:
        key = f"layer{stage}"
        return self.fcf[key](x) if key in self.fcf else x


def fcf_r2plus1d_18(num_classes: int, **kwargs) -> FCFR2Plus1D:
    """FCF-(2+1)D ResNet-18 ((2+1)D basic blocks); keyword arguments as `FCFR2Plus1D`."""
    return FCFR2Plus1D(num_classes, depth=18, **kwargs)


def fcf_r2plus1d_34(num_classes: int, **kwargs) -> FCFR2Plus1D:
    """FCF-(2+1)D ResNet-34 ((2+1)D basic blocks); keyword arguments as `FCFR2Plus1D`."""
    return FCFR2Plus1D(num_classes, depth=34, **kwargs)


def fcf_r2plus1d_50(num_classes: int, **kwargs) -> FCFR2Plus1D:
    """FCF-(2+1)D ResNet-50, the paper's network; keyword arguments as `FCFR2Plus1D`."""
    return FCFR2Plus1D(num_classes, depth=50, **kwargs)


def r2plus1d_18(num_classes: int, **kwargs) -> FCFR2Plus1D:
    """Plain (2+1)D ResNet-18 baseline: `FCFR2Plus1D(depth=18, fcf=False)`."""
    return FCFR2Plus1D(num_classes, depth=18, fcf=False, **kwargs)


def r2plus1d_34(num_classes: int, **kwargs) -> FCFR2Plus1D:
    """Plain (2+1)D ResNet-34 baseline: `FCFR2Plus1D(depth=34, fcf=False)`."""
    return FCFR2Plus1D(num_classes, depth=34, fcf=False, **kwargs)


def r2plus1d_50(num_classes: int, **kwargs) -> FCFR2Plus1D:
    """Plain (2+1)D ResNet-50 baseline: `FCFR2Plus1D(depth=50, fcf=False)`."""
    return FCFR2Plus1D(num_classes, depth=50, fcf=False, **kwargs)
