"""The dataset check: every video decoded once in parallel; unreadable files, durations, rates."""

from __future__ import annotations

import io

import pytest

from datamodules import VideoListDataModule
from datamodules.check import check_datamodule, load_datamodule, main


def _write_list(tmp_path, shared_videos):
    (tmp_path / "zero.mp4").write_bytes(b"")
    lst = tmp_path / "list.txt"
    lst.write_text(
        "kinetics_arm_wrestling.mp4 0\nh264_340x256.mp4 1\nmpeg4_320x240.avi 1\n"
        f"{tmp_path / 'zero.mp4'} 0\n{tmp_path / 'missing.mp4'} 1\n"
    )
    return lst


def test_check_datamodule_reports_bad_files_durations_and_rates(tmp_path, shared_videos):
    lst = _write_list(tmp_path, shared_videos)
    dm = VideoListDataModule(root=str(shared_videos), train_list=str(lst))
    out = io.StringIO()
    report = check_datamodule(dm, splits=["train", "test"], num_workers=2, out=out)
    assert list(report.splits) == ["train"]  # a layout without a test list: skipped
    r = report.splits["train"]
    assert (r.videos, r.readable) == (5, 3)
    assert r.unreadable == [(str(tmp_path / "zero.mp4"), "zero-byte file")]
    assert r.unusable == [(str(tmp_path / "missing.mp4"), "file not found")]  # known from the listing
    assert sorted(r.fps) == pytest.approx([25.0, 28.0, 30.0], rel=1e-3)
    assert sorted(r.durations) == pytest.approx([6.56, 10.0, 10.0], rel=1e-3)
    assert sorted(r.frames) == [164, 280, 300]
    assert not report.ok
    text = out.getvalue()
    assert "unreadable videos (1)" in text and "zero-byte file" in text
    assert "unusable entries (1)" in text and "missing.mp4: file not found" in text


def test_check_command_line_reads_the_data_section(tmp_path, shared_videos, capsys):
    lst = _write_list(tmp_path, shared_videos)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "trainer:\n  max_epochs: 1\nmodel:\n  class_path: something.Else\n"
        f"data:\n  class_path: datamodules.VideoListDataModule\n  init_args:\n"
        f"    root: {shared_videos}\n    train_list: {lst}\n    batch_size: 2\n"
    )
    assert isinstance(load_datamodule(cfg), VideoListDataModule)
    # The `python -m datamodules.check` entry point, run in-process (a subprocess would spend
    # seconds importing torch for no extra coverage).
    assert main(["--config", str(cfg), "--num-workers", "1"]) == 1  # unreadable files found
    printed = capsys.readouterr().out
    assert "train" in printed and "missing.mp4: file not found" in printed
    (tmp_path / "bad.yaml").write_text("model: {}\n")
    with pytest.raises(ValueError, match="no 'data:' section"):
        load_datamodule(tmp_path / "bad.yaml")
