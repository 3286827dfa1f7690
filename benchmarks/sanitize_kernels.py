"""Every CUDA kernel path of the ops on tiny shapes, forward and backward: the workload for running the kernels
under NVIDIA's compute-sanitizer (racecheck: shared-memory hazards; synccheck: barrier and warp-mask misuse;
memcheck: out-of-bounds and misaligned accesses), which finds on a GPU what host emulation cannot prove.

    compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/sanitize_kernels.py
    compute-sanitizer --tool synccheck --error-exitcode 1 python benchmarks/sanitize_kernels.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python benchmarks/sanitize_kernels.py

(``benchmarks/gpu_suite.sh`` runs these when compute-sanitizer is installed.) Without a GPU,
``--device cpu`` runs the same cases through host emulation, which is how the test suite keeps this script
working. The cases: both kernel variants; SIFA's three ops (the SIFA step with gradients on out and on attn)
with vector and scalar loads (a storage offset breaks 16-byte alignment), one and two register passes per
group, several lane-group widths, float32 / float16 / float64; TV-L1 on planes the whole-plane kernels hold
(float32 up to 1024 pixels, float64 up to 512), on a larger one (the simple fallback) and on more planes
than the grid has blocks (shared memory and scratch reused across planes). Each case checks
its outputs are finite, so a kernel that writes garbage fails here too, not only under the sanitizer.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

import ops
from ops.kernel_loader import KERNEL_VARIANTS, use_kernel_variant
from ops.repflow import kernels as tvl1_kernels

# (channels, groups, height, width): vector loads (C/G divisible by the vector width), scalar loads (C/G = 3),
# and a group too wide for one register pass (512 float32 channels: four steps of 32 lanes × 4 channels).
SIFA_CASES = [(16, 2, 5, 6), (6, 2, 4, 5), (512, 1, 3, 3)]
SIFA_DTYPES = [torch.float32, torch.float16, torch.float64]
# (height, width, dtype): planes the fast TV-L1 kernels hold, a partial last warp, and a fallback plane.
FLOW_CASES = [(14, 14, torch.float32), (32, 32, torch.float32), (5, 7, torch.float32), (16, 32, torch.float64)]
FLOW_FALLBACK = (40, 40, torch.float32)


def _check_finite(name: str, *tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and not torch.isfinite(t).all():
            raise RuntimeError(f"{name}: non-finite values in a result")


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` channels-last, one element into a larger buffer: same values, not 16-byte aligned."""
    b, c, h, w = t.shape
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(b, h, w, c).permute(0, 3, 1, 2)
    view.copy_(t)
    return view


def sifa_cases(device: torch.device, backend: str) -> Iterator[str]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    for dtype in SIFA_DTYPES:
        for channels, groups, height, width in SIFA_CASES:
            if channels > 64 and dtype != torch.float32:
                continue  # the two-pass path needs one dtype; the sanitizers' cost grows with the channels
            for misaligned in (False, True):
                q, kv, off = (
                    (torch.randn(2, c, height, width, generator=gen) * scale)
                    .to(device=device, dtype=dtype)
                    .contiguous(memory_format=torch.channels_last)
                    for c, scale in ((channels, 1.0), (channels, 1.0), (18, 1.5))
                )
                if misaligned:
                    q, kv = _misaligned(q), _misaligned(kv)
                q, kv, off = (t.detach().requires_grad_() for t in (q, kv, off))
                out, attn = ops.sifa.deform_attention(q, kv, off, 3, groups=groups, backend=backend, return_attn=True)
                (out.square().sum() + attn.square().sum()).backward()
                _check_finite("deform_attention", out, attn, q.grad, kv.grad, off.grad)
                q.grad = kv.grad = off.grad = None
                corr = ops.deform_correlation(q, kv, off, 3, groups=groups, backend=backend)
                agg = ops.deform_aggregation(kv, corr, off, 3, groups=groups, backend=backend)
                agg.square().sum().backward()
                _check_finite("deform_correlation + deform_aggregation", corr, agg, q.grad, kv.grad, off.grad)
                yield f"sifa {str(dtype).removeprefix('torch.')} C={channels} G={groups} {height}x{width}" + (
                    " misaligned" if misaligned else ""
                )


def flow_cases(device: torch.device, backend: str) -> Iterator[str]:
    gen = torch.Generator(device="cpu").manual_seed(1)
    for height, width, dtype in [*FLOW_CASES, FLOW_FALLBACK]:
        i0 = torch.randn(2, 3, height, width, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        i1 = torch.randn(2, 3, height, width, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        theta = torch.tensor(0.3, dtype=dtype, device=device, requires_grad=True)
        flow = ops.tvl1_flow(i0, i1, 5, theta=theta, backend=backend)
        flow.square().sum().backward()
        _check_finite("tvl1_flow", flow, i0.grad, i1.grad, theta.grad)
        yield f"tvl1 {str(dtype).removeprefix('torch.')} {height}x{width}"
    # More planes than blocks: each block walks several planes, so its shared memory and its backward
    # scratch are reused from plane to plane (the barriers at a plane's start guard that reuse).
    side, dtype = 6, torch.float32
    threads = tvl1_kernels.plane_threads(side * side, dtype)
    resident = tvl1_kernels.plane_blocks(device, 1 << 30, threads, resident_only=True)
    planes = 2 * resident + 1 if device.type == "cuda" else 3 * resident + 1
    i0 = torch.randn(1, planes, side, side, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    i1 = torch.randn(1, planes, side, side, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    flow = ops.tvl1_flow(i0, i1, 3, backend=backend)
    flow.square().sum().backward()
    _check_finite("tvl1_flow", flow, i0.grad, i1.grad)
    yield f"tvl1 float32 {planes} planes of {side}x{side} over {resident} resident blocks"


@contextmanager
def _device_context(device: torch.device) -> Iterator[str]:
    """The backend to pass the ops, inside the context that allows it."""
    if device.type == "cuda":
        yield "cupy"
    else:
        with ops.kernel_host_emulation():
            yield "emulated"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (the kernels through CuPy) or cpu (host emulation)")
    ap.add_argument("--kernels", nargs="+", choices=KERNEL_VARIANTS, default=list(KERNEL_VARIANTS))
    ap.add_argument("--ops", nargs="+", choices=("sifa", "flow"), default=["sifa", "flow"])
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sanitize_kernels.py: no CUDA device", file=sys.stderr)
        return 2
    runs = {"sifa": sifa_cases, "flow": flow_cases}
    with _device_context(device) as backend:
        for variant in args.kernels:
            with use_kernel_variant(variant):
                for name in args.ops:
                    for case in runs[name](device, backend):
                        print(f"ok  {variant:<6} {case}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a launch error of the last kernels surfaces here, before "ran"
    print("all kernel paths ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
