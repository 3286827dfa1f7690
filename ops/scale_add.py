"""``scale_add``: the trivial kernel that proves the kernel infrastructure end to end.

``scale_add(x, y, alpha) = alpha * x + y`` for 2-D tensors, through ``kernels/scale_add.cu``; it
takes strided inputs as they are (strides are kernel arguments). CUDA tensors launch through CuPy,
CPU tensors run the same source through host emulation (ops/host_emulation.py). Not part of the user
API (``ops.__all__``); the tests import it as ``ops.scale_add.scale_add``.
"""

from __future__ import annotations

import torch

from .kernel_loader import KernelSource
from .validation import OpDeviceError, OpDtypeError, OpShapeError

SCALE_ADD_SOURCE = KernelSource("scale_add.cu", ("scale_add_2d",))


def scale_add(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``alpha * x + y`` computed by the CUDA kernel (emulated on CPU); x, y 2-D of equal shape/dtype."""
    if x.dim() != 2 or x.shape != y.shape:
        raise OpShapeError(f"x and y must be 2-D of equal shape, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if x.dtype != y.dtype:
        raise OpDtypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.device != y.device:
        raise OpDeviceError(f"x and y must be on the same device, got {x.device} and {y.device}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows, cols = x.shape
    SCALE_ADD_SOURCE.launch(
        "scale_add_2d",
        (x, y, out, rows, cols, *x.stride(), *y.stride(), float(alpha)),
        dtype=x.dtype,
        numel=x.numel(),
    )
    return out
