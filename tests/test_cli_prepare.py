"""`vmm prepare` on a tiny real dataset: a folder of the shared clips (one of them broken), written
as files and as shards; what it prints, meta.json, and one-line errors for bad options."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lightning_modules.cli import main


@pytest.fixture
def clip_folder(tmp_path, shared_videos) -> Path:
    """root/{train,test}/<class>/<clip>: 2 train clips, 1 test clip and a zero-byte test "clip"."""
    root = tmp_path / "clips"
    for split, cls, name, source in (
        ("train", "arm", "a.mp4", "kinetics_arm_wrestling.mp4"),
        ("train", "other", "b.avi", "mpeg4_320x240.avi"),
        ("test", "other", "c.mp4", "h264_340x256.mp4"),
    ):
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        (root / split / cls / name).symlink_to(shared_videos / source)
    (root / "test" / "arm").mkdir(parents=True)
    (root / "test" / "arm" / "zero.mp4").write_bytes(b"")
    return root


def _data(root: Path) -> list[str]:
    return ["--data", "datamodules.VideoFolderDataModule", "--data.init_args.root", str(root)]


@pytest.mark.slow
def test_prepare_writes_files_and_shards_and_reports_each_split(clip_folder, tmp_path, capsys):
    out = tmp_path / "prepared_files"
    main(["prepare", *_data(clip_folder), "--output", str(out), "--format", "files", "--short_side", "64",
          "--num_workers", "0"])  # fmt: skip
    printed = capsys.readouterr().out
    assert f"meta.json written to {out / 'meta.json'}" in printed
    assert re.search(r"train: 2 videos, 0 bad", printed) and re.search(r"test: 1 videos, 1 bad", printed)
    assert re.search(r"bad: .*zero\.mp4: ", printed)
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["layout"] == "files" and meta["classes"] == ["arm", "other"]
    assert meta["source"]["datamodule"] == "datamodules.VideoFolderDataModule"
    assert meta["source"]["init_args"]["root"] == str(clip_folder)
    assert meta["splits"]["train"]["num_samples"] == 2 and meta["splits"]["test"]["num_bad"] == 1
    for name in meta["splits"]["train"]["files"]:
        assert (out / "train" / (name if isinstance(name, str) else name["name"])).is_file()
    shards = tmp_path / "prepared_shards"
    main(["prepare", *_data(clip_folder), "--output", str(shards), "--short_side", "0", "--splits", "[train]",
          "--num_workers", "0"])  # fmt: skip
    meta = json.loads((shards / "meta.json").read_text(encoding="utf-8"))
    assert meta["layout"] == "shards" and list(meta["splits"]) == ["train"]
    assert sorted(p.name for p in (shards / "train").glob("shard-*.tar")) == ["shard-000000.tar"]


def test_prepare_errors_are_one_line(clip_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VMM_DEBUG", raising=False)
    taken = tmp_path / "a_file"
    taken.write_text("not a folder", encoding="utf-8")
    cases = [  # (arguments, what the one line must say)
        ([*_data(clip_folder)], r"--output"),
        ([*_data(clip_folder), "--output", str(tmp_path / "o"), "--format", "zip"], r"--format|format"),
        ([*_data(clip_folder), "--output", str(tmp_path / "o"), "--short_side", "33"], r"short_side: expected"),
        ([*_data(clip_folder), "--output", str(taken)], r"output: expected a folder"),
    ]
    for args, says in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(["prepare", *args], console=True)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("vmm prepare: error: "), (args, err)
        assert re.search(says, err[0]), (args, err)
