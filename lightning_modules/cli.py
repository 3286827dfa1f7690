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
import contextlib
import json
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins import _PLUGIN_INPUT
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from .classifier import VideoClassifier
from .io import AtomicCheckpointIO, check_writable_file, load_vmm_checkpoint
from .reports import PredictionWriter, TestReportWriter

__all__ = ["VMMCLI", "VMMTrainer", "PredictionWriter", "main", "predict_files"]

DATA_CONFIG_KEY = "vmm_data_config"
PREDICT_SETTINGS_KEY = "vmm_test_settings"
INTERRUPTED_CKPT = "interrupted.ckpt"
# Exit statuses of a run stopped by a signal, as a shell reports them (128 + signal number).
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143
EXIT_SIGINT = 128 + signal.SIGINT  # 130


@contextlib.contextmanager
def _signal_exit_status(what: str) -> Any:
    """Turn Lightning's exits after a signal into the shell's statuses: SIGTERM 143, SIGINT 130.

    Lightning ends a run stopped by SIGTERM with a bare SystemExit (status 0) and one stopped by
    Ctrl+C with status 1, after its graceful shutdown (callbacks' on_exception, loggers finalised);
    schedulers and `fit && test` chains must see that the run did not finish.
    """
    try:
        yield
    except SIGTERMException:
        rank_zero_info(f"[vmm] {what} stopped by SIGTERM; exiting with status {EXIT_SIGTERM}")
        raise SystemExit(EXIT_SIGTERM) from None
    except SystemExit as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise SystemExit(EXIT_SIGINT) from None
        raise
    except KeyboardInterrupt:
        raise SystemExit(EXIT_SIGINT) from None


class VMMTrainer(Trainer):
    """`lightning.Trainer` with `demo` (fit, then test the best checkpoint, then print a summary),
    atomic checkpoint files loaded with weights_only=True (`AtomicCheckpointIO`, unless a
    CheckpointIO plugin is given), and exit status 143/130 after SIGTERM/SIGINT."""

    def __init__(
        self, *args: Any, plugins: _PLUGIN_INPUT | list[_PLUGIN_INPUT] | None = None, **kwargs: Any
    ) -> None:
        """Args: as `lightning.Trainer`; `plugins` (Trainer's type, so the CLI instantiates them) gets an
        `AtomicCheckpointIO` unless one of them is a CheckpointIO."""
        plugin_list = list(plugins) if isinstance(plugins, (list, tuple)) else ([plugins] if plugins else [])
        if not any(isinstance(p, CheckpointIO) for p in plugin_list):
            plugin_list.append(AtomicCheckpointIO())
        super().__init__(*args, plugins=plugin_list, **kwargs)

    def fit(self, *args: Any, **kwargs: Any) -> None:
        with _signal_exit_status("fit"):
            super().fit(*args, **kwargs)

    def validate(self, *args: Any, **kwargs: Any) -> Any:
        with _signal_exit_status("validate"):
            return super().validate(*args, **kwargs)

    def test(self, *args: Any, **kwargs: Any) -> Any:
        with _signal_exit_status("test"):
            return super().test(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with _signal_exit_status("predict"):
            return super().predict(*args, **kwargs)

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
        try:
            self.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        except SystemExit as exc:
            how = {EXIT_SIGTERM: "by SIGTERM", EXIT_SIGINT: "by SIGINT (Ctrl+C)"}.get(exc.code)
            if how and self.is_global_zero:
                saved = self.checkpoint_callback and Path(self.checkpoint_callback.dirpath or "") / INTERRUPTED_CKPT
                resume = f"; resume with --ckpt_path {saved}" if saved and saved.is_file() else ""
                print(f"\nvmm demo interrupted {how} during training; the test was not run{resume}", flush=True)
            raise
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


class _InterruptCheckpoint(Callback):
    """On SIGTERM or Ctrl+C during a single-process `fit`, saves `interrupted.ckpt` beside the
    ModelCheckpoint files (Lightning's graceful shutdown saves nothing unless a ModelCheckpoint has
    save_on_exception), so the run resumes with `--ckpt_path .../interrupted.ckpt` from the step it
    reached. Not under DDP: saving is a collective there, and ranks interrupted at different points
    would wait on each other for ever; give a ModelCheckpoint `save_on_exception: true` instead."""

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Any stage of fit (its validation included), never the sanity check.
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)) or trainer.state.fn != "fit":
            return
        if trainer.world_size > 1:
            return
        ckpt_cb = trainer.checkpoint_callback
        if ckpt_cb is None or not getattr(ckpt_cb, "dirpath", None) or trainer.sanity_checking:
            return
        path = Path(ckpt_cb.dirpath) / INTERRUPTED_CKPT
        trainer.save_checkpoint(path)
        rank_zero_info(f"[vmm] {type(exception).__name__}: saved {path} (step {trainer.global_step})")


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

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check `--ckpt_path` against the configured model (see `_check_ckpt_against_config`).

        With `--ckpt_path` on the command line, the checkpoint's model hyperparameters are given
        first (`--model <json>`), so a configuration without `model.net` tests the checkpoint alone,
        and whatever the configuration and `--model.*` set afterwards can be compared with them.
        """
        self._ckpt: dict[str, Any] | None = None
        argv = None if isinstance(args, (dict, argparse.Namespace)) else list(sys.argv[1:] if args is None else args)
        if argv and argv[0] in self.subcommands() and not {"-h", "--help"} & set(argv):
            ckpt_arg = _ckpt_path_argument(argv[1:])
            if ckpt_arg is not None:
                self._ckpt = load_vmm_checkpoint(ckpt_arg)
                model_hp = _checkpoint_model_config(self._ckpt)
                if model_hp is not None:
                    args = [argv[0], "--model", json.dumps(model_hp), *argv[1:]]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
            super().parse_arguments(parser, args)
        self._check_ckpt_against_config()

    def _check_ckpt_against_config(self) -> None:
        """Refuse a checkpoint whose network class differs from the configured `model.net`; warn
        about every configured `model.*` value that the checkpoint's hyperparameters replace.

        LightningCLI rebuilds the model from the checkpoint's hyperparameters, so without this
        `vmm test --config fcf.yaml --ckpt_path sifa.ckpt` would test SIFA under the FCF run.
        """
        sub = self.config.get("subcommand")
        ckpt_path = self.config.get(sub, {}).get("ckpt_path") if sub else None
        if not ckpt_path or ckpt_path in ("best", "last", "hpc", "registry"):
            return
        ckpt = self._ckpt if self._ckpt is not None else load_vmm_checkpoint(ckpt_path)
        self._ckpt = ckpt
        ckpt_model = _checkpoint_model_config(ckpt)
        cfg_model = self.config[sub].get("model")
        if ckpt_model is None or cfg_model is None:
            return
        cfg_model = cfg_model.as_dict() if hasattr(cfg_model, "as_dict") else dict(cfg_model)
        ckpt_net = ckpt_model["net"]["class_path"]
        cfg_net = (cfg_model.get("net") or {}).get("class_path")
        if cfg_net is not None and cfg_net != ckpt_net:
            raise ValueError(
                f"--ckpt_path {ckpt_path} holds a {ckpt_net} network, but the configuration names model.net "
                f"{cfg_net}; the checkpoint's network would be used under this run's settings. Give a "
                "configuration without model.net (the checkpoint alone defines the model), or the matching "
                "checkpoint"
            )
        ckpt_flat, cfg_flat = _flatten(ckpt_model), _flatten(cfg_model)
        ignored = [
            f"model.{k}={cfg_flat[k]!r} (checkpoint: {ckpt_flat[k]!r})"
            for k in sorted(cfg_flat)
            if k in ckpt_flat and cfg_flat[k] != ckpt_flat[k]
        ]
        if ignored:
            rank_zero_warn(
                f"--ckpt_path {ckpt_path}: the model is rebuilt from the checkpoint ({ckpt_net}, its "
                f"hyperparameters); these configured values will not apply: {', '.join(ignored)}",
                category=UserWarning,
            )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        self._dump_config()
        callbacks = list(self._get(self.config_init, "trainer", default={}).get("callbacks") or [])
        callbacks.append(_StoreDataConfig(self.config_dump.get("data")))
        if self.subcommand in ("fit", "demo"):
            callbacks.append(_InterruptCheckpoint())
        if not any(isinstance(cb, TestReportWriter) for cb in callbacks):
            callbacks.append(TestReportWriter())  # test_results.json, confusion matrix, scores_test.json
        if self.subcommand == "predict":
            predictions = self._get(self.config, "predictions")
            if predictions is not None:
                check_writable_file(predictions, "--predictions")
            callbacks.append(PredictionWriter(predictions))
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    def predict(self, model: LightningModule, datamodule: LightningDataModule | None = None, **kwargs: Any) -> None:
        """`vmm predict --config ...`: the datamodule's predict set, or else its test set.

        The video datamodules have no predict split; predicting their test set writes per-video
        top-k for every test video, named by file path.
        """
        kwargs["return_predictions"] = False  # the PredictionWriter keeps the merged per-video results
        writer = next(cb for cb in self.trainer.callbacks if isinstance(cb, PredictionWriter))
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask
        if writer.output is None and self.trainer.is_global_zero:
            check_writable_file(Path(log_dir or ".") / "predictions.json", "--predictions (default <log_dir>)")
        if datamodule is None or is_overridden("predict_dataloader", datamodule):
            self.trainer.predict(model, datamodule=datamodule, **kwargs)
            return
        datamodule.setup("test")
        records = datamodule.records("test") if hasattr(datamodule, "records") else None
        if records is not None:
            writer.video_names = [str(r.path) for r in records]
        self.trainer.predict(model, dataloaders=datamodule.test_dataloader(), **kwargs)


def _ckpt_path_argument(argv: Sequence[str]) -> str | None:
    """The value of `--ckpt_path` on a command line (last one wins, as in the parser), or None."""
    value = None
    for i, a in enumerate(argv):
        if a == "--ckpt_path" and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith("--ckpt_path="):
            value = a.split("=", 1)[1]
    return value if value and value not in ("best", "last", "hpc", "registry") and "://" not in value else None


# Model keys that the CLI links from the datamodule: never "overrides" of the checkpoint.
_LINKED_MODEL_KEYS = ("num_classes", "class_names", "net.init_args.num_classes", "_instantiator")


def _checkpoint_model_config(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The model part of a `vmm fit` checkpoint's hyperparameters as a config (no linked keys), or
    None when it does not record its network as a class_path (a checkpoint written from Python)."""
    hp = ckpt.get("hyper_parameters")
    if not isinstance(hp, dict) or not isinstance(hp.get("net"), dict) or "class_path" not in hp["net"]:
        return None
    model = json.loads(json.dumps(hp, default=str))  # a deep copy of plain data
    model.pop("_instantiator", None)
    model.pop("num_classes", None)
    model.pop("class_names", None)
    model["net"].get("init_args", {}).pop("num_classes", None)
    return model


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"net": {"init_args": {"depth": 18}}} -> {"net.init_args.depth": 18}, without linked keys;
    tuples compare as lists."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if key in _LINKED_MODEL_KEYS:
            continue
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


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
    """Top-k classes of each video file with a `vmm fit` checkpoint; prints them and writes JSON
    (to `output`, default `<checkpoint name>.predictions.json` in the working directory).

    The network is rebuilt from the checkpoint's hyperparameters, the class names come from the
    checkpoint, and clips are decoded with the test-view settings (clip length, frame interval,
    clips x crops, short side, crop size) of the datamodule it was trained with. Returns one dict per decoded video
    (`video`, `views`, `top_k` = list of {class_id, class_name, prob}); failures are printed.

    Arguments are checked, and the output location probed for writing, before any inference. The
    checkpoint is loaded with weights_only=True: a file that needs anything beyond tensors and
    plain containers is refused ("not a vmm checkpoint: ...") and nothing in it is run.
    """
    # Imported here: `vmm --help` must not need the data stack.
    from datamodules.dataset import VideoFilesDataset, collate_clips

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise ValueError(f"ckpt_path must be an existing checkpoint file, got {str(ckpt_path)!r}")
    if not videos:
        raise ValueError("videos must name at least one video file")
    missing = [str(v) for v in videos if not (Path(v).is_file() or Path(v).is_dir())]
    if missing:
        raise ValueError(f"videos must be existing files or frame folders; not found: {missing}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Next to the checkpoint is often a read-only mount (shared model store): default to the cwd.
    out_path = Path(output) if output is not None else Path.cwd() / f"{ckpt_path.stem}.predictions.json"
    check_writable_file(out_path, "output")
    ckpt = load_vmm_checkpoint(ckpt_path)
    if "net" not in ckpt.get("hyper_parameters", {}):
        raise ValueError(
            f"{ckpt_path} does not record its network (train with `vmm fit`, or load it in Python with "
            "VideoClassifier.load_from_checkpoint(path, net=...))"
        )
    model = VideoClassifier.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    if top_k is not None:
        model.hparams.top_k = top_k
    settings = ckpt.get(PREDICT_SETTINGS_KEY)
    if settings is None:
        raise ValueError(f"{ckpt_path} has no test-view settings ({PREDICT_SETTINGS_KEY}); was it written by vmm fit?")
    dataset = VideoFilesDataset([str(v) for v in videos], **settings)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_clips
    )
    writer = PredictionWriter(str(out_path), video_names=[str(v) for v in videos])
    trainer_kwargs: dict[str, Any] = {"accelerator": accelerator, "devices": devices, "logger": False}
    if precision is not None:
        trainer_kwargs["precision"] = precision
    trainer = VMMTrainer(callbacks=[writer], enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs)
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
    p.add_argument("videos", nargs="+", help="video files (any container/codec PyAV decodes) or frame folders")
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by vmm fit")
    p.add_argument(
        "--output", default=None,
        help="JSON output file (default: <checkpoint name>.predictions.json in the working directory)",
    )
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
