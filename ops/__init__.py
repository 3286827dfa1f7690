"""vmm ops: SIFA's deformable inter-frame attention and Representation Flow's TV-L1 layer.

Each op has a pure-PyTorch reference (``backend="torch"``) and CuPy CUDA kernels
(``backend="cupy"``); ``backend="auto"`` picks CuPy for CUDA tensors when CuPy imports.
"""

from . import kernel_loader
from .repflow import FCFBlock, FlowLayer, tvl1_flow
from .scale_add import scale_add
from .sifa import SIFA, deform_aggregation, deform_correlation

__all__ = ["kernel_loader", "scale_add", "SIFA", "deform_aggregation", "deform_correlation"]
__all__ += ["tvl1_flow", "FlowLayer", "FCFBlock"]
