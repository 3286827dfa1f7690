"""The `vmm` console script: one LightningCLI parser for every command, plus score fusion.

    vmm fit|validate|test|predict --config configs/<net>_<dataset>.yaml [--key value ...]
    vmm demo --config configs/demo_sifa_synthetic.yaml     fit, then test the best checkpoint
    vmm predict --ckpt_path best.ckpt clip1.mp4 [folder/ frames/ ...]   (no dataset or config needed)
    vmm check-data --config configs/<net>_<dataset>.yaml [--write_clean_list clean.txt]
    vmm fuse-scores a/scores_test.json b/scores_test.json [--weights 0.5 0.5] [--output fused.json]

`check-data` and file-mode `predict` are subcommands of the same parser as fit/test, so options
are spelled alike everywhere (`--data.init_args.root`, `--ckpt_path`) and a config's overrides
apply to every command. The model is always `VideoClassifier`; the network (`--model.net`) and
the datamodule (`--data`) are given by `class_path`. `data.num_classes` is linked to the
classifier's and the network's `num_classes`, and `data.class_names` to the classifier's, so
checkpoints carry the class names. The CLI is the one place that joins data and model
(docs/architecture.md).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins import _PLUGIN_INPUT
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from .classifier import VideoClassifier
from .io import (
    AtomicCheckpointIO,
    CheckpointError,
    ConfigError,
    check_writable_file,
    check_yaml_expansion,
    load_vmm_checkpoint,
)
from .reports import PredictionWriter, TestReportWriter

__all__ = ["ConfigError", "VMMCLI", "VMMTrainer", "PredictionWriter", "fuse_scores", "main", "predict_files"]

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

    def __init__(self, *args: Any, plugins: _PLUGIN_INPUT | list[_PLUGIN_INPUT] | None = None, **kwargs: Any) -> None:
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
            notes = datamodule.result_notes(res) if callable(getattr(datamodule, "result_notes", None)) else []
            if notes:  # the datamodule knows its own chance level and ceilings
                lines += [f"  {n}" for n in notes]
            elif k:
                lines.append(f"  K = {k} classes: chance {100 / k:.1f}%")
            lines.append(f"  checkpoint: {Path(best).resolve() if best else None}")
            if log_dir:
                lines.append(
                    f"  logs: {log_dir} (metrics.csv, test_results.json, confusion_matrix_test.png, scores_test.json)"
                )
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


def _guarded_yaml_load(value: str, path: str | Path = "") -> Any:
    """jsonargparse's YAML loader, after refusing alias bombs (see `check_yaml_expansion`): the
    parser copies what it loads, which expands every alias."""
    from jsonargparse._loaders_dumpers import get_yaml_default_loader, yaml_load

    try:
        check_yaml_expansion(value, get_yaml_default_loader())
    except ConfigError as exc:
        raise ConfigError(f"{path or 'a YAML value'}: {exc}") from None
    return yaml_load(value)


# The parser mode of every vmm parser: YAML as jsonargparse reads it, alias bombs refused first.
PARSER_MODE = "vmm-yaml"


def _register_parser_mode() -> None:
    import yaml
    from jsonargparse import set_loader

    set_loader(PARSER_MODE, _guarded_yaml_load, exceptions=(yaml.YAMLError,))


def _parse_error_fix(message: str) -> str | None:
    """A parse error as one line naming the fix; None for a multi-line report (type errors), which
    is printed as jsonargparse words it.

    jsonargparse words a missing datamodule as "required: test.data" and a datamodule without its
    root as a Union-subtype report; neither says which option to give."""
    if re.search(r"the following arguments are required: [\w-]+\.data\b", message):
        return (
            "needs a dataset: give --config CONFIG.yaml (e.g. the run's config.yaml) or --data CLASS_PATH "
            "with its --data.init_args.root DIR"
        )
    init = re.search(
        r'Parser key "(\w+)".*?class_path \'([\w.]+)\'.*?the following arguments are required: ([\w, ]+)',
        message,
        re.S,
    )
    if init:
        key, cls, names = init.groups()
        options = " ".join(f"--{key}.init_args.{n.strip()} VALUE" for n in names.split(",") if n.strip())
        return f"{cls.rpartition('.')[2]} needs {names.strip()}: give {options} (or set it in the --config file)"
    if "\n" not in message.strip():  # a one-line message needs no usage block above it
        return re.sub(r'^Parser key "([\w.]+)": ', r"--\1: ", message.strip())
    return None


class _VMMArgumentParser(LightningArgumentParser):
    """Lightning's parser; parse errors are reported as one line naming the option to give
    (`_parse_error_fix`) where they can be, without the usage block; others as jsonargparse does."""

    vmm_command: str | None = None

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        fix = _parse_error_fix(message)
        if fix is None or not self.exit_on_error or _debug_requested():
            super().error(message if fix is None else fix, ex)
        command = f"vmm {self.vmm_command}" if self.vmm_command else "vmm"
        sys.stderr.write(f"{command}: error: {fix}\n")
        raise SystemExit(2)


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
        kwargs.setdefault("parser_class", _VMMArgumentParser)
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        _register_parser_mode()
        kwargs.setdefault("parser_mode", PARSER_MODE)
        return super().init_parser(**kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """The Trainer-method subcommands (fit, validate, test, predict, demo) and the arguments
        LightningCLI skips in each; `check-data` (no model, no Trainer) is added beside them."""
        cmds = LightningCLI.subcommands()
        cmds["demo"] = {"model", "datamodule"}
        return cmds

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.net.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """LightningCLI's subcommands plus `check-data`, all in one parser: the `data` options,
        `--config` layering and overrides are spelled the same way in every command."""
        self._subcommand_parsers: dict[str, LightningArgumentParser] = {}
        subcommands = parser.add_subcommands()
        for name in self.subcommands():
            # inspect.getdoc falls back to Trainer's docstring for the overridden methods
            description = (inspect.getdoc(getattr(self.trainer_class, name)) or "").split("\n")[0] or None
            sub = self._prepare_subcommand_parser(
                self.trainer_class, name, **{"description": description, **kwargs.get(name, {})}
            )
            self._subcommand_parsers[name] = sub
            subcommands.add_subcommand(name, sub, help=description)
        description = "Decode every video of the datamodule once and list the unreadable ones."
        sub = self.init_parser(description=description, **kwargs.get(CHECK_DATA, {}))
        self.add_default_arguments_to_parser(sub)
        sub.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)
        # A full run configuration is accepted as it is; its model and trainer sections are not used.
        sub.add_argument("--model", type=dict | None, default=None, help="ignored by check-data")
        sub.add_argument("--trainer", type=dict | None, default=None, help="ignored by check-data")
        self._subcommand_method_arguments[CHECK_DATA] = sub.add_method_arguments(
            VMMCLI, "check_data", skip={"datamodule"}
        )
        self._subcommand_parsers[CHECK_DATA] = sub
        subcommands.add_subcommand(CHECK_DATA, sub, help=description)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":  # options that only prediction reads
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
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check `--ckpt_path` against the configured model (see `_check_ckpt_against_config`).

        With `--ckpt_path` on the command line, the checkpoint's model hyperparameters are given
        first (`--model <json>`), so a configuration without `model.net` tests the checkpoint alone,
        and whatever the configuration and `--model.*` set afterwards can be compared with them.
        `vmm predict` on files without `--config`/`--data` also gets the checkpoint's class names
        and test views as its datamodule (`PredictFilesDataModule`, overridable by `--data.init_args.*`).
        Old spellings of predict/check-data options are translated, with a deprecation warning.
        """
        self._ckpt: dict[str, Any] | None = None
        self._file_predict = False
        self._flag_names: dict[str, str] = {}
        argv = None if isinstance(args, (dict, argparse.Namespace)) else list(sys.argv[1:] if args is None else args)
        if argv and argv[0] in (*self.subcommands(), CHECK_DATA) and not {"-h", "--help"} & set(argv):
            rest, self._flag_names = _translate_old_spellings(argv[0], argv[1:])
            injected: list[str] = []
            ckpt_arg = _ckpt_path_argument(rest) if argv[0] != CHECK_DATA else None
            if ckpt_arg is not None:
                if not Path(ckpt_arg).exists():
                    raise ValueError(
                        f"--ckpt_path {ckpt_arg}: no such file (give the .ckpt file written by vmm fit, e.g. "
                        "lightning_logs/version_0/checkpoints/last.ckpt)"
                    )
                self._ckpt = load_vmm_checkpoint(ckpt_arg)
                model_hp = _checkpoint_model_config(self._ckpt)
                if model_hp is not None:
                    _check_network_class_path(ckpt_arg, model_hp["net"]["class_path"], rest)
                    injected += ["--model", json.dumps(model_hp)]
            if argv[0] == "predict" and _is_file_predict(rest):
                self._file_predict = True
                injected += _file_predict_defaults(ckpt_arg, self._ckpt)
            args = argv = [argv[0], *injected, *rest]
        for p in (parser, *getattr(self, "_subcommand_parsers", {}).values()):
            p.vmm_command = argv[0] if argv else None  # for their one-line errors
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
            super().parse_arguments(parser, args)
        self._check_ckpt_against_config()
        self._drop_pretrained_under_ckpt_path()
        # Only its hyperparameters were needed: do not hold the weights and optimizer states for the whole
        # run (the Trainer reads the file again).
        self._ckpt = None
        if argv:
            self._drop_stale_num_classes(argv[1:])
        if self.config.get("subcommand") == "predict":
            self._check_predict_arguments()

    def _parse_ckpt_path(self) -> None:
        # LightningCLI merges the checkpoint's hyperparameters into the config after parsing: an older
        # checkpoint names the pretrained file it was inflated from, which must not be loaded again.
        super()._parse_ckpt_path()
        self._drop_pretrained_under_ckpt_path()

    def _drop_pretrained_under_ckpt_path(self) -> None:
        """With `--ckpt_path` the network's weights come from the checkpoint: a configured
        `model.net.init_args.pretrained` file would be loaded only to be overwritten (and may be
        gone since training), so it is not loaded. `_check_ckpt_against_config` names it."""
        sub = self.config.get("subcommand")
        # "last" / "best" may find no checkpoint (a first fit): the pretrained weights are then used.
        if not sub or self.config[sub].get("ckpt_path") in (None, "", "best", "last", "hpc", "registry"):
            return
        key = f"{sub}.model.net.init_args.pretrained"
        if self.config.get(key) is not None:
            self.config[key] = None

    def _drop_stale_num_classes(self, argv: Sequence[str]) -> None:
        """Layered configurations (`--config a.yaml --config b.yaml`) keep `data.init_args` values
        across a change of `data.class_path`. A `num_classes` set only for an earlier datamodule
        class is dropped (back to the new class's default: taken from its data), with a warning."""
        sub = self.config.get("subcommand")
        data = self.config.get(sub, {}).get("data") if sub else None
        init = data.get("init_args") if data is not None and hasattr(data, "get") else None
        if init is None or init.get("num_classes") is None:
            return
        final_cls = str(data.get("class_path") or "")
        source_cls = _num_classes_source(argv)
        if source_cls is None or _class_name(source_cls) == _class_name(final_cls):
            return
        import importlib

        module, _, name = final_cls.rpartition(".")
        try:
            param = inspect.signature(getattr(importlib.import_module(module), name)).parameters.get("num_classes")
        except (ImportError, AttributeError, ValueError):
            param = None
        default = None if param is None or param.default is inspect.Parameter.empty else param.default
        rank_zero_warn(
            f"data.init_args.num_classes={init.get('num_classes')} was set for {source_cls}, not for {final_cls} "
            f"(a later --config changed data.class_path); it is not carried over: the number of classes comes "
            f"from the data ({'default ' + repr(default) if default is not None else 'its class names/labels'})",
            category=UserWarning,
        )
        init["num_classes"] = default

    def _check_num_classes(self) -> None:
        """An explicit `data.init_args.num_classes` that disagrees with the datamodule's own class
        count (e.g. its `class_names`) is an error, not a model with the wrong number of outputs."""
        data = self._get(self.config, "data")
        init = data.get("init_args") if data is not None and hasattr(data, "get") else None
        explicit = init.get("num_classes") if init is not None else None
        actual = getattr(self.datamodule, "num_classes", None)
        if explicit is not None and isinstance(actual, int) and actual != explicit:
            raise ValueError(
                f"data.init_args.num_classes={explicit} disagrees with the data: {type(self.datamodule).__name__} "
                f"has {actual} classes (its class names / labels); remove num_classes or make it {actual}"
            )

    def _check_predict_arguments(self) -> None:
        """`vmm predict`: top_k, the video paths (folders expanded) and the output file, checked
        before any model is built."""
        cfg = self.config["predict"]
        top_k = cfg.get("top_k")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k}")
        videos = cfg.get("videos") or []
        self._predict_paths: list[str] | None = None
        if videos:
            from datamodules.files import expand_video_paths  # the data stack only when asked for

            self._predict_paths = expand_video_paths(videos)
        elif self._file_predict:
            raise ValueError(
                "videos: vmm predict without --config/--data needs video files, frame folders or folders to "
                "search (or give --config to predict a datamodule's test set)"
            )
        predictions = cfg.get("predictions")
        if predictions is None and self._file_predict:
            # Next to the checkpoint is often a read-only mount (shared model store): default to the cwd.
            predictions = str(Path.cwd() / f"{Path(cfg['ckpt_path']).stem}.predictions.json")
            cfg["predictions"] = predictions
        if predictions is not None:
            check_writable_file(predictions, self._flag_names.get("--predictions", "--predictions"))

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
        if self._ckpt is not None:
            ckpt = self._ckpt
        elif "://" in str(ckpt_path):  # a URL: fsspec, as Lightning will read it (weights_only=True)
            ckpt = AtomicCheckpointIO().load_checkpoint(ckpt_path)
        else:
            ckpt = load_vmm_checkpoint(ckpt_path)
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

    def instantiate_classes(self) -> None:
        """As LightningCLI; `check-data` builds only the datamodule (no model, no Trainer)."""
        if self.subcommand != CHECK_DATA:
            super().instantiate_classes()
            return
        self.config_init = self.parser.instantiate_classes(self.config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = None
        self.trainer = None
        self._check_num_classes()

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand != CHECK_DATA:
            super()._run_subcommand(subcommand)
            return
        args = self.config_init[subcommand]
        self.check_data(self.datamodule, **{k: args[k] for k in self._subcommand_method_arguments[subcommand]})

    def check_data(
        self,
        datamodule: LightningDataModule,
        splits: list[str] | None = None,
        num_workers: int | None = None,
        decoder_threads: int | None = None,
        write_clean_list: str | None = None,
    ) -> None:
        """`vmm check-data`: decode every distinct video of the datamodule once (a file listed in
        several splits is decoded once) and print per-split counts, durations, frame rates and
        the unreadable or unusable entries. The report is kept as `self.check_report`; `vmm`
        exits with status 1 when it lists any bad entry.

        Args:
            datamodule: a `datamodules.VideoDataModule` (`--data`).
            splits: the splits to check (default: every split the layout has).
            num_workers: decoding processes (default: the datamodule's `num_workers`).
            decoder_threads: FFmpeg threads per process (default: the datamodule's).
            write_clean_list: also write the annotation list of each checked split without its bad
                entries, to `<stem>_<split><suffix>` of this path (clean.txt -> clean_train.txt):
                `path label` lines (absolute paths; VideoListDataModule reads them), or
                `folder num_frames label` for frame-folder datasets (RawFrameListDataModule).
        """
        from datamodules.check import check_datamodule, clean_list_files, write_clean_lists  # data stack on demand

        if write_clean_list is not None:  # an impossible list fails before the decoding, not after
            clean_list_files(datamodule, splits or ("train", "val", "test"), write_clean_list)
        report = check_datamodule(
            datamodule,
            splits=splits or ("train", "val", "test"),
            num_workers=getattr(datamodule, "num_workers", 2) if num_workers is None else num_workers,
            decoder_threads=datamodule.clip.decoder_threads if decoder_threads is None else decoder_threads,
        )
        self.check_report = report
        if write_clean_list is not None:
            for path in write_clean_lists(datamodule, report, write_clean_list):
                print(f"clean list written to {path}")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        self._check_num_classes()
        if self._file_predict:
            self.save_config_callback = None  # no log directory: config.yaml would land in the cwd
        self._dump_config()
        callbacks = list(self._get(self.config_init, "trainer", default={}).get("callbacks") or [])
        callbacks.append(_StoreDataConfig(self.config_dump.get("data")))
        if self.subcommand in ("fit", "demo"):
            callbacks.append(_InterruptCheckpoint())
        if not any(isinstance(cb, TestReportWriter) for cb in callbacks):
            callbacks.append(TestReportWriter())  # test_results.json, confusion matrix, scores_test.json
        if self.subcommand == "predict":
            callbacks.append(PredictionWriter(self._get(self.config, "predictions")))  # checked when parsed
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    def predict(self, model: LightningModule, datamodule: LightningDataModule | None = None, **kwargs: Any) -> None:
        """`vmm predict`: the given videos (decoded with the datamodule's test views), else the
        datamodule's predict set, else its test set.

        The video datamodules have no predict split; predicting their test set writes per-video
        top-k for every test video, named by file path.
        """
        kwargs["return_predictions"] = False  # the PredictionWriter keeps the merged per-video results
        writer = next(cb for cb in self.trainer.callbacks if isinstance(cb, PredictionWriter))
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask
        if writer.output is None:  # on every rank: one rank failing alone would leave the others waiting
            check_writable_file(Path(log_dir or ".") / "predictions.json", "--predictions (default <log_dir>)")
        top_k = self._get(self.config, "top_k")
        if top_k is not None:
            model.hparams.top_k = top_k
        if self._predict_paths:
            if not callable(getattr(datamodule, "predict_dataset", None)):
                raise ValueError(
                    f"videos: the datamodule {type(datamodule).__name__} cannot decode files (no predict_dataset); "
                    "use a datamodules.VideoDataModule"
                )
            from datamodules.dataset import collate_clips  # the data stack only when asked for

            loader = torch.utils.data.DataLoader(
                datamodule.predict_dataset(self._predict_paths),
                batch_size=datamodule.test_batch_size,
                num_workers=datamodule.num_workers,
                collate_fn=collate_clips,
                pin_memory=datamodule.pin_memory,
            )
            writer.video_names = list(self._predict_paths)
            with warnings.catch_warnings():
                # The checkpoint's ModelCheckpoint states are of no use to a prediction.
                warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint.*")
                self.trainer.predict(model, dataloaders=loader, **kwargs)
            return
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


VMM_NETWORKS = "lightning_modules.networks."


def _check_network_class_path(ckpt_path: str, class_path: object, argv: Sequence[str]) -> None:
    """A checkpoint is data: the network class it names is imported only when it is one of vmm's
    networks, or when the command line names that same class (`--model.net.class_path`, or in a
    `--config`) -- parsing imports the class, and importing a module runs its code."""
    if isinstance(class_path, str) and re.fullmatch(re.escape(VMM_NETWORKS) + r"[A-Za-z_][\w.]*", class_path):
        return
    given = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        if flag == "--model.net.class_path" or flag == "--model.net":
            given.append(value)
        elif flag in ("-c", "--config"):
            with contextlib.suppress(OSError):
                given.append(Path(value).read_text(encoding="utf-8"))
    if any(str(class_path) in g for g in given):
        return
    raise ValueError(
        f"--ckpt_path {ckpt_path}: its network {class_path} is not one of vmm's networks ({VMM_NETWORKS}*), and "
        f"a checkpoint does not choose which code runs; if you trust that class, name it: --model.net.class_path "
        f"{class_path}"
    )


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


# ------------------------------------------------------------------------------ one grammar for every command

CHECK_DATA = "check-data"
_DEPRECATED_AFTER = "the old spelling will be removed in the next release"
# Spellings of the former separate argparse front ends -> the one LightningCLI grammar.
_OLD_SPELLINGS: dict[str, dict[str, str]] = {
    "predict": {
        "--output": "--predictions",
        "--batch_size": "--data.init_args.test_batch_size",
        "--num_workers": "--data.init_args.num_workers",
        "--accelerator": "--trainer.accelerator",
        "--devices": "--trainer.devices",
        "--precision": "--trainer.precision",
    },
    CHECK_DATA: {"--num-workers": "--num_workers", "--decoder-threads": "--decoder_threads"},
}


def _translate_old_spellings(command: str, argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Rewrite deprecated option spellings of `command` (with a FutureWarning each); returns the new
    arguments and {new flag: the flag the user typed} for error messages. check-data's
    `--splits a b` (several values) becomes `--splits [a, b]`."""
    table = _OLD_SPELLINGS.get(command, {})
    out: list[str] = []
    typed: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        if flag in table:
            new = table[flag]
            warnings.warn(
                f"vmm {command}: {flag} is deprecated, use {new} ({_DEPRECATED_AFTER})", FutureWarning, stacklevel=2
            )
            typed[new] = flag
            out.append(f"{new}{eq}{value}")
        elif command == CHECK_DATA and arg == "--splits":
            values = []
            while i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                values.append(argv[i + 1])
                i += 1
            if not values:  # an empty list would silently mean "every split"
                raise ValueError("--splits: expected one or more of train, val, test (e.g. --splits [train, val])")
            if len(values) > 1:
                warnings.warn(
                    f"vmm {command}: --splits {' '.join(values)} is deprecated, use --splits "
                    f"[{', '.join(values)}] ({_DEPRECATED_AFTER})",
                    FutureWarning,
                    stacklevel=2,
                )
            out += ["--splits", values[0] if len(values) == 1 and values[0].startswith("[") else json.dumps(values)]
        else:
            out.append(arg)
        i += 1
    return out, typed


def _is_file_predict(argv: Sequence[str]) -> bool:
    """`vmm predict` without a config or a datamodule class (`--data.init_args.*` overrides allowed) is
    file mode: the datamodule comes from the checkpoint."""
    # --print_config stays in file mode: it prints the file-mode configuration that would run.
    return not any(
        a in ("-c", "--config", "--data", "--data.class_path")
        or a.startswith(("--config=", "--data=", "--data.class_path="))
        for a in argv
    )


def _file_predict_defaults(ckpt_path: str | None, ckpt: dict[str, Any] | None) -> list[str]:
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


def _class_name(class_path: str) -> str:
    """ "datamodules.layouts.VideoListDataModule" and "VideoListDataModule" name the same class."""
    return class_path.rpartition(".")[2]


def _num_classes_source(argv: Sequence[str]) -> str | None:
    """The data class_path in force where `num_classes` was last set on this command line (its
    `--config` files and `--data*` options, in order); None if never set, or set before any class."""
    import yaml

    current: str | None = None
    source: str | None = None

    def take(data: Any) -> None:
        nonlocal current, source
        if isinstance(data, str):
            current = data
        elif isinstance(data, dict):
            current = data.get("class_path", current)
            init = data.get("init_args") if isinstance(data.get("init_args"), dict) else {}
            if "num_classes" in init or "num_classes" in data:
                source = current

    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        try:
            if flag in ("-c", "--config"):
                with open(value, encoding="utf-8") as fh:
                    cfg = yaml.safe_load(fh)
                if isinstance(cfg, dict) and "data" in cfg:
                    take(cfg["data"])
            elif flag == "--data":
                take(yaml.safe_load(value))
            elif flag == "--data.class_path":
                current = value
            elif flag in ("--data.init_args.num_classes", "--data.num_classes"):
                source = current
        except (OSError, yaml.YAMLError):
            continue  # the parser itself reports unreadable configs
    return source


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
    cli = VMMCLI(args=args)
    writer = next(cb for cb in cli.trainer.callbacks if isinstance(cb, PredictionWriter))
    return writer.results


# ------------------------------------------------------------------------------ fusing score dumps


def fuse_scores(
    dumps: Sequence[str | Path], weights: Sequence[float] | None = None, output: str | Path | None = None
) -> dict[str, Any]:
    """Fuse per-video score dumps (`scores_test.json` of `vmm test`, lightning_modules/reports.py)
    of two or more models on the same split: the fused probabilities of a video are the weighted
    mean of its probabilities in each dump (weights default to equal; they need not sum to 1).

    Videos are matched by `video_id`; their labels and (where both are known) names must agree, and
    so must the class names. A video missing from some dump (it failed to decode there) is left
    out and counted. Prints top-1 / top-5 / mean-class accuracy of each dump and of the fused
    scores over the common videos when every label is known (>= 0), and writes the fused dump
    (same format, plus `fused_from` and `metrics`) to `output` when given. Returns that dump.
    """
    from .evaluation import video_metrics
    from .reports import SCORE_FORMAT, read_score_dump

    if isinstance(dumps, str | Path) or len(dumps) < 2:
        raise ValueError(f"dumps: expected at least two score files, got {dumps!r}")
    weights = [1.0] * len(dumps) if weights is None else [float(w) for w in weights]
    if len(weights) != len(dumps) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"weights: expected {len(dumps)} non-negative numbers (one per dump) with a positive sum, got {weights}"
        )
    if output is not None:
        check_writable_file(output, "--output")
    read = [read_score_dump(d) for d in dumps]
    names = read[0]["class_names"]
    for d, r in zip(dumps[1:], read[1:], strict=True):
        if r["class_names"] != names:
            raise ValueError(f"{d}: class_names differ from {dumps[0]}'s (the dumps must come from the same classes)")
    common = sorted(set.intersection(*(set(r["ids"].tolist()) for r in read)))
    if not common:
        raise ValueError(f"the dumps {[str(d) for d in dumps]} have no video_id in common (not the same split?)")
    rows = [{v: i for i, v in enumerate(r["ids"].tolist())} for r in read]
    ids = torch.tensor(common, dtype=torch.int64)
    picked = [torch.tensor([row[v] for v in common], dtype=torch.int64) for row in rows]
    labels = read[0]["labels"][picked[0]]
    video_names = [read[0]["names"][i] for i in picked[0].tolist()]
    for d, r, p in zip(dumps[1:], read[1:], picked[1:], strict=True):
        if not torch.equal(r["labels"][p], labels):
            raise ValueError(f"{d}: the labels of the common videos differ from {dumps[0]}'s")
        other = [r["names"][i] for i in p.tolist()]
        clash = [v for v, a, b in zip(common, video_names, other, strict=True) if a and b and a != b]
        if clash:
            raise ValueError(f"{d}: video ids {clash[:5]} name other files than in {dumps[0]} (not the same split?)")
        video_names = [a or b for a, b in zip(video_names, other, strict=True)]
    total = sum(weights)
    fused = sum((w / total) * r["probs"][p] for w, r, p in zip(weights, read, picked, strict=True))
    left_out = sorted(set().union(*(set(r["ids"].tolist()) for r in read)) - set(common))
    excluded = sorted(set().union(*(set(r.get("excluded_video_ids") or []) for r in read)) | set(left_out))
    labelled = bool(len(labels)) and bool((labels >= 0).all())
    k = len(names)
    lines = []
    metrics = None
    if labelled:
        for d, r, p in zip(dumps, read, picked, strict=True):
            lines.append((str(d), video_metrics(r["probs"][p], labels, k)))
        metrics = video_metrics(fused, labels, k)
        lines.append((f"fused (weights {', '.join(f'{w:g}' for w in weights)})", metrics))
        width = max(len(n) for n, _ in lines)
        for name, m in lines:
            print(
                f"{name:<{width}}  top-1 {100 * m['top1']:5.1f}%  top-5 {100 * m['top5']:5.1f}%  "
                f"mean-class {100 * m['mean_class']:5.1f}%"
            )
    print(f"{len(common)} videos fused" + (f"; {len(left_out)} not in every dump, left out" if left_out else ""))
    result = {
        "format": SCORE_FORMAT,
        "split": read[0].get("split"),
        "class_names": list(names),
        "num_classes": k,
        "fused_from": [{"path": str(d), "weight": w} for d, w in zip(dumps, weights, strict=True)],
        "metrics": metrics,
        "videos": [
            {"video_id": v, "name": n, "label": y, "probs": p}
            for v, n, y, p in zip(ids.tolist(), video_names, labels.tolist(), fused.tolist(), strict=True)
        ],
        "excluded_video_ids": excluded,
    }
    if output is not None:
        from .io import atomic_write_json

        atomic_write_json(output, result)
        print(f"fused scores written to {output}")
    return result


def _fuse_scores_main(argv: Sequence[str]) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="vmm fuse-scores",
        description="Fuse per-video score dumps (scores_test.json of vmm test) of several models by a weighted "
        "mean of their probabilities; prints each one's and the fused accuracy.",
    )
    parser.add_argument("dumps", nargs="+", type=str, help="two or more scores_test.json files of the same split")
    parser.add_argument("--weights", nargs="+", type=float, default=None, help="one weight per dump (default equal)")
    parser.add_argument("--output", type=str | None, default=None, help="JSON file for the fused scores")
    args = parser.parse_args(list(argv))
    fuse_scores(args.dumps, args.weights, args.output)


_HELP = """usage: vmm <command> [options]

Motion-aware video action recognition (SIFA, Representation Flow) on PyTorch Lightning.

commands:
  fit          train:                  vmm fit --config configs/demo_sifa_synthetic.yaml [--trainer.max_epochs 3]
  validate     evaluate on val:        vmm validate --config CONFIG --ckpt_path CKPT
  test         evaluate on test:       vmm test --config CONFIG --ckpt_path CKPT  (views averaged per video)
  predict      classify videos:        vmm predict --ckpt_path CKPT clip.mp4 [folder/ frames/ ...]
               or a datamodule:        vmm predict --config CONFIG --ckpt_path CKPT
  demo         fit, then test the best checkpoint and print its accuracy: vmm demo --config CONFIG
  check-data   decode every video of a dataset once and list failures: vmm check-data --config CONFIG
  fuse-scores  fuse two models' test scores: vmm fuse-scores a/scores_test.json b/scores_test.json

Every command but fuse-scores parses the same options: --config YAML (repeatable), dotted overrides
(--data.init_args.root /data, --model.lr 0.05, --trainer.devices 2), --ckpt_path, --print_config.
`vmm <command> --help` lists them all. An error caused by the input prints one line and exits 2 (usage)
or 1 (bad data); add --debug (or set VMM_DEBUG=1) for its traceback.
"""


def _debug_requested(argv: Sequence[str] = ()) -> bool:
    """`--debug` on the command line or VMM_DEBUG set (not "0"): errors keep their traceback."""
    return "--debug" in argv or os.environ.get("VMM_DEBUG", "0").strip() not in ("", "0")


_VMM_SOURCES = tuple(
    str(Path(__file__).resolve().parents[1] / d) + os.sep for d in ("lightning_modules", "datamodules", "ops")
)
_DATA_ERRORS = {"AnnotationError", "TooMuchBadData", "VideoDecodeError"}  # by name: no data stack import


def _raised_by_vmm(exc: BaseException) -> bool:
    """Whether the innermost frame of `exc`'s traceback is vmm's code (a check of the user's input),
    not a library's (where the same type is more likely a bug)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.startswith(_VMM_SOURCES)


def _expected_exit_status(exc: BaseException) -> int | None:
    """The exit status for an error caused by the user's input: 1 for bad data (the status a failed
    `vmm check-data` has), 2 for usage (arguments, paths, configs, checkpoints); None for a bug,
    which keeps its traceback."""
    names = {c.__name__ for c in type(exc).__mro__}
    if names & _DATA_ERRORS:
        return 1
    if isinstance(exc, (CheckpointError, ConfigError)) or "MisconfigurationException" in names:
        return 2
    if not _raised_by_vmm(exc):
        return None
    if isinstance(exc, RuntimeError):  # an unusable split, non-finite scores, nothing predicted
        return 1
    if isinstance(exc, (ValueError, TypeError, OSError)):
        return 2
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: its last line is the error
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if last.startswith(type(exc).__name__ + ":") else last
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


def main(args: Sequence[str] | None = None, *, console: bool | None = None) -> None:
    """Entry point of the `vmm` console script (`args` default to sys.argv[1:]).

    `console` (default: True when `args` is None, i.e. as the console script): an error caused by
    the user's input (`_expected_exit_status`) prints one line, `vmm <command>: error: <message>`,
    to stderr and exits with status 2 (usage) or 1 (bad data); other exceptions, and every error
    under `--debug` or VMM_DEBUG=1, propagate with their traceback. From Python (`args` given),
    exceptions propagate.
    """
    argv = list(sys.argv[1:] if args is None else args)
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    if console is None:
        console = args is None
    try:
        _main(argv)
    except Exception as exc:
        status = None if debug or not console else _expected_exit_status(exc)
        if status is None:
            raise
        command = f"vmm {argv[0]}" if argv and not argv[0].startswith("-") else "vmm"
        print(f"{command}: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        raise SystemExit(status) from None


def _main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(_HELP, end="")
        return
    if argv[0] in ("fuse-scores", "fuse"):
        _fuse_scores_main(argv[1:])
        return
    cli = VMMCLI(args=argv)
    report = getattr(cli, "check_report", None)
    if report is not None and not report.ok:
        raise SystemExit(1)  # check-data found unreadable or unusable entries


if __name__ == "__main__":
    main()
