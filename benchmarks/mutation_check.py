"""Can this machine's kernel check see a missing barrier? A mutation test of the checks themselves.

compute-sanitizer's racecheck sees hazards in shared memory only, and a barrier that orders global-memory
or register hand-offs is invisible to it; the comparison of the fast kernels with the simple ones is what
catches those. This script removes one required ``__syncthreads()`` from a copy of the fast TV-L1 kernels
(the one between the primal step's write of ``u`` to shared memory and the dual step's reads of the
neighbours' ``u``), runs the mutated kernel on many planes beside the simple kernels and expects them to
disagree. Exit 0: the mismatch was seen (the check works); 1: the mutated kernel agreed (a barrier bug
would pass the GPU tests on this machine); 2: the script could not run.

    python benchmarks/mutation_check.py                 # on the GPU (benchmarks/gpu_suite.sh runs it)
    VMM_EMULATION_ORDER=warps python benchmarks/mutation_check.py --device cpu   # host emulation

Under host emulation the default thread order runs the warps in lockstep and hides the race; the
``warps`` order (each warp runs ahead to its next barrier) shows it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import ops
from ops.kernel_loader import KERNEL_DIR, KernelSource, use_kernel_variant
from ops.repflow import kernels as tvl1_kernels

# The barrier removed: the one that ends the primal step's writes of u to shared memory.
MUTATION_SITE = re.compile(r"__syncthreads\(\);(\s*// Dual step)")


def mutated_source(directory: Path) -> KernelSource:
    """A copy of the kernel directory in ``directory`` whose tvl1_plane.cu lacks the barrier above."""
    for path in KERNEL_DIR.iterdir():
        if path.suffix in (".cu", ".cuh", ".h"):
            shutil.copy(path, directory / path.name)
    target = directory / tvl1_kernels.TVL1_PLANE_SOURCE.filename
    text, count = MUTATION_SITE.subn(r"/* barrier removed by mutation_check.py */\1", target.read_text("utf-8"), 1)
    if count != 1:
        raise RuntimeError(f"{target.name}: the mutation site (the barrier before the dual step) was not found")
    target.write_text(text, encoding="utf-8")
    return KernelSource(str(target), tvl1_kernels.TVL1_PLANE_SOURCE.kernels)


@contextmanager
def plane_kernels(source: KernelSource) -> Iterator[None]:
    """The fast TV-L1 launches use ``source`` within this context (this script's process only)."""
    original = tvl1_kernels.TVL1_PLANE_SOURCE
    tvl1_kernels.TVL1_PLANE_SOURCE = source
    try:
        yield
    finally:
        tvl1_kernels.TVL1_PLANE_SOURCE = original


def run(device: torch.device, planes: int, size: int, n_iter: int) -> float:
    """Largest |fast mutated - simple| of the flow over ``planes`` planes of ``size``² pixels."""
    gen = torch.Generator().manual_seed(0)
    i0 = (torch.randn(1, planes, size, size, generator=gen) * 20).to(device)
    i1 = (torch.randn(1, planes, size, size, generator=gen) * 20).to(device)
    backend = "cupy" if device.type == "cuda" else "emulated"
    with tempfile.TemporaryDirectory() as tmp:
        source = mutated_source(Path(tmp))
        with use_kernel_variant("fast"), plane_kernels(source):
            mutated = ops.tvl1_flow(i0, i1, n_iter, backend=backend)
        with use_kernel_variant("simple"):
            simple = ops.tvl1_flow(i0, i1, n_iter, backend=backend)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return float((mutated - simple).abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (the kernels through CuPy) or cpu (host emulation)")
    ap.add_argument("--planes", type=int, default=None, help="planes (default: 512 on CUDA, 2 emulated)")
    ap.add_argument("--size", type=int, default=32, help="plane side in pixels (32: a 1024-pixel plane)")
    ap.add_argument("--n-iter", type=int, default=5)
    ap.add_argument("--tolerance", type=float, default=1e-3, help="a larger difference counts as a mismatch")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("mutation_check.py: no CUDA device", file=sys.stderr)
        return 2
    planes = args.planes or (512 if device.type == "cuda" else 2)
    if device.type == "cuda":
        diff = run(device, planes, args.size, args.n_iter)
    else:
        with ops.kernel_host_emulation():
            diff = run(device, planes, args.size, args.n_iter)
    if not diff <= args.tolerance:  # NaN (poisoned or uninitialised memory read) counts as a mismatch
        print(f"mismatch seen (max |mutated - simple| = {diff:.3g}): a missing barrier fails the comparison here")
        return 0
    print(f"NO mismatch (max |mutated - simple| = {diff:.3g}): a missing barrier would pass this machine's checks")
    return 1


if __name__ == "__main__":
    sys.exit(main())
