"""What every `vmm` parser shares: the one YAML reader (alias bombs refused before they expand),
one-line parse errors naming the option to give, and the data section (`--config`, `--data`,
`--data.init_args.*`) that the training commands and the data commands (check-data, prepare)
spell alike."""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import ActionConfigFile, DefaultHelpFormatter
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from .cli import debug_requested
from .io import ConfigError, check_yaml_expansion

__all__ = [
    "PARSER_MODE",
    "VMMArgumentParser",
    "VMMHelpFormatter",
    "check_num_classes",
    "data_parser",
    "debug_requested",
    "drop_stale_num_classes",
    "load_yaml",
    "parse_data_section",
    "register_parser_mode",
]

# The parser mode of every vmm parser: YAML as jsonargparse reads it, alias bombs refused first.
PARSER_MODE = "vmm-yaml"


def load_yaml(value: str, path: str | Path = "") -> Any:
    """The one YAML reader of the `vmm` command line: jsonargparse's loader, after refusing alias
    bombs (see `check_yaml_expansion`): the parser copies what it loads, which expands every alias."""
    from jsonargparse import get_loader

    try:
        check_yaml_expansion(value)
    except ConfigError as exc:
        raise ConfigError(f"{path or 'a YAML value'}: {exc}") from None
    return get_loader("yaml")(value)


def register_parser_mode() -> None:
    import yaml
    from jsonargparse import set_loader

    set_loader(PARSER_MODE, load_yaml, exceptions=(yaml.YAMLError,))


def _parse_error_fix(message: str, top_level: bool = True) -> str | None:
    """A parse error as one line naming the fix; None for a multi-line report (type errors), which
    is printed as jsonargparse words it.

    jsonargparse words a missing datamodule as "required: test.data" and a datamodule without its
    root as a Union-subtype report; neither says which option to give."""
    if re.search(r"the following arguments are required: (?:[\w-]+\.)?data\b", message):
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
    # A nested parser's message becomes part of its parent's, which the rules above read as worded.
    typed = top_level and re.fullmatch(r'Parser key "([\w.]+)":\s*\n\s*([^\n]+)', message.strip())
    if typed:  # one value of the wrong type: "--format: Expected a ... Got value: zip"
        return f"--{typed[1]}: {typed[2].strip()}"
    missing = top_level and re.fullmatch(r"the following arguments are required: ([\w, ]+)", message.strip())
    if missing:  # options of the command itself, named as they are typed
        return "the following arguments are required: " + ", ".join(f"--{n.strip()}" for n in missing[1].split(","))
    if "\n" not in message.strip():  # a one-line message needs no usage block above it
        return re.sub(r'^Parser key "([\w.]+)": ', r"--\1: ", message.strip())
    return None


# Options the parser's types require that a command line may leave out: what their help says instead.
_NOT_ALWAYS_REQUIRED = {
    "videos": "optional",
    "model.net": "required unless --ckpt_path gives the checkpoint's network",
}
# Classes named in the "known subclasses" lists of the help; the others (every torch.nn.Module of
# torch and torchmetrics under --model.net) are counted.
_LISTED_PACKAGES = ("lightning_modules.", "datamodules.", "ops.", "lightning.")
# Readable titles of the parser groups (jsonargparse takes a class's first docstring line).
GROUP_TITLES = {
    "trainer": "Trainer options (lightning.Trainer, --trainer.NAME VALUE)",
    "model": "Model options (lightning_modules.VideoClassifier, --model.NAME VALUE; a network's options: "
    "--model.net.help CLASS_PATH)",
    "data": "Data options (--data CLASS_PATH, --data.init_args.NAME VALUE; a class's options: --data.help CLASS_PATH)",
}


def _listed_subclasses(match: re.Match[str]) -> str:
    names = [n.strip() for n in match[1].split(",") if n.strip()]
    listed = [n for n in names if n.startswith(_LISTED_PACKAGES)]
    others = len(names) - len(listed)
    return "known subclasses: " + ", ".join(listed + ([f"and {others} of other packages"] if others else []))


class VMMHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with "required" only on what every command line must give, and the
    "known subclasses" of an option limited to vmm's and Lightning's classes."""

    def _get_help_string(self, action: Any) -> str:
        text = super()._get_help_string(action)
        instead = _NOT_ALWAYS_REQUIRED.get(action.dest)
        if instead is not None:
            text = text.replace("(required", f"({instead}", 1)
        return re.sub(r"known subclasses: ([^)]*)", _listed_subclasses, text)


def title_groups(parser: Any, titles: dict[str, str] | None = None) -> None:
    """Give `parser`'s argument groups readable titles (`GROUP_TITLES`, then `titles`)."""
    for key, title in {**GROUP_TITLES, **(titles or {})}.items():
        group = parser.groups.get(key) if isinstance(getattr(parser, "groups", None), dict) else None
        if group is not None:
            group.title = title


class VMMArgumentParser(LightningArgumentParser):
    """Lightning's parser; parse errors are reported as one line naming the option to give
    (`_parse_error_fix`) where they can be, without the usage block; others as jsonargparse does.
    `vmm_command` (the command's name, e.g. "check-data") starts the line."""

    vmm_command: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", VMMHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        fix = _parse_error_fix(message, top_level=self.exit_on_error)
        if fix is None or not self.exit_on_error or debug_requested():
            super().error(message if fix is None else fix, ex)
        command = f"vmm {self.vmm_command}" if self.vmm_command else "vmm"
        sys.stderr.write(f"{command}: error: {fix}\n")
        raise SystemExit(2)


# ------------------------------------------------------------------------------ the data section


def data_parser(command: str, description: str) -> VMMArgumentParser:
    """A parser for a command that needs only a datamodule: `--config` (repeatable; a full run
    configuration is accepted as it is, its model and trainer sections unused), `--data CLASS_PATH`
    and `--data.init_args.*`, as fit/test spell them. The caller adds its own options."""
    register_parser_mode()
    parser = VMMArgumentParser(prog=f"vmm {command}", description=description, parser_mode=PARSER_MODE)
    parser.vmm_command = command
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="Path to a configuration file (YAML).")
    parser.add_argument("--seed_everything", type=bool | int, default=True, help=f"ignored by {command}")
    parser.add_lightning_class_args(LightningDataModule, "data", subclass_mode=True)
    parser.add_argument("--model", type=dict | None, default=None, help=f"ignored by {command}")
    parser.add_argument("--trainer", type=dict | None, default=None, help=f"ignored by {command}")
    title_groups(parser)
    return parser


def parse_data_section(parser: VMMArgumentParser, argv: Sequence[str]) -> tuple[Any, LightningDataModule]:
    """Parse `argv` with a `data_parser`; returns the parsed config and the datamodule it builds
    (a `num_classes` left from an earlier datamodule class dropped, one that disagrees with the data
    refused: see `drop_stale_num_classes` and `check_num_classes`)."""
    config = parser.parse_args(list(argv))
    drop_stale_num_classes(config, argv)
    # `instantiate` since jsonargparse 4.49, `instantiate_classes` before
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    datamodule = instantiate(config).data
    check_num_classes(config, datamodule)
    return config, datamodule


def drop_stale_num_classes(config: Any, argv: Sequence[str]) -> None:
    """Layered configurations (`--config a.yaml --config b.yaml`) keep `data.init_args` values
    across a change of `data.class_path`. A `num_classes` set only for an earlier datamodule
    class is dropped (back to the new class's default: taken from its data), with a warning.

    `config`: the parsed configuration (its `data` section; jsonargparse keeps no record of which
    file set a value, so `argv` -- its `--config` files and `--data*` options, in order -- is
    walked for it)."""
    data = config.get("data")
    init = data.get("init_args") if data is not None and hasattr(data, "get") else None
    if init is None or init.get("num_classes") is None:
        return
    final_cls = str(data.get("class_path") or "")
    source_cls = _num_classes_source(argv)
    if source_cls is None or _class_name(source_cls) == _class_name(final_cls):
        return
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


def check_num_classes(config: Any, datamodule: Any) -> None:
    """An explicit `data.init_args.num_classes` that disagrees with the datamodule's own class
    count (e.g. its `class_names`) is an error, not a model with the wrong number of outputs."""
    data = config.get("data")
    init = data.get("init_args") if data is not None and hasattr(data, "get") else None
    explicit = init.get("num_classes") if init is not None else None
    actual = getattr(datamodule, "num_classes", None)
    if explicit is not None and isinstance(actual, int) and actual != explicit:
        raise ValueError(
            f"data.init_args.num_classes={explicit} disagrees with the data: {type(datamodule).__name__} "
            f"has {actual} classes (its class names / labels); remove num_classes or make it {actual}"
        )


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
                cfg = load_yaml(Path(value).read_text(encoding="utf-8"), value)
                if isinstance(cfg, dict) and "data" in cfg:
                    take(cfg["data"])
            elif flag == "--data":
                take(load_yaml(value))
            elif flag == "--data.class_path":
                current = value
            elif flag in ("--data.init_args.num_classes", "--data.num_classes"):
                source = current
        except (OSError, yaml.YAMLError):
            continue  # the parser itself reports unreadable configs
    return source
