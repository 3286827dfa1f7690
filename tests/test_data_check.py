"""The dataset check: every video decoded once in parallel; unreadable files, durations, rates."""

from __future__ import annotations

import io
import os

import pytest

from datamodules import VideoListDataModule
from datamodules.check import check_datamodule


def _write_list(tmp_path, shared_videos):
    (tmp_path / "zero.mp4").write_bytes(b"")
    lst = tmp_path / "list.txt"
    lst.write_text(
        "kinetics_arm_wrestling.mp4 0\nh264_340x256.mp4 1\nmpeg4_320x240.avi 1\n"
        f"{tmp_path / 'zero.mp4'} 0\n{tmp_path / 'missing.mp4'} 1\n",
        encoding="utf-8",
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


def _shared_split_lists(tmp_path):
    """A train list and a test list that share two files; the test list also lists a zero-byte file."""
    (tmp_path / "zero.mp4").write_bytes(b"")
    train = tmp_path / "train.txt"
    train.write_text("kinetics_arm_wrestling.mp4 0\nh264_340x256.mp4 1\nmpeg4_320x240.avi 1\n", encoding="utf-8")
    test = tmp_path / "test.txt"
    test.write_text(
        f"h264_340x256.mp4 1\nmpeg4_320x240.avi 1\n{tmp_path / 'zero.mp4'} 0\n{tmp_path / 'gone.mp4'} 1\n",
        encoding="utf-8",
    )
    return train, test


def test_files_shared_by_splits_are_decoded_once_and_clean_lists_drop_bad_entries(tmp_path, shared_videos):
    from datamodules.check import write_clean_lists

    train, test = _shared_split_lists(tmp_path)
    dm = VideoListDataModule(root=str(shared_videos), train_list=str(train), test_list=str(test))
    report = check_datamodule(dm, num_workers=0, print_table=False)
    # val falls back to the test list: three splits, four distinct openable files, each decoded once
    assert list(report.splits) == ["train", "val", "test"] and report.decoded == 4
    assert [report.splits[s].readable for s in ("train", "val", "test")] == [3, 2, 2]
    assert report.unreadable == [(str(tmp_path / "zero.mp4"), "zero-byte file")]  # once, not once per split
    assert report.unusable == [(str(tmp_path / "gone.mp4"), "file not found")]
    written = write_clean_lists(dm, report, tmp_path / "out" / "clean.txt")
    assert [p.name for p in written] == ["clean_train.txt", "clean_val.txt", "clean_test.txt"]
    assert (tmp_path / "out" / "clean_test.txt").read_text(encoding="utf-8") == (
        f"{shared_videos / 'h264_340x256.mp4'} 1\n{shared_videos / 'mpeg4_320x240.avi'} 1\n"
    )
    # The clean lists are VideoListDataModule lists (absolute paths: any root) that check clean.
    clean = VideoListDataModule(root="/nonexistent", train_list=str(written[0]), test_list=str(written[2]))
    again = check_datamodule(clean, num_workers=0, print_table=False)
    assert again.ok and again.decoded == 3 and again.splits["train"].readable == 3


def test_clean_list_of_frame_folders_is_a_rawframe_list(tmp_path):
    import numpy as np
    from helpers.frames import write_jpeg_folder

    from datamodules import RawFrameListDataModule
    from datamodules.check import clean_list_files, write_clean_lists

    frames = np.zeros((6, 16, 16, 3), dtype=np.uint8)
    write_jpeg_folder(tmp_path / "a", frames)
    write_jpeg_folder(tmp_path / "b", frames[:3])  # lists 6 frames, holds 3: unreadable
    lst = tmp_path / "frames.txt"
    lst.write_text("a 6 0\nb 6 1\na 2 4 1\n", encoding="utf-8")  # the last: with an offset
    dm = RawFrameListDataModule(root=str(tmp_path), train_list=str(lst))
    report = check_datamodule(dm, num_workers=0, print_table=False)
    assert [p for p, _ in report.unreadable] == [str(tmp_path / "b")]
    (tmp_path / "lists").mkdir()
    (tmp_path / "clean_train.txt").symlink_to(tmp_path / "lists" / "kept.txt")  # written through, kept
    (written,) = write_clean_lists(dm, report, tmp_path / "clean.txt")
    assert written.is_symlink()
    assert (tmp_path / "lists" / "kept.txt").read_text(
        encoding="utf-8"
    ) == f"# frame_template: 'img_{{:05d}}.jpg'  frame_start_index: 1\n{tmp_path / 'a'} 6 0\n{tmp_path / 'a'} 2 4 1\n"
    os.mkfifo(tmp_path / "fifo_train.txt")
    with pytest.raises(ValueError, match=r"write_clean_list: cannot write .*fifo_train.txt: it is a FIFO"):
        clean_list_files(dm, ["train"], tmp_path / "fifo.txt")
    assert RawFrameListDataModule(root="/", train_list=str(written)).records("train")[0].path == str(tmp_path / "a")


def test_clean_list_refuses_windowed_entries_and_folders(tmp_path, shared_videos):
    from datamodules import KineticsDataModule
    from datamodules.check import clean_list_files

    train, _ = _shared_split_lists(tmp_path)
    dm = VideoListDataModule(root=str(shared_videos), train_list=str(train))
    with pytest.raises(ValueError, match="write_clean_list: expected a file path, got the existing folder"):
        clean_list_files(dm, ["train"], tmp_path)
    # Untrimmed Kinetics: the CSV's [time_start, time_end) window is part of the entry.
    (tmp_path / "k400" / "annotations").mkdir(parents=True)
    (tmp_path / "k400" / "annotations" / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\narm wrestling,abc,1,4,train\n", encoding="utf-8"
    )
    (tmp_path / "k400" / "abc.mp4").symlink_to(shared_videos / "kinetics_arm_wrestling.mp4")
    kinetics = KineticsDataModule(root=str(tmp_path / "k400"))
    with pytest.raises(ValueError, match=r"write_clean_list: the 'train' split has 1 entries with a time window"):
        clean_list_files(kinetics, ["train", "test"], tmp_path / "clean.txt")


def test_clean_list_in_an_unwritable_folder_fails_before_decoding(tmp_path, shared_videos, capsys):
    from datamodules.check import clean_list_files
    from lightning_modules.cli import main as vmm_main

    train, _ = _shared_split_lists(tmp_path)
    dm = VideoListDataModule(root=str(shared_videos), train_list=str(train))
    # /proc takes no new files, whoever runs the test (root included).
    with pytest.raises(ValueError, match=r"write_clean_list: cannot write '/proc/x_train.txt': directory '/proc'"):
        clean_list_files(dm, ["train"], "/proc/x.txt")
    args = ["check-data", "--data", "VideoListDataModule", "--data.init_args.root", str(shared_videos)]
    args += ["--data.init_args.train_list", str(train), "--write_clean_list", "/proc/x.txt"]
    with pytest.raises(ValueError, match="directory '/proc' is not writable"):
        vmm_main(args)
    assert "train" not in capsys.readouterr().out  # no table: nothing was decoded


def test_frame_folders_table_has_no_nan_and_an_empty_split_is_an_error(tmp_path):
    import numpy as np
    from helpers.frames import write_jpeg_folder

    from datamodules import RawFrameListDataModule

    write_jpeg_folder(tmp_path / "a", np.zeros((6, 16, 16, 3), dtype=np.uint8))
    (tmp_path / "train.txt").write_text("a 6 0\n", encoding="utf-8")
    (tmp_path / "test.txt").write_text("# nothing listed yet\n", encoding="utf-8")
    dm = RawFrameListDataModule(
        root=str(tmp_path), train_list=str(tmp_path / "train.txt"), test_list=str(tmp_path / "test.txt"), num_classes=2
    )
    out = io.StringIO()
    report = check_datamodule(dm, splits=["train", "test"], num_workers=0, out=out)
    text = out.getvalue()
    assert "nan" not in text.lower(), text
    assert "frames (min/med/max)" in text and "6" in text.splitlines()[2]
    assert report.splits["train"].summary()["duration_min_med_max"] is None  # JSON-safe: no NaN
    assert not report.ok and report.empty_splits == ["test"]
    assert "empty splits (1): test (no entries listed)" in text
