"""Which frame-pair operations give a learnable frame-order cue? A controlled small-model comparison.

Written to find out why the SIFA arm of `motion_probe.py` stays near chance while FCF learns the
direction of motion. Every model here is the same tiny per-frame CNN (two strided 2D convs to 1/4 resolution, one
frame-pair operation, two 3×3 convs, mean over T·H·W, linear), trained with the same data, optimiser
and budget; only the frame-pair operation differs:

    plain    none: per-frame features averaged over time (order-blind, capped at 1/2)
    diff     concat(x[t+1] - x[t], x[t+1]): a subtractive cue (what temporal gradients / TV-L1 build on)
    corr     concat(x[t], deform_correlation(x[t], x[t+1], 0)): the 3×3 correlation volume SIFA computes,
             with the tap identity kept
    sifa     ops.SIFA as specified (docs/sifa.md §2): correlation-weighted aggregation added to x[t]
    sifa-kaiming, sifa-d2   SIFA with Kaiming-initialised offsets / dilation 2
    sifa-cos  SIFA's aggregation with a normalised attention: softmax over the taps of the cosine
             similarity / 0.1 (bounded, like a transformer's), instead of the raw dot product whose
             added term grows like x³ — the "scale" question of docs/sifa.md §5
    sifa-corr SIFA with correlation features (docs/sifa.md §5), when ops.SIFA has the option

Motion scale is a variable: `--speed MIN MAX` (pixels per stored frame at 80 px) and `--interval`
set the displacement between sampled frames; the pair operation sits at 1/4 resolution, where a
±1 window reaches ±4 input pixels. `--task coherence` trains on frames in order vs permuted (K = 2).

    python benchmarks/motion_cue.py                          # all modes, ~25 min on a 2-core CPU
    python benchmarks/motion_cue.py --epochs 60              # on a GPU: ~10 s per mode after loading
    python benchmarks/motion_cue.py --modes diff sifa --epochs 5
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from datamodules import SyntheticMotionDataModule
from datamodules.synthetic import ORDER_BLIND_CEILING
from ops import SIFA, deform_aggregation, deform_correlation

MODES = ("plain", "diff", "corr", "sifa", "sifa-kaiming", "sifa-d2", "sifa-cos", "sifa-corr")
MEAN, STD = 0.45, 0.25


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, (1, kernel, kernel), (1, stride, stride), (0, kernel // 2, kernel // 2), bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
    )


class CueNet(nn.Module):
    """Per-frame stem to 1/4 resolution → frame-pair operation `mode` → two 3×3 convs → mean → fc."""

    def __init__(self, mode: str, num_classes: int, channels: int = 16) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.stem = nn.Sequential(conv_bn_relu(3, channels, 5, 2), conv_bn_relu(channels, channels, 3, 2))
        if mode.startswith("sifa"):
            offset_init = "kaiming" if mode == "sifa-kaiming" else "zeros"
            extra = {}
            if mode == "sifa-corr":
                if "correlation_features" not in inspect.signature(SIFA).parameters:
                    raise ValueError("mode 'sifa-corr': ops.SIFA has no correlation_features option in this version")
                extra["correlation_features"] = True
            self.sifa = SIFA(channels, dilation=2 if mode == "sifa-d2" else 1, offset_init=offset_init, **extra)
        wide = mode in ("diff", "corr")
        self.head = nn.Sequential(
            conv_bn_relu(2 * channels if wide else channels, 2 * channels, 3, 1),
            conv_bn_relu(2 * channels, 2 * channels, 3, 1),
        )
        self.fc = nn.Linear(2 * channels, num_classes)

    def pair_op(self, f: torch.Tensor) -> torch.Tensor:
        if self.mode == "plain":
            return f
        if self.mode == "diff":
            return torch.cat((f[:, :, 1:] - f[:, :, :-1], f[:, :, 1:]), dim=1)
        if self.mode == "corr":
            n, c, t, h, w = f.shape

            def pairs(v: torch.Tensor) -> torch.Tensor:
                return v.transpose(1, 2).reshape(n * (t - 1), v.shape[1], h, w)

            zero = f.new_zeros(n * (t - 1), 18, h, w)
            attn = deform_correlation(pairs(f[:, :, :-1]), pairs(f[:, :, 1:]), zero, kernel_size=3)
            attn = attn.reshape(n, t - 1, 9, h, w).transpose(1, 2)
            pad = f.new_zeros(n, c - 9, t - 1, h, w)  # same head width as diff
            return torch.cat((f[:, :, :-1], attn, pad), dim=1)
        if self.mode == "sifa-cos":
            return self.cosine_sifa(f)
        return self.sifa(f)

    def cosine_sifa(self, f: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
        """SIFA (same offsets, window and residual) with attention softmax_k(cos(x[t], x[t+1](p_k)) / τ)."""
        n, c, t, h, w = f.shape
        motion = (1 + torch.sigmoid(f[:, :, 1:] - f[:, :, :-1])) * f[:, :, 1:]
        offset = self.sifa.conv_offset(motion)

        def pairs(v: torch.Tensor) -> torch.Tensor:
            return v.transpose(1, 2).reshape(n * (t - 1), v.shape[1], h, w)

        unit = F.normalize(f, dim=1)
        off = pairs(offset)
        k, d = self.sifa.kernel_size, self.sifa.dilation
        sim = deform_correlation(pairs(unit[:, :, :-1]), pairs(unit[:, :, 1:]), off, kernel_size=k, dilation=d)
        cosine = sim * c  # the op averages over channels; unit vectors make that cos / C
        agg = deform_aggregation(pairs(f[:, :, 1:]), (cosine / temperature).softmax(1), off, kernel_size=k, dilation=d)
        agg = agg.reshape(n, t - 1, c, h, w).transpose(1, 2)
        return torch.cat((f[:, :, :-1] + agg, f[:, :, -1:]), dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.pair_op(self.stem(x))).mean(dim=(2, 3, 4)))


def load_split(loader) -> tuple[torch.Tensor, torch.Tensor]:
    clips, labels = [], []
    for batch in loader:
        video = batch["video"]
        clips.append(video.reshape(-1, *video.shape[-4:]))
        labels.append(batch["label"].reshape(-1))
    return torch.cat(clips), torch.cat(labels)


def to_float(clips: torch.Tensor) -> torch.Tensor:
    return (clips.float() / 255.0 - MEAN) / STD


def accuracy(net: nn.Module, clips: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    net.eval()
    with torch.no_grad():
        batches = (clips[i : i + 64].to(device) for i in range(0, len(clips), 64))
        pred = torch.cat([net(to_float(b)).argmax(1).cpu() for b in batches])
    net.train()
    return float((pred == labels).float().mean())


def train_mode(mode: str, data: tuple[torch.Tensor, ...], num_classes: int, args: argparse.Namespace) -> dict:
    clips, labels, test_clips, test_labels = data
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    net = CueNet(mode, num_classes).to(device)
    clips, labels = clips.to(device), labels.to(device)  # uint8: the whole training split fits on any device
    opt = torch.optim.AdamW(net.parameters(), args.lr, weight_decay=0.01)
    steps_per_epoch = len(clips) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch)
    history = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        perm, losses = torch.randperm(len(clips)).to(device), []
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            loss = F.cross_entropy(net(to_float(clips[idx])), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach())
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            acc = accuracy(net, test_clips, test_labels, device)
            recent = float(torch.stack(losses).mean())
            history.append({"epoch": epoch + 1, "train_loss": recent, "test_top1": acc})
            print(
                f"  {mode:>12s} epoch {epoch + 1:3d}: train loss {recent:.3f}  test top-1 {100 * acc:5.1f}%", flush=True
            )
    return {
        "mode": mode,
        "test_top1": history[-1]["test_top1"],
        "history": history,
        "train_seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--num-classes", type=int, default=8)
    p.add_argument("--train-per-class", type=int, default=160)
    p.add_argument("--test-per-class", type=int, default=16)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--interval", type=int, default=2)
    p.add_argument(
        "--speed",
        type=float,
        nargs=2,
        default=[2.0, 6.0],
        metavar=("MIN", "MAX"),
        help="object speed range, pixels per stored frame (80 px)",
    )
    p.add_argument(
        "--task",
        default="direction",
        choices=("direction", "coherence"),
        help="coherence: ordered vs permuted frames (K = 2; every frame read, --interval scales the speed)",
    )
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the nets train (default: cuda when available; SIFA then runs its kernels)",
    )
    p.add_argument("--workers", type=int, default=1, help="decoding processes for loading the clips once")
    p.add_argument("--cache", default=None, help="dataset cache root (default $VMM_CACHE or ~/.cache/vmm)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    speed, interval, video_frames = tuple(args.speed), args.interval, 20
    if args.task == "coherence":  # the whole clip, so both classes show the same frame set
        if args.num_classes != 2:
            p.error("--num-classes: the coherence task has 2 classes")
        speed, interval, video_frames = (speed[0] * interval, speed[1] * interval), 1, args.frames
    dm = SyntheticMotionDataModule(
        root=args.cache,
        num_classes=args.num_classes,
        train_per_class=args.train_per_class,
        val_per_class=2,
        test_per_class=args.test_per_class,
        seed=0,
        batch_size=64,
        num_workers=args.workers,
        num_frames=args.frames,
        frame_interval=interval,
        crop_size=args.crop,
        test_clips=1,
        speed_range=speed,
        video_frames=video_frames,
        task=args.task,
    )
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    data = (*load_split(dm.train_dataloader()), *load_split(dm.test_dataloader()))
    print(
        f"{len(data[0])} training clips, {len(data[2])} test clips, K = {args.num_classes} "
        f"(chance {100 / args.num_classes:.1f}%, order-blind ceiling {100 * ORDER_BLIND_CEILING:.0f}%)",
        flush=True,
    )
    results = [train_mode(mode, data, args.num_classes, args) for mode in args.modes]
    n_test = len(data[2])
    print(
        f"chance {100 / args.num_classes:.1f}%, order-blind ceiling {100 * ORDER_BLIND_CEILING:.0f}%, "
        f"s.d. = sqrt(p(1-p)/n) on n = {n_test} test clips"
    )
    print("| frame-pair operation | test top-1 | ± s.d. | train s |")
    print("| --- | --- | --- | --- |")
    for r in results:
        p_hat = r["test_top1"]
        sd = math.sqrt(p_hat * (1 - p_hat) / max(1, n_test))
        print(f"| {r['mode']} | {100 * p_hat:.1f}% | {100 * sd:.1f} | {r['train_seconds']:.0f} |")
    out = {"args": vars(args), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
