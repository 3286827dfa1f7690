"""What runs: the one place where the ops decide between the PyTorch reference and the CUDA kernels.

* **Backend names** (:data:`BACKENDS`, the ``backend`` argument of every op, module and network):
  "torch" (the pure-PyTorch reference), "cupy" (the CUDA kernels through CuPy; CUDA tensors only) and
  "auto" (CuPy for CUDA tensors when CuPy imports, else the reference). A fourth name,
  :data:`EMULATED_BACKEND` ("emulated"), runs the kernels on CPU tensors through host emulation and is
  accepted only inside :func:`kernel_host_emulation` (test support, ops/host_emulation.py).
* **The rule** (:func:`use_kernels`): whether a call with a given backend runs the kernels for its
  tensors, or raises the reason it cannot (docs/architecture.md §3.1).
* **The kernel variant** (:func:`kernel_variant`): "simple" or "fast", from :func:`use_kernel_variant`,
  else the environment variable ``VMM_KERNELS``, else :data:`DEFAULT_KERNEL_VARIANT`.
* **Host-emulation state** (:func:`kernel_host_emulation`, :func:`host_emulation_enabled`) and
  **CuPy availability** (:func:`cupy_available`).

Depends on :mod:`ops.validation` only, so every other module of ``ops`` can ask it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch

from .validation import BackendError, BackendUnavailableError, OpArgumentError

#: The type of the ``backend`` argument every op, module and network takes (docs/architecture.md §3.1);
#: the networks annotate with it, so the command line offers exactly these names.
Backend = Literal["auto", "torch", "cupy"]
#: Its values.
BACKENDS: tuple[str, ...] = get_args(Backend)

#: The test-only backend that runs the CUDA kernels on CPU tensors through host emulation.
EMULATED_BACKEND = "emulated"

#: The kernel implementations an op can run (docs/architecture.md §6): "simple" (one thread per output
#: element, no cooperation: the kernels verified on a GPU, an H200, before tvl1.cu took reciprocals) and
#: "fast" (the bandwidth-minded kernels: shared memory, warp shuffles, channels-last / whole-plane mappings;
#: checked by nvcc/NVRTC and in host emulation, never launched on a GPU yet).
KERNEL_VARIANTS: tuple[str, ...] = ("simple", "fast")
#: The default: the variant that has run on a GPU. "fast" becomes the default once a recorded GPU run
#: (benchmarks/gpu_suite.sh, the device named in benchmarks/RESULTS.md) shows it passing its GPU tests.
DEFAULT_KERNEL_VARIANT = "simple"

_CUPY_MISSING = "backend 'cupy' needs CuPy: pip install 'video-motion-modules[cuda12]' (or [cuda13])"

# ------------------------------------------------------------------------------- host emulation

_depth_lock = threading.Lock()
_enabled_depth = 0


@contextmanager
def kernel_host_emulation() -> Iterator[None]:
    """Within this context the ops accept ``backend="emulated"``: their CUDA kernels run on CPU
    tensors through host emulation (tests only; see ops/host_emulation.py). Nests; process-wide."""
    global _enabled_depth
    with _depth_lock:
        _enabled_depth += 1
    try:
        yield
    finally:
        with _depth_lock:
            _enabled_depth -= 1


def host_emulation_enabled() -> bool:
    """Whether a :func:`kernel_host_emulation` context is active."""
    return _enabled_depth > 0


# ----------------------------------------------------------------------------------------- CuPy


# torch.compile calls it at trace time and bakes the result in, rather than tracing an import inside the graph.
@torch.compiler.assume_constant_result
def cupy_available() -> bool:
    """Whether CuPy imports (constant within a compiled graph)."""
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def require_cupy() -> None:
    """:class:`BackendUnavailableError` naming the install command when CuPy does not import."""
    if not cupy_available():
        raise BackendUnavailableError(_CUPY_MISSING)


# -------------------------------------------------------------------------------------- backends


def check_backend(backend: object, name: str = "backend") -> str:
    """``backend`` itself when it is one of :data:`BACKENDS` (or "emulated" while host emulation is
    enabled), else :class:`BackendError` naming the argument ``name``."""
    if isinstance(backend, str) and backend in BACKENDS:
        return backend
    if backend == EMULATED_BACKEND:
        if host_emulation_enabled():
            return backend
        raise BackendError(
            f"{name} 'emulated' runs the CUDA kernels on the CPU for tests only; it is accepted inside "
            "`with ops.kernel_host_emulation():` (see ops/host_emulation.py). Users want one of "
            f"{BACKENDS}"
        )
    raise BackendError(f"{name} must be one of {BACKENDS}, got {backend!r}")


def use_kernels(backend: str, t: torch.Tensor) -> bool:
    """Whether an op called with ``backend`` runs the CUDA kernels for tensors like ``t``: "torch" never,
    "auto" for CUDA tensors when CuPy imports, "cupy" always (a clear error when it cannot). The one
    place this rule lives (docs/architecture.md §3.1).

    "emulated" (tests only, accepted inside :func:`kernel_host_emulation`): the kernels on CPU
    tensors through host emulation.
    """
    backend = check_backend(backend)
    if backend == "torch":
        return False
    if backend == "auto":
        return t.device.type == "cuda" and cupy_available()
    if backend == EMULATED_BACKEND:
        if t.device.type != "cpu":
            raise BackendError(f"backend 'emulated' runs the kernels on CPU tensors, got tensors on {t.device}")
        return True
    if t.device.type != "cuda":
        raise BackendError(f"backend 'cupy' needs CUDA tensors, got tensors on {t.device}")
    require_cupy()
    return True


def check_kernel_device(op: str, t: torch.Tensor) -> None:
    """Refuse CPU tensors outside :func:`kernel_host_emulation` (BackendError): on CPU the kernels run
    only through host emulation, a test vehicle that a user must not reach by calling ``torch.ops.vmm.*``
    directly. CUDA tensors pass (the launch itself reports a missing CuPy)."""
    if t.device.type == "cpu" and not host_emulation_enabled():
        raise BackendError(
            f"vmm::{op} runs the CUDA kernels; on CPU tensors only inside ops.kernel_host_emulation() "
            "(host emulation, for tests). Use the ops' backend='torch' for CPU tensors."
        )


# ------------------------------------------------------------------------------ kernel variants

_variant_override: list[str] = []


def kernel_variant() -> str:
    """Which kernel implementation the ops launch: the innermost :func:`use_kernel_variant`, else the
    environment variable ``VMM_KERNELS`` (``simple`` or ``fast``), else :data:`DEFAULT_KERNEL_VARIANT`."""
    if _variant_override:
        return _variant_override[-1]
    value = os.environ.get("VMM_KERNELS", "").strip().lower() or DEFAULT_KERNEL_VARIANT
    if value not in KERNEL_VARIANTS:
        raise OpArgumentError(f"VMM_KERNELS must be one of {KERNEL_VARIANTS}, got {value!r}")
    return value


@contextmanager
def use_kernel_variant(variant: str) -> Iterator[None]:
    """Within this context the ops launch the ``variant`` kernels ("fast" or "simple"); for tests and
    benchmarks that compare the two. Process-wide, nests."""
    if variant not in KERNEL_VARIANTS:
        raise OpArgumentError(f"kernel variant must be one of {KERNEL_VARIANTS}, got {variant!r}")
    _variant_override.append(variant)
    try:
        yield
    finally:
        _variant_override.pop()
