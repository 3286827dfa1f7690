"""`vmm predict`: per-video top-k classes of the given videos, or of a datamodule's predict or test set.

    vmm predict --ckpt_path best.ckpt clip1.mp4 [folder/ frames/ ...]   (no dataset or config needed)
    vmm predict --config CONFIG --ckpt_path best.ckpt [videos ...]

Without `--config`/`--data` ("file mode") the datamodule comes from the checkpoint: its class names
and test views as a `PredictFilesDataModule` (`file_predict_defaults`). `predict_files` is the same
from Python.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden

from .callbacks import PREDICT_SETTINGS_KEY
from .io import check_writable_file
from .reports import PredictionWriter

__all__ = [
    "add_predict_arguments",
    "check_predict_arguments",
    "file_predict_defaults",
    "is_file_predict",
    "predict_files",
    "run_predict",
]


def add_predict_arguments(parser: Any) -> None:
    """The options that only prediction reads: the videos, the output file and top_k."""
    parser.add_argument(
        "videos",
        nargs="*",
        type=str,
        help="video files, frame folders (JPEG/PNG images only) or folders searched recursively for "
        "both; none: the datamodule's test set. Without --config/--data the checkpoint's class "
        "names and test views are used (--data.init_args.* overrides them)",
    )
    parser.add_argument(
        "--predictions",
        type=str | None,
        default=None,
        help="JSON file for the per-video top-k predictions (default: <log_dir>/predictions.json; "
        "on files without a config: ./<checkpoint name>.predictions.json)",
    )
    parser.add_argument(
        "--top_k",
        type=int | None,
        default=None,
        help="number of classes listed per video (default: the model's top_k, 5)",
    )


def check_predict_arguments(config: Any, file_mode: bool) -> list[str] | None:
    """`vmm predict`'s top_k, video paths (folders expanded; returned, None when none are given) and
    output file (in file mode defaulting to ./<checkpoint name>.predictions.json, set in `config`),
    checked before any model is built. `config`: the predict command's parsed configuration."""
    top_k = config.get("top_k")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k}")
    videos = config.get("videos") or []
    paths = None
    if videos:
        from datamodules.files import expand_video_paths  # the data stack only when asked for

        paths = expand_video_paths(videos)
    elif file_mode:
        raise ValueError(
            "videos: vmm predict without --config/--data needs video files, frame folders or folders to "
            "search (or give --config to predict a datamodule's test set)"
        )
    predictions = config.get("predictions")
    if predictions is None and file_mode:
        # Next to the checkpoint is often a read-only mount (shared model store): default to the cwd.
        predictions = str(Path.cwd() / f"{Path(config['ckpt_path']).stem}.predictions.json")
        config["predictions"] = predictions
    if predictions is not None:
        check_writable_file(predictions, "--predictions")
    return paths


def run_predict(
    trainer: Trainer,
    model: LightningModule,
    datamodule: LightningDataModule | None,
    paths: list[str] | None,
    top_k: int | None,
    **kwargs: Any,
) -> None:
    """Predict `paths` (decoded with the datamodule's test views), else the datamodule's predict
    set, else its test set, through the trainer's `PredictionWriter`.

    The video datamodules have no predict split; predicting their test set writes per-video
    top-k for every test video, named by file path.
    """
    kwargs["return_predictions"] = False  # the PredictionWriter keeps the merged per-video results
    writer = next(cb for cb in trainer.callbacks if isinstance(cb, PredictionWriter))
    log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
    if writer.output is None:  # on every rank: one rank failing alone would leave the others waiting
        check_writable_file(Path(log_dir or ".") / "predictions.json", "--predictions (default <log_dir>)")
    if top_k is not None:
        model.hparams.top_k = top_k
    if paths:
        if not callable(getattr(datamodule, "predict_dataset", None)):
            raise ValueError(
                f"videos: the datamodule {type(datamodule).__name__} cannot decode files (no predict_dataset); "
                "use a datamodules.VideoDataModule"
            )
        from datamodules.dataset import collate_clips  # the data stack only when asked for

        loader = torch.utils.data.DataLoader(
            datamodule.predict_dataset(paths),
            batch_size=datamodule.test_batch_size,
            num_workers=datamodule.num_workers,
            collate_fn=collate_clips,
            pin_memory=datamodule.pin_memory,
        )
        writer.video_names = list(paths)
        with warnings.catch_warnings():
            # The checkpoint's ModelCheckpoint states are of no use to a prediction.
            warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint.*")
            trainer.predict(model, dataloaders=loader, **kwargs)
        return
    if datamodule is None or is_overridden("predict_dataloader", datamodule):
        trainer.predict(model, datamodule=datamodule, **kwargs)
        return
    datamodule.setup("test")
    records = datamodule.records("test") if hasattr(datamodule, "records") else None
    if records is not None:
        writer.video_names = [str(r.path) for r in records]
    trainer.predict(model, dataloaders=datamodule.test_dataloader(), **kwargs)


def is_file_predict(argv: Sequence[str]) -> bool:
    """`vmm predict` without a config or a datamodule class (`--data.init_args.*` overrides allowed) is
    file mode: the datamodule comes from the checkpoint."""
    # --print_config stays in file mode: it prints the file-mode configuration that would run.
    return not any(
        a in ("-c", "--config", "--data", "--data.class_path")
        or a.startswith(("--config=", "--data=", "--data.class_path="))
        for a in argv
    )


def file_predict_defaults(ckpt_path: str | None, ckpt: dict[str, Any] | None) -> list[str]:
    """The arguments given before the user's in file mode: the checkpoint's class names and test
    views as `PredictFilesDataModule`, one device, no logger and no checkpointing (nothing written but
    the predictions), no seeding."""
    if ckpt_path is None or ckpt is None:
        raise ValueError(
            "--ckpt_path: vmm predict on files needs the checkpoint written by vmm fit (or give --config to "
            "predict a datamodule's test set)"
        )
    hp = ckpt.get("hyper_parameters") or {}
    if "net" not in hp:
        raise ValueError(
            f"{ckpt_path} does not record its network (train with `vmm fit`, or load it in Python with "
            "VideoClassifier.load_from_checkpoint(path, net=...))"
        )
    settings = ckpt.get(PREDICT_SETTINGS_KEY)
    if not isinstance(settings, dict):
        raise ValueError(f"{ckpt_path} has no test-view settings ({PREDICT_SETTINGS_KEY}); was it written by vmm fit?")
    class_names = ckpt.get("class_names") or hp.get("class_names")
    if not class_names:
        raise ValueError(f"{ckpt_path} has no class names; was it written by vmm fit?")
    init = {("eval_short_side" if k == "short_side" else k): v for k, v in settings.items()}
    init.update(class_names=list(class_names), batch_size=1, test_batch_size=1, num_workers=0)
    data = {"class_path": "datamodules.files.PredictFilesDataModule", "init_args": init}
    # No seeding: predicting is deterministic, and predict_files must not reseed its caller's RNGs.
    return [
        "--seed_everything",
        "false",
        "--data",
        json.dumps(data),
        "--trainer.logger",
        "false",
        "--trainer.devices",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.enable_checkpointing",
        "false",
    ]


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
    """Top-k classes of each video with a `vmm fit` checkpoint: `vmm predict --ckpt_path CKPT <videos>`
    from Python. Prints them and writes JSON (to `output`, default `<checkpoint name>.predictions.json`
    in the working directory).

    `videos`: files, frame folders, or folders searched recursively for both. The network is
    rebuilt from the checkpoint's hyperparameters, the class names come from the checkpoint, and
    clips are decoded with the test-view settings (clip length, frame interval, clips x crops,
    short side, crop size) of the datamodule it was trained with. `batch_size`: videos per batch.
    Returns one dict per decoded video (`video`, `views`, `top_k` = list of {class_id, class_name,
    prob}); failures are printed and listed in the file.

    Arguments are checked, and the output location probed for writing, before any inference. The
    checkpoint is loaded with weights_only=True: a file that needs anything beyond tensors and
    plain containers is refused ("not a vmm checkpoint: ...") and nothing in it is run.
    """
    if isinstance(videos, str | Path) or not videos:
        raise ValueError("videos must name at least one video file or folder (a list of paths)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    args = [
        "predict",
        "--ckpt_path",
        str(ckpt_path),
        *map(str, videos),
        "--data.init_args.test_batch_size",
        str(batch_size),
        "--data.init_args.num_workers",
        str(num_workers),
        "--trainer.accelerator",
        accelerator,
        "--trainer.devices",
        str(devices),
    ]
    if output is not None:
        args += ["--predictions", str(output)]
    if top_k is not None:
        args += ["--top_k", str(top_k)]
    if precision is not None:
        args += ["--trainer.precision", str(precision)]
    from .cli import VMMCLI  # the CLI builds the model and the Trainer

    cli = VMMCLI(args=args)
    writer = next(cb for cb in cli.trainer.callbacks if isinstance(cb, PredictionWriter))
    return writer.results
