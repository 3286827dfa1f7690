"""Per-kernel profile of the CUDA kernels behind SIFA and FlowLayer: where a step's device time goes.

For each case (the shapes of the full-size networks, below) and phase (forward, forward+backward):

- event ms: the step timed with CUDA events (median of --iters after --warmup), as the op benchmarks;
- a ``torch.profiler`` run of --iters steps (CUPTI traces every kernel in the process, so the CuPy
  kernels, launched on torch's current stream, appear next to torch's own): per kernel its launches
  and device time per step, and the kernel sum;
- host overhead = event ms - kernel sum: the time the GPU waits for the host within a step (Python,
  launch latency, CuPy's per-launch work), which no kernel optimisation removes;
- forward only: the bytes the op must at least move (the models of bench_sifa.py / bench_flow.py),
  as GB/s at the event time and at the kernel sum, and the fraction of the bandwidth bound
  (bytes / device bandwidth, measured with a device-to-device copy or given by --bandwidth-gbs).

Cases: ``sifa`` = SIFA layer3 of SIFA-ResNet-50, N = 32 clips (B = 96 frame pairs, C = 256, 14²),
the two ops (deform_correlation + deform_aggregation) and the SIFA block's fused path; ``flow`` =
FlowLayer at 28², T = 16, N = 8 clips, n_iter 10 (FCF-(2+1)D-50 at 224²). 16-bit FlowLayer inputs
run under autocast, as in a mixed-precision network.

    PYTHONPATH=. python benchmarks/profile_ops.py [--dtypes float32 float16] [--cases sifa flow]
                                                  [--kernels fast simple] [--iters 10] [--warmup 3]
                                                  [--bandwidth-gbs X]
Each case runs once per kernel variant (ops.backends.use_kernel_variant: the fast kernels and the
simple ones they replace), so the two are compared in one run.
Needs a CUDA device and CuPy; exits with an error otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from cuda_timing import cuda_time_ms, measure_bandwidth_gbs

from ops.kernel_loader import KERNEL_VARIANTS, use_kernel_variant

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class KernelRow:
    name: str
    launches_per_step: float
    us_per_step: float


@dataclass
class Profile:
    """One case, phase and dtype: event time, kernel breakdown, and the forward's byte bound."""

    case: str
    phase: str
    dtype: str
    variant: str
    event_ms: float
    kernels: list[KernelRow] = field(default_factory=list)
    bound_bytes: int | None = None

    @property
    def kernel_ms(self) -> float:
        return sum(k.us_per_step for k in self.kernels) / 1e3

    @property
    def host_overhead_ms(self) -> float:
        return self.event_ms - self.kernel_ms


def device_events(prof: torch.profiler.profile) -> list[tuple[str, float]]:
    """(name, µs) of every device-side activity (kernels, memcpy, memset) the profiler recorded."""
    out = []
    for evt in prof.events():
        if getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA:
            out.append((evt.name, evt.time_range.elapsed_us()))
    return out


def kernel_breakdown(fn: Callable[[], None], steps: int) -> list[KernelRow]:
    """Profile ``steps`` calls of ``fn`` and sum device time per kernel name, per step, largest first."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    sums: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name, us in device_events(prof):
        sums[name][0] += 1
        sums[name][1] += us
    rows = [KernelRow(name, n / steps, us / steps) for name, (n, us) in sums.items()]
    return sorted(rows, key=lambda r: -r.us_per_step)


def sifa_cases(
    dtype: torch.dtype, device: torch.device, variant: str
) -> list[tuple[str, str, Callable[[], None], int | None]]:
    """(case, phase, step, forward bytes) for SIFA layer3 N=32, two ops and fused, on the ``variant`` kernels,
    with the inputs in the memory format the SIFA block hands the kernels (channels-last)."""
    import bench_sifa

    channels, size = bench_sifa.LAYERS["layer3"]
    batch = 32 * (bench_sifa.FRAMES - 1)
    inputs = bench_sifa.make_inputs(batch, channels, size, dtype, device)
    q, k, off, cot = bench_sifa.in_layout(inputs, "block", "cupy")
    es = q.element_size()
    two_op_bytes = bench_sifa.fwd_bytes(batch, channels, size, es)
    # The fused path reads q, k and the offsets and writes out; attn need not leave the chip.
    fused_bytes = es * (3 * batch * channels * size * size + batch * 2 * bench_sifa.K**2 * size * size)
    cases = []
    # bench_sifa runs the variant named after ":" in the backend (its own use_kernel_variant context).
    two_ops, fused = f"cupy:{variant}", f"cupy-fused:{variant}"
    for name, backend, nbytes in (("sifa two ops", two_ops, two_op_bytes), ("sifa fused", fused, fused_bytes)):

        def fwd(backend=backend):
            with torch.no_grad():
                bench_sifa.forward(backend, q, k, off)

        def train(backend=backend):
            q.grad = k.grad = off.grad = None
            bench_sifa.step(backend, q, k, off, cot)

        cases += [(name, "forward", fwd, nbytes), (name, "fwd+bwd", train, None)]
    return cases


def flow_cases(
    dtype: torch.dtype, device: torch.device, variant: str
) -> list[tuple[str, str, Callable[[], None], int | None]]:
    """(case, phase, step, forward bytes) for FlowLayer 28², T=16, N=8, n_iter 10 on the ``variant`` kernels."""
    import bench_flow

    from ops.repflow.modules import FlowLayer

    clips, frames, size, n_iter = 8, 16, 28, 10
    torch.manual_seed(0)
    layer = FlowLayer(bench_flow.CHANNELS, n_iter, backend="cupy").to(device)
    x = bench_flow.make_input(clips, frames, size, dtype, device)
    autocast = torch.autocast("cuda", dtype=dtype) if dtype in (torch.float16, torch.bfloat16) else nullcontext()
    with torch.no_grad(), autocast:
        cot = torch.randn_like(layer(x))
    nbytes = bench_flow.fwd_bytes(clips * (frames - 1), size, n_iter, x.element_size())

    def fwd():
        with torch.no_grad(), autocast, use_kernel_variant(variant):
            layer(x)

    def train():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with autocast, use_kernel_variant(variant):
            out = layer(x)
            torch.autograd.backward(out, cot)

    name = f"flow {size}² T={frames} N={clips} n_iter={n_iter}"
    return [(name, "forward", fwd, nbytes), (name, "fwd+bwd", train, None)]


def run(args: argparse.Namespace) -> list[Profile]:
    device = torch.device("cuda")
    bandwidth = args.bandwidth_gbs or measure_bandwidth_gbs(device)
    source = "given" if args.bandwidth_gbs else "measured d2d copy"
    print(f"device: {torch.cuda.get_device_name(device)}, bandwidth {bandwidth:.0f} GB/s ({source})")
    profiles = []
    builders = {"sifa": sifa_cases, "flow": flow_cases}
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for case_name in args.cases:
            for variant in args.kernels:
                # Each step function enters its variant itself (the variant is read at every launch).
                for case, phase, fn, nbytes in builders[case_name](dtype, device, variant):
                    event_ms = cuda_time_ms(fn, args.iters, args.warmup)
                    kernels = kernel_breakdown(fn, args.iters)
                    p = Profile(case, phase, dtype_name, variant, event_ms, kernels, nbytes)
                    profiles.append(p)
                    print_profile(p, bandwidth, args.top)
                torch.cuda.empty_cache()
    return profiles


def print_profile(p: Profile, bandwidth_gbs: float, top: int) -> None:
    print(f"\n== {p.case}, {p.phase}, {p.dtype}, {p.variant} kernels")
    if not p.kernels:
        print("   no device activity recorded (is CUPTI available to torch.profiler?)")
    for k in p.kernels[:top]:
        share = k.us_per_step / max(p.kernel_ms * 1e3, 1e-9)
        print(f"   {k.us_per_step:>10.1f} us {share:>6.1%}  x{k.launches_per_step:<6.1f} {k.name[:90]}")
    if len(p.kernels) > top:
        rest = sum(k.us_per_step for k in p.kernels[top:])
        print(f"   {rest:>10.1f} us         ({len(p.kernels) - top} more kernels)")
    line = (
        f"   event {p.event_ms:.3f} ms, kernel sum {p.kernel_ms:.3f} ms, "
        f"host overhead {p.host_overhead_ms:.3f} ms ({p.host_overhead_ms / p.event_ms:.0%} of the step)"
    )
    if p.bound_bytes is not None:
        bound_ms = p.bound_bytes / (bandwidth_gbs * 1e9) * 1e3
        gbs_event = p.bound_bytes / (p.event_ms * 1e-3) / 1e9
        gbs_kernels = p.bound_bytes / max(p.kernel_ms * 1e-3, 1e-12) / 1e9
        line += (
            f"\n   bytes {p.bound_bytes / 2**20:.1f} MiB, bound {bound_ms:.4f} ms: {gbs_event:.0f} GB/s at the event "
            f"time ({bound_ms / p.event_ms:.0%} of the bound), {gbs_kernels:.0f} GB/s over the kernels "
            f"({bound_ms / max(p.kernel_ms, 1e-12):.0%})"
        )
    print(line, flush=True)


def main(argv: list[str] | None = None) -> list[Profile]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "float16"])
    ap.add_argument("--cases", nargs="+", choices=("sifa", "flow"), default=["sifa", "flow"])
    ap.add_argument(
        "--kernels", nargs="+", choices=KERNEL_VARIANTS, default=list(KERNEL_VARIANTS), help="kernel variants profiled"
    )
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=8, help="kernels listed per row (the rest summed)")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="device bandwidth; measured when omitted")
    args = ap.parse_args(argv)
    from ops.kernel_loader import cupy_available

    if not torch.cuda.is_available() or not cupy_available():
        missing = "a CUDA device" if not torch.cuda.is_available() else "CuPy"
        sys.exit(f"profile_ops.py needs a CUDA device and CuPy: {missing} not available")
    profiles = run(args)
    if any(not p.kernels for p in profiles):
        sys.exit("profile_ops.py: some steps recorded no device activity (see above)")
    return profiles


if __name__ == "__main__":
    main()
