"""The `vmm` commands that need only a datamodule (no model, no Trainer), each a small program on
Lightning's `LightningArgumentParser` with the data section of fit/test (`arguments.data_parser`):

    vmm check-data --config CONFIG [--splits [train, val]] [--num_workers 4] [--write_clean_list clean.txt]
    vmm prepare --config CONFIG --output DIR [--format shards|files] [--short_side 320] [--splits [train]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from lightning.pytorch import LightningDataModule

from .arguments import data_parser, parse_data_section, title_groups

__all__ = ["CHECK_DATA", "DATA_COMMANDS", "PREPARE", "DataCommandRun", "check_data", "prepare", "run_data_command"]

CHECK_DATA = "check-data"
PREPARE = "prepare"


@dataclass
class DataCommandRun:
    """What a data command built and found: its datamodule and, for check-data, its report."""

    command: str
    datamodule: LightningDataModule
    check_report: Any = None  # datamodules.check.DataCheckReport
    meta: dict[str, Any] | None = None  # prepare: what it wrote to meta.json

    @property
    def ok(self) -> bool:
        """Whether the command found nothing wrong (`vmm` exits with status 1 otherwise)."""
        return self.check_report is None or self.check_report.ok


def check_data(
    datamodule: LightningDataModule,
    splits: list[str] | None = None,
    num_workers: int | None = None,
    decoder_threads: int | None = None,
    write_clean_list: str | None = None,
) -> Any:
    """`vmm check-data`: decode every distinct video of the datamodule once (a file listed in
    several splits is decoded once) and print per-split counts, durations, frame rates and
    the unreadable or unusable entries. Returns the `DataCheckReport`; `vmm` exits with status 1
    when it lists any bad entry.

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
    if write_clean_list is not None:
        for path in write_clean_lists(datamodule, report, write_clean_list):
            print(f"clean list written to {path}")
    return report


def prepare(
    datamodule: LightningDataModule,
    output: str,
    format: Literal["shards", "files"] = "shards",
    short_side: int = 320,
    shard_size_mb: float = 256.0,
    num_workers: int | None = None,
    splits: list[str] | None = None,
    source_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`vmm prepare`: write the datamodule's videos, resized, as tar shards or as a tree of files
    (`datamodules.prepare.prepare_dataset`; docs/scale.md), then print where meta.json went and
    each split's counts and bad videos. Returns the meta dict.

    Args:
        datamodule: a `datamodules.VideoDataModule` (`--data`).
        output: the folder to write (new, or prepared before with the same settings: resumed).
        format: "shards" (WebDataset-style tars per split) or "files" (the tree, resized).
        short_side: even pixels of the re-encoded short side; 0 packs the original bytes.
        shard_size_mb: size of a shard in MB (10^6 bytes).
        num_workers: processes that decode and encode (default: min(cpus, 8); 0: this process).
        splits: the splits to write (default: every split the layout has).
        source_config: the datamodule's {class_path, init_args} recorded in meta.json.
    """
    from datamodules.prepare import prepare_dataset  # the data stack on demand

    meta = prepare_dataset(
        datamodule,
        output,
        format=format,
        short_side=short_side,
        shard_size_mb=shard_size_mb,
        num_workers=num_workers,
        splits=splits,
        source_config=source_config,
    )
    print(f"meta.json written to {Path(output).expanduser() / 'meta.json'} ({meta['layout']})")
    for split, summary in meta["splits"].items():
        print(f"  {split}: {summary['num_samples']} videos, {summary['num_bad']} bad")
        for path, reason in summary["bad"]:
            print(f"    bad: {path}: {reason}")
    return meta


def _check_data_main(argv: Sequence[str]) -> DataCommandRun:
    parser = data_parser(CHECK_DATA, "Decode every video of the datamodule once and list the unreadable ones.")
    parser.add_function_arguments(check_data, skip={"datamodule"})
    title_groups(parser, {"check_data": "check-data options"})
    for i, arg in enumerate(argv):  # "--splits" before another option parses as no list at all
        if arg == "--splits" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            raise ValueError("--splits: expected one or more of train, val, test (e.g. --splits [train, val])")
    config, datamodule = parse_data_section(parser, argv)
    options = {k: config.get(k) for k in ("splits", "num_workers", "decoder_threads", "write_clean_list")}
    return DataCommandRun(CHECK_DATA, datamodule, check_data(datamodule, **options))


def _prepare_main(argv: Sequence[str]) -> DataCommandRun:
    parser = data_parser(PREPARE, "Write the datamodule's videos, resized, as tar shards or files, with a meta.json.")
    parser.add_function_arguments(prepare, skip={"datamodule", "source_config"})
    title_groups(parser, {"prepare": "prepare options"})
    config, datamodule = parse_data_section(parser, argv)
    source = yaml.safe_load(parser.dump(config))["data"]  # as the config spells it, for meta.json
    options = {k: config.get(k) for k in ("output", "format", "short_side", "shard_size_mb", "num_workers", "splits")}
    return DataCommandRun(PREPARE, datamodule, meta=prepare(datamodule, source_config=source, **options))


DATA_COMMANDS = {CHECK_DATA: _check_data_main, PREPARE: _prepare_main}


def run_data_command(command: str, argv: Sequence[str]) -> DataCommandRun:
    """Run `vmm <command> <argv>` for one of `DATA_COMMANDS`."""
    return DATA_COMMANDS[command](list(argv))
