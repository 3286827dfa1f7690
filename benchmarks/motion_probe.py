"""Motion probe: does a motion module let a per-frame 2D backbone see the order of frames?

On the synthetic motion dataset classes come in time-reversal pairs, so a network that pools
per-frame features over time without order is capped at 1/2 (it can tell the pair at best, never
the member; chance is 1/K). Three arms share one per-frame 2D ResNet backbone (temporal stem 1, no
temporal convolution, temporal average pooling), the data, the optimiser and the budget; only the
module differs:

    plain      SIFAResNet(K, stem_temporal_kernel=1, stem_temporal_stride=1, sifa=False,
                          global_context=False, dual_path=False)
    sifa       the same with sifa=True (SIFA in alternating blocks of layer2-4)
    sifa-corr  the same with correlation features (a residual branch from SIFA's correlation, docs/sifa.md §5)
    fcf        FCFR2Plus1D(K, temporal=False, fcf=True) (flow-conv-flow after layer2)

Each arm trains for --epochs on the training split and is tested once at the end (no model
selection) on the test split, views averaged per video. Before training, the script measures each
fresh net's order sensitivity, max |log p(x) - log p(x reversed in time)|: exactly 0 for the plain
arm (the premise of the probe), also 0 for SIFA at init (its residual branch starts at zero with
the zero-initialised last BN), small but non-zero for FCF and for SIFA's correlation branch (live at init).

Tasks (docs/synthetic_motion.md): `--task direction` (K classes in time-reversal pairs; K = 2 is
the sharpest form: chance = ceiling = 50%; for K > 2 the per-pair table splits each pair's
accuracy into "pair found" and "member right given the pair") and `--task coherence` (frames in
order vs the same frames permuted, K = 2; every order-blind model is at exactly 50%). Coherence
clips are written with exactly `--frames` frames and read at interval 1, so both classes show the
same frame set; `--interval` then scales the speed instead, keeping the motion per sampled frame
equal to the direction task's.

Pretrained features (`--pretrain-epochs N`): stage 1 trains the plain per-frame backbone on the
generator's appearance task (shape × texture family, motion independent of the label); stage 2
starts every arm from those weights (all but the classifier; modules the plain net lacks — SIFA,
FCF — start fresh), fine-tuned, or with `--freeze-backbone` only the modules and classifier train
(the copied weights fixed, BN statistics included).

    python benchmarks/motion_probe.py                      # defaults: ~10-30 min on a 2-core CPU
    python benchmarks/motion_probe.py --epochs 3 --train-per-class 16 --arms plain sifa
    python benchmarks/motion_probe.py --num-classes 2 --task coherence --arms plain fcf
    python benchmarks/motion_probe.py --num-classes 2 --pretrain-epochs 8 --freeze-backbone
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from datamodules import SyntheticMotionDataModule
from datamodules.synthetic import ORDER_BLIND_CEILING, class_names_for
from lightning_modules import VideoClassifier
from lightning_modules.networks import FCFR2Plus1D, SIFAResNet

ARMS = ("plain", "sifa", "sifa-corr", "fcf")
TASKS = ("direction", "coherence")
# The network switch of SIFA's correlation features (docs/sifa.md §5).
CORRELATION_SWITCH = "correlation_features"


def has_correlation_features() -> bool:
    """Whether the imported SIFAResNet has the correlation-features switch (the sifa-corr arm)."""
    return CORRELATION_SWITCH in inspect.signature(SIFAResNet).parameters


def build_net(arm: str, num_classes: int, args: argparse.Namespace) -> torch.nn.Module:
    common = {
        "depth": args.depth,
        "width_mult": args.width,
        "dropout": args.dropout,
        "zero_init_residual": not getattr(args, "no_zero_init_residual", False),
    }
    if arm in ("plain", "sifa", "sifa-corr"):
        as_released = arm != "plain" and getattr(args, "sifa_net", False)  # SIFA-Net's two other parts
        extra = {}
        if arm == "sifa-corr":
            if not has_correlation_features():
                raise ValueError(f"arm 'sifa-corr': SIFAResNet has no {CORRELATION_SWITCH} option in this version")
            extra[CORRELATION_SWITCH] = getattr(args, "correlation_features", True)
        return SIFAResNet(
            num_classes,
            stem_temporal_kernel=args.stem_temporal,
            stem_temporal_stride=args.stem_temporal,
            sifa=arm != "plain",
            global_context=as_released,
            dual_path=as_released,
            sifa_stages=tuple(args.sifa_stages),
            sifa_dilation=args.sifa_dilation,
            **extra,
            **common,
        )
    if arm == "fcf":
        return FCFR2Plus1D(
            num_classes,
            temporal=False,
            fcf=True,
            fcf_n_iter=args.fcf_n_iter,
            fcf_bottleneck=args.fcf_bottleneck,
            **common,
        )
    raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")


class TestCurve(pl.Callback):
    """Records test top-1 at the epochs the Trainer validates (the probe's validation loader is the test
    split when a curve is asked for): a learning curve without model selection."""

    def __init__(self, arm: str) -> None:
        self.arm, self.points = arm, []

    def on_validation_end(self, trainer, pl_module) -> None:
        res = pl_module.last_eval.get("val")
        if res is None or trainer.sanity_checking:
            return
        epoch, step = trainer.current_epoch + 1, trainer.global_step
        self.points.append({"epoch": epoch, "step": step, "top1": float(res["top1"])})
        print(
            f"  {self.arm:>5s} epoch {epoch:3d} (step {step}): test top-1 {100 * float(res['top1']):.1f}%", flush=True
        )


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


def make_datamodule(args: argparse.Namespace, task: str, num_classes: int) -> SyntheticMotionDataModule:
    """The probe's data: `task` in direction / coherence / appearance (coherence: every frame, interval 1)."""
    speed = (args.speed[0], args.speed[1])
    video_frames, interval = args.video_frames, args.interval
    if task == "coherence":  # the whole clip, so ordered and shuffled show the same frame set
        video_frames, interval = args.frames, 1
        speed = (speed[0] * args.interval, speed[1] * args.interval)
    return SyntheticMotionDataModule(
        root=args.cache,
        num_classes=num_classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        test_per_class=args.test_per_class,
        seed=args.data_seed,
        video_frames=video_frames,
        speed_range=speed,
        task=task,
        batch_size=args.batch_size,
        num_workers=args.workers,
        num_frames=args.frames,
        frame_interval=interval,
        crop_size=args.crop,
        test_clips=args.test_clips,
    )


def fit_and_test(
    net: torch.nn.Module,
    dm: SyntheticMotionDataModule,
    epochs: int,
    args: argparse.Namespace,
    name: str,
    flow_lr_scale: float = 1.0,
) -> dict:
    """Train `net` for `epochs` on dm's training split, test once; metrics, per-epoch losses and the
    video-level confusion matrix (rows = true class)."""
    model = VideoClassifier(
        net,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup,
        scheduler=getattr(args, "scheduler", "cosine"),
        min_lr=args.lr * 0.01,
        flow_lr_scale=flow_lr_scale,
    )
    epoch_loss = EpochLoss(name)
    curve = TestCurve(name)
    every = getattr(args, "curve_every", 0)
    if every:
        dm.val_dataloader = dm.test_dataloader  # the curve's points are test top-1; nothing is selected on them
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if every else 0,
        check_val_every_n_epoch=every or 1,
        callbacks=[epoch_loss, curve],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    train_s = time.perf_counter() - start
    trainer.test(model, datamodule=dm, verbose=False)
    res = model.last_eval["test"]
    return {
        "top1": res["top1"],
        "top5": res["top5"],
        "mean_class": res["mean_class"],
        "clip_top1": res["clip_top1"],
        "test_videos": res["num_videos"],
        "train_loss_last": epoch_loss.history[-1] if epoch_loss.history else float("nan"),
        "train_loss_per_epoch": epoch_loss.history,
        "curve": curve.points,
        "train_seconds": train_s,
        "final_lr": float(trainer.optimizers[0].param_groups[0]["lr"]),
        "confusion": res.confusion.long().tolist(),
    }


def pretrain_backbone(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], dict]:
    """Stage 1: the plain per-frame net trained on the appearance task; its state dict and test figures."""
    pl.seed_everything(args.seed, verbose=False)
    # Appearance is a per-frame property: stage 1 reads short clips (--pretrain-frames), more of them.
    stage1 = argparse.Namespace(
        **{
            **vars(args),
            "frames": args.pretrain_frames,
            "train_per_class": args.pretrain_per_class or args.train_per_class,
        }
    )
    dm = make_datamodule(stage1, "appearance", 4)
    dm.prepare_data()
    net = build_net("plain", 4, args)
    res = fit_and_test(net, dm, args.pretrain_epochs, stage1, "appear")
    print(
        f"[pretrain] appearance task (4 classes, chance 25%): test top-1 {100 * res['top1']:.1f}% after "
        f"{args.pretrain_epochs} epochs, {res['train_seconds']:.0f} s",
        flush=True,
    )
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return state, {k: v for k, v in res.items() if k != "confusion"}


def load_backbone(net: torch.nn.Module, state: dict[str, torch.Tensor], freeze: bool) -> int:
    """Copy every tensor of `state` whose name and shape `net` shares, except the classifier; with
    `freeze`, those parameters stop training and their BN statistics stop moving. Returns the count."""
    own = net.state_dict()
    copied = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and not k.startswith("fc")}
    net.load_state_dict(copied, strict=False)
    if freeze:
        for name, param in net.named_parameters():
            if name in copied:
                param.requires_grad_(False)
        for name, module in net.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and f"{name}.running_mean" in copied:
                module.momentum = 0.0  # batch statistics still normalise in training; the stored ones stay
    return len(copied)


def run_arm(arm: str, args: argparse.Namespace, pretrained: dict[str, torch.Tensor] | None = None) -> dict:
    pl.seed_everything(args.seed, verbose=False)
    dm = make_datamodule(args, args.task, args.num_classes)
    dm.prepare_data()
    net = build_net(arm, dm.num_classes, args)
    copied = load_backbone(net, pretrained, args.freeze_backbone) if pretrained is not None else 0
    probe_clip = torch.randn(2, 3, args.frames, args.crop, args.crop)
    sensitivity = order_sensitivity(net, probe_clip)
    res = fit_and_test(net, dm, args.epochs, args, arm, args.flow_lr_scale if arm == "fcf" else 1.0)
    return {
        "arm": arm,
        **res,
        "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
        "trainable_params_M": sum(p.numel() for p in net.parameters() if p.requires_grad) / 1e6,
        "pretrained_tensors": copied,
        "order_sensitivity_at_init": sensitivity,
        "per_pair": per_pair(res["confusion"]) if args.task == "direction" else [],
    }


def per_pair(confusion: list[list[int]]) -> list[dict]:
    """For each time-reversal pair (2i, 2i+1): its videos, top-1 on them, the fraction predicted inside
    the pair ("pair found", the order-blind part) and top-1 among those ("member", the order part,
    1/2 for an order-blind model)."""
    m = torch.tensor(confusion, dtype=torch.float64)
    out = []
    for i in range(0, m.shape[0] - 1, 2):
        rows = m[i : i + 2]
        n = float(rows.sum())
        in_pair = float(rows[:, i : i + 2].sum())
        correct = float(rows[0, i] + rows[1, i + 1])
        out.append(
            {
                "pair": (i, i + 1),
                "videos": int(n),
                "top1": correct / max(n, 1.0),
                "pair_found": in_pair / max(n, 1.0),
                "member_given_pair": correct / max(in_pair, 1.0),
                "pair_found_videos": int(in_pair),
            }
        )
    return out


def binomial_sd(p: float, n: int) -> float:
    """s.d. of an accuracy p measured on n independent videos, sqrt(p(1-p)/n)."""
    return math.sqrt(p * (1 - p) / max(1, n))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", nargs="+", default=["plain", "sifa", "fcf"], choices=ARMS)
    p.add_argument(
        "--task",
        default="direction",
        choices=TASKS,
        help="direction (time-reversal pairs) or coherence (ordered vs shuffled frames, K = 2)",
    )
    p.add_argument("--epochs", type=int, default=12, help="training budget, the same for every arm")
    p.add_argument(
        "--curve-every",
        type=int,
        default=0,
        help="also test every N epochs during training (a learning curve, no model selection; 0: only at the end)",
    )
    p.add_argument("--num-classes", type=int, default=8)
    p.add_argument("--train-per-class", type=int, default=40)
    p.add_argument("--val-per-class", type=int, default=2)
    p.add_argument("--test-per-class", type=int, default=16)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--interval", type=int, default=2, help="frame interval (doubles the motion per frame)")
    p.add_argument(
        "--speed",
        type=float,
        nargs=2,
        default=[2.0, 6.0],
        metavar=("MIN", "MAX"),
        help="object speed range, pixels per stored frame at the 80-px stored size",
    )
    p.add_argument("--video-frames", type=int, default=20, help="stored frames per video (direction task)")
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
        "--no-zero-init-residual",
        action="store_true",
        help="start the last BN of every residual branch at 1, not 0 (SIFA's branch then acts from step 0)",
    )
    p.add_argument(
        "--stem-temporal",
        type=int,
        default=1,
        help="temporal kernel = stride of the plain/SIFA arms' stem; 1 is the probe, 2+ a control that lets the "
        "stem itself see frame order",
    )
    p.add_argument(
        "--sifa-net",
        action="store_true",
        help="the SIFA arms as released (global context and dual path on); with --stem-temporal 4 this is "
        "SIFA-Net, and the plain arm C2D with the same stem",
    )
    p.add_argument(
        "--pretrain-epochs",
        type=int,
        default=0,
        help="stage 1: train the plain backbone on the appearance task first (0: no pretraining)",
    )
    p.add_argument("--pretrain-frames", type=int, default=2, help="frames per stage-1 clip (appearance is per frame)")
    p.add_argument(
        "--pretrain-per-class",
        type=int,
        default=None,
        help="stage-1 training clips per appearance class (default: --train-per-class)",
    )
    p.add_argument(
        "--pretrained-file",
        default=None,
        help="reuse stage 1 from this file when it exists, else write it there (same settings only)",
    )
    p.add_argument(
        "--freeze-backbone",
        action="store_true",
        help="stage 2 trains only what the pretrained backbone lacks (modules, classifier)",
    )
    p.add_argument("--optimizer", default="adamw", choices=("sgd", "adamw"))
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up epochs")
    p.add_argument(
        "--scheduler",
        default="cosine",
        choices=("cosine", "constant"),
        help="after the warm-up: cosine to lr/100, or the peak lr throughout",
    )
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
    if args.task == "coherence" and args.num_classes != 2:
        p.error(f"--num-classes: the coherence task has 2 classes, got {args.num_classes}")
    if args.freeze_backbone and not args.pretrain_epochs:
        p.error("--freeze-backbone needs --pretrain-epochs > 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    k = args.num_classes
    pretrained, pretrain_res = None, None
    if args.pretrain_epochs:
        saved = Path(args.pretrained_file) if args.pretrained_file else None
        if saved is not None and saved.is_file():  # stage 1 of an earlier run with the same settings
            blob = torch.load(saved, map_location="cpu", weights_only=True)
            pretrained, pretrain_res = blob["state"], blob["result"]
            print(f"[pretrain] loaded {saved}: appearance test top-1 {100 * pretrain_res['top1']:.1f}%", flush=True)
        else:
            pretrained, pretrain_res = pretrain_backbone(args)
            if saved is not None:
                torch.save({"state": pretrained, "result": pretrain_res}, saved)
    results = []
    for arm in args.arms:
        r = run_arm(arm, args, pretrained)
        results.append(r)
        print(
            f"[probe] {arm:>9s}: test top-1 {100 * r['top1']:5.1f}% "
            f"± {100 * binomial_sd(r['top1'], r['test_videos']):.1f}"
            f" (clip {100 * r['clip_top1']:5.1f}%, {r['test_videos']} videos)  train {r['train_seconds']:.0f} s  "
            f"{r['params_M']:.2f} M params  order sensitivity at init {r['order_sensitivity_at_init']:.2e}",
            flush=True,
        )
    n_test = results[0]["test_videos"] if results else 0
    ceiling = ORDER_BLIND_CEILING  # 1/2 for both tasks (coherence: chance = ceiling)
    noise = binomial_sd(ceiling, n_test)  # s.d. of an accuracy at the ceiling: the yardstick of "above it"
    print()
    print(
        f"motion probe, {args.task} task: K = {k} classes, chance {100 / k:.1f}%, order-blind ceiling "
        f"{100 * ceiling:.0f}% (± {100 * noise:.1f}% s.d. at the ceiling on {n_test} test videos)"
    )
    speed = args.speed if args.task == "direction" else [v * args.interval for v in args.speed]
    interval = args.interval if args.task == "direction" else 1
    pre = ""
    if args.pretrain_epochs:
        pre = (
            f"; backbone pretrained {args.pretrain_epochs} epochs on appearance "
            f"({100 * pretrain_res['top1']:.1f}%), {'frozen' if args.freeze_backbone else 'fine-tuned'}"
        )
    print(
        f"budget: {args.epochs} epochs x {k * args.train_per_class} clips of {args.frames} frames "
        f"(interval {interval}, speed {speed[0]:g}-{speed[1]:g} px/stored frame) at {args.crop}², per-frame 2D "
        f"ResNet-{args.depth} x{args.width} (temporal stem {args.stem_temporal}"
        f"{', SIFA arms with global context and dual path' if args.sifa_net else ''}), {args.optimizer} lr {args.lr} "
        f"{args.scheduler}, batch {args.batch_size}{pre}"
    )
    print(
        "| arm | test top-1 | ± s.d. | chance | ceiling | (top-1 − ceiling) / s.d. at ceiling | last train loss "
        "| train s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['arm']} | {100 * r['top1']:.1f}% | {100 * binomial_sd(r['top1'], r['test_videos']):.1f} | "
            f"{100 / k:.1f}% | {100 * ceiling:.0f}% | {(r['top1'] - ceiling) / noise:+.1f} | "
            f"{r['train_loss_last']:.3f} | {r['train_seconds']:.0f} |"
        )
    if args.task == "direction" and k > 2:
        print()
        print(
            "per pair: top-1 on the pair's videos / pair found (order-blind part) / member right given the pair "
            "(order part; 50% for an order-blind model)"
        )
        names = class_names_for(k)
        print("| arm | " + " | ".join(f"{names[i]} / {names[i + 1]}" for i in range(0, k, 2)) + " |")
        print("| --- |" + " --- |" * (k // 2))
        for r in results:
            cells = [
                f"{100 * q['top1']:.0f} / {100 * q['pair_found']:.0f} / {100 * q['member_given_pair']:.0f}%"
                for q in r["per_pair"]
            ]
            print(f"| {r['arm']} | " + " | ".join(cells) + " |")
    out = {
        "task": args.task,
        "num_classes": k,
        "ceiling": ceiling,
        "chance": 1 / k,
        "noise_sd": noise,
        "args": vars(args),
        "pretrain": pretrain_res,
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
