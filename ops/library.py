"""The kernels' ``torch.library`` custom ops: what is shared by the SIFA and TV-L1 registrations.

With torch >= 2.4 (``torch.library.custom_op``) the kernel paths of the ops are registered as custom
ops in the ``vmm`` namespace (docs/architecture.md §3.1): ``vmm::deform_correlation``,
``vmm::deform_aggregation``, ``vmm::deform_attention`` (see ``ops/sifa/kernels.py``) and
``vmm::tvl1_iterations`` (``ops/repflow/kernels.py``), each with a fake implementation (shapes and
dtypes only) and a registered autograd formula whose backward is itself a ``vmm::*_backward`` custom
op. ``torch.compile`` and ``torch.export`` therefore see each kernel call as one graph node, forward
and backward, and FakeTensor tracing never touches the kernels. On older torch the same kernels run
through ``torch.autograd.Function`` s, which work eagerly but make ``torch.compile`` break the graph.

The ops have one implementation for every device: CUDA tensors launch through CuPy, CPU tensors run the
same kernels through host emulation (test support) and are accepted only inside
:func:`ops.kernel_host_emulation` — the ``backend="emulated"`` path of the public functions, which is
how the CPU test suite exercises the registration, the fake implementations and the autograd wiring.
"""

from __future__ import annotations

import torch

from .validation import BackendError

#: Whether this torch has ``torch.library.custom_op`` / ``register_fake`` (torch >= 2.4).
CUSTOM_OPS: bool = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")

#: The custom ops' namespace: ``torch.ops.vmm.<name>``.
NAMESPACE = "vmm"


def check_kernel_device(op: str, t: torch.Tensor) -> None:
    """Refuse CPU tensors outside :func:`ops.kernel_host_emulation` (BackendError): on CPU the kernels run
    only through host emulation, a test vehicle that a user must not reach by calling ``torch.ops.vmm.*``
    directly. CUDA tensors pass (the launch itself reports a missing CuPy)."""
    if t.device.type == "cpu":
        from .host_emulation import host_emulation_enabled

        if not host_emulation_enabled():
            raise BackendError(
                f"{NAMESPACE}::{op} runs the CUDA kernels; on CPU tensors only inside ops.kernel_host_emulation() "
                "(host emulation, for tests). Use the ops' backend='torch' for CPU tensors."
            )


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """The empty tensor a backward op returns for a gradient nobody asked for (custom ops cannot return
    None); the autograd formula turns it back into None."""
    return like.new_empty((0,))


def needed(grad: torch.Tensor, wanted: bool) -> torch.Tensor | None:
    """``grad`` when it was asked for, else None (undoes :func:`placeholder`)."""
    return grad if wanted else None


#: The autograd Function each custom op replaces on torch < 2.4 (by op name).
FUNCTION_NAMES: dict[str, str] = {
    "deform_correlation": "DeformCorrelationFunction",
    "deform_aggregation": "DeformAggregationFunction",
    "deform_attention": "DeformAttentionFunction",
    "tvl1_iterations": "TVL1Iterations",
}


def is_kernel_node(node: object, op: str) -> bool:
    """Whether the autograd node ``node`` (a ``grad_fn``) is the backward of the kernel op ``op`` (one of
    :data:`FUNCTION_NAMES`): the custom op's generated node, or the autograd Function's on older torch."""
    name = type(node).__name__
    return f"{NAMESPACE}_{op}_" in name or name.startswith(FUNCTION_NAMES[op])
