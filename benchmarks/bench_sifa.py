"""SIFA ops benchmark: deform_correlation + deform_aggregation, forward and forward+backward, per backend.

One step is what the SIFA block runs per layer: ``attn = deform_correlation(q, k, offset)``,
``out = deform_aggregation(k, attn, offset)``, then ``backward`` of ``<out, cotangent>`` into q, k and
offset. Shapes are SIFA-ResNet-50's at 16×224² (T = 4 after the stem, so B = 3·N frame pairs):
layer2 C=128 at 28², layer3 C=256 at 14², layer4 C=512 at 7², N = 8 and 32 clips.

CUDA (when available): the reference ("torch") and the kernels ("cupy"), and the SIFA block's fused
paths of both ("torch-fused", "cupy-fused": ``ops.sifa.deform_attention``) run in this process on
the same inputs; the kernels once per variant of --kernels ("cupy:fast", "cupy:simple", ...;
ops.backends.use_kernel_variant). Times from CUDA events (median of --iters after --warmup), peak
memory of the step above what the inputs occupy (torch.cuda.max_memory_allocated), and the ratios
reference/kernels (torch/cupy and torch-fused/cupy-fused per variant) and simple/fast. --layout: the
inputs' memory format, "block" (default) as the SIFA block hands them over (NCHW to the reference,
channels-last to the kernels), or "nchw" / "channels_last" for every backend. The forward is also
compared with the memory-bandwidth bound: the bytes the two ops must at least read and write (q, k
twice, offsets twice, attn written and read, out written), divided by the device bandwidth (measured
here with a device-to-device copy, or --bandwidth-gbs).

CPU (always): the reference's forward and forward+backward time on a small shape (two ops and
fused, in interleaved rounds), and the bytes autograd saves for the backward with each backend (the
kernels run through host emulation for that count; their CPU time is not a benchmark).

    python benchmarks/bench_sifa.py [--iters 20] [--warmup 5] [--dtype float32] [--clips 8 32]
                                    [--kernels fast simple] [--layout block|nchw|channels_last]
                                    [--bandwidth-gbs X] [--cpu-only | --gpu-only] [--require-cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from cuda_timing import cuda_peak_bytes, cuda_time_ms, measure_bandwidth_gbs

import ops
from ops.kernel_loader import KERNEL_VARIANTS, use_kernel_variant
from ops.sifa.kernels import deform_aggregation_kernels, deform_correlation_kernels
from ops.sifa.reference import (
    deform_aggregation_reference,
    deform_attention_reference,
    deform_correlation_reference,
)

BACKENDS = ("torch", "cupy", "torch-fused", "cupy-fused")
LAYERS = {"layer2": (128, 28), "layer3": (256, 14), "layer4": (512, 7)}
FRAMES = 4
K = 3
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def make_inputs(batch, channels, size, dtype, device, requires_grad=True):
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale
        return t.to(dtype).requires_grad_(requires_grad)

    q = rnd(batch, channels, size, size)
    k = rnd(batch, channels, size, size)
    off = rnd(batch, 2 * K * K, size, size, scale=1.5)
    cot = rnd(batch, channels, size, size).detach()
    return q, k, off, cot


def forward(backend, q, k, off):
    """The two ops in turn; "<backend>-fused" is the SIFA block's path, ops.sifa.deform_attention (the
    reference samples each tap once for both ops; the kernels' backward takes both ops' d kv and
    d offset in one pass each). "cupy...:<variant>" runs that kernel variant."""
    backend, _, variant = backend.partition(":")
    with use_kernel_variant(variant or "fast"):
        if backend.endswith("-fused"):
            return ops.sifa.deform_attention(q, k, off, K, backend=backend.removesuffix("-fused"))
        attn = ops.deform_correlation(q, k, off, K, backend=backend)
        return ops.deform_aggregation(k, attn, off, K, backend=backend)


def step(backend, q, k, off, cot):
    out = forward(backend, q, k, off)
    with use_kernel_variant(backend.partition(":")[2] or "fast"):
        torch.autograd.backward(out, cot)


def in_layout(inputs, layout, backend):
    """``inputs`` (q, k, offset, cotangent; NCHW) in the memory format ``layout`` gives ``backend``."""
    if layout == "nchw" or (layout == "block" and backend.startswith("torch")):
        return inputs
    q, k, off, cot = (t.detach().contiguous(memory_format=torch.channels_last) for t in inputs)
    return q.requires_grad_(), k.requires_grad_(), off.requires_grad_(), cot


def fwd_bytes(batch, channels, size, element_size, groups=1):
    """Minimum bytes moved by the two forward ops: corr reads q, k, offset and writes attn; agg reads
    value (= k), attn, offset and writes out."""
    hw = size * size
    maps = batch * channels * hw
    attn = batch * groups * K * K * hw
    offset = batch * 2 * K * K * hw
    return element_size * (2 * maps + offset + attn) + element_size * (2 * maps + attn + offset)


# ----------------------------------------------------------------------------------------------- CUDA


def measure_backend(backend, inputs, iters, warmup):
    """(forward ms, forward+backward ms, peak bytes of forward+backward above the inputs) on CUDA."""
    q, k, off, cot = inputs
    with torch.no_grad():
        fwd_ms = cuda_time_ms(lambda: forward(backend, q, k, off), iters, warmup)

    def train():
        q.grad = k.grad = off.grad = None
        step(backend, q, k, off, cot)

    train_ms = cuda_time_ms(train, iters, warmup)
    q.grad = k.grad = off.grad = None
    return fwd_ms, train_ms, cuda_peak_bytes(train)


def run_cuda(args) -> list[dict]:
    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    bandwidth = args.bandwidth_gbs or measure_bandwidth_gbs(device)
    source = "given" if args.bandwidth_gbs else "measured d2d copy"
    print(
        f"device: {torch.cuda.get_device_name(device)}, dtype {args.dtype}, bandwidth {bandwidth:.0f} GB/s ({source})"
    )
    print(f"kernel variants: {' '.join(args.kernels)}; input layout: {args.layout}")
    print(
        f"{'shape':<26}{'backend':<19}{'fwd ms':>9}{'fwd+bwd ms':>12}{'peak MiB':>10}"
        f"{'fwd bound ms':>14}{'of bound':>10}"
    )
    backends = [b if b.startswith("torch") else f"{b}:{v}" for b in BACKENDS for v in args.kernels]
    backends = list(dict.fromkeys(backends))  # the reference once, the kernels once per variant
    pairs = [
        (ref, f"{ker}:{v}") for v in args.kernels for ref, ker in (("torch", "cupy"), ("torch-fused", "cupy-fused"))
    ]
    if "fast" in args.kernels and "simple" in args.kernels:
        pairs += [(f"{b}:simple", f"{b}:fast") for b in ("cupy", "cupy-fused")]
    rows = []
    for clips in args.clips:
        for layer, (channels, size) in LAYERS.items():
            batch = clips * (FRAMES - 1)
            inputs = make_inputs(batch, channels, size, dtype, device)
            bound_ms = fwd_bytes(batch, channels, size, inputs[0].element_size()) / (bandwidth * 1e9) * 1e3
            result = {
                b: measure_backend(b, in_layout(inputs, args.layout, b), args.iters, args.warmup) for b in backends
            }
            name = f"{layer} N={clips} B={batch}"
            for backend, (fwd_ms, train_ms, peak) in result.items():
                print(
                    f"{name:<26}{backend:<19}{fwd_ms:>9.3f}{train_ms:>12.3f}{peak / 2**20:>10.1f}"
                    f"{bound_ms:>14.4f}{bound_ms / fwd_ms:>9.0%}"
                )
            for ref, ker in pairs:
                (tf, tt, tp), (cf, ct, cp) = result[ref], result[ker]
                ratios = f"{tf / cf:>8.1f}x{tt / ct:>11.1f}x{tp / max(cp, 1):>9.1f}x"
                print(f"{'':<26}{'ratio':<19}{ratios}   ({ref} / {ker})")
            rows.append({"layer": layer, "clips": clips, "batch": batch, **result, "fwd_bound_ms": bound_ms})
            del inputs
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------ CPU


def saved_bytes(fn, q, k, off):
    """Bytes of distinct tensors autograd saves for the backward of ``fn(q, k, off)``, beyond the inputs."""
    seen: dict[int, int] = {}
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, off)}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in inputs:  # the inputs exist anyway; count what the ops add
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(q, k, off)
    return sum(seen.values())


def _pair(corr_fn, agg_fn):
    def run(q, k, off):
        return agg_fn(k, corr_fn(q, k, off, K, 1, 1), off, K, 1, 1)

    return run


def run_cpu(args) -> dict:
    clips, channels, size = 2, 64, 28
    batch = clips * (FRAMES - 1)
    torch.set_num_threads(args.threads)
    q, k, off, cot = make_inputs(batch, channels, size, torch.float32, "cpu")

    def train(backend):
        q.grad = k.grad = off.grad = None
        step(backend, q, k, off, cot)

    def no_grad_forward(backend):
        with torch.no_grad():
            forward(backend, q, k, off)

    # Interleaved rounds, median per case: a shared machine's load drifts, and this keeps it fair.
    cases = {
        (b, what): fn for b in ("torch", "torch-fused") for what, fn in (("fwd", no_grad_forward), ("train", train))
    }
    times: dict = {case: [] for case in cases}
    for round_ in range(args.cpu_iters + 1):
        for case, fn in cases.items():
            t0 = time.perf_counter()
            fn(case[0])
            if round_:  # the first round warms up
                times[case].append(time.perf_counter() - t0)
    result = {
        b: tuple(statistics.median(times[(b, w)]) * 1e3 for w in ("fwd", "train")) for b in ("torch", "torch-fused")
    }
    saved = {
        "torch": saved_bytes(_pair(deform_correlation_reference, deform_aggregation_reference), q, k, off),
        "torch-fused": saved_bytes(lambda *a: deform_attention_reference(*a, K, 1, 1), q, k, off),
    }
    with ops.kernel_host_emulation():  # the kernels' custom ops take CPU tensors only inside this context
        saved["kernels"] = saved_bytes(_pair(deform_correlation_kernels, deform_aggregation_kernels), q, k, off)
    input_bytes = q.numel() * q.element_size()
    print(
        f"CPU reference, float32, B={batch} (N={clips}, T={FRAMES}), C={channels}, {size}x{size}, "
        f"{torch.get_num_threads()} threads:"
    )
    for backend, (fwd_ms, train_ms) in result.items():
        print(f"  {backend:<12} forward {fwd_ms:7.1f} ms   forward+backward {train_ms:7.1f} ms")
    print(f"  fused / two ops, forward+backward: {result['torch-fused'][1] / result['torch'][1]:.2f}")
    print("bytes autograd saves for the backward beyond the inputs (kernels: emulated launch, same count on CUDA):")
    for name, nbytes in saved.items():
        print(f"  {name:<12} {nbytes / 2**20:7.2f} MiB = {nbytes / input_bytes:5.1f} feature maps")
    return {"time_ms": result, "saved_bytes": saved}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--clips", type=int, nargs="+", default=[8, 32])
    ap.add_argument(
        "--kernels", nargs="+", choices=KERNEL_VARIANTS, default=list(KERNEL_VARIANTS), help="kernel variants to time"
    )
    ap.add_argument("--layout", choices=("block", "nchw", "channels_last"), default="block", help="input memory format")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="device bandwidth; measured when omitted")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--cpu-only", action="store_true")
    only.add_argument("--gpu-only", action="store_true", help="skip the CPU reference timings and saved-bytes count")
    ap.add_argument("--cpu-iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for the reference")
    ap.add_argument("--require-cuda", action="store_true", help="fail (exit 1) when the CUDA part cannot run")
    args = ap.parse_args(argv)
    results: dict = {} if args.gpu_only else {"cpu": run_cpu(args)}
    if not args.cpu_only:
        if torch.cuda.is_available() and ops.kernel_loader.cupy_available():
            results["cuda"] = run_cuda(args)
        elif args.require_cuda:
            raise SystemExit("bench_sifa.py --require-cuda: needs a CUDA device and CuPy")
        else:
            print("CUDA part skipped: needs a CUDA device and CuPy")
    return results


if __name__ == "__main__":
    main()
