"""The kernels' ``torch.library`` custom ops: what is shared by the SIFA and TV-L1 registrations.

The kernel paths of the ops are registered as custom ops (``torch.library.custom_op``, torch >= 2.4)
in the ``vmm`` namespace (docs/architecture.md §3.1): ``vmm::deform_correlation``,
``vmm::deform_aggregation``, ``vmm::deform_attention`` (see ``ops/sifa/kernels.py``) and
``vmm::tvl1_iterations`` (``ops/repflow/kernels.py``), each with a fake implementation (shapes and
dtypes only) and a registered autograd formula whose backward is itself a ``vmm::*_backward`` custom
op. ``torch.compile`` and ``torch.export`` therefore see each kernel call as one graph node, forward
and backward, and FakeTensor tracing never touches the kernels.

The ops have one implementation for every device: CUDA tensors launch through CuPy, CPU tensors run the
same kernels through host emulation (test support) and are accepted only inside
:func:`ops.kernel_host_emulation` — the ``backend="emulated"`` path of the public functions, which is
how the CPU test suite exercises the registration, the fake implementations and the autograd wiring.
Each op refuses CPU tensors outside that context (:func:`ops.backends.check_kernel_device`).
"""

from __future__ import annotations

import warnings

import torch

from .validation import OpArgumentError

#: The custom ops' namespace: ``torch.ops.vmm.<name>``.
NAMESPACE = "vmm"

#: The forward kernel ops (each has a ``<name>_backward`` op too).
KERNEL_OPS: tuple[str, ...] = ("deform_correlation", "deform_aggregation", "deform_attention", "tvl1_iterations")


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """The empty tensor a backward op returns for a gradient nobody asked for (custom ops cannot return
    None); the autograd formula turns it back into None."""
    return like.new_empty((0,))


def needed(grad: torch.Tensor, wanted: bool) -> torch.Tensor | None:
    """``grad`` when it was asked for, else None (undoes :func:`placeholder`)."""
    return grad if wanted else None


def alert_not_deterministic(what: str) -> None:
    """Warn or raise, as ``torch.use_deterministic_algorithms`` asks, for a kernel backward that
    accumulates with atomicAdd (``what`` names it): the same contract as torch's own atomicAdd backwards
    (e.g. grid_sample's on CUDA)."""
    if torch.are_deterministic_algorithms_enabled():
        message = f"{what} uses atomicAdd and is not deterministic (nor is the reference's grid_sample on CUDA)"
        if torch.is_deterministic_algorithms_warn_only_enabled():
            warnings.warn(message, stacklevel=3)
        else:
            raise RuntimeError(message)


def is_kernel_node(node: object, op: str) -> bool:
    """Whether the autograd node ``node`` (a ``grad_fn``) is the backward of the kernel op ``op`` (one of
    :data:`KERNEL_OPS`): the node torch generates for the custom op ``vmm::<op>``."""
    if op not in KERNEL_OPS:
        raise OpArgumentError(f"op must be one of {KERNEL_OPS}, got {op!r}")
    return f"{NAMESPACE}_{op}_" in type(node).__name__
