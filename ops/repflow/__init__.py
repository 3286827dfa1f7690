"""Representation Flow (Piergiovanni & Ryoo, CVPR 2019): the TV-L1 layer as a differentiable op.

``tvl1_flow`` and ``FlowStencils`` (functional.py; reference.py the plain-PyTorch iteration,
kernels.py the fused CUDA kernels), ``FlowLayer`` and ``FCFBlock`` (modules.py); the math is
docs/repflow.md.
"""

from .functional import FlowStencils, default_stencils, tvl1_flow
from .modules import FCFBlock, FlowLayer

__all__ = ["FCFBlock", "FlowLayer", "FlowStencils", "default_stencils", "tvl1_flow"]
