"""Representation-flow benchmark: FlowLayer forward and forward+backward, reference ("torch") vs fused kernels ("cupy").

Shapes are FCF-(2+1)D-50's (docs/repflow.md §3): the flow layers of an FCF block run on the bottleneck
(32 channels) after layer2, i.e. 28×28 at 224² input and 14×14 at 112²; clips of 8 and 16 frames,
8 clips per batch (so 8·(T-1) frame pairs), n_iter 10 and 20. All learnable switches as the paper's
best (image stencils fixed, the rest learnable), so the backward produces every gradient the block
trains with.

CUDA (when available): the reference and each kernel variant of --kernels (default: fast and simple,
ops.backends.use_kernel_variant; the fast variant falls back to the simple kernels for planes
over 1024 float32 pixels, the "path" column says which ran) in this process on the same inputs; times
from CUDA events (median of --iters after --warmup), peak memory of forward+backward above what the
inputs occupy (torch.cuda.max_memory_allocated), and the ratios torch/kernels. The forward is also
compared with two memory-traffic figures, divided by the device bandwidth (measured with a
device-to-device copy, or --bandwidth-gbs): "bound", the simple kernels' traffic (the first iteration
reads gx, gy, rho_c, u (2 maps), p (4) and writes u (2); every further iteration is one fused launch
that reads gx, gy, rho_c, u (2), p (4) and writes u (2), p (4), i.e. 15 map passes; plus 5 for the
image gradient and rho_c); and "one pass", what any
implementation must move (5 maps for the image gradient and rho_c, then gx, gy, rho_c read and u (2)
written once: 10 map passes), which the fast kernels aim at (their "of bound" may exceed 100%).

CPU (always): the reference's forward and forward+backward time on a small shape, and the number of
[B,C,H,W] maps each backend keeps for the backward (the kernels run through host emulation for that
count: autograd's saved tensors plus the kernels' checkpoints, the same for both variants; their CPU
time is not a benchmark). With --cpu-peak also the rise of peak resident memory of one
forward+backward per backend and variant, each in a fresh process (coarse: the C allocator keeps
freed blocks; a ratio, not a GPU figure).

    python benchmarks/bench_flow.py [--iters 10] [--warmup 3] [--dtype float32] [--n-iter 10 20]
                                    [--frames 8 16] [--sizes 28 14] [--clips 8] [--bandwidth-gbs X]
                                    [--kernels fast simple] [--cpu-only | --gpu-only] [--cpu-peak]
                                    [--require-cuda]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch
from cuda_timing import cuda_peak_bytes, cuda_time_ms, measure_bandwidth_gbs

import ops
from ops.kernel_loader import KERNEL_VARIANTS, use_kernel_variant
from ops.repflow.kernels import segment_length, tvl1_path
from ops.repflow.modules import FlowLayer

CHANNELS = 32  # FCF bottleneck
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def layer_flow(layer, i0, i1, n_iter, kernels):
    """tvl1_flow with ``layer``'s parameters: the reference, or (``kernels``) the fused kernels, which on
    CPU tensors run through host emulation."""
    with ops.kernel_host_emulation():
        backend = "emulated" if kernels and i0.device.type == "cpu" else ("cupy" if kernels else "torch")
        return ops.tvl1_flow(i0, i1, n_iter, layer.theta, layer.lam, layer.tau, layer.stencils(), backend=backend)


def make_input(clips, frames, size, dtype, device, requires_grad=True):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(clips, CHANNELS, frames, size, size, generator=gen, device=device, dtype=torch.float32)
    # A moving pattern rather than pure noise, so the threshold branches are mixed as in a network.
    x = x + torch.roll(x, shifts=1, dims=-1).cumsum(2) * 0.1
    return x.to(dtype).requires_grad_(requires_grad)


def make_layers(n_iter, device):
    torch.manual_seed(0)
    ref = FlowLayer(CHANNELS, n_iter, backend="torch").to(device)
    fused = FlowLayer(CHANNELS, n_iter, backend="cupy").to(device)
    fused.load_state_dict(ref.state_dict())
    return {"torch": ref, "cupy": fused}


def step(layer, x, cot):
    layer.zero_grad(set_to_none=True)
    x.grad = None
    torch.autograd.backward(layer(x), cot)


def fwd_bytes(pairs, size, n_iter, element_size=4):
    """Lower bound of the fused forward's memory traffic (see the module docstring); the state is
    always float32 (16-bit inputs compute in float32)."""
    map_bytes = pairs * CHANNELS * size * size * max(element_size, 4)
    return map_bytes * (11 + 15 * (n_iter - 1) + 5)


def one_pass_bytes(pairs, size, element_size=4):
    """What any forward must move (see the module docstring): 10 map passes, independent of n_iter."""
    return pairs * CHANNELS * size * size * max(element_size, 4) * 10


# ----------------------------------------------------------------------------------------------- CUDA


def measure(layer, x, cot, args) -> tuple[float, float, int]:
    """(forward ms, forward+backward ms, peak bytes of forward+backward above the inputs) on CUDA."""
    with torch.no_grad():
        fwd_ms = cuda_time_ms(lambda: layer(x), args.iters, args.warmup)
    train_ms = cuda_time_ms(lambda: step(layer, x, cot), args.iters, args.warmup)
    layer.zero_grad(set_to_none=True)
    x.grad = None
    return fwd_ms, train_ms, cuda_peak_bytes(lambda: step(layer, x, cot))


def run_cuda(args) -> list[dict]:
    dtype = DTYPES[args.dtype]
    if dtype in (torch.float16, torch.bfloat16):
        # 16-bit activations reach the float32 flow layers under autocast, as in a mixed-precision
        # network (FlowLayer refuses a dtype other than its parameters' outside autocast).
        with torch.autocast("cuda", dtype=dtype):
            return _run_cuda(args, dtype)
    return _run_cuda(args, dtype)


def _run_cuda(args, dtype: torch.dtype) -> list[dict]:
    device = torch.device("cuda")
    bandwidth = args.bandwidth_gbs or measure_bandwidth_gbs(device)
    source = "given" if args.bandwidth_gbs else "measured d2d copy"
    name = torch.cuda.get_device_name(device)
    print(f"device: {name}, dtype {args.dtype}, bandwidth {bandwidth:.0f} GB/s ({source})")
    print(
        f"{'shape':<34}{'backend':<8}{'path':<8}{'fwd ms':>9}{'fwd+bwd ms':>12}{'peak MiB':>10}"
        f"{'bound ms':>10}{'of bound':>10}{'one pass ms':>13}{'of it':>8}"
    )
    rows = []
    for n_iter in args.n_iter:
        layers = make_layers(n_iter, device)
        for size in args.sizes:
            for frames in args.frames:
                x = make_input(args.clips, frames, size, dtype, device)
                pairs = args.clips * (frames - 1)
                with torch.no_grad():
                    cot = torch.randn_like(layers["torch"](x))
                bound_ms = fwd_bytes(pairs, size, n_iter, x.element_size()) / (bandwidth * 1e9) * 1e3
                one_pass_ms = one_pass_bytes(pairs, size, x.element_size()) / (bandwidth * 1e9) * 1e3
                result = {"torch": measure(layers["torch"], x, cot, args)}
                paths = {"torch": ""}
                for variant in args.kernels:
                    with use_kernel_variant(variant):
                        result[variant] = measure(layers["cupy"], x, cot, args)
                        paths[variant] = tvl1_path(torch.float32 if dtype != torch.float64 else dtype, size, size)
                name = f"{size}x{size} T={frames} N={args.clips} n_iter={n_iter}"
                for backend, (fwd_ms, train_ms, peak) in result.items():
                    if backend == "torch":
                        of_bound = of_one_pass = ""
                    else:
                        of_bound, of_one_pass = f"{bound_ms / fwd_ms:.0%}", f"{one_pass_ms / fwd_ms:.0%}"
                    print(
                        f"{name:<34}{backend:<8}{paths[backend]:<8}{fwd_ms:>9.3f}{train_ms:>12.3f}"
                        f"{peak / 2**20:>10.1f}{bound_ms:>10.4f}{of_bound:>10}{one_pass_ms:>13.4f}{of_one_pass:>8}"
                    )
                tf, tt, tp = result["torch"]
                for variant in args.kernels:
                    cf, ct, cp = result[variant]
                    print(
                        f"{'':<34}{'ratio':<8}{'':<8}{tf / cf:>8.1f}x{tt / ct:>11.1f}x{tp / max(cp, 1):>9.1f}x"
                        f"   (torch / {variant})"
                    )
                row = {"size": size, "frames": frames, "n_iter": n_iter, **result, "paths": paths}
                rows.append({**row, "fwd_bound_ms": bound_ms, "one_pass_ms": one_pass_ms})
                del x, cot
                torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------ CPU


def stored_maps(n_iter, kernels, pairs=2, size=8):
    """[B,C,H,W] maps (B = frame pairs) one tvl1_flow call with FlowLayer's learnable parameters keeps
    for its backward: distinct tensors autograd saves (the inputs excluded) plus the fused kernels'
    checkpoints (saved by the custom op, so the pack hook sees them)."""
    layer = FlowLayer(CHANNELS, n_iter)
    i0 = torch.randn(pairs, CHANNELS, size, size, requires_grad=True) * 50
    i1 = torch.randn(pairs, CHANNELS, size, size, requires_grad=True) * 50
    seen: dict[int, int] = {}
    inputs = {t.untyped_storage().data_ptr() for t in (i0, i1)}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in inputs and t.numel() > CHANNELS * 8:  # maps, not the stencils or scalars
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer_flow(layer, i0, i1, n_iter, kernels)
    return sum(seen.values()) / (pairs * CHANNELS * size * size * 4)


def run_cpu(args) -> dict:
    torch.set_num_threads(args.threads)
    clips, frames, size, n_iter = 1, 8, 14, 10
    x = make_input(clips, frames, size, torch.float32, "cpu")
    layer = FlowLayer(CHANNELS, n_iter, backend="torch")
    with torch.no_grad():
        cot = torch.randn_like(layer(x))

    def timed(fn):
        for _ in range(2):
            fn()
        times = []
        for _ in range(args.cpu_iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    with torch.no_grad():
        fwd_ms = timed(lambda: layer(x))
    train_ms = timed(lambda: step(layer, x, cot))
    print(
        f"CPU ({torch.get_num_threads()} threads), reference FlowLayer, N={clips} C={CHANNELS} T={frames} "
        f"{size}x{size} n_iter={n_iter}: forward {fwd_ms:.1f} ms, forward+backward {train_ms:.1f} ms"
    )
    # Maps kept for the backward, per backend; the kernels' path runs through host emulation here.
    print("tvl1_flow: maps of [pairs, C, H, W] kept for backward (reference: autograd; kernels: + checkpoints):")
    counts = {}
    for n in args.n_iter:
        ref = stored_maps(n, kernels=False)
        fused = stored_maps(n, kernels=True)
        counts[n] = (ref, fused)
        print(
            f"  n_iter={n:>3}: reference {ref:6.1f}, kernels {fused:5.1f} "
            f"(checkpoint every {segment_length(n)} iterations), ratio {ref / fused:.1f}x"
        )
    print(
        "  (both variants save the same maps; the simple kernels' backward adds a working set of about 23 "
        "maps, the fast kernels' 3 gradient maps plus a scratch of 6·(L+1) plane maps per block of a grid "
        "capped by the SM count; the GPU peak-memory column measures everything)"
    )
    return {"fwd_ms": fwd_ms, "train_ms": train_ms, "maps": counts}


def peak_child(kernels: bool, n_iter: int, pairs: int = 14, size: int = 28) -> None:
    """In a fresh process: tvl1_flow forward+backward with FlowLayer's learnable parameters on CPU, and
    the rise of resident memory it causes at its peak, in maps of [pairs, C, H, W]."""
    torch.set_num_threads(1)
    layer = FlowLayer(CHANNELS, n_iter)

    def run(i0, i1):
        out = layer_flow(layer, i0, i1, n_iter, kernels)
        with ops.kernel_host_emulation():  # the kernels' backward op refuses CPU tensors outside it
            out.backward(torch.ones_like(out))

    tiny = torch.randn(1, CHANNELS, 4, 4, requires_grad=True)
    run(tiny, tiny * 2)  # loads the emulation library, warms the allocator
    i0 = (torch.randn(pairs, CHANNELS, size, size) * 50).requires_grad_()
    i1 = (i0.detach() + torch.randn(pairs, CHANNELS, size, size) * 10).requires_grad_()
    page = resource.getpagesize()

    def rss() -> int:
        with open("/proc/self/statm", encoding="utf-8") as f:
            return int(f.read().split()[1]) * page

    # Sample the current resident size from a thread while the step runs (torch ops and the
    # emulated kernels release the GIL); the process's lifetime peak would include import transients.
    base = rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    run(i0, i1)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss())
    print((peak[0] - base) / (pairs * CHANNELS * size * size * 4))


def run_cpu_peak(args) -> dict:
    """Peak resident memory of tvl1_flow forward+backward, reference vs each kernel variant (host
    emulation), one fresh process each. RSS is coarse (the C allocator keeps freed blocks), so read it
    as a ratio."""
    print("tvl1_flow forward+backward on CPU, peak rise of RSS in maps of [14, 32, 28, 28] float32:")
    out = {}
    for n in args.n_iter:
        maps = {}
        for backend in ("torch", *args.kernels):
            cmd = [sys.executable, __file__, "--peak-child", "torch" if backend == "torch" else "kernels", str(n)]
            env = {**os.environ, "VMM_KERNELS": backend if backend != "torch" else "fast"}
            result = subprocess.run(
                cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", check=True, env=env
            )
            maps[backend] = float(result.stdout.strip().splitlines()[-1])
        out[n] = maps
        kernels = ", ".join(
            f"{v} {maps[v]:5.0f} (ratio {maps['torch'] / max(maps[v], 1e-9):.1f}x)" for v in args.kernels
        )
        print(f"  n_iter={n:>3}: reference {maps['torch']:6.0f}, {kernels}")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--n-iter", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 14])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--bandwidth-gbs", type=float, default=None)
    parser.add_argument(
        "--kernels", nargs="+", choices=KERNEL_VARIANTS, default=list(KERNEL_VARIANTS), help="kernel variants to run"
    )
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--cpu-only", action="store_true")
    only.add_argument("--gpu-only", action="store_true", help="skip the CPU timings and saved-maps count")
    parser.add_argument("--cpu-iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-peak", action="store_true", help="also measure CPU peak RSS per backend (~1 min)")
    parser.add_argument("--require-cuda", action="store_true", help="fail (exit 1) when the GPU part cannot run")
    parser.add_argument("--peak-child", nargs=2, metavar=("BACKEND", "N_ITER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_child:
        peak_child(args.peak_child[0] == "kernels", int(args.peak_child[1]))
        return
    if not args.gpu_only:
        run_cpu(args)
    if args.cpu_peak:
        run_cpu_peak(args)
    if args.cpu_only:
        return
    if not torch.cuda.is_available():
        if args.require_cuda:
            raise SystemExit("bench_flow.py --require-cuda: CUDA not available")
        print("CUDA not available: GPU part skipped")
        return
    run_cuda(args)


if __name__ == "__main__":
    main()
