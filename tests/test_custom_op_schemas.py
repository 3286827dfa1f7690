"""The ``vmm::*`` custom ops register on every supported torch (>= 2.4, the first with ``torch.library.custom_op``).

torch 2.4 reads a custom op's schema from its type annotations only when they are real types: the
kernels modules use postponed annotations (``from __future__ import annotations``, so every
annotation is a string), and torch 2.4 and 2.5 also know no ``list[bool]`` nor ``Tensor | None``. So
the registrations give their schemas explicitly; these tests hold them to that and to what a newer
torch infers from the same signatures.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from helpers import REPO_ROOT

# torch 2.4.0's infer_schema compared each annotation against a table of types, so a string (a
# postponed annotation) was "unsupported" and custom_op raised ValueError when the module was imported.
_IMPORT_AS_ON_TORCH_2_4 = textwrap.dedent(
    """
    import inspect
    import torch

    inferred = torch.library.infer_schema

    def infer_schema_of_torch_2_4(fn, *args, **kwargs):
        for name, p in inspect.signature(fn).parameters.items():
            if isinstance(p.annotation, str):
                raise ValueError(f"infer_schema(func): Parameter {name} has unsupported type {p.annotation}")
        return inferred(fn, *args, **kwargs)

    torch.library.infer_schema = infer_schema_of_torch_2_4
    import ops  # registers every vmm:: op
    print(sorted(n for n in dir(torch.ops.vmm) if not n.startswith("_")))
    """
)


def test_ops_import_without_schema_inference_from_postponed_annotations():
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_AS_ON_TORCH_2_4],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("deform_correlation", "deform_aggregation", "deform_attention", "tvl1_iterations"):
        assert name in proc.stdout and f"{name}_backward" in proc.stdout


def test_explicit_schemas_match_the_signatures():
    from ops.repflow import kernels as tvl1_kernels
    from ops.sifa import kernels as sifa_kernels

    defs = [getattr(m, n) for m in (sifa_kernels, tvl1_kernels) for n in dir(m) if n.endswith("_op") and n[0] == "_"]
    assert len(defs) == 8
    for op in defs:
        registered = str(getattr(torch.ops.vmm, op._name).default._schema)
        assert registered == f"vmm::{op._name}" + torch.library.infer_schema(op._init_fn, mutates_args=())
