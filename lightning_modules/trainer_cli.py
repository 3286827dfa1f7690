"""`VMMCLI`: the LightningCLI of vmm's Trainer commands (fit, validate, test, predict, demo).

The model is always `VideoClassifier`; the network (`--model.net`) and the datamodule (`--data`) are
given by `class_path`. `data.num_classes` is linked to the classifier's and the network's
`num_classes`, and `data.class_names` to the classifier's, so checkpoints carry the class names.
`lightning_modules.cli.main` imports this module only for these commands, so `vmm --help` and
`vmm fuse-scores` start without torch and Lightning.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from .arguments import PARSER_MODE, VMMArgumentParser, drop_stale_num_classes, register_parser_mode, title_groups
from .arguments import check_num_classes as _check_data_num_classes
from .callbacks import DataTimeMonitor, InterruptCheckpoint, StoreDataConfig, TestRunSummary
from .classifier import VideoClassifier
from .data_commands import DATA_COMMANDS, run_data_command
from .io import AtomicCheckpointIO, load_vmm_checkpoint
from .predict import (
    add_predict_arguments,
    check_predict_arguments,
    file_predict_defaults,
    is_file_predict,
    run_predict,
)
from .reports import PredictionWriter, TestReportWriter
from .trainer import VMMTrainer

__all__ = ["VMMCLI"]


def _section(config: Any, subcommand: str | None, key: str, default: Any = None) -> Any:
    """`key` of the running subcommand's part of a parsed config."""
    return config.get(str(subcommand), config).get(key, default)


class VMMCLI(LightningCLI):
    """LightningCLI for `VideoClassifier` with any datamodule (`--data <class_path>`).

    Adds the `demo` subcommand, links the datamodule's class count and names into the model, installs
    vmm's callbacks (`lightning_modules.callbacks`, `TestReportWriter`, and `PredictionWriter` for
    predict) and checks `--ckpt_path` against the configured model. `VMMCLI(args=["check-data", ...])`
    runs a data command (`lightning_modules.data_commands`): `datamodule` and `check_report` are set,
    `model` and `trainer` are None.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        argv = kwargs.get("args")
        if isinstance(argv, (list, tuple)) and argv and argv[0] in DATA_COMMANDS:
            run = run_data_command(argv[0], argv[1:])
            self.subcommand, self.datamodule, self.check_report = run.command, run.datamodule, run.check_report
            self.model = self.trainer = None
            return
        kwargs.setdefault("model_class", VideoClassifier)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("trainer_class", VMMTrainer)
        # The classifier owns its optimizer and per-iteration schedule (configure_optimizers).
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", VMMArgumentParser)
        # Each subcommand's parser learns its name (for its one-line errors and predict's options).
        parser_kwargs = dict(kwargs.get("parser_kwargs") or {})
        for name in self.subcommands():
            parser_kwargs[name] = {"vmm_command": name, **parser_kwargs.get(name, {})}
        kwargs["parser_kwargs"] = parser_kwargs
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        register_parser_mode()
        command = kwargs.pop("vmm_command", None)
        kwargs.setdefault("parser_mode", PARSER_MODE)
        parser = super().init_parser(**kwargs)
        parser.vmm_command = command
        return parser

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """The Trainer-method subcommands (fit, validate, test, predict, demo) and the arguments
        LightningCLI skips in each."""
        cmds = LightningCLI.subcommands()
        cmds["demo"] = {"model", "datamodule"}
        return cmds

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.net.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        if getattr(parser, "vmm_command", None) == "predict":
            add_predict_arguments(parser)
        title_groups(parser)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check `--ckpt_path` against the configured model (`_check_ckpt_against_config`).

        `--ckpt_path` is read from the command line before parsing (`_checkpoint_arguments`): the
        checkpoint's model hyperparameters are given first (`--model <json>`), so a configuration
        without `model.net` tests the checkpoint alone (the model section is required, and
        LightningCLI merges a checkpoint's hyperparameters only after a successful parse), and a
        missing file is named before the parser asks for a dataset. `vmm predict` on files without
        `--config`/`--data` also gets the checkpoint's class names and test views as its datamodule
        (`PredictFilesDataModule`, overridable by `--data.init_args.*`).
        """
        self._file_predict = False
        self._predict_paths: list[str] | None = None
        self._ckpt: dict[str, Any] | None = None  # the checkpoint of --ckpt_path, while parsing
        ckpt = None
        argv = None if isinstance(args, (dict, Namespace)) else list(sys.argv[1:] if args is None else args)
        if argv and argv[0] in self.subcommands() and not {"-h", "--help"} & set(argv):
            command, rest = argv[0], argv[1:]
            parser.vmm_command = command
            ckpt_arg = _ckpt_path_argument(rest)
            injected, ckpt = _checkpoint_arguments(ckpt_arg, rest)
            if command == "predict" and is_file_predict(rest):
                self._file_predict = True
                injected += file_predict_defaults(ckpt_arg, ckpt)
            args = argv = [command, *injected, *rest]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
            super().parse_arguments(parser, args)
        self._ckpt = ckpt
        self._check_ckpt_against_config()
        # Only its hyperparameters were needed: the weights and optimizer states are not held for the
        # whole run (the Trainer reads the file again).
        self._ckpt = None
        sub = self.config.get("subcommand")
        if argv and sub:
            drop_stale_num_classes(self.config[sub], argv[1:])
        if self.config.get("subcommand") == "predict":
            self._predict_paths = check_predict_arguments(self.config["predict"], self._file_predict)

    def before_instantiate_classes(self) -> None:
        """With `--ckpt_path` the network's weights come from the checkpoint: a configured
        `model.net.init_args.pretrained` file would be loaded only to be overwritten (and may be
        gone since training), so it is not loaded; `_check_ckpt_against_config` named it. Here, after
        LightningCLI merged the checkpoint's hyperparameters (an older checkpoint names the
        pretrained file it was inflated from)."""
        sub = self.config.get("subcommand")
        # "last" / "best" may find no checkpoint (a first fit): the pretrained weights are then used.
        if not sub or self.config[sub].get("ckpt_path") in (None, "", "best", "last", "hpc", "registry"):
            return
        key = f"{sub}.model.net.init_args.pretrained"
        if self.config.get(key) is not None:
            self.config[key] = None

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
        if self._ckpt is not None:  # read from the command line's --ckpt_path
            ckpt = self._ckpt
        elif "://" in str(ckpt_path):  # a URL: fsspec, as Lightning will read it (weights_only=True)
            ckpt = AtomicCheckpointIO().load_checkpoint(ckpt_path)
        else:
            ckpt = load_vmm_checkpoint(ckpt_path)
        ckpt_model = _checkpoint_model_config(ckpt)
        cfg_model = self.config[sub].get("model")
        if ckpt_model is None or cfg_model is None:
            return
        cfg_model = cfg_model.as_dict() if hasattr(cfg_model, "as_dict") else dict(cfg_model)
        ckpt_net = ckpt_model["net"]["class_path"]
        cfg_net = (cfg_model.get("net") or {}).get("class_path")
        if not _is_vmm_network(ckpt_net) and cfg_net != ckpt_net:
            raise _not_a_vmm_network(ckpt_path, ckpt_net)
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
        # run=False builds one parser without subcommands: its config is the command's
        config = self.config[self.subcommand] if self.subcommand else self.config
        _check_data_num_classes(config, self.datamodule)
        if self._file_predict:
            self.save_config_callback = None  # no log directory: config.yaml would land in the cwd
        dump = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False, format="yaml"))
        callbacks = list(_section(self.config_init, self.subcommand, "trainer", {}).get("callbacks") or [])
        callbacks.append(StoreDataConfig((dump[self.subcommand] if self.subcommand else dump).get("data")))
        if self.subcommand in ("fit", "demo"):
            callbacks.append(InterruptCheckpoint())
            if not any(isinstance(cb, DataTimeMonitor) for cb in callbacks):
                callbacks.append(DataTimeMonitor())  # train/data_time
        if not any(isinstance(cb, TestReportWriter) for cb in callbacks):
            callbacks.append(TestReportWriter())  # test_results.json, confusion matrix, scores_test.json
        if self.subcommand in ("test", "demo", None):
            callbacks.append(TestRunSummary())  # after TestReportWriter: names the files it wrote
        if self.subcommand == "predict":
            callbacks.append(PredictionWriter(self.config["predict"].get("predictions")))  # checked when parsed
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    # LightningCLI runs a CLI method named like the subcommand instead of the Trainer's: not documented,
    # but no private name; the documented hooks (before_predict) cannot change what is predicted.
    def predict(self, model: LightningModule, datamodule: LightningDataModule | None = None, **kwargs: Any) -> None:
        """`vmm predict`: the given videos (decoded with the datamodule's test views), else the
        datamodule's predict set, else its test set (`lightning_modules.predict.run_predict`)."""
        top_k = self.config["predict"].get("top_k")
        run_predict(self.trainer, model, datamodule, self._predict_paths, top_k, **kwargs)


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


def _is_vmm_network(class_path: object) -> bool:
    return isinstance(class_path, str) and bool(re.fullmatch(re.escape(VMM_NETWORKS) + r"[A-Za-z_][\w.]*", class_path))


def _not_a_vmm_network(ckpt_path: str, class_path: object) -> ValueError:
    return ValueError(
        f"--ckpt_path {ckpt_path}: its network {class_path} is not one of vmm's networks ({VMM_NETWORKS}*), and "
        f"a checkpoint does not choose which code runs; if you trust that class, name it: --model.net.class_path "
        f"{class_path}"
    )


def _checkpoint_arguments(ckpt_path: str | None, argv: Sequence[str]) -> tuple[list[str], dict[str, Any] | None]:
    """The arguments given before the user's for the command line's `--ckpt_path` (its model's
    hyperparameters as `--model <json>`) and the checkpoint read; ([], None) without one.

    A checkpoint is data: the network class it names is imported (parsing imports a class_path, and
    importing a module runs its code) only when it is one of vmm's networks or the command line names
    it (`--model.net.class_path`, `--model.net`, or in a `--config`: compared after parsing)."""
    if ckpt_path is None:
        return [], None
    if not Path(ckpt_path).exists():
        raise ValueError(
            f"--ckpt_path {ckpt_path}: no such file (give the .ckpt file written by vmm fit, e.g. "
            "lightning_logs/version_0/checkpoints/last.ckpt)"
        )
    ckpt = load_vmm_checkpoint(ckpt_path)
    model_hp = _checkpoint_model_config(ckpt)
    if model_hp is None:
        return [], ckpt
    class_path = model_hp["net"]["class_path"]
    named = False
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        named |= flag in ("--model.net.class_path", "--model.net") and str(class_path) in value
    if _is_vmm_network(class_path) or named:
        return ["--model", json.dumps(model_hp)], ckpt
    if any(arg in ("-c", "--config") or arg.startswith("--config=") for arg in argv):
        return [], ckpt  # the configured network must be this one: `_check_ckpt_against_config`
    raise _not_a_vmm_network(ckpt_path, class_path)


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
