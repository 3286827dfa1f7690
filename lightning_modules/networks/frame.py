"""The motion probe's networks: one per-frame 2D ResNet, plain or with SIFA or FCF added."""

from __future__ import annotations

from typing import Literal

from ops.validation import check_choice

from .fcf_r2plus1d import FCFR2Plus1D
from .sifa_resnet import SIFAResNet

MOTIONS = ("none", "sifa", "fcf")


def frame_resnet(
    num_classes: int,
    motion: Literal["none", "sifa", "fcf"] = "none",
    depth: int = 18,
    **kwargs,
) -> SIFAResNet | FCFR2Plus1D:
    """Per-frame 2D ResNet (stem (1,7,7), no temporal conv, mean over T·H·W), with `motion` added.

    - "none": `SIFAResNet` with a 1/1 stem and no SIFA, global context or dual path (the same
      modules as `FCFR2Plus1D(temporal=False, fcf=False)`);
    - "sifa": the same with SIFA in the odd blocks of `sifa_stages`;
    - "fcf": `FCFR2Plus1D(temporal=False)` with FCF blocks after `fcf_stages`.

    `kwargs` are the classes' keyword arguments; `sifa_*` options and `correlation_features` are dropped
    for the arms without SIFA and `fcf_*` options for the arms without FCF, so one options dict serves
    all three arms.
    With the same seed the three arms start from identical backbone weights.
    """
    check_choice("motion", motion, MOTIONS)
    no_sifa = ("sifa_", "correlation_features")
    drop = ("fcf_",) if motion == "sifa" else no_sifa if motion == "fcf" else (*no_sifa, "fcf_")
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith(drop)}
    if motion == "fcf":
        return FCFR2Plus1D(num_classes, depth=depth, temporal=False, fcf=True, **kwargs)
    return SIFAResNet(
        num_classes,
        depth=depth,
        stem_temporal_kernel=1,
        stem_temporal_stride=1,
        sifa=motion == "sifa",
        global_context=False,
        dual_path=False,
        **kwargs,
    )
