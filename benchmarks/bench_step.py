"""Train-step benchmark: forward + backward + optimizer step of a motion network against its baseline.

Pairs (candidate vs baseline, everything else equal; docs/sifa.md §3, docs/repflow.md §3):

- ``sifa``: SIFA-ResNet-50 vs C2D-ResNet-50, clips of 16×224², batch 8;
- ``fcf``: FCF-(2+1)D-50 vs (2+1)D-50, clips of 16×112², batch 8;
- ``sifa-corr``: SIFA-ResNet-50 with its correlation branches (``correlation_features=True``,
  docs/sifa.md §5) vs the paper's SIFA-ResNet-50, clips of 16×224², batch 8.

Each is timed in float32 ("fp32") and under bfloat16 autocast ("bf16-mixed": float32 weights and
optimizer, as Lightning's ``precision="bf16-mixed"``), and in the contiguous (NCTHW) and
channels-last (NTHWC, ``torch.channels_last_3d``) memory formats on CUDA, so the table shows where
channels-last helps rather than assuming it. One step = ``zero_grad``, forward, NLL loss of the
network's log-probabilities against random labels, backward, SGD (momentum 0.9) step.

The baseline and the candidate are built once and interleaved: every round times one step of each,
the order alternating between rounds, so drifts in clock or load hit both alike. Reported per
configuration: ms/step (median over rounds) and clips/s for both, the motion module's overhead
``candidate / baseline - 1`` from the medians, and the median of the per-round ratios (the paired
estimate). On CUDA also the peak memory of one step above what the model and inputs occupy.

Timing: CUDA events around each step on a GPU, ``time.perf_counter`` on the CPU. Without a GPU the
full sizes would take minutes per step, so the script refuses them; ``--tiny`` runs the same
builders at width 1/16, 16×16² clips, batch 2, flow n_iter 2 (seconds on a CPU; a smoke test, not
a benchmark).

    PYTHONPATH=. python benchmarks/bench_step.py [--pairs sifa fcf] [--precisions fp32 bf16-mixed]
        [--memory-formats contiguous channels_last] [--iters 10] [--warmup 3] [--batch 8]
        [--tiny] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules import networks

PRECISIONS = ("fp32", "bf16-mixed")
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last_3d}
NUM_CLASSES = 400


@dataclass(frozen=True)
class Pair:
    """A candidate network, its baseline and the clip shape they are timed at."""

    name: str
    candidate: str
    baseline: str
    frames: int
    size: int
    candidate_kwargs: tuple[tuple[str, object], ...] = ()  # the candidate's switches beyond the builder's


PAIRS = {
    "sifa": Pair("sifa", "sifa_resnet50", "c2d_resnet50", frames=16, size=224),
    "fcf": Pair("fcf", "fcf_r2plus1d_50", "r2plus1d_50", frames=16, size=112),
    "sifa-corr": Pair(
        "sifa-corr",
        "sifa_resnet50",
        "sifa_resnet50",
        frames=16,
        size=224,
        candidate_kwargs=(("correlation_features", True),),
    ),
}

#: Keyword arguments of the builders at --tiny: same depth-50 structure, width 1/8, a short flow.
TINY_KWARGS = {
    "sifa_resnet50": {"width_mult": 0.0625},
    "c2d_resnet50": {"width_mult": 0.0625},
    "fcf_r2plus1d_50": {"width_mult": 0.0625, "fcf_bottleneck": 4, "fcf_n_iter": 2},
    "r2plus1d_50": {"width_mult": 0.0625},
}
TINY_SIZE = 16
TINY_BATCH = 2


@dataclass
class StepResult:
    """One configuration of one pair; times in milliseconds per step, throughput in clips per second."""

    pair: str
    candidate: str
    baseline: str
    precision: str
    memory_format: str
    batch: int
    frames: int
    size: int
    rounds: int
    candidate_ms: float
    baseline_ms: float
    candidate_clips_per_s: float
    baseline_clips_per_s: float
    overhead: float  # candidate_ms / baseline_ms - 1
    overhead_paired: float  # median over rounds of candidate / baseline, minus 1
    candidate_peak_mib: float | None = None
    baseline_peak_mib: float | None = None
    width_mult: float = 1.0


class Trainer:
    """One network, its SGD optimizer and a fixed batch; ``step()`` runs one optimizer step."""

    def __init__(
        self,
        builder: str,
        kwargs: dict,
        x: torch.Tensor,
        y: torch.Tensor,
        precision: str,
        memory_format: torch.memory_format,
    ) -> None:
        torch.manual_seed(0)
        with x.device:  # initialise on the device itself (a depth-50 init on the host takes seconds)
            self.net: nn.Module = getattr(networks, builder)(NUM_CLASSES, **kwargs)
        self.net = self.net.to(memory_format=memory_format).train()
        self.x = x.contiguous(memory_format=memory_format)
        self.y = y
        self.opt = torch.optim.SGD(self.net.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        self.autocast = (
            torch.autocast(x.device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
        )

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with self.autocast:
            loss = F.nll_loss(self.net(self.x).float(), self.y)
        loss.backward()
        self.opt.step()


def timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    """A function that runs ``fn`` once and returns its time in ms (CUDA events on a GPU)."""
    if device.type == "cuda":

        def timed(fn: Callable[[], None]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return timed

    def timed_cpu(fn: Callable[[], None]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return timed_cpu


def peak_mib(trainer: Trainer) -> float:
    """Peak CUDA memory of one step above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    trainer.step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_pair(
    pair: Pair, precision: str, memory_format: str, args: argparse.Namespace, device: torch.device
) -> StepResult:
    """Build baseline and candidate, warm both up, then time them interleaved."""
    batch = TINY_BATCH if args.tiny else args.batch
    size = TINY_SIZE if args.tiny else (args.size or pair.size)
    width_mult = TINY_KWARGS[pair.baseline]["width_mult"] if args.tiny else (args.width or 1.0)
    sized = {"width_mult": width_mult}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, pair.frames, size, size, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    fmt = MEMORY_FORMATS[memory_format]
    trainers = {
        role: Trainer(name, {**(TINY_KWARGS[name] if args.tiny else sized), **extra}, x, y, precision, fmt)
        for role, name, extra in (
            ("baseline", pair.baseline, {}),
            ("candidate", pair.candidate, dict(pair.candidate_kwargs)),
        )
    }
    for _ in range(args.warmup):
        for t in trainers.values():
            t.step()
    timed = timer(device)
    times: dict[str, list[float]] = {"baseline": [], "candidate": []}
    for r in range(args.iters):
        order = ("baseline", "candidate") if r % 2 == 0 else ("candidate", "baseline")
        for role in order:
            times[role].append(timed(trainers[role].step))
    cand, base = statistics.median(times["candidate"]), statistics.median(times["baseline"])
    paired = statistics.median(c / b for c, b in zip(times["candidate"], times["baseline"], strict=True))
    result = StepResult(
        pair=pair.name,
        candidate=pair.candidate,
        baseline=pair.baseline,
        precision=precision,
        memory_format=memory_format,
        batch=batch,
        frames=pair.frames,
        size=size,
        rounds=args.iters,
        candidate_ms=cand,
        baseline_ms=base,
        candidate_clips_per_s=batch / (cand * 1e-3),
        baseline_clips_per_s=batch / (base * 1e-3),
        overhead=cand / base - 1,
        overhead_paired=paired - 1,
        width_mult=width_mult,
    )
    if device.type == "cuda":
        result.candidate_peak_mib = peak_mib(trainers["candidate"])
        result.baseline_peak_mib = peak_mib(trainers["baseline"])
    del trainers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def environment(device: torch.device) -> dict:
    """What the figures depend on: device, versions, TF32 and cuDNN switches, the ops' backend."""
    from ops.kernel_loader import cupy_available

    env = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        # Which implementation the motion modules run ("auto" backend): CuPy kernels only on CUDA.
        "motion_ops": "cupy kernels" if device.type == "cuda" and cupy_available() else "torch reference",
    }
    return env


def format_row(r: StepResult) -> str:
    peak = ""
    if r.candidate_peak_mib is not None:
        peak = f"{r.baseline_peak_mib:>10.0f}{r.candidate_peak_mib:>10.0f}"
    return (
        f"{r.pair:<10}{r.precision:<11}{r.memory_format:<14}{r.baseline_ms:>10.2f}{r.candidate_ms:>10.2f}"
        f"{r.baseline_clips_per_s:>10.1f}{r.candidate_clips_per_s:>10.1f}{r.overhead:>+10.1%}{r.overhead_paired:>+10.1%}"
        f"{peak}"
    )


HEADER = (
    f"{'pair':<10}{'precision':<11}{'format':<14}{'base ms':>10}{'cand ms':>10}{'base c/s':>10}{'cand c/s':>10}"
    f"{'overhead':>10}{'paired':>10}"
)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--pairs",
        nargs="+",
        choices=sorted(PAIRS),
        default=["sifa", "fcf"],
        help="default: sifa fcf (each module against its baseline)",
    )
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    ap.add_argument(
        "--memory-formats",
        nargs="+",
        choices=sorted(MEMORY_FORMATS),
        default=None,
        help="default: both on CUDA, contiguous on the CPU",
    )
    ap.add_argument("--iters", type=int, default=10, help="timed rounds (one step of each network per round)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps of each network first")
    ap.add_argument("--batch", type=int, default=8, help="clips per step (ignored with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="width 1/16, 16x16^2 clips, batch 2: a CPU smoke run")
    ap.add_argument("--size", type=int, default=None, help="clip height = width (default: the pair's)")
    ap.add_argument("--width", type=float, default=None, help="width multiplier of both networks (default 1)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    args = ap.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.batch < 1:
        ap.error(
            f"--iters >= 1, --warmup >= 0 and --batch >= 1 expected, got {args.iters}, {args.warmup}, {args.batch}"
        )

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    if args.tiny and (args.size is not None or args.width is not None):
        ap.error("--tiny fixes the size and width; give --size / --width without it")
    if (args.size is not None and args.size < 8) or (args.width is not None and args.width <= 0):
        ap.error(f"--size >= 8 and --width > 0 expected, got {args.size}, {args.width}")
    if device.type == "cpu" and not args.tiny and args.size is None:
        ap.error(
            "no CUDA device: the full sizes need a GPU (use --tiny for a CPU smoke run, or a smaller "
            "--size and --width for a CPU measurement)"
        )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    formats = args.memory_formats or (list(MEMORY_FORMATS) if device.type == "cuda" else ["contiguous"])

    env = environment(device)
    print(
        f"train step: {env['device']}, torch {env['torch']}, motion ops: {env['motion_ops']}, "
        f"{args.iters} interleaved rounds after {args.warmup} warm-up steps"
        + (" (--tiny: not a benchmark)" if args.tiny else "")
    )
    print(HEADER + ("" if device.type == "cpu" else f"{'base MiB':>10}{'cand MiB':>10}"))
    results: list[StepResult] = []
    errors: list[dict] = []
    for name in args.pairs:
        for precision in args.precisions:
            for fmt in formats:
                # One failing configuration (an op refusing a layout, out of memory) must not hide the others.
                try:
                    r = run_pair(PAIRS[name], precision, fmt, args, device)
                except Exception as exc:  # reported below and in the exit status
                    errors.append({"pair": name, "precision": precision, "memory_format": fmt, "error": repr(exc)})
                    print(f"{name:<10}{precision:<11}{fmt:<14}FAILED: {exc!r}", flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                results.append(r)
                print(format_row(r), flush=True)
    # Where channels-last helps: the fastest memory format per network and precision, as measured.
    for name in args.pairs:
        for role in ("baseline", "candidate"):
            for precision in args.precisions:
                rows = [r for r in results if r.pair == name and r.precision == precision]
                if not rows:
                    continue
                fastest = min(rows, key=lambda r, role=role: getattr(r, f"{role}_ms"))
                print(
                    f"{name}: {getattr(fastest, role)} {precision} fastest in {fastest.memory_format} "
                    f"({getattr(fastest, f'{role}_ms'):.2f} ms/step)"
                )
    out = {
        "environment": env,
        "tiny": args.tiny,
        "iters": args.iters,
        "warmup": args.warmup,
        "results": [asdict(r) for r in results],
        "errors": errors,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if errors:
        sys.exit(f"bench_step.py: {len(errors)} configuration(s) failed (see above)")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
