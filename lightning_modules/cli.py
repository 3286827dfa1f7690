"""The `vmm` console script: LightningCLI subcommands plus file prediction and the data check.

    vmm fit|validate|test|predict --config configs/<net>_<dataset>.yaml [--key value ...]
    vmm demo --config configs/demo_sifa_synthetic.yaml     fit, then test the best checkpoint
    vmm predict --ckpt_path best.ckpt clip1.mp4 [clip2.avi ...]   (no dataset or config needed)
    vmm check-data --config configs/<net>_<dataset>.yaml    decode every video once, list failures

The model is always `VideoClassifier`; the network (`--model.net`) and the datamodule (`--data`)
are given by `class_path`. `data.num_classes` is linked to the classifier's and the network's
`num_classes`, and `data.class_names` to the classifier's, so checkpoints carry the class names.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.model_helpers import is_overridden

from .classifier import VideoClassifier, _gather_objects

__all__ = ["VMMCLI", "VMMTrainer", "PredictionWriter", "main", "predict_files"]

DATA_CONFIG_KEY = "vmm_data_config"
PREDICT_SETTINGS_KEY = "vmm_test_settings"


class VMMTrainer(Trainer):
    """`lightning.Trainer` with `demo`: fit, then test the best checkpoint, then print a summary."""

    def demo(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
    ) -> dict[str, Any]:
        """Train, then test the best checkpoint; print the test accuracy and the checkpoint path.

        Args:
            model: the model to train.
            datamodule: the data (its train/val/test splits).
            ckpt_path: resume training from this checkpoint.
        """
        self.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        ckpt_cb = self.checkpoint_callback
        best = getattr(ckpt_cb, "best_model_path", "") or getattr(ckpt_cb, "last_model_path", "") or None
        self.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
        res = dict(getattr(model, "last_eval", {}).get("test", {}))
        log_dir = self.log_dir  # a collective under DDP: every rank must ask
        if self.is_global_zero:
            k = getattr(model, "num_classes", None)
            lines = ["", "=" * 72, "vmm demo finished"]
            if res:
                lines.append(
                    f"  test accuracy (video level): top-1 {100 * res['top1']:.1f}%  top-5 {100 * res['top5']:.1f}%"
                    f"  mean-class {100 * res['mean_class']:.1f}%  on {res['num_videos']} videos"
                )
            if k:
                from datamodules.synthetic import ORDER_BLIND_CEILING  # the data stack only when asked for

                lines.append(
                    f"  K = {k} classes: chance {100 / k:.1f}%; on the synthetic motion set a model blind to"
                    f" frame order is capped at {100 * ORDER_BLIND_CEILING:.0f}% (the pair, never the member)"
                )
            lines.append(f"  checkpoint: {Path(best).resolve() if best else None}")
            if log_dir:
                lines.append(f"  logs: {log_dir} (metrics.csv, test_results.json, confusion_matrix_test.png)")
            lines.append("=" * 72)
            print("\n".join(lines), flush=True)
        return res


class _StoreDataConfig(Callback):
    """Puts the datamodule's config (class_path + init_args) and its test-view settings into every
    checkpoint, so `vmm predict <files>` decodes new videos the way the model was tested."""

    def __init__(self, data_config: dict[str, Any] | None) -> None:
        self.data_config = data_config

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.data_config is not None:
            checkpoint[DATA_CONFIG_KEY] = self.data_config
        settings = getattr(trainer.datamodule, "test_settings", None)
        if isinstance(settings, dict):
            checkpoint[PREDICT_SETTINGS_KEY] = dict(settings)


class PredictionWriter(BasePredictionWriter):
    """Merges `VideoClassifier.predict_step` outputs per video (across batches and ranks), prints
    the top-k classes of every video and writes them as JSON.

    Args:
        output: JSON file to write; default `<trainer.log_dir>/predictions.json`.
        video_names: names (e.g. file paths) indexed by video id, shown instead of the ids.
    """

    def __init__(self, output: str | None = None, video_names: Sequence[str] | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = output
        self.video_names = list(video_names) if video_names is not None else None
        self.results: list[dict[str, Any]] = []

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        flat: list[dict[str, Any]] = []
        for p in predictions:  # one list per dataloader, or one list of batch outputs
            flat.extend(p if isinstance(p, list) else [p])
        parts = [(o["video_id"], o["num_views"], o["probs"], o["bad_video_ids"]) for o in flat]
        parts = [x for rank_parts in _gather_objects(parts) for x in rank_parts]
        if not trainer.is_global_zero:
            return
        num_classes = pl_module.num_classes
        vids = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
        counts = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
        probs = torch.cat([p[2] for p in parts]) if parts else torch.zeros(0, num_classes)
        bad = torch.unique(torch.cat([p[3] for p in parts])) if parts else torch.zeros(0, dtype=torch.int64)
        # A distributed sampler may repeat clips to even out ranks; they only re-weight a video's views
        # by duplicating identical probabilities, so the mean is unchanged up to that weighting.
        uvid, inv = torch.unique(vids, return_inverse=True)
        psum = torch.zeros(len(uvid), num_classes).index_add_(0, inv, probs * counts.unsqueeze(1))
        n = torch.zeros(len(uvid), dtype=torch.int64).index_add_(0, inv, counts)
        mean = psum / n.clamp_min(1).unsqueeze(1)
        top = pl_module.topk(mean)
        self.results = []
        for i, v in enumerate(uvid.tolist()):
            self.results.append(
                {
                    "video_id": v,
                    "video": self._name(v),
                    "views": int(n[i]),
                    "top_k": [
                        {"class_id": c, "class_name": name, "prob": round(float(p), 6)}
                        for c, name, p in zip(top["topk_ids"][i].tolist(), top["topk_names"][i],
                                              top["topk_probs"][i].tolist(), strict=True)
                    ],
                }
            )
        failed = [{"video_id": v, "video": self._name(v)} for v in bad.tolist() if v not in set(uvid.tolist())]
        for r in self.results:
            guesses = ", ".join(f"{t['class_name']} {100 * t['prob']:.1f}%" for t in r["top_k"])
            print(f"{r['video']}: {guesses}")
        for f in failed:
            print(f"{f['video']}: could not be decoded")
        out = Path(self.output) if self.output else Path(trainer.log_dir or ".") / "predictions.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"predictions": self.results, "failed": failed}, indent=2) + "\n")
        print(f"predictions written to {out}")

    def _name(self, video_id: int) -> str:
        if self.video_names is not None and 0 <= video_id < len(self.video_names):
            return self.video_names[video_id]
        return str(video_id)


class VMMCLI(LightningCLI):
    """LightningCLI for `VideoClassifier` with any datamodule (`--data <class_path>`).

    Adds the `demo` subcommand, links the datamodule's class count and names into the model,
    stores the data config in checkpoints and writes predictions with `PredictionWriter`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", VideoClassifier)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("trainer_class", VMMTrainer)
        # The classifier owns its optimizer and per-iteration schedule (configure_optimizers).
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        cmds = LightningCLI.subcommands()
        cmds["demo"] = {"model", "datamodule"}
        return cmds

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.net.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.add_argument(
            "--predictions", type=str | None, default=None,
            help="predict: JSON file for the per-video top-k predictions (default <log_dir>/predictions.json)",
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        self._dump_config()
        callbacks = list(self._get(self.config_init, "trainer", default={}).get("callbacks") or [])
        callbacks.append(_StoreDataConfig(self.config_dump.get("data")))
        if self.subcommand == "predict":
            callbacks.append(PredictionWriter(self._get(self.config, "predictions")))
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    def predict(self, model: LightningModule, datamodule: LightningDataModule | None = None, **kwargs: Any) -> None:
        """`vmm predict --config ...`: the datamodule's predict set, or else its test set.

        The video datamodules have no predict split; predicting their test set writes per-video
        top-k for every test video, named by file path.
        """
        kwargs["return_predictions"] = False  # the PredictionWriter keeps the merged per-video results
        if datamodule is None or is_overridden("predict_dataloader", datamodule):
            self.trainer.predict(model, datamodule=datamodule, **kwargs)
            return
        datamodule.setup("test")
        writer = next(cb for cb in self.trainer.callbacks if isinstance(cb, PredictionWriter))
        records = datamodule.records("test") if hasattr(datamodule, "records") else None
        if records is not None:
            writer.video_names = [str(r.path) for r in records]
        self.trainer.predict(model, dataloaders=datamodule.test_dataloader(), **kwargs)


# ------------------------------------------------------------------------------ predict on files


def predict_files(
    ckpt_path: str | Path,
    videos: Sequence[str | Path],
    *,
    output: str | Path | None = None,
    top_k: int | None = None,
    batch_size: int = 1,
    num_workers: int = 0,
    accelerator: str = "auto",
    devices: int | str = 1,
    precision: str | int | None = None,
) -> list[dict[str, Any]]:
    """Top-k classes of each video file with a `vmm fit` checkpoint; prints them and writes JSON.

    The network is rebuilt from the checkpoint's hyperparameters, the class names come from the
    checkpoint, and clips are decoded with the test-view settings (clip length, frame interval,
    clips x crops, short side, crop size) of the datamodule it was trained with. Returns one dict per decoded video
    (`video`, `views`, `top_k` = list of {class_id, class_name, prob}); failures are printed.
    """
    # Imported here: `vmm --help` must not need the data stack.
    from datamodules.dataset import VideoFilesDataset, collate_clips

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise ValueError(f"ckpt_path must be an existing checkpoint file, got {str(ckpt_path)!r}")
    if not videos:
        raise ValueError("videos must name at least one video file")
    missing = [str(v) for v in videos if not Path(v).is_file()]
    if missing:
        raise ValueError(f"videos must be existing files; not found: {missing}")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if "net" not in ckpt.get("hyper_parameters", {}):
        raise ValueError(
            f"{ckpt_path} does not record its network (train with `vmm fit`, or load it in Python with "
            "VideoClassifier.load_from_checkpoint(path, net=...))"
        )
    model = VideoClassifier.load_from_checkpoint(ckpt_path, map_location="cpu")
    if top_k is not None:
        model.hparams.top_k = top_k
    settings = ckpt.get(PREDICT_SETTINGS_KEY)
    if settings is None:
        raise ValueError(f"{ckpt_path} has no test-view settings ({PREDICT_SETTINGS_KEY}); was it written by vmm fit?")
    dataset = VideoFilesDataset([str(v) for v in videos], **settings)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_clips
    )
    writer = PredictionWriter(str(output) if output else None, video_names=[str(v) for v in videos])
    trainer_kwargs: dict[str, Any] = {"accelerator": accelerator, "devices": devices, "logger": False}
    if precision is not None:
        trainer_kwargs["precision"] = precision
    trainer = Trainer(callbacks=[writer], enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs)
    if output is None:
        writer.output = str(ckpt_path.with_suffix(".predictions.json"))
    trainer.predict(model, dataloaders=loader, return_predictions=False)
    return writer.results


def _predict_files_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="vmm predict",
        description=(
            "Classify video files with a checkpoint from `vmm fit` (network, class names and clip settings "
            "are read from it). With --config (or --data), runs LightningCLI's predict on a datamodule "
            "instead; see `vmm predict --config CONFIG --help`."
        ),
    )
    p.add_argument("videos", nargs="+", help="video files (any container/codec PyAV decodes)")
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by vmm fit")
    p.add_argument("--output", default=None, help="JSON output (default: <ckpt>.predictions.json)")
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=1, help="videos per batch (each with all its views)")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="1")
    p.add_argument("--precision", default=None)
    a = p.parse_args(argv)
    devices: int | str = int(a.devices) if a.devices.isdigit() else a.devices
    predict_files(
        a.ckpt_path, a.videos, output=a.output, top_k=a.top_k, batch_size=a.batch_size,
        num_workers=a.num_workers, accelerator=a.accelerator, devices=devices, precision=a.precision,
    )


def _is_file_predict(argv: list[str]) -> bool:
    """`vmm predict` without a config or datamodule is file mode."""
    return not any(a in ("-c", "--config", "--print_config") or a.startswith(("--data", "--config=")) for a in argv)


_HELP = """usage: vmm <command> [options]

Motion-aware video action recognition (SIFA, Representation Flow) on PyTorch Lightning.

commands:
  fit          train:                  vmm fit --config configs/demo_sifa_synthetic.yaml [--trainer.max_epochs 3]
  validate     evaluate on val:        vmm validate --config CONFIG --ckpt_path CKPT
  test         evaluate on test:       vmm test --config CONFIG --ckpt_path CKPT  (views averaged per video)
  predict      classify video files:   vmm predict --ckpt_path CKPT clip.mp4 [more.avi ...]
               or a datamodule:        vmm predict --config CONFIG --ckpt_path CKPT
  demo         fit, then test the best checkpoint and print its accuracy: vmm demo --config CONFIG
  check-data   decode every video of a dataset once and list failures: vmm check-data --config CONFIG

Options are LightningCLI's: --config YAML (repeatable), dotted overrides (--model.lr 0.05,
--trainer.devices 2, --trainer.strategy ddp), --print_config. `vmm <command> --help` lists them all.
"""


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the `vmm` console script (`args` default to sys.argv[1:])."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(_HELP, end="")
        return
    if argv[0] == "check-data":
        from datamodules.check import main as check_main  # the data stack only when asked for

        code = check_main(argv[1:])
        if code:
            raise SystemExit(code)
        return
    if argv[0] == "predict" and _is_file_predict(argv[1:]):
        _predict_files_main(argv[1:])
        return
    VMMCLI(args=None if args is None else argv)


if __name__ == "__main__":
    main()
