"""CUDA timing helpers shared by the op benchmarks (run as scripts from benchmarks/)."""

from __future__ import annotations

import statistics

import torch


def cuda_time_ms(fn, iters: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs, timed with CUDA events after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cuda_peak_bytes(fn) -> int:
    """Peak bytes allocated by ``fn()`` above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure_bandwidth_gbs(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), iters=10, warmup=3)
    return 2 * nbytes / (ms * 1e-3) / 1e9
