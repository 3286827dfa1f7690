"""Annotation layouts: label conventions, missing videos, malformed lines, CLI construction."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import datamodules
from datamodules import (
    AnnotationError,
    HMDB51DataModule,
    KineticsDataModule,
    UCF101DataModule,
    VideoFolderDataModule,
    VideoListDataModule,
)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0")  # parsing only looks at names; decoding is tested elsewhere
    return path


def test_folder_layout_sorted_class_folders(tmp_path):
    for split in ("train", "test"):
        for cls in ("walk", "Jump", "run"):
            _touch(tmp_path / split / cls / f"{cls}_1.mp4")
            _touch(tmp_path / split / cls / f"{cls}_2.avi")
        _touch(tmp_path / split / "run" / "notes.txt")
    dm = VideoFolderDataModule(root=str(tmp_path))
    assert dm.class_names == ["Jump", "run", "walk"]  # sorted, as ImageFolder / the toolkits do
    assert dm.num_classes == 3
    train = dm.records("train")
    assert len(train) == 6
    assert {(Path(r.path).parent.name, r.label) for r in train} == {("Jump", 0), ("run", 1), ("walk", 2)}
    assert dm.records("val") == dm.records("test")  # no val/ folder: validation uses test/
    (tmp_path / "test" / "swim").mkdir()
    with pytest.raises(AnnotationError, match="swim"):
        VideoFolderDataModule(root=str(tmp_path)).records("test")


def test_path_label_list(tmp_path):
    (tmp_path / "train.txt").write_text("a/x 1.mp4 2\nb/y.mp4 0\n\n# comment\nc/z.mp4 1\n", encoding="utf-8")
    (tmp_path / "val.txt").write_text("a/q.mp4 1\n", encoding="utf-8")
    dm = VideoListDataModule(root=str(tmp_path), train_list="train.txt", test_list=str(tmp_path / "val.txt"))
    assert dm.class_names == ["0", "1", "2"]
    recs = dm.records("train")
    assert [(Path(r.path).relative_to(tmp_path).as_posix(), r.label) for r in recs] == [
        ("a/x 1.mp4", 2),
        ("b/y.mp4", 0),
        ("c/z.mp4", 1),
    ]
    assert dm.records("val") == dm.records("test")
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nbird\n", encoding="utf-8")
    assert VideoListDataModule(root=str(tmp_path), train_list="train.txt", class_names=str(names)).class_names == [
        "cat",
        "dog",
        "bird",
    ]
    (tmp_path / "bad.txt").write_text("a.mp4 0\nb.mp4 7\n", encoding="utf-8")
    dm = VideoListDataModule(root=str(tmp_path), train_list="bad.txt", num_classes=3)
    with pytest.raises(AnnotationError, match=r"bad.txt:2: unknown class 7"):
        dm.records("train")
    (tmp_path / "bad2.txt").write_text("a.mp4 0\nonlyonefield\n", encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"bad2.txt:2: expected 'path label'"):
        VideoListDataModule(root=str(tmp_path), train_list="bad2.txt", num_classes=3).records("train")
    (tmp_path / "bad3.txt").write_text("a.mp4 zero\n", encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"bad3.txt:1: label must be an integer"):
        VideoListDataModule(root=str(tmp_path), train_list="bad3.txt", num_classes=3).records("train")


KINETICS_TRAIN = """label,youtube_id,time_start,time_end,split,is_cc
"arm wrestling",aaa,10,20,train,0
abseiling,bbb,0,10,train,0
"arm wrestling",ccc,5,15,train,1
"zumba, dance",ddd,30,40,train,0
abseiling,eee,1,11,train,0
"""


def test_kinetics_csv_trimmed_untrimmed_missing(tmp_path, caplog):
    ann = tmp_path / "annotations"
    ann.mkdir()
    (ann / "train.csv").write_text(KINETICS_TRAIN, encoding="utf-8")
    (ann / "validate.csv").write_text(
        'label,youtube_id,time_start,time_end,split\n"zumba, dance",fff,0,10,val\n', encoding="utf-8"
    )
    (ann / "test.csv").write_text(
        "label,youtube_id,time_start,time_end,split\nskydiving,ggg,0,10,test\n", encoding="utf-8"
    )
    _touch(tmp_path / "train" / "arm wrestling" / "aaa_000010_000020.mp4")  # trimmed, class folder
    _touch(tmp_path / "train" / "bbb_000000_000010.mp4")  # trimmed, flat
    _touch(tmp_path / "raw" / "ddd.mkv")  # untrimmed: the window is kept
    _touch(tmp_path / "val" / "fff_000000_000010.mp4")
    dm = KineticsDataModule(root=str(tmp_path))
    assert dm.class_names == ["abseiling", "arm wrestling", "zumba, dance"]  # sorted training labels
    with caplog.at_level(logging.WARNING):
        train = dm.records("train")
    by_name = {Path(r.path).name: r for r in train if r.problem is None}
    assert set(by_name) == {"aaa_000010_000020.mp4", "bbb_000000_000010.mp4", "ddd.mkv"}
    assert by_name["aaa_000010_000020.mp4"].label == 1 and by_name["aaa_000010_000020.mp4"].start is None
    assert (by_name["ddd.mkv"].label, by_name["ddd.mkv"].start, by_name["ddd.mkv"].end) == (2, 30.0, 40.0)
    assert dm.missing_videos["train"] == ["ccc_000005_000015", "eee_000001_000011"]
    # Missing videos stay in the split, in listed order, as unusable entries (counted, never opened).
    assert [Path(r.path).stem for r in train] == [
        "aaa_000010_000020",
        "bbb_000000_000010",
        "ccc_000005_000015",
        "ddd",
        "eee_000001_000011",
    ]
    assert [(r.path, r.label) for r in dm.unusable("train")] == [("ccc_000005_000015", 1), ("eee_000001_000011", 0)]
    assert "listed in train.csv:4" in dm.unusable("train")[0].problem
    assert "2 of 5 entries cannot be used" in caplog.text and "ccc_000005_000015" in caplog.text
    assert [r.label for r in dm.records("val")] == [2]
    with pytest.raises(AnnotationError, match=r"test.csv:2: unknown class 'skydiving'"):
        dm.records("test")
    (ann / "train.csv").write_text("label,youtube_id,time_start,split\nx,a,0,train\n", encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"train.csv:1: header lacks column\(s\) \['time_end'\]"):
        _ = KineticsDataModule(root=str(tmp_path)).class_names


def test_hmdb51_split_files(tmp_path):
    ann = tmp_path / "testTrainMulti_7030_splits"
    ann.mkdir()
    for cls, lines in {"wave": ["w1.avi 1", "w2.avi 2", "w3.avi 0"], "brush_hair": ["b1.avi 2", "b2.avi 1"]}.items():
        for split in (1, 2):
            text = lines if split == 1 else [ln.replace(" 1", " 9") for ln in lines]
            (ann / f"{cls}_test_split{split}.txt").write_text("\n".join(text) + " \n", encoding="utf-8")
    dm = HMDB51DataModule(root=str(tmp_path), split=1)
    assert dm.class_names == ["brush_hair", "wave"]
    assert [(Path(r.path).name, r.label) for r in dm.records("train")] == [("b2.avi", 0), ("w1.avi", 1)]
    assert [(Path(r.path).name, r.label) for r in dm.records("test")] == [("b1.avi", 0), ("w2.avi", 1)]
    assert Path(dm.records("train")[0].path) == tmp_path / "brush_hair" / "b2.avi"
    assert dm.records("val") == dm.records("test")
    msg = r"brush_hair_test_split2.txt:2: expected '<video> <0\|1\|2>', got 'b2.avi 9'"
    with pytest.raises(AnnotationError, match=msg):
        HMDB51DataModule(root=str(tmp_path), split=2).records("train")
    with pytest.raises(ValueError, match="split: expected 1, 2 or 3"):
        HMDB51DataModule(root=str(tmp_path), split=4)


def test_ucf101_lists(tmp_path):
    ann = tmp_path / "ucfTrainTestlist"
    ann.mkdir()
    (ann / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n3 YoYo\n", encoding="utf-8")
    (ann / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nYoYo/v_YoYo_g01_c01.avi 3\n", encoding="utf-8"
    )
    (ann / "testlist01.txt").write_text("Archery/v_Archery_g01_c01.avi\nYoYo/v_YoYo_g02_c01.avi\n", encoding="utf-8")
    dm = UCF101DataModule(root=str(tmp_path))
    assert dm.class_names == ["ApplyEyeMakeup", "Archery", "YoYo"]
    assert [r.label for r in dm.records("train")] == [0, 2]  # 1-based ids in the files
    assert [r.label for r in dm.records("test")] == [1, 2]  # from the class folder
    assert dm.records("train")[1].path == str(tmp_path / "YoYo" / "v_YoYo_g01_c01.avi")
    (ann / "trainlist02.txt").write_text("YoYo/v_YoYo_g01_c01.avi 4\n", encoding="utf-8")
    (ann / "testlist02.txt").write_text("", encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"trainlist02.txt:1: unknown class id 4"):
        UCF101DataModule(root=str(tmp_path), split=2).records("train")


def test_every_datamodule_is_exported_and_cli_constructible(tmp_path):
    jsonargparse = pytest.importorskip("jsonargparse")
    import lightning as L

    for name in (
        "VideoFolderDataModule",
        "VideoListDataModule",
        "KineticsDataModule",
        "HMDB51DataModule",
        "UCF101DataModule",
        "SyntheticMotionDataModule",
    ):
        assert issubclass(getattr(datamodules, name), L.LightningDataModule), name
    (tmp_path / "train.txt").write_text("a.mp4 0\nb.mp4 3\n", encoding="utf-8")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    cfg = parser.parse_object(
        {
            "data": {
                "class_path": "datamodules.VideoListDataModule",
                "init_args": {
                    "root": str(tmp_path),
                    "train_list": "train.txt",
                    "batch_size": 3,
                    "num_frames": 4,
                    "train_short_side": [64, 80],
                    "crop_size": 56,
                    "test_crops": 1,
                    "sampling": "segment",
                },
            }
        }
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    dm = instantiate(cfg).data
    assert isinstance(dm, VideoListDataModule)
    assert dm.batch_size == 3 and dm.clip.num_frames == 4 and dm.clip.sampling == "segment"
    assert dm.train_transform.short_side == (64, 80) and dm.num_classes == 4
    extra = {"VideoListDataModule": {"train_list": "train.txt"}, "SyntheticMotionDataModule": {"speed_range": [1, 2]}}
    for name in (
        "VideoFolderDataModule",
        "VideoListDataModule",
        "KineticsDataModule",
        "HMDB51DataModule",
        "UCF101DataModule",
        "SyntheticMotionDataModule",
    ):
        cfg = parser.parse_object(
            {
                "data": {
                    "class_path": f"datamodules.{name}",
                    "init_args": {"root": str(tmp_path), "batch_size": 2, **extra.get(name, {})},
                }
            }
        )
        dm = instantiate(cfg).data
        assert type(dm).__name__ == name and dm.batch_size == 2
    assert dm.spec.speed_range == (1.0, 2.0) and dm.num_classes == 8
    assert not (tmp_path / "synthetic_motion").exists()  # nothing generated before prepare_data
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_object(
            {
                "data": {
                    "class_path": "datamodules.VideoListDataModule",
                    "init_args": {"root": "x", "sampling": "sparse"},
                }
            }
        )
