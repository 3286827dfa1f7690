"""vmm ops: SIFA's deformable inter-frame attention and Representation Flow's TV-L1 layer.

Each op has a pure-PyTorch reference (``backend="torch"``) and CuPy CUDA kernels
(``backend="cupy"``); ``backend="auto"`` picks CuPy for CUDA tensors when CuPy imports
(docs/architecture.md §3.1); :mod:`ops.backends` decides what runs (backend names, the backend
rule, the kernel variant, host emulation's state, CuPy's availability). Both op packages have the same
file roles: ``functional.py`` (the public functions, validation and backend dispatch),
``reference.py`` (plain PyTorch),
``kernels.py`` (the kernels' custom ops and their dispatch to the launchers) and ``modules.py``
(``nn.Module`` s). Bad arguments raise the exception types of :mod:`ops.validation`.

Submodules that are not part of the user API but stay importable: :mod:`ops.backends` (what runs),
:mod:`ops.kernel_loader` (kernel registry and launch), :mod:`ops.kernel_files` (the ``.cu`` files and
their inlined text), :mod:`ops.library` (support for the kernels' ``torch.library`` custom ops,
``vmm::*``), :mod:`ops.host_emulation` (running the kernels on the CPU, for tests; see
:func:`kernel_host_emulation`), :mod:`ops.compile_checks` (nvcc / NVRTC checks, test tooling) and
:mod:`ops.scale_add` (the kernel infrastructure's smoke-test kernel).
"""

# scale_add is imported for its KernelSource only: importing ops registers every kernel file.
from . import kernel_loader, scale_add  # noqa: F401
from .backends import BACKENDS, kernel_host_emulation
from .repflow import FCFBlock, FlowLayer, FlowStencils, default_stencils, tvl1_flow
from .sifa import SIFA, deform_aggregation, deform_attention, deform_correlation
from .validation import (
    BackendError,
    BackendUnavailableError,
    OpArgumentError,
    OpArgumentTypeError,
    OpDeviceError,
    OpDtypeError,
    OpError,
    OpShapeError,
)

__all__ = [
    # SIFA (docs/sifa.md)
    "deform_correlation",
    "deform_aggregation",
    "deform_attention",
    "SIFA",
    # Representation Flow (docs/repflow.md)
    "tvl1_flow",
    "FlowStencils",
    "default_stencils",
    "FlowLayer",
    "FCFBlock",
    # backends and errors
    "BACKENDS",
    "kernel_host_emulation",
    "OpError",
    "OpShapeError",
    "OpDtypeError",
    "OpDeviceError",
    "OpArgumentError",
    "OpArgumentTypeError",
    "BackendError",
    "BackendUnavailableError",
]
