"""Video networks: SIFA-ResNet, FCF-(2+1)D ResNet and their plain baselines.

Every network takes `[N, 3, T, H, W]` float input (normalised frames) and exposes
`forward_heads(x) -> list[Tensor]` (logits `[N, num_classes]` per head) and
`forward(x) = log(mean_i softmax(head_i))` (the head's `log_softmax` when there is one head).

Classes (usable from LightningCLI with `class_path`, keyword init args):

- `SIFAResNet(num_classes, depth=50, ...)`: C2D SIFA-Net of docs/sifa.md §3, depths 18/34/50/101.
  `sifa=False` is the plain C2D baseline; `dual_path=True` (default) gives two heads.
- `FCFR2Plus1D(num_classes, depth=50, ...)`: FCF-(2+1)D ResNet of docs/repflow.md §3, depths 18/34/50.
  `fcf=False` is the plain (2+1)D baseline; `temporal=False` a per-frame 2D backbone.

Builders: `sifa_resnet18/34/50/101`, `c2d_resnet18/50` (SIFA off), `fcf_r2plus1d_18/34/50`,
`r2plus1d_18/34/50` (FCF off); each is `(num_classes, **kwargs)` with the class's keyword arguments.

Motion probe (one per-frame 2D ResNet-18 backbone, temporal average pooling; only the module differs;
with the same seed the three arms also start from identical backbone weights).
`frame_resnet(K, motion="none"|"sifa"|"fcf", **options)` builds each arm; spelled out:

- plain: `SIFAResNet(K, depth=18, stem_temporal_kernel=1, stem_temporal_stride=1, sifa=False,
  global_context=False, dual_path=False)` (identical to `FCFR2Plus1D(K, depth=18, temporal=False, fcf=False)`)
- + SIFA: the same with `sifa=True` (optionally `sifa_stages=...`)
- + FCF: `FCFR2Plus1D(K, depth=18, temporal=False, fcf=True)` (optionally `fcf_stages=...`)

Where the modules live (for hooks and visualisation): SIFA blocks are `<layerN>.<i>.motion`
(`ops.SIFA`, odd i), FCF blocks are `fcf["layerN"]` (`ops.FCFBlock`, applied after layerN).

Learning-rate groups: a network names parameters that train with their own lr factor in
`parameter_groups() -> {name: [parameters]}` (FCF networks: "flow", the flow layers, scaled by
`VideoClassifier(flow_lr_scale=...)`); `parameter_groups(net)` asks it, and finds the flow layers of a
network that declares nothing.

ImageNet weights: `pretrained=<path to a torchvision-layout 2D ResNet state dict>`; see
`lightning_modules.networks.pretrained`.
"""

from .base import FLOW_GROUP, VideoResNet, flow_layer_parameters, parameter_groups
from .blocks import BasicBlock, Bottleneck, Conv2Plus1D, GlobalContext
from .fcf_r2plus1d import (
    FCFR2Plus1D,
    fcf_r2plus1d_18,
    fcf_r2plus1d_34,
    fcf_r2plus1d_50,
    r2plus1d_18,
    r2plus1d_34,
    r2plus1d_50,
)
from .frame import frame_resnet
from .pretrained import InflationReport, inflate_2d_state_dict, load_pretrained_2d
from .sifa_resnet import (
    SIFAResNet,
    c2d_resnet18,
    c2d_resnet50,
    sifa_resnet18,
    sifa_resnet34,
    sifa_resnet50,
    sifa_resnet101,
)

__all__ = [
    "FLOW_GROUP",
    "BasicBlock",
    "Bottleneck",
    "Conv2Plus1D",
    "FCFR2Plus1D",
    "GlobalContext",
    "InflationReport",
    "SIFAResNet",
    "VideoResNet",
    "c2d_resnet18",
    "c2d_resnet50",
    "fcf_r2plus1d_18",
    "fcf_r2plus1d_34",
    "fcf_r2plus1d_50",
    "flow_layer_parameters",
    "frame_resnet",
    "inflate_2d_state_dict",
    "load_pretrained_2d",
    "parameter_groups",
    "r2plus1d_18",
    "r2plus1d_34",
    "r2plus1d_50",
    "sifa_resnet18",
    "sifa_resnet34",
    "sifa_resnet50",
    "sifa_resnet101",
]
