"""Bad data inputs: entries that cannot be used are counted and reported (never silently dropped,
never opened), list-file encodings, crop_size None with mixed aspect ratios. The synthetic cache's
bad inputs are tested in test_data_synthetic.py."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from datamodules import (
    AnnotationError,
    KineticsDataModule,
    UCF101DataModule,
    VideoFilesDataset,
    VideoFolderDataModule,
    VideoListDataModule,
    collate_clips,
)
from datamodules.check import check_datamodule
from datamodules.encode import write_video
from datamodules.frames import frame_index

TINY = dict(
    num_frames=4,
    frame_interval=2,
    eval_short_side=32,
    train_short_side=(32, 32),
    crop_size=32,
    test_clips=1,
    test_crops=1,
    num_workers=0,
    pin_memory=False,
    batch_size=2,
)


@contextlib.contextmanager
def _no_hang(seconds: int = 120):
    """Fail instead of waiting forever if anything opens a FIFO (open blocks until a writer comes)."""

    def _alarm(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s: was a FIFO opened?")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------ entries that cannot be used


def _folder_with_broken_entries(tmp_path: Path, shared_videos: Path) -> Path:
    root = tmp_path / "ds"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
        (root / split / "a" / "good.mp4").symlink_to(shared_videos / "h264_340x256.mp4")
        (root / split / "b" / "good.avi").symlink_to(shared_videos / "mpeg4_320x240.avi")
    test = root / "test"
    (test / "a" / "dangling.mp4").symlink_to(tmp_path / "gone.mp4")
    (test / "b" / "loop.mp4").symlink_to(test / "b" / "loop.mp4")  # a link to itself
    os.mkfifo(test / "a" / "pipe.mp4")
    return root


def test_folder_layout_counts_dangling_links_loops_and_fifos(tmp_path, shared_videos, caplog):
    root = _folder_with_broken_entries(tmp_path, shared_videos)
    dm = VideoFolderDataModule(root=str(root), **TINY)
    with _no_hang():
        test = dm.records("test")
        assert [Path(r.path).name for r in test] == ["dangling.mp4", "good.mp4", "pipe.mp4", "good.avi", "loop.mp4"]
        problems = {Path(r.path).name: r.problem for r in dm.unusable("test")}
        assert set(problems) == {"dangling.mp4", "pipe.mp4", "loop.mp4"}
        assert problems["dangling.mp4"].startswith("dangling symbolic link")
        assert problems["loop.mp4"] == "symbolic link loop"
        assert "FIFO" in problems["pipe.mp4"]
        assert dm.unusable("train") == []
        assert "'test' split: 3 of 5 entries cannot be used" in caplog.text
        # In the test set they are videos that could not be used: no samples, their ids reported.
        dm.setup("test")
        batches = list(dm.test_dataloader())
    ids = torch.cat([b["video_id"] for b in batches]).unique().tolist()
    bad = sorted(torch.cat([b["bad_video_ids"] for b in batches]).tolist())
    assert ids == [1, 3] and bad == [0, 2, 4]


def test_check_data_lists_unusable_entries_without_opening_them(tmp_path, shared_videos):
    root = _folder_with_broken_entries(tmp_path, shared_videos)
    dm = VideoFolderDataModule(root=str(root), **TINY)
    out = io.StringIO()
    with _no_hang():
        report = check_datamodule(dm, splits=["test"], num_workers=0, out=out)
    r = report.splits["test"]
    assert (r.videos, r.readable, r.unreadable) == (5, 2, [])
    assert sorted(Path(p).name for p, _ in r.unusable) == ["dangling.mp4", "loop.mp4", "pipe.mp4"]
    assert not report.ok
    text = out.getvalue()
    assert "unusable entries (3)" in text and "pipe.mp4: not a regular file" in text


def test_predicting_a_fifo_does_not_block_and_says_what_it_is(tmp_path, shared_videos, caplog):
    os.mkfifo(tmp_path / "pipe.mp4")
    ds = VideoFilesDataset(
        [str(tmp_path / "pipe.mp4"), str(shared_videos / "h264_340x256.mp4")], num_frames=4, short_side=32, crop_size=32
    )
    with _no_hang():
        items = [ds[0], ds[1]]
    assert items[0]["bad_video_ids"].tolist() == [0] and items[0]["video"].shape[0] == 0
    assert "pipe.mp4: not a regular file (a FIFO" in caplog.text  # not "zero-byte file"
    assert items[1]["video"].shape == (1, 3, 4, 32, 32)


class _MeanNet(nn.Module):
    """The smallest network VideoClassifier accepts: channel means -> one linear head."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(3, num_classes)

    def forward_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.fc(x.mean((2, 3, 4)))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_heads(x)[0].log_softmax(-1)


def test_missing_kinetics_videos_are_counted_in_test_results(tmp_path, shared_videos):
    from lightning.pytorch.loggers import CSVLogger

    from lightning_modules.classifier import VideoClassifier
    from lightning_modules.reports import TestReportWriter

    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "aaa_000000_000010.mp4").symlink_to(shared_videos / "kinetics_arm_wrestling.mp4")
    (tmp_path / "videos" / "bbb_000000_000010.mp4").symlink_to(shared_videos / "h264_340x256.mp4")
    ann = tmp_path / "annotations"
    ann.mkdir()
    rows = "label,youtube_id,time_start,time_end,split\nwrestle,aaa,0,10,x\nother,bbb,0,10,x\nother,ccc,0,10,x\n"
    (ann / "train.csv").write_text(rows, encoding="utf-8")
    (ann / "test.csv").write_text(rows, encoding="utf-8")
    dm = KineticsDataModule(root=str(tmp_path), video_dir=str(tmp_path / "videos"), **TINY)
    assert [r.path for r in dm.unusable("test")] == ["ccc_000000_000010"]
    model = VideoClassifier(_MeanNet(2))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path / "logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[TestReportWriter()],
    )
    trainer.test(model, datamodule=dm, verbose=False)
    [report_file] = (tmp_path / "logs").rglob("test_results.json")
    report = json.loads(report_file.read_text(encoding="utf-8"))
    assert report["num_videos"] == 2 and report["excluded_videos"] == 1
    scores = json.loads(
        (report_file.parent / "scores_test.json").read_text(encoding="utf-8")
    )  # per-video, named by record
    videos = tmp_path / "videos"
    assert [(v["video_id"], v["name"]) for v in scores["videos"]] == [
        (0, str(videos / "aaa_000000_000010.mp4")),
        (1, str(videos / "bbb_000000_000010.mp4")),
    ]
    assert scores["excluded_video_ids"] == [2]


# ------------------------------------------------------------------ list files: encodings


def test_list_files_in_latin1_name_the_file_and_line(tmp_path):
    (tmp_path / "list.txt").write_bytes("a.mp4 0\ncaf\u00e9.mp4 1\n".encode("latin-1"))
    dm = VideoListDataModule(root=str(tmp_path), train_list="list.txt", num_classes=2)
    with pytest.raises(AnnotationError, match=r"list.txt:2: not UTF-8 text \(byte 0xe9 at column 4\)"):
        dm.records("train")
    ann = tmp_path / "annotations"
    ann.mkdir()
    (ann / "train.csv").write_bytes("label,youtube_id,time_start,time_end,split\ncaf\u00e9,a,0,1,x\n".encode("latin-1"))
    with pytest.raises(AnnotationError, match=r"train.csv:2: not UTF-8 text"):
        _ = KineticsDataModule(root=str(tmp_path)).class_names


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_entry(tmp_path):
    bom = "\ufeff"
    (tmp_path / "list.txt").write_text(f"{bom}a.mp4 0\nb.mp4 1\n", encoding="utf-8")
    recs = VideoListDataModule(root=str(tmp_path), train_list="list.txt").records("train")
    assert [r.path for r in recs] == [str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")]
    ann = tmp_path / "annotations"
    ann.mkdir()
    (ann / "train.csv").write_text(f"{bom}label,youtube_id,time_start,time_end,split\nrun,a,0,1,x\n", encoding="utf-8")
    assert KineticsDataModule(root=str(tmp_path)).class_names == ["run"]
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text(f"{bom}1 Archery\n2 YoYo\n", encoding="utf-8")
    (lists / "trainlist01.txt").write_text(f"{bom}YoYo/v_YoYo_g01_c01.avi 2\n", encoding="utf-8")
    (lists / "testlist01.txt").write_text(f"{bom}Archery/v_Archery_g01_c01.avi\n", encoding="utf-8")
    ucf = UCF101DataModule(root=str(tmp_path))
    assert ucf.class_names == ["Archery", "YoYo"]
    assert ucf.records("train")[0].path == str(tmp_path / "YoYo" / "v_YoYo_g01_c01.avi")
    assert ucf.records("test")[0].label == 0


def test_a_json_class_names_file_is_read_as_json(tmp_path):
    (tmp_path / "list.txt").write_text("a.mp4 0\nb.mp4 1\n", encoding="utf-8")

    def names(file: str, text: str) -> list[str]:
        (tmp_path / file).write_text(text, encoding="utf-8")
        return VideoListDataModule(root=str(tmp_path), train_list="list.txt", class_names=file).class_names

    # Something-Something V2's labels.json: name -> id as a string, not in id order.
    assert names("labels.json", '{"Pushing something": "1", "Closing something": "0"}') == [
        "Closing something",
        "Pushing something",
    ]
    assert names("ids.json", '{"walk": 1, "run": 0}') == ["run", "walk"]
    assert names("list.json", '["run", "walk"]') == ["run", "walk"]
    assert names("names.txt", "run\nwalk, fast\n") == ["run", "walk, fast"]
    for file, text, why in (
        ("bad.json", '{"run": "0", "walk": "0"}', r"bad.json: expected the ids 0\.\.1 once each"),
        ("bad2.json", '{"run": "zero"}', r"bad2.json: expected integer class ids"),
        ("bad3.json", '{"run": 0', r"bad3.json:1: not valid JSON"),
        ("bad4.json", '["run", "run"]', r"bad4.json: duplicate class names"),
        ("bad5.json", '"run"', r"bad5.json: expected a JSON object \{class name: id\} or a list of class names"),
        ("json.txt", '{"run": 0, "walk": 1}', r"json.txt:1: expected one class name per line, got JSON"),
    ):
        with pytest.raises(AnnotationError, match=why):
            names(file, text)


def test_extra_list_columns_are_refused_or_read_as_the_offset_form(tmp_path):
    from datamodules import RawFrameListDataModule

    def records(text: str, cls=VideoListDataModule, **kw):
        (tmp_path / "list.txt").write_text(text, encoding="utf-8")
        return cls(root=str(tmp_path), train_list="list.txt", num_classes=4, **kw).records("train")

    with pytest.raises(
        AnnotationError, match=r"list.txt:2: expected 'path label', got 2 number columns after the path .*multi-label"
    ):
        records("a.mp4 1\ntest.mp4 0 3\n")
    with pytest.raises(AnnotationError, match=r"list.txt:1: expected 'path label', got 3 number columns"):
        records("clip.mp4 1.5 3.0 2\n")  # a time window
    (tmp_path / "take 2").write_bytes(b"\0")  # a path with spaces that ends in a number, on disk
    assert [r.path for r in records("take 2 1\nmy clip.mp4 3\n")] == [
        str(tmp_path / "take 2"),
        str(tmp_path / "my clip.mp4"),
    ]
    # MMAction2's with-offset rawframes: frame i is file number frame_start_index + offset + i.
    recs = records("v1 10 2\nmy v2 5 20 3\n", cls=RawFrameListDataModule)
    assert [(Path(r.path).name, r.offset, r.num_frames, r.label) for r in recs] == [
        ("v1", 0, 10, 2),
        ("my v2", 5, 20, 3),
    ]
    frames = tmp_path / "v3"
    frames.mkdir()
    for i in range(1, 9):  # frames 1..8; the list uses 4..8 (offset 3, 5 frames)
        Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(frames / f"img_{i:05d}.png")
    (rec,) = records("v3 3 5 1\n", cls=RawFrameListDataModule, frame_template="img_{:05d}.png")
    index = frame_index(rec.path, rec.template, rec.start_index, rec.num_frames, rec.offset)
    assert index.num_frames == 5 and Path(index.file(0)).name == "img_00004.png"
    (rec,) = records("v3 3 5 1\n", cls=RawFrameListDataModule, frame_template="img_{:05d}.png", trust_counts=False)
    assert frame_index(rec.path, rec.template, rec.start_index, rec.num_frames, rec.offset).num_frames == 5
    with pytest.raises(AnnotationError, match=r"list.txt:1: expected 'frame_dir total_frames label' or 'frame_dir "):
        records("v4 0 10 1 2\n", cls=RawFrameListDataModule)  # multi-label
    with pytest.raises(AnnotationError, match=r"list.txt:1: offset: expected >= 0, got -1"):
        records("v5 -1 10 1\n", cls=RawFrameListDataModule)


# ------------------------------------------------------------------ crop_size None


def test_crop_size_none_with_mixed_aspect_ratios_names_crop_size(tmp_path, shared_videos):
    portrait = np.random.default_rng(0).integers(0, 256, (8, 48, 32, 3), dtype=np.uint8)
    write_video(tmp_path / "portrait.mp4", portrait, fps=8)
    ds = VideoFilesDataset(
        [str(shared_videos / "h264_340x256.mp4"), str(tmp_path / "portrait.mp4")],
        num_frames=4,
        short_side=32,
        crop_size=None,
    )
    items = [ds[0], ds[1]]
    assert items[0]["video"].shape[-2:] == (32, 42) and items[1]["video"].shape[-2:] == (48, 32)
    with pytest.raises(ValueError, match=r"crop_size: null .* set crop_size"):
        collate_clips(items)
    assert collate_clips([items[0], ds[0]])["video"].shape[0] == 2  # same size: fine


# ------------------------------------------------------------------ a stream that reports 0x0 frames


def _zero_size_avi(path: Path) -> Path:
    """A real rawvideo AVI whose headers (avih, the stream's BITMAPINFOHEADER) say 0x0: FFmpeg then
    reports width = height = 0, and nothing in the file says otherwise (raw frames carry no size)."""
    import struct

    import av

    with av.open(str(path), "w", format="avi") as c:
        s = c.add_stream("rawvideo", rate=10)
        s.width, s.height, s.pix_fmt = 32, 24, "bgr24"
        for i in range(6):
            frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), 40 * i, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
    data = bytearray(path.read_bytes())
    struct.pack_into("<II", data, data.index(b"avih") + 8 + 32, 0, 0)  # dwWidth, dwHeight
    struct.pack_into("<ii", data, data.index(b"strf") + 8 + 4, 0, 0)  # biWidth, biHeight
    path.write_bytes(bytes(data))
    return path


def test_a_stream_reporting_zero_width_and_height_is_a_bad_video(tmp_path, shared_videos):
    import av

    from datamodules.decode import VideoDecodeError, build_index

    zero = _zero_size_avi(tmp_path / "zero.avi")
    with av.open(str(zero)) as c:  # the file is what the test says it is
        assert (c.streams.video[0].codec_context.width, c.streams.video[0].codec_context.height) == (0, 0)
    with pytest.raises(VideoDecodeError, match=r"zero.avi: .*0x0"):
        build_index(zero)
    lst = tmp_path / "list.txt"
    lst.write_text(f"{shared_videos / 'h264_340x256.mp4'} 0\n{zero} 1\n", encoding="utf-8")
    dm = VideoListDataModule(root="/", train_list=str(lst), test_list=str(lst), **TINY)
    items = [dm.dataset("test")[i] for i in range(2)]  # excluded at test: no samples, its id counted
    assert [len(it["label"]) for it in items] == [1, 0] and items[1]["bad_video_ids"].tolist() == [1]
    report = check_datamodule(dm, splits=["test"], num_workers=0, print_table=False)
    assert [(Path(p).name, "0x0" in why) for p, why in report.splits["test"].unreadable] == [("zero.avi", True)]


# ------------------------------------------------------------------ Kinetics: an unlabelled test CSV


def test_kinetics_test_csv_without_labels_is_an_unlabelled_split_for_predict(tmp_path, shared_videos):
    from lightning_modules.classifier import VideoClassifier

    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "aaa_000000_000010.mp4").symlink_to(shared_videos / "kinetics_arm_wrestling.mp4")
    (tmp_path / "videos" / "bbb_000000_000010.mp4").symlink_to(shared_videos / "h264_340x256.mp4")
    ann = tmp_path / "annotations"
    ann.mkdir()
    (ann / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\nwrestle,aaa,0,10,train\nother,bbb,0,10,train\n", encoding="utf-8"
    )
    # The official Kinetics test CSV has no label column.
    (ann / "test.csv").write_text("youtube_id,time_start,time_end,split\nbbb,0,10,test\naaa,0,10,test\n", "utf-8")
    dm = KineticsDataModule(root=str(tmp_path), video_dir=str(tmp_path / "videos"), **TINY)
    assert [(Path(r.path).name, r.label) for r in dm.records("test")] == [
        ("bbb_000000_000010.mp4", -1),
        ("aaa_000000_000010.mp4", -1),
    ]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    model = VideoClassifier(_MeanNet(2), class_names=dm.class_names)
    out = trainer.predict(model, dataloaders=dm.test_dataloader())
    assert sum(len(o["video_id"]) for o in out) == 2
    with pytest.raises(ValueError, match=r"test.csv has no label column: .*vmm predict"):
        trainer.test(model, datamodule=dm)
    with pytest.raises(ValueError, match=r"no labelled validation split: .*val_csv"):
        trainer.validate(model, datamodule=dm)
    (ann / "train.csv").write_text("youtube_id,time_start,time_end,split\naaa,0,10,train\n", encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"train.csv:1: header lacks column\(s\) \['label'\]"):
        _ = KineticsDataModule(root=str(tmp_path), video_dir=str(tmp_path / "videos"), **TINY).class_names


def test_a_json_annotation_list_where_a_text_list_is_expected_names_the_format(tmp_path):
    from datamodules import RawFrameListDataModule

    entries = [{"filename": "a.mp4", "label": 0}, {"filename": "b.mp4", "label": 1}]
    for name, text in (("list.json", json.dumps(entries, indent=2)), ("list.txt", json.dumps(entries))):
        (tmp_path / name).write_text(text, encoding="utf-8")
        for dm, form in ((VideoListDataModule, "path label"), (RawFrameListDataModule, "frame_dir num_frames label")):
            with pytest.raises(AnnotationError, match=rf"{name}: unsupported format \(JSON\): expected '{form}' lines"):
                dm(root=str(tmp_path), train_list=str(tmp_path / name), num_classes=2).records("train")
    # A path that starts with a bracket is still a path.
    (tmp_path / "brackets.txt").write_text("[take 1] a.mp4 1\n", encoding="utf-8")
    records = VideoListDataModule(root=str(tmp_path), train_list=str(tmp_path / "brackets.txt")).records("train")
    assert [(Path(r.path).name, r.label) for r in records] == [("[take 1] a.mp4", 1)]


def test_duplicate_list_lines_are_counted_and_warned(tmp_path, caplog):
    lst = tmp_path / "list.txt"
    lst.write_text("a.mp4 0\nb.mp4 1\na.mp4 0\na.mp4 1\nc.mp4 1\n", encoding="utf-8")
    dm = VideoListDataModule(root=str(tmp_path), train_list=str(lst), **TINY)
    with caplog.at_level("WARNING"):
        records = dm.records("train")
    assert len(records) == 5  # kept as listed: each line is an entry
    assert dm.duplicate_entries("train") == {str(tmp_path / "a.mp4"): 3}
    assert "'train' split: 2 duplicate entries (a path listed more than once" in caplog.text
    assert "a.mp4 (3 times, labels [0, 1])" in caplog.text
