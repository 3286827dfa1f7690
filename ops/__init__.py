"""vmm ops: SIFA's deformable inter-frame attention and Representation Flow's TV-L1 layer.

Each op has a pure-PyTorch reference (``backend="torch"``) and CuPy CUDA kernels
(``backend="cupy"``); ``backend="auto"`` picks CuPy for CUDA tensors when CuPy imports.
"""

from . import kernel_loader
from .scale_add import scale_add

__all__ = ["kernel_loader", "scale_add"]
