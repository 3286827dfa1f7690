"""The `vmm` console script: `main` dispatches `vmm <command>`.

    vmm fit|validate|test|predict --config configs/<net>_<dataset>.yaml [--key value ...]
    vmm demo --config configs/demo_sifa_synthetic.yaml     fit, then test the best checkpoint
    vmm predict --ckpt_path best.ckpt clip1.mp4 [folder/ frames/ ...]   (no dataset or config needed)
    vmm check-data --config configs/<net>_<dataset>.yaml [--write_clean_list clean.txt]
    vmm prepare --config configs/<net>_<dataset>.yaml --output /data/prepared [--format shards|files]
    vmm fuse-scores a/scores_test.json b/scores_test.json [--weights 0.5 0.5] [--output fused.json]

`main` looks at the command before importing torch or Lightning: `vmm --help`, a command's `--help`
and `fuse-scores` start at once; the names below that need them (`VMMCLI`, `VMMTrainer`, ...) are
imported on first use. The Trainer commands (fit, validate, test, predict, demo) are one LightningCLI,
`VMMCLI` (`lightning_modules.trainer_cli`); the data
commands (check-data, prepare) are small programs with the same data section (`lightning_modules.data_commands`),
so options are spelled alike everywhere (`--data.init_args.root`) and a config's overrides apply to
every command. The model is always `VideoClassifier`; the network (`--model.net`) and the datamodule
(`--data`) are given by `class_path`. `data.num_classes` is linked to the classifier's and the
network's `num_classes`, and `data.class_names` to the classifier's, so checkpoints carry the class
names. The CLI is the one place that joins data and model (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import textwrap
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported on first use: see `__getattr__`
    from .callbacks import PREDICT_SETTINGS_KEY
    from .io import ConfigError
    from .predict import predict_files
    from .reports import PredictionWriter, fuse_scores
    from .trainer import INTERRUPTED_CKPT, VMMTrainer
    from .trainer_cli import VMMCLI

__all__ = [
    "COMMANDS",
    "INTERRUPTED_CKPT",
    "PREDICT_SETTINGS_KEY",
    "ConfigError",
    "PredictionWriter",
    "VMMCLI",
    "VMMTrainer",
    "command_help",
    "debug_requested",
    "fuse_scores",
    "main",
    "predict_files",
    "quiet_third_party",
]

# Every command, in the order `vmm --help` lists them.
COMMANDS = ("fit", "validate", "test", "predict", "demo", "check-data", "prepare", "fuse-scores")
DATA_COMMAND_NAMES = ("check-data", "prepare")

# Names this module offers from the modules that import torch and Lightning, imported on first use:
# `vmm --help` and `vmm fuse-scores --help` need neither.
_LAZY_NAMES = {
    "VMMCLI": "trainer_cli",
    "VMMTrainer": "trainer",
    "INTERRUPTED_CKPT": "trainer",
    "PREDICT_SETTINGS_KEY": "callbacks",
    "ConfigError": "io",
    "PredictionWriter": "reports",
    "fuse_scores": "reports",
    "predict_files": "predict",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f"{__package__}.{_LAZY_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """`--debug` on the command line or VMM_DEBUG set (not "0"): errors keep their traceback."""
    return "--debug" in argv or os.environ.get("VMM_DEBUG", "0").strip() not in ("", "0")


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
    from .reports import fuse_scores  # torch, only once the arguments parsed

    fuse_scores(args.dumps, args.weights, args.output)


_USAGE = f"usage: vmm {{{','.join(COMMANDS)}}} [options]\n"
_HELP = f"""{_USAGE}
Motion-aware video action recognition (SIFA, Representation Flow) on PyTorch Lightning.

commands:
  fit          train:                  vmm fit --config configs/demo_sifa_synthetic.yaml [--trainer.max_epochs 3]
  validate     evaluate on val:        vmm validate --config CONFIG --ckpt_path CKPT
  test         evaluate on test:       vmm test --config CONFIG --ckpt_path CKPT  (views averaged per video)
  predict      classify videos:        vmm predict --ckpt_path CKPT clip.mp4 [folder/ frames/ ...]
               or a datamodule:        vmm predict --config CONFIG --ckpt_path CKPT
  demo         fit, then test the best checkpoint and print its accuracy: vmm demo --config CONFIG
  check-data   decode every video of a dataset once and list failures: vmm check-data --config CONFIG
  prepare      resize a dataset into shards or files: vmm prepare --config CONFIG --output DIR
  fuse-scores  fuse two models' test scores: vmm fuse-scores a/scores_test.json b/scores_test.json

Every command but fuse-scores parses the same options: --config YAML (repeatable), dotted overrides
(--data.init_args.root /data, --model.lr 0.05, --trainer.devices 2), --ckpt_path, --print_config.
`vmm <command> --help` lists the command's own options, `vmm <command> --help-all` every option.
An error caused by the input prints one line and exits 2 (usage) or 1 (bad data); add --debug (or set
VMM_DEBUG=1) for its traceback.
"""


# `vmm <command> --help` for the Trainer commands: the command's own options first, then the ones
# every command shares; `--help-all` prints jsonargparse's list of every option (Lightning's Trainer,
# the model, the datamodule classes). Written out here so it prints without importing torch; a test
# checks each option named against the full list.
HELP_ALL = "--help-all"
_COMMAND_HELP = {
    "fit": (
        "vmm fit --config CONFIG [options]",
        "Train a model. Logs (metrics.csv), config.yaml and checkpoints (best-*.ckpt by val top-1, last.ckpt) go "
        "to <trainer.default_root_dir>/lightning_logs/version_N.",
        [
            ("--ckpt_path CKPT", "resume from this checkpoint (its epoch, optimizer and schedule)"),
            ("--trainer.max_epochs N", "epochs to train"),
            ("--model.lr LR", "peak learning rate for model.base_batch_size clips"),
            ("--data.init_args.root DIR", "where the dataset is"),
            ("--data.init_args.num_workers N", "decoding processes (at most one per usable CPU)"),
        ],
    ),
    "validate": (
        "vmm validate --config CONFIG --ckpt_path CKPT [options]",
        "Evaluate a checkpoint on the validation split (one centre clip per video).",
        [("--ckpt_path CKPT", "the checkpoint to evaluate (a config without model.net is enough)")],
    ),
    "test": (
        "vmm test --config CONFIG --ckpt_path CKPT [options]",
        "Evaluate a checkpoint on the test split, averaging test_clips x test_crops views per video; writes "
        "test_results.json, confusion_matrix_test.csv/.png and scores_test.json and prints their paths.",
        [
            ("--ckpt_path CKPT", "the checkpoint to test (a config without model.net is enough)"),
            ("--data.init_args.test_clips N", "clips per video (the dataset configs' paper protocol, e.g. 10)"),
            ("--data.init_args.test_crops N", "crops per clip, 1 or 3: fewer views test faster, less accurately"),
        ],
    ),
    "predict": (
        "vmm predict --ckpt_path CKPT [videos ...] [options]",
        "Classify videos with a trained checkpoint and print each one's top-k classes. Without --config or "
        "--data, the videos are decoded with the checkpoint's class names and test views.",
        [
            (
                "videos ...",
                "video files, frame folders or folders searched for both (optional: without them, "
                "the datamodule's predict set, else its test set)",
            ),
            ("--ckpt_path CKPT", "the checkpoint (required)"),
            ("--top_k K", "classes listed per video (default: the model's top_k, 5)"),
            (
                "--predictions FILE",
                "JSON file of the predictions (default: <log_dir>/predictions.json; on files "
                "without a config: ./<checkpoint name>.predictions.json)",
            ),
        ],
    ),
    "demo": (
        "vmm demo --config configs/demo_sifa_synthetic.yaml [options]",
        "Train, then test the best checkpoint; print its accuracy, the dataset's chance level and where the "
        "checkpoint and logs are.",
        [
            ("--trainer.max_epochs N", "epochs to train"),
            ("--ckpt_path CKPT", "resume training from this checkpoint"),
        ],
    ),
    "check-data": (
        "vmm check-data --config CONFIG [options]",
        "Decode every video of the datamodule once and list the unreadable or unusable ones with per-split "
        "counts, durations and frame rates; exits with status 1 when it lists any.",
        [
            ("--splits [train, val]", "the splits to check (default: every split the layout has)"),
            ("--num_workers N", "decoding processes (default: the datamodule's)"),
            ("--write_clean_list FILE", "also write each split's list without its bad entries (clean_train.txt, ...)"),
        ],
    ),
    "prepare": (
        "vmm prepare --config CONFIG --output DIR [options]",
        "Write the datamodule's videos, resized and re-encoded, as tar shards (read by "
        "datamodules.ShardedVideoDataModule) or as a tree of files, with a meta.json; a second run with the "
        "same settings resumes.",
        [
            ("--output DIR", "the folder to write (required)"),
            ("--format shards|files", "tar shards per split (default) or a tree of files"),
            ("--short_side PIXELS", "even pixels of the re-encoded short side (default 320; 0 keeps the bytes)"),
            ("--shard_size_mb MB", "size of a shard (default 256)"),
            ("--num_workers N", "processes that decode and encode (default: min(CPUs, 8))"),
            ("--splits [train]", "the splits to write (default: every split the layout has)"),
        ],
    ),
}
_COMMON_OPTIONS = [
    ("-c, --config CONFIG", "a YAML configuration (configs/*.yaml); repeatable, later files override"),
    (
        "--data CLASS_PATH",
        "the datamodule; --data.init_args.NAME VALUE sets its options (--data.help CLASS_PATH lists them)",
    ),
    (
        "--model.net CLASS_PATH",
        "the network; --model.net.init_args.NAME VALUE, --model.NAME VALUE (lr, optimizer, ...)",
    ),
    ("--trainer.NAME VALUE", "Lightning's Trainer: --trainer.accelerator cpu, --trainer.devices 2, ..."),
    ("--seed_everything SEED", "the random seed (true: a random one)"),
    ("--print_config", "print the configuration these options give, and exit"),
    ("--debug", "a traceback instead of the one-line error (or VMM_DEBUG=1)"),
    ("-h, --help", "this help"),
    (HELP_ALL, "every option, with types and defaults (Trainer, model, datamodule)"),
]


# The data commands build a datamodule only: no model, no Trainer.
_DATA_COMMON_OPTIONS = [
    (name, "every option, with types and defaults (the command's, the datamodule's)" if name == HELP_ALL else text)
    for name, text in _COMMON_OPTIONS
    if not name.startswith(("--model", "--trainer", "--seed", "--print_config"))
]

_HELP_WIDTH = 100


def _option_lines(options: list[tuple[str, str]]) -> list[str]:
    lines = []
    for name, text in options:
        wrapped = textwrap.wrap(text, _HELP_WIDTH - 34) or [""]
        if len(name) > 30:
            lines.append(f"  {name}")
            lines += [" " * 34 + w for w in wrapped]
        else:
            lines.append(f"  {name:<30}  {wrapped[0]}")
            lines += [" " * 34 + w for w in wrapped[1:]]
    return lines


def command_help(command: str) -> str:
    """`vmm <command> --help`: its usage, what it does, its own options, the options it shares with
    the other commands, and how to list every option."""
    usage, description, own = _COMMAND_HELP[command]
    data_only = command in DATA_COMMAND_NAMES
    lines = [f"usage: {usage}", "", textwrap.fill(description, _HELP_WIDTH), ""]
    lines += [f"{command} options:", *_option_lines(own), ""]
    lines += ["common options:", *_option_lines(_DATA_COMMON_OPTIONS if data_only else _COMMON_OPTIONS), ""]
    what = "its own, the datamodule's" if data_only else "Lightning's Trainer, the model, the datamodule"
    lines.append(f"Every option ({what}): vmm {command} {HELP_ALL}")
    return "\n".join(lines) + "\n"


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
    from .io import CheckpointError, ConfigError

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


# Third-party messages about their own packaging and internals, not about the user's run: (category,
# message regex) of warnings, and words of Lightning's info lines. Installed by `main` only.
_THIRD_PARTY_WARNINGS = (
    # Lightning, when neither tensorboard nor tensorboardX is installed: it logs to CSV, as vmm documents.
    (Warning, r"Starting from v1\.9\.0, `tensorboardX` has been removed"),
    # torch deprecates LeafSpec(), which Lightning's _pytree still calls.
    (Warning, r".*LeafSpec.*deprecated"),
    # The loaders' worker counts are vmm's choice: fitted to the CPUs (datamodules.base.fitted_num_workers).
    (Warning, r"The '\w+' does not have many workers"),
    (Warning, r"This DataLoader will create \d+ worker processes in total"),
)
# Lightning's note that a ModelCheckpoint of the configuration will not resume its best-k record: a
# concern of a resumed fit only.
_NOT_FITTING_WARNINGS = ((Warning, r"The dirpath has changed from"),)
_THIRD_PARTY_INFO = ("litlogger",)
_LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropThirdPartyInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(word in message for word in _THIRD_PARTY_INFO)


@contextlib.contextmanager
def quiet_third_party(command: str | None = None) -> Iterator[None]:
    """Within: the third-party warnings and info lines that are not the user's business
    (`_THIRD_PARTY_WARNINGS`, `_THIRD_PARTY_INFO`) are not shown. Forked DataLoader workers inherit it;
    DDP's processes run `vmm` again. `command`: the vmm command that runs."""
    drop = _DropThirdPartyInfo()
    loggers = [logging.getLogger(name) for name in _LIGHTNING_INFO_LOGGERS]
    with warnings.catch_warnings():
        fitting = command in (None, "fit", "demo")
        for category, message in _THIRD_PARTY_WARNINGS + (() if fitting else _NOT_FITTING_WARNINGS):
            warnings.filterwarnings("ignore", message=message, category=category)
        for logger in loggers:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(drop)


def main(args: Sequence[str] | None = None, *, console: bool | None = None) -> None:
    """Entry point of the `vmm` console script (`args` default to sys.argv[1:]).

    `console` (default: True when `args` is None, i.e. as the console script): an error caused by
    the user's input (`_expected_exit_status`) prints one line, `vmm <command>: error: <message>`,
    to stderr and exits with status 2 (usage) or 1 (bad data); other exceptions, and every error
    under `--debug` or VMM_DEBUG=1, propagate with their traceback. From Python (`args` given),
    exceptions propagate.
    """
    argv = list(sys.argv[1:] if args is None else args)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    if console is None:
        console = args is None
    try:
        with quiet_third_party(argv[0] if argv else None):
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
    if argv[0] not in COMMANDS and not argv[0].startswith("-"):
        sys.stderr.write(f"{_USAGE}vmm: error: unknown command {argv[0]!r}; the commands: {', '.join(COMMANDS)}\n")
        raise SystemExit(2)
    if argv[0] in _COMMAND_HELP and {"-h", "--help"} & set(argv[1:]):
        print(command_help(argv[0]), end="")
        return
    if HELP_ALL in argv[1:]:
        argv = [a if a != HELP_ALL else "--help" for a in argv]
    if argv[0] in DATA_COMMAND_NAMES:
        from .data_commands import run_data_command

        if not run_data_command(argv[0], argv[1:]).ok:
            raise SystemExit(1)  # check-data found unreadable or unusable entries
        return
    from .trainer_cli import VMMCLI

    VMMCLI(args=argv)


if __name__ == "__main__":
    main()
