"""Motion probe: does a motion module let a per-frame 2D backbone see the order of frames?

On the synthetic motion dataset classes come in time-reversal pairs, so a network that pools
per-frame features over time without order is capped at 1/2 (it can tell the pair at best, never
the member; chance is 1/K). Three arms share one per-frame 2D ResNet backbone (temporal stem 1, no
temporal convolution, temporal average pooling), the data, the optimiser and the budget; only the
module differs:

    plain   SIFAResNet(K, stem_temporal_kernel=1, stem_temporal_stride=1, sifa=False,
                       global_context=False, dual_path=False)
    sifa    the same with sifa=True (SIFA in alternating blocks of layer2-4)
    fcf     FCFR2Plus1D(K, temporal=False, fcf=True) (flow-conv-flow after layer2)

Each arm trains for --epochs on the training split and is tested once at the end (no model
selection) on the test split, views averaged per video. Before training, the script measures each
fresh net's order sensitivity, max |log p(x) - log p(x reversed in time)|: exactly 0 for the plain
arm (the premise of the probe), also 0 for SIFA at init (its residual branch starts at zero with
the zero-initialised last BN), small but non-zero for FCF.

    python benchmarks/motion_probe.py                      # defaults: ~10-30 min on a 2-core CPU
    python benchmarks/motion_probe.py --epochs 3 --train-per-class 16 --arms plain sifa
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from datamodules import SyntheticMotionDataModule
from datamodules.synthetic import ORDER_BLIND_CEILING
from lightning_modules import VideoClassifier
from lightning_modules.networks import FCFR2Plus1D, SIFAResNet

ARMS = ("plain", "sifa", "fcf")


def build_net(arm: str, num_classes: int, args: argparse.Namespace) -> torch.nn.Module:
    common = {"depth": args.depth, "width_mult": args.width, "dropout": args.dropout}
    if arm in ("plain", "sifa"):
        return SIFAResNet(
            num_classes, stem_temporal_kernel=args.stem_temporal, stem_temporal_stride=args.stem_temporal,
            sifa=arm == "sifa",
            global_context=False, dual_path=False, sifa_stages=tuple(args.sifa_stages),
            sifa_dilation=args.sifa_dilation, **common,
        )
    if arm == "fcf":
        return FCFR2Plus1D(
            num_classes, temporal=False, fcf=True, fcf_n_iter=args.fcf_n_iter, fcf_bottleneck=args.fcf_bottleneck,
            **common,
        )
    raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")


class EpochLoss(pl.Callback):
    """Prints each epoch's mean training loss (so a long run shows whether an arm is fitting at all)."""

    def __init__(self, arm: str) -> None:
        self.arm, self.losses, self.history = arm, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        mean = float(torch.stack(self.losses).mean()) if self.losses else float("nan")
        self.losses = []
        self.history.append(mean)
        print(f"  {self.arm:>5s} epoch {trainer.current_epoch + 1:3d}: train loss {mean:.3f}", flush=True)


def order_sensitivity(net: torch.nn.Module, clip: torch.Tensor) -> float:
    """max |log p(x) - log p(reversed x)| of a freshly built net in eval mode (0 = order-blind)."""
    net.eval()
    with torch.no_grad():
        diff = (net(clip) - net(clip.flip(2))).abs().max()
    net.train()
    return float(diff)


def run_arm(arm: str, args: argparse.Namespace) -> dict:
    pl.seed_everything(args.seed, verbose=False)
    dm = SyntheticMotionDataModule(
        root=args.cache, num_classes=args.num_classes, train_per_class=args.train_per_class,
        val_per_class=args.val_per_class, test_per_class=args.test_per_class, seed=args.data_seed,
        batch_size=args.batch_size, num_workers=args.workers, num_frames=args.frames,
        frame_interval=args.interval, crop_size=args.crop, test_clips=args.test_clips,
    )
    dm.prepare_data()
    net = build_net(arm, dm.num_classes, args)
    probe_clip = torch.randn(2, 3, args.frames, args.crop, args.crop)
    sensitivity = order_sensitivity(net, probe_clip)
    model = VideoClassifier(
        net, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup,
        min_lr=args.lr * 0.01, flow_lr_scale=args.flow_lr_scale if arm == "fcf" else 1.0,
    )
    epoch_loss = EpochLoss(arm)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator=args.accelerator, devices=1, precision=args.precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=[epoch_loss],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    train_s = time.perf_counter() - start
    trainer.test(model, datamodule=dm, verbose=False)
    res = model.last_eval["test"]
    return {
        "arm": arm,
        "top1": res["top1"],
        "top5": res["top5"],
        "mean_class": res["mean_class"],
        "clip_top1": res["clip_top1"],
        "test_videos": res["num_videos"],
        "train_loss_last": epoch_loss.history[-1] if epoch_loss.history else float("nan"),
        "train_loss_per_epoch": epoch_loss.history,
        "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
        "train_seconds": train_s,
        "order_sensitivity_at_init": sensitivity,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--epochs", type=int, default=12, help="training budget, the same for every arm")
    p.add_argument("--num-classes", type=int, default=8)
    p.add_argument("--train-per-class", type=int, default=40)
    p.add_argument("--val-per-class", type=int, default=2)
    p.add_argument("--test-per-class", type=int, default=16)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--interval", type=int, default=2, help="frame interval (doubles the motion per frame)")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--test-clips", type=int, default=2)
    p.add_argument("--depth", type=int, default=18)
    p.add_argument("--width", type=float, default=0.25, help="width multiplier of the ResNet")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--fcf-n-iter", type=int, default=10)
    p.add_argument("--fcf-bottleneck", type=int, default=16)
    p.add_argument("--sifa-stages", type=int, nargs="+", default=[2, 3, 4], help="ResNet stages with SIFA blocks")
    p.add_argument("--sifa-dilation", type=int, default=1)
    p.add_argument(
        "--stem-temporal", type=int, default=1,
        help="temporal kernel = stride of the plain/SIFA arms' stem; 1 is the probe, 2+ a control that lets the "
        "stem itself see frame order",
    )
    p.add_argument("--optimizer", default="adamw", choices=("sgd", "adamw"))
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up epochs")
    p.add_argument("--flow-lr-scale", type=float, default=1.0, help="lr factor of FlowLayer parameters (fcf arm)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="dataset cache root (default $VMM_CACHE or ~/.cache/vmm)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    k = args.num_classes
    results = []
    for arm in args.arms:
        r = run_arm(arm, args)
        results.append(r)
        print(
            f"[probe] {arm:>5s}: test top-1 {100 * r['top1']:5.1f}%  (clip {100 * r['clip_top1']:5.1f}%, "
            f"{r['test_videos']} videos)  train {r['train_seconds']:.0f} s  {r['params_M']:.2f} M params  "
            f"order sensitivity at init {r['order_sensitivity_at_init']:.2e}",
            flush=True,
        )
    n_test = results[0]["test_videos"] if results else 0
    ceiling = ORDER_BLIND_CEILING
    noise = math.sqrt(ceiling * (1 - ceiling) / max(1, n_test))  # binomial s.d. of an accuracy at the ceiling
    print()
    print(f"motion probe: K = {k} classes, chance {100 / k:.1f}%, order-blind ceiling {100 * ceiling:.0f}% "
          f"(± {100 * noise:.1f}% s.d. on {n_test} test videos)")
    print(f"budget: {args.epochs} epochs x {k * args.train_per_class} clips of {args.frames} frames "
          f"(interval {args.interval}) at {args.crop}², per-frame 2D ResNet-{args.depth} x{args.width}, "
          f"{args.optimizer} lr {args.lr}")
    print("| arm | test top-1 | vs ceiling | train s |")
    print("| --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['arm']} | {100 * r['top1']:.1f}% | {r['top1'] / ceiling:.2f}x | {r['train_seconds']:.0f} |")
    out = {"num_classes": k, "ceiling": ceiling, "chance": 1 / k, "noise_sd": noise, "args": vars(args),
           "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
