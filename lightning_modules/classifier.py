"""`VideoClassifier`: the one LightningModule, wrapping any network with `forward_heads`.

Data arrive as uint8 clips (`datamodules` batches); normalisation happens here, on the device, in
every step, so loader workers never build float32 clips. Validation and test aggregate every view of a video
(mean of softmax) after gathering the clips of all ranks, and drop the duplicate clips that a
distributed sampler pads with, so metrics do not depend on the number of processes; the
arithmetic lives in `lightning_modules.evaluation`. The module computes and logs results (kept in
`last_eval`); files are written by Callbacks (`lightning_modules.reports`). It never imports the
ops: the network names its own parameter groups (`lightning_modules.networks.parameter_groups`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import PurePath
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import ClipAugment, mix_clips
from .evaluation import EvalAccumulator, EvalResult, average_views

__all__ = ["VideoClassifier", "EvalResult"]

# Kinetics RGB statistics on [0, 1] pixels (as in SlowFast/PyTorchVideo); any dataset works with them.
KINETICS_MEAN = (0.45, 0.45, 0.45)
KINETICS_STD = (0.225, 0.225, 0.225)
# Checkpoint key recording the 2D weight file a network was inflated from (its hyperparameters
# say pretrained=None: the checkpoint's weights already hold the inflation).
PRETRAINED_FROM_KEY = "vmm_pretrained_from"


class VideoClassifier(pl.LightningModule):
    """Video action classifier around a network with `forward_heads(x) -> list[logits]`.

    Args:
        net: network taking normalised float clips [N, 3, T, H, W]; `forward_heads` returns one
            logits tensor [N, num_classes] per head, `forward` returns log(mean softmax over heads).
        num_classes: number of classes; defaults to `net.num_classes`. The CLI links it (and the
            network's) to the datamodule's `num_classes`.
        class_names: names indexed by class id, stored in checkpoints so `vmm predict` can name
            classes; taken from the datamodule at setup when not given.
        optimizer: "sgd" (momentum, optional Nesterov) or "adamw".
        lr: peak learning rate (after warm-up) for a global batch of `base_batch_size` clips.
        base_batch_size: the global batch (clips per optimizer step) `lr` and `min_lr` were tuned
            for. At fit start both are scaled linearly to the actual global batch, devices ×
            num_nodes × the datamodule's `batch_size` × accumulate_grad_batches, so a recipe runs
            unchanged on any number of GPUs; `lr_base` and `lr_peak` (scaled) are logged. None: no
            scaling (`lr` is used as given).
        weight_decay: L2 (SGD) / decoupled (AdamW) weight decay.
        decay_norm_and_bias: also decay 0-/1-d parameters (BN/GN scales and shifts, biases, FlowLayer
            scalars); off by default.
        flow_lr_scale: learning-rate factor for the network's "flow" parameter group, its
            Representation Flow layers (`lightning_modules.networks.parameter_groups`; the recipe
            of docs/repflow.md §2 trains them at 0.01× lr). No effect on networks without one.
        scheduler: "cosine" (linear warm-up, then cosine to `min_lr`, stepped every optimizer step)
            or "constant" (warm-up, then constant).
        warmup_epochs: warm-up length in epochs (fractions allowed), linear from lr/steps to lr.
        min_lr: final learning rate of the cosine schedule (scaled like `lr` for flow parameters).
        label_smoothing: cross-entropy label smoothing, applied to every head.
        mean, std: per-channel normalisation of [0, 1] pixels, applied on the device.
        top_k: number of classes returned by `predict_step` (and the "top5" metrics' k, capped at
            num_classes).
        color_jitter, color_jitter_p, grayscale_p, blur_p, rand_augment: per-clip augmentation on the
            device in training only (uint8 clips, before normalisation); see
            `lightning_modules.augment.ClipAugment`. `rand_augment` is (n, m) with m on the released
            SIFA 0–30 scale (m / 30 of each operation's maximum). All off by default.
        mixup_alpha, cutmix_alpha: Beta parameters of mixup / CutMix between the clips of a training
            batch (0 = off); `mix_prob`: probability that a clip is mixed; `mix_switch_prob`: CutMix
            instead of mixup when both are on. Targets become class probabilities (every head's
            loss uses them); `train/top1` is then measured against each clip's dominant class.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        decay_norm_and_bias: bool = False,
        flow_lr_scale: float = 1.0,
        scheduler: Literal["cosine", "constant"] = "cosine",
        warmup_epochs: float = 0.0,
        min_lr: float = 0.0,
        label_smoothing: float = 0.0,
        mean: Sequence[float] = KINETICS_MEAN,
        std: Sequence[float] = KINETICS_STD,
        top_k: int = 5,
        base_batch_size: int | None = None,
        color_jitter: tuple[float, float, float, float] | None = None,
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.0,
        blur_p: float = 0.0,
        rand_augment: tuple[int, int] | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        mix_switch_prob: float = 0.5,
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():
            # Built by the CLI, `net` is saved as its class_path config (so load_from_checkpoint can
            # rebuild it); built in Python it is a module, which checkpoints already hold.
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            self.save_hyperparameters()
        if isinstance(self.hparams.get("net"), nn.Module):
            del self.hparams["net"]
        self.num_classes = _checked_num_classes(net, num_classes, class_names)
        _check_optimisation(optimizer, scheduler, lr, min_lr, warmup_epochs, flow_lr_scale, base_batch_size)
        _check_input_and_mixing(mean, std, top_k, mixup_alpha, cutmix_alpha, mix_prob, mix_switch_prob)
        self.net = net
        self.class_names: list[str] | None = list(class_names) if class_names is not None else None
        # Buffers, so they follow the module to its device; not persistent (they are hyperparameters).
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1, 1), False)
        augment = ClipAugment(
            color_jitter=color_jitter,
            color_jitter_p=color_jitter_p,
            grayscale_p=grayscale_p,
            blur_p=blur_p,
            rand_augment=rand_augment,
        )
        # No parameters or buffers: checkpoints are the same with or without augmentation.
        self.clip_augment: ClipAugment | None = augment if augment.enabled else None
        self.mixing = mixup_alpha > 0 or cutmix_alpha > 0
        self._init_run_state()

    def _init_run_state(self) -> None:
        """State that a run fills in (evaluation results, lr scaling); none is a hyperparameter."""
        self._eval: EvalAccumulator | None = None
        self.last_eval: dict[str, EvalResult] = {}
        # Set when a checkpoint's classes are the datamodule's in another order: output column j
        # is network class _class_order[j] (see on_load_checkpoint).
        self._class_order: Tensor | None = None
        self._net_class_names: list[str] | None = None
        self.lr_scale = 1.0  # set at fit start from base_batch_size and the actual global batch
        self._peak_lrs: list[float] = []
        self._augment_seed = 0

    # ---------------------------------------------------------------- data on the device

    def forward(self, x: Tensor) -> Tensor:
        """Normalised float clips [N, 3, T, H, W] -> log(mean softmax over heads) [N, num_classes]."""
        return self._to_data_order(self.net(x))

    def _to_data_order(self, scores: Tensor) -> Tensor:
        """Per-class scores [N, num_classes] in the network's class order -> the datamodule's order
        (identity unless a checkpoint's classes came in another order; see `on_load_checkpoint`)."""
        if self._class_order is None:
            return scores
        return scores.index_select(1, self._class_order.to(scores.device))

    def normalize(self, video: Tensor) -> Tensor:
        """uint8 clips [N, 3, T, H, W] (RGB, 0..255) -> (x/255 - mean)/std, same device, computed in float32
        and returned in the module's floating dtype (float32; bf16/fp16 under `precision="*-true"`)."""
        if not isinstance(video, Tensor) or video.dtype != torch.uint8:
            raise TypeError(
                f"batch['video'] must be a uint8 tensor [N,3,T,H,W], got "
                f"{getattr(video, 'dtype', type(video))} of shape {tuple(getattr(video, 'shape', ()))}"
            )
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"batch['video'] must have shape [N,3,T,H,W], got {tuple(video.shape)}")
        x = video.to(torch.float32).div_(255.0)
        # The buffers follow the module's conversion ("bf16-true" casts them with the weights).
        return x.sub_(self.pixel_mean).div_(self.pixel_std).to(self.pixel_mean.dtype)

    def _video(self, batch: dict[str, Tensor]) -> Tensor:
        # Normalised inside the steps rather than in `on_after_batch_transfer`: Lightning skips the
        # module's hook when the datamodule defines one, and a skipped normalisation would go unnoticed.
        return self.normalize(batch["video"])

    # ---------------------------------------------------------------- training

    def _heads(self, x: Tensor) -> list[Tensor]:
        heads = self.net.forward_heads(x)
        if isinstance(heads, Tensor):
            heads = [heads]
        return [self._to_data_order(h) for h in heads]

    def _loss(self, heads: list[Tensor], label: Tensor) -> Tensor:
        """Sum over heads of cross-entropy (SIFA trains its two heads this way)."""
        ls = self.hparams.label_smoothing
        return sum(F.cross_entropy(h.float(), label, label_smoothing=ls) for h in heads)

    @staticmethod
    def _probs(heads: list[Tensor]) -> Tensor:
        return torch.stack([h.float().softmax(-1) for h in heads]).mean(0)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        y = batch["label"]
        x, target = self.augment(batch["video"], y, batch_idx)
        heads = self._heads(x)
        loss = self._loss(heads, target)
        with torch.no_grad():
            # Mixed clips count as their dominant class.
            hard = target.argmax(1) if target.dim() == 2 else target
            acc = (self._probs(heads).argmax(1) == hard).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        self.log("train/top1", acc, prog_bar=True, batch_size=len(y))
        # Host values are logged as CPU tensors: Lightning turns a Python float into a tensor on the module's
        # device, a blocking host-to-device copy (a stream synchronisation) every step on a GPU.
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("lr", torch.tensor(float(lr)), batch_size=len(y))
        self.log("lr_base", torch.tensor(float(self.hparams.lr)), batch_size=len(y))
        self.log("lr_peak", torch.tensor(float(self.hparams.lr * self.lr_scale)), batch_size=len(y))
        return loss

    def augment(self, video: Tensor, label: Tensor, batch_idx: int = 0) -> tuple[Tensor, Tensor]:
        """Training input: uint8 clips [N,3,T,H,W] and ids [N] -> normalised float clips, targets.

        Per-clip augmentation (uint8, before normalisation), normalisation, then mixup / CutMix
        (targets: ids [N] unmixed, class probabilities [N, num_classes] when mixing is on). The
        random draws are seeded per (seed, rank, epoch, batch): reproducible, resumable, and
        different on every rank; the global RNG state is left as it was.
        """
        if self.clip_augment is None and not self.mixing:
            return self.normalize(video), label
        hp = self.hparams
        rank = self.global_rank if self._trainer is not None else 0
        epoch = self.current_epoch if self._trainer is not None else 0
        seed = self._augment_seed
        for part in (rank, epoch, batch_idx):
            seed = (seed * 1_000_003 + part) % (2**63)
        # Our draws are on the CPU, kornia's on the module's device (its generators follow `.to()`), and
        # torch.manual_seed seeds CUDA too: fork the CPU and the clips' CUDA generator, so both come back.
        cuda = (
            [video.device.index if video.device.index is not None else torch.cuda.current_device()]
            if video.is_cuda
            else []
        )
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            if self.clip_augment is not None:
                video = self.clip_augment(video)
            x = self.normalize(video)
            if not self.mixing:
                return x, label
            return mix_clips(
                x, label, self.num_classes, hp.mixup_alpha, hp.cutmix_alpha, hp.mix_prob, hp.mix_switch_prob
            )

    def on_fit_start(self) -> None:
        # torch's seed (seed_everything's) at fit start: augmentation seeds derive from it.
        self._augment_seed = torch.initial_seed()
        if self.hparams.base_batch_size is not None:
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(
                f"[vmm] lr {self.hparams.lr:g} for a global batch of {self.hparams.base_batch_size} -> "
                f"{self.hparams.lr * self.lr_scale:g} for {self._global_batch_size()} "
                f"(x{self.lr_scale:g}, linear scaling)"
            )

    def on_train_start(self) -> None:
        # A resumed run restored the schedule of its checkpoint, whose peak lr may have been scaled
        # for another global batch: re-apply this run's scaled peaks.
        if self.hparams.base_batch_size is None or not self._peak_lrs:
            return
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            if isinstance(sched, torch.optim.lr_scheduler.LambdaLR) and len(sched.base_lrs) == len(self._peak_lrs):
                sched.base_lrs = list(self._peak_lrs)
                for group, peak, fn in zip(sched.optimizer.param_groups, self._peak_lrs, sched.lr_lambdas, strict=True):
                    group["initial_lr"] = peak
                    group["lr"] = peak * fn(sched.last_epoch)

    # ---------------------------------------------------------------- validation / test

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.class_names is None and dm is not None and getattr(dm, "class_names", None) is not None:
            if len(dm.class_names) == self.num_classes:
                self.class_names = list(dm.class_names)

    def _eval_step(self, batch: dict[str, Tensor]) -> None:
        assert self._eval is not None
        if "bad_video_ids" in batch:
            self._eval.add_bad(batch["bad_video_ids"])
        y = batch["label"]
        if len(y) == 0:  # every video of the batch failed to decode
            return
        heads = self._heads(self._video(batch))
        losses = sum(
            F.cross_entropy(h.float(), y, reduction="none", label_smoothing=self.hparams.label_smoothing) for h in heads
        )
        self._eval.add(batch["video_id"], batch["view"], y, self._probs(heads), losses)

    def _eval_epoch_end(self, stage: str) -> EvalResult:
        assert self._eval is not None
        res = self._eval.compute(self.num_classes, self.hparams.top_k)
        self._eval = None
        self.last_eval[stage] = res
        for name, value in res.items():
            # Values are already global (gathered above), so no sync_dist reduction.
            self.log(f"{stage}/{name}", float(value), sync_dist=False)
        return res

    def on_validation_epoch_start(self) -> None:
        self._eval = EvalAccumulator()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval = EvalAccumulator()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def on_test_end(self) -> None:
        # After the callbacks' on_test_end, so `reports.TestReportWriter` has written the report
        # (metrics null) before the run fails. Every rank holds the gathered result: all raise, none hangs.
        res = self.last_eval.get("test")
        if res is not None and res["num_videos"] == 0:
            raise RuntimeError(
                f"test: no test video could be used ({res['excluded_videos']} failed to decode); the metrics "
                "are undefined (null in test_results.json). Run `vmm check-data` to list the failures"
            )
        self._refuse_nonfinite("test", "test_results.json")

    def on_validation_end(self) -> None:
        # A stand-alone validation fails like a test; inside fit, the epoch's metrics are nan.
        if self._trainer is not None and self.trainer.state.fn == "validate":
            self._refuse_nonfinite("val", "the logged metrics")

    def _refuse_nonfinite(self, stage: str, where: str) -> None:
        res = self.last_eval.get(stage)
        if res is not None and res["nonfinite_videos"]:
            raise RuntimeError(
                f"{stage}: {res['nonfinite_videos']} of {res['num_videos']} videos had non-finite scores (NaN/Inf); "
                f"no metrics (null/nan in {where}). Check the checkpoint's weights for NaN/Inf, or use precision 32 "
                "if half precision overflowed"
            )

    # ---------------------------------------------------------------- prediction

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Per video of the batch (its views averaged): top-k class ids, names and probabilities.

        Returns a dict with `video_id` [V], `num_views` [V], `probs` [V, num_classes] (mean softmax
        over the batch's views), `topk_ids` [V, k], `topk_probs` [V, k], `topk_names` (V lists of k
        names) and `bad_video_ids` [M]. A video whose views span batches appears in each; the
        `PredictionWriter` merges them (weighted by `num_views`).
        """
        vid = batch["video_id"]
        bad = batch.get("bad_video_ids", vid.new_zeros(0)).cpu()
        if len(vid) == 0:
            clip_probs = torch.zeros(0, self.num_classes)
        else:
            clip_probs = self._probs(self._heads(self._video(batch))).cpu()
        uvid, probs, count = average_views(vid.cpu(), clip_probs)
        return {"video_id": uvid, "num_views": count, "probs": probs, "bad_video_ids": bad, **self.topk(probs)}

    def topk(self, probs: Tensor) -> dict[str, Any]:
        """probs [V, num_classes] -> `topk_ids` [V, k], `topk_probs` [V, k], `topk_names` (lists)."""
        k = min(self.hparams.top_k, self.num_classes)
        p, i = probs.topk(k, dim=1)
        names = self.class_names or [str(c) for c in range(self.num_classes)]
        return {"topk_ids": i, "topk_probs": p, "topk_names": [[names[c] for c in row] for row in i.tolist()]}

    # ---------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The class names in the order of the network's outputs (the weights being saved).
        checkpoint["class_names"] = self._net_class_names if self._class_order is not None else self.class_names
        checkpoint["num_classes"] = self.num_classes
        # Plain data only, so the checkpoint loads with torch.load(weights_only=True).
        if "hyper_parameters" in checkpoint:
            hp = checkpoint["hyper_parameters"] = _plain_data(checkpoint["hyper_parameters"])
            # The 2D weights were inflated into the saved weights: rebuilding the network from this
            # checkpoint must not need that file again (it is kept, for the record, under its own key).
            init = hp["net"].get("init_args") if isinstance(hp.get("net"), dict) else None
            if isinstance(init, dict) and init.get("pretrained") is not None:
                checkpoint[PRETRAINED_FROM_KEY] = init["pretrained"]
                init["pretrained"] = None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Take the checkpoint's class names, checked against the datamodule's.

        Same names in another order: evaluation and prediction reorder the network's outputs to
        the datamodule's order (a warning says so); resuming `fit` is refused. A different set of
        names is an error. Both messages list both orders.
        """
        self._class_order, self._net_class_names = None, None
        ckpt_names = checkpoint.get("class_names")
        if ckpt_names is None:
            return
        ckpt_names = list(ckpt_names)
        self.class_names = ckpt_names
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        dm_names = getattr(dm, "class_names", None)
        if dm_names is None or list(dm_names) == ckpt_names:
            return
        dm_names = list(dm_names)
        both = f"checkpoint: {ckpt_names}; datamodule: {dm_names}"
        if sorted(dm_names) != sorted(ckpt_names) or len(set(ckpt_names)) != len(ckpt_names):
            raise ValueError(f"the checkpoint's classes are not the datamodule's ({both})")
        if self.trainer.state.fn == "fit":
            raise ValueError(
                f"cannot resume training: the datamodule lists the checkpoint's classes in another order, so "
                f"its labels would mean other classes ({both})"
            )
        self._class_order = torch.tensor([ckpt_names.index(n) for n in dm_names], dtype=torch.int64)
        self._net_class_names, self.class_names = ckpt_names, dm_names
        warnings.warn(
            f"the datamodule lists the checkpoint's classes in another order; outputs are reordered to the "
            f"datamodule's ({both})",
            UserWarning,
            stacklevel=2,
        )

    # ---------------------------------------------------------------- optimisation

    def param_groups(self, lr: float | None = None) -> list[dict[str, Any]]:
        """Parameter groups: (flow-layer or not) × (decayed or not), each with its own lr.

        `lr`: the peak lr of the non-flow groups (default: the `lr` hyperparameter, unscaled).
        """
        hp = self.hparams
        base_lr = hp.lr if lr is None else lr
        flow_ids: set[int] = set()
        if hp.flow_lr_scale != 1.0:
            from .networks import FLOW_GROUP, parameter_groups  # the network names its flow parameters

            flow_ids = {id(p) for p in parameter_groups(self.net).get(FLOW_GROUP, [])}
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for p in self.net.parameters():
            if not p.requires_grad:
                continue
            decay = hp.decay_norm_and_bias or p.ndim > 1
            groups.setdefault((id(p) in flow_ids, decay), []).append(p)
        out = []
        for (is_flow, decay), params in sorted(groups.items()):
            group_lr = base_lr * (hp.flow_lr_scale if is_flow else 1.0)
            out.append({"params": params, "lr": group_lr, "weight_decay": hp.weight_decay if decay else 0.0})
        return out

    def _global_batch_size(self) -> int:
        """Clips per optimizer step over all processes: world size × batch × accumulation."""
        trainer = self.trainer
        batch = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        if batch is None:
            loader = trainer.train_dataloader
            batch = getattr(loader, "batch_size", None)
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(
                "base_batch_size needs the per-device batch size: give the datamodule a `batch_size` "
                f"attribute or the train DataLoader a batch_size (found {batch!r}), or set base_batch_size=None"
            )
        return trainer.world_size * batch * trainer.accumulate_grad_batches

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        total = self.trainer.estimated_stepping_batches  # loads the train dataloader when needed
        if hp.base_batch_size is not None:
            self.lr_scale = self._global_batch_size() / hp.base_batch_size
        peak = hp.lr * self.lr_scale
        groups = self.param_groups(peak)
        self._peak_lrs = [g["lr"] for g in groups]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=peak, momentum=hp.momentum, nesterov=hp.nesterov)
        else:
            opt = torch.optim.AdamW(groups, lr=peak)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs > 0 and math.isfinite(total):
            per_epoch = max(1.0, total / max_epochs)
        else:
            per_epoch = max(1.0, self.trainer.num_training_batches / self.trainer.accumulate_grad_batches)
        if hp.scheduler == "cosine" and not math.isfinite(total):
            raise ValueError("scheduler='cosine' needs a finite trainer.max_epochs or trainer.max_steps")
        fn = _warmup_cosine(
            warmup_steps=int(round(hp.warmup_epochs * per_epoch)),
            total_steps=int(total) if math.isfinite(total) else 0,
            min_ratio=hp.min_lr / hp.lr,
            cosine=hp.scheduler == "cosine",
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


def _checked_num_classes(net: nn.Module, num_classes: int | None, class_names: Sequence[str] | None) -> int:
    """`num_classes` (default `net.num_classes`), checked against the network and `class_names`."""
    if not isinstance(net, nn.Module) or not callable(getattr(net, "forward_heads", None)):
        raise TypeError(f"net must be an nn.Module with forward_heads(x) -> list[logits], got {type(net)}")
    if num_classes is None:
        num_classes = getattr(net, "num_classes", None)
        if num_classes is None:
            raise ValueError("num_classes must be given when net has no num_classes attribute")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names must have num_classes={num_classes} entries, got {len(class_names)}")
    return int(num_classes)


def _check_optimisation(
    optimizer: str,
    scheduler: str,
    lr: float,
    min_lr: float,
    warmup_epochs: float,
    flow_lr_scale: float,
    base_batch_size: int | None,
) -> None:
    """Raise ValueError naming the first optimiser / schedule argument out of range."""
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    if scheduler not in ("cosine", "constant"):
        raise ValueError(f"scheduler must be 'cosine' or 'constant', got {scheduler!r}")
    if lr <= 0 or min_lr < 0 or min_lr > lr:
        raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={lr}, min_lr={min_lr}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if flow_lr_scale <= 0:
        raise ValueError(f"flow_lr_scale must be > 0, got {flow_lr_scale}")
    if base_batch_size is not None and base_batch_size < 1:
        raise ValueError(f"base_batch_size must be >= 1 or None (no lr scaling), got {base_batch_size}")


def _check_input_and_mixing(
    mean: Sequence[float],
    std: Sequence[float],
    top_k: int,
    mixup_alpha: float,
    cutmix_alpha: float,
    mix_prob: float,
    mix_switch_prob: float,
) -> None:
    """Raise ValueError naming the first normalisation / top-k / mixing argument out of range."""
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std must have 3 entries (RGB) with std > 0, got mean={mean}, std={std}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
    if not (0 <= mix_prob <= 1 and 0 <= mix_switch_prob <= 1):
        raise ValueError(f"mix_prob and mix_switch_prob must be in [0, 1], got {mix_prob}, {mix_switch_prob}")


def _plain_data(obj: Any) -> Any:
    """`obj` with namespaces turned into dicts and paths into strings (recursively), so a checkpoint
    holding it needs no Python class to load; anything else that is not plain data becomes str."""
    if obj is None or isinstance(obj, (bool, int, float, str, Tensor)):
        return obj
    if isinstance(obj, dict):
        return {k: _plain_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain_data(v) for v in obj) if type(obj) in (list, tuple) else [_plain_data(v) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    as_dict = getattr(obj, "as_dict", None)  # jsonargparse.Namespace
    if callable(as_dict):
        return _plain_data(as_dict())
    if hasattr(obj, "__dict__") and type(obj).__name__ == "Namespace":  # argparse.Namespace
        return _plain_data(vars(obj))
    return str(obj)


def _warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float, cosine: bool) -> Callable[[int], float]:
    """lr factor at optimizer step s: linear (s+1)/warmup, then cosine from 1 to min_ratio at total."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if not cosine:
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
