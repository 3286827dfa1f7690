"""Something-Something V1/V2 and rawframe-list datamodules on small real trees (VP9 WebM written by
PyAV, JPEG frames from the shared clips), the left/right flip on the real SSv2 class names, and a
2-process DDP run on a frame dataset.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from helpers.ddp import run_datamodule_ddp
from helpers.frames import (
    make_ssv1_tree,
    make_ssv2_tree,
    source_clips,
    ssv2_class_names,
    video_frames,
    write_jpeg_folder,
)

from datamodules import (
    AnnotationError,
    FrameRecord,
    RawFrameListDataModule,
    SomethingSomethingV1DataModule,
    SomethingSomethingV2DataModule,
)
from datamodules.something import left_right_pairs, mirror_class_name, mirror_label_table

NAMES = ssv2_class_names()
L2R, R2L = "Pushing something from left to right", "Pushing something from right to left"
TINY = {
    "batch_size": 2,
    "num_workers": 0,
    "num_frames": 4,
    "train_short_side": (32, 36),
    "eval_short_side": 32,
    "crop_size": 32,
    "test_clips": 1,
    "test_crops": 1,
    "pin_memory": False,
}


@pytest.fixture(scope="module")
def clips():
    from helpers import SHARED_VIDEOS

    if not SHARED_VIDEOS.is_dir():
        pytest.skip(f"shared test videos not found at {SHARED_VIDEOS}")
    return source_clips(SHARED_VIDEOS)


def test_left_right_pairs_of_the_real_ssv2_classes():
    assert len(NAMES) == 174 and len(set(NAMES)) == 174
    pairs = {(NAMES[i], NAMES[j]) for i, j in left_right_pairs(NAMES)}
    assert pairs == {
        ("Pulling something from left to right", "Pulling something from right to left"),
        ("Pushing something from left to right", "Pushing something from right to left"),
        ("Turning the camera left while filming something", "Turning the camera right while filming something"),
    }
    table = mirror_label_table(NAMES)
    assert [table[t] for t in table] == list(range(174))  # mirroring twice is the identity
    plug = NAMES.index("Plugging something into something but pulling it right out as you remove your hand")
    assert table[plug] == plug  # "right out" has no mirror class
    assert mirror_class_name("Left and right") == "Right and left"
    assert mirror_class_name("leftover rights") == "leftover rights"  # whole words only


def test_ssv2_webm_layout_labels_splits_and_unlabelled_test(clips, tmp_path):
    ids = make_ssv2_tree(
        tmp_path,
        clips,
        {
            "train": [L2R, R2L, "Holding something", "Approaching something with your camera"],
            "validation": [L2R, "Putting something, something and something on the table"],
            "test": ["", ""],
        },
    )
    (tmp_path / "20bn-something-something-v2" / f"{ids['validation'][1]}.webm").write_bytes(b"\x1a\x45\xdf\xa3junk")
    dm = SomethingSomethingV2DataModule(root=str(tmp_path), **TINY)
    assert dm.num_classes == 174 and dm.class_names == NAMES
    assert dm.train_transform.flip is False and dm.clip.sampling == "segment"
    train = dm.records("train")
    assert [r.label for r in train] == [
        NAMES.index(n) for n in (L2R, R2L, "Holding something", "Approaching something with your camera")
    ]
    assert train[0].path.endswith(f"20bn-something-something-v2/{ids['train'][0]}.webm")
    assert [r.path for r in dm.records("test")] == [r.path for r in dm.records("val")]  # test = validation
    dm.setup("test")
    ds = dm.dataset("test")
    good, bad = ds[0], ds[1]
    assert good["video"].shape == (1, 3, 4, 32, 32) and good["label"].item() == NAMES.index(L2R)
    assert bad["video"].shape[0] == 0 and bad["bad_video_ids"].tolist() == [1]  # excluded, reported
    item = dm.dataset("train")[2]
    assert item["video"].shape == (1, 3, 4, 32, 32) and item["video"].dtype == torch.uint8

    predict = SomethingSomethingV2DataModule(root=str(tmp_path), test_split="test", **TINY)
    assert [r.label for r in predict.records("test")] == [-1, -1]
    assert predict.records("val")[0].label == NAMES.index(L2R)

    (tmp_path / "labels" / "train.json").write_text(
        json.dumps([{"id": "9", "template": "Juggling [something]"}]), encoding="utf-8"
    )
    with pytest.raises(AnnotationError, match=r"train.json.*entry 0 \(id 9\): unknown class 'Juggling something'"):
        SomethingSomethingV2DataModule(root=str(tmp_path), **TINY).records("train")
    with pytest.raises(ValueError, match="test_split"):
        SomethingSomethingV2DataModule(root=str(tmp_path), test_split="val")


def test_ssv2_extracted_frames_option(clips, tmp_path):
    ids = make_ssv2_tree(tmp_path, clips, {"train": [L2R, R2L], "validation": [L2R]}, frames=True)
    dm = SomethingSomethingV2DataModule(root=str(tmp_path), frame_dir="frames", **TINY)
    rec = dm.records("val")[0]
    assert isinstance(rec, FrameRecord) and rec.path == str(tmp_path / "frames" / ids["validation"][0])
    dm.setup("fit")
    assert dm.dataset("val")[0]["video"].shape == (1, 3, 4, 32, 32)
    with pytest.raises(ValueError, match="template"):
        SomethingSomethingV2DataModule(root=str(tmp_path), frame_dir="frames", frame_template="img.jpg")


def test_flip_swaps_left_right_labels_with_the_mirrored_clip(clips, tmp_path):
    make_ssv2_tree(tmp_path, clips, {"train": [L2R, "Holding something"], "validation": [L2R]})
    plain = SomethingSomethingV2DataModule(root=str(tmp_path), **TINY).dataset("train")
    flipping = SomethingSomethingV2DataModule(root=str(tmp_path), flip=True, **TINY)
    assert flipping.train_transform.flip is False  # the dataset flips, so it knows which clips it mirrored
    assert flipping.left_right_pairs == [
        (NAMES.index("Pulling something from left to right"), NAMES.index("Pulling something from right to left")),
        (NAMES.index(L2R), NAMES.index(R2L)),
        (166, 167),
    ]
    ds = flipping.dataset("train")
    outcomes = set()
    for seed in range(12):
        for vid in (0, 1):
            a = ds._load(vid, np.random.default_rng(seed), eval_mode=False)
            b = plain._load(vid, np.random.default_rng(seed), eval_mode=False)
            mirrored = not torch.equal(a["video"], b["video"])
            if mirrored:
                assert torch.equal(a["video"], b["video"].flip(-1))
            want = mirror_label_table(NAMES)[b["label"].item()] if mirrored else b["label"].item()
            assert a["label"].item() == want
            outcomes.add((vid, mirrored))
    assert outcomes == {(0, False), (0, True), (1, False), (1, True)}
    # the swapped label really occurs for the left/right class; the symmetric class keeps its own
    labels = {ds._load(0, np.random.default_rng(s), eval_mode=False)["label"].item() for s in range(12)}
    assert labels == {NAMES.index(L2R), NAMES.index(R2L)}
    # the evaluation splits are never flipped
    assert flipping.dataset("val").flip_labels is None
    no_swap = SomethingSomethingV2DataModule(root=str(tmp_path), flip=True, flip_swaps_left_right=False, **TINY)
    assert no_swap.train_transform.flip is True and no_swap.dataset("train").flip_labels is None


def test_ssv1_frame_layout_and_bad_folders(clips, tmp_path):
    names = NAMES[:10]
    ids = make_ssv1_tree(tmp_path, clips, names, {"train": [0, 1, 2, 3], "validation": [4, 5, 6], "test": [0, 1]})
    empty = tmp_path / "20bn-something-something-v1" / ids["validation"][1]
    for f in empty.iterdir():
        f.unlink()
    gap = tmp_path / "20bn-something-something-v1" / ids["validation"][2]
    for f in sorted(gap.iterdir())[4:9]:
        f.unlink()  # frames 5..9 missing: the segment sampler asks for some of them
    dm = SomethingSomethingV1DataModule(root=str(tmp_path), **TINY)
    assert dm.class_names == names
    train = dm.records("train")
    assert [r.label for r in train] == [0, 1, 2, 3]
    assert isinstance(train[0], FrameRecord) and train[0].template == "{:05d}.jpg"
    dm.setup("test")
    ds = dm.dataset("test")
    assert ds[0]["video"].shape == (1, 3, 4, 32, 32)
    for k in (1, 2):
        assert ds[k]["video"].shape[0] == 0 and ds[k]["bad_video_ids"].tolist() == [k]
    assert [r.label for r in SomethingSomethingV1DataModule(root=str(tmp_path), test_split="test").records("test")] == [
        -1,
        -1,
    ]
    (tmp_path / "something-something-v1-train.csv").write_text(f"1;{names[0]}\n2;Not a class\n", encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"v1-train.csv:2: unknown class 'Not a class'"):
        SomethingSomethingV1DataModule(root=str(tmp_path)).records("train")
    # Latin-1 instead of UTF-8: the file and line are named, not a raw UnicodeDecodeError
    (tmp_path / "something-something-v1-train.csv").write_bytes(f"1;{names[0]}\n2;Caf\u00e9\n".encode("latin-1"))
    with pytest.raises(AnnotationError, match=r"v1-train.csv:2: not UTF-8 text"):
        SomethingSomethingV1DataModule(root=str(tmp_path)).records("train")


def test_rawframe_lists(clips, tmp_path):
    lines = []
    for k in range(4):
        write_jpeg_folder(tmp_path / "rawframes" / f"clip {k}", video_frames(clips, k, length=10))
        lines.append(f"rawframes/clip {k} 10 {k % 2}")
    write_jpeg_folder(tmp_path / "rawframes" / "short", video_frames(clips, 5, length=3))
    lines.append("rawframes/short 10 1")  # the list claims more frames than exist
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    dm = RawFrameListDataModule(root=str(tmp_path), train_list="train.txt", test_list="train.txt", **TINY)
    assert dm.class_names == ["0", "1"]
    recs = dm.records("train")
    assert recs[1].path == str(tmp_path / "rawframes" / "clip 1") and recs[1].num_frames == 10
    ds = dm.dataset("test")
    assert ds[1]["video"].shape == (1, 3, 4, 32, 32) and ds[1]["label"].tolist() == [1]
    assert ds[4]["bad_video_ids"].tolist() == [4]  # listed count trusted: the missing frames are found
    scanned = RawFrameListDataModule(root=str(tmp_path), train_list="train.txt", trust_counts=False, **TINY)
    assert scanned.dataset("train")._index(scanned.records("train")[4]).num_frames == 3
    (tmp_path / "bad.txt").write_text("rawframes/clip 0 ten 1\n", encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"bad.txt:1: num_frames and label must be integers"):
        RawFrameListDataModule(root=str(tmp_path), train_list="bad.txt").records("train")
    with pytest.raises(ValueError, match="start_index"):
        RawFrameListDataModule(root=str(tmp_path), train_list="train.txt", frame_start_index=3)


def test_cli_construction_keeps_the_something_something_defaults(tmp_path):
    """Through jsonargparse (as `vmm` builds them) the SS modules get their own defaults: segment
    sampling of 8 frames, no flip; the left/right option and rawframe options parse."""
    import jsonargparse
    import lightning as L

    (tmp_path / "train.txt").write_text("f0 8 0\nf1 8 1\n", encoding="utf-8")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    for name, args in [
        ("SomethingSomethingV2DataModule", {}),
        ("SomethingSomethingV1DataModule", {}),
        ("SomethingSomethingV2DataModule", {"flip": True, "frame_dir": "frames"}),
    ]:
        cfg = parser.parse_object(
            {"data": {"class_path": f"datamodules.{name}", "init_args": {"root": str(tmp_path), **args}}}
        )
        dm = instantiate(cfg).data
        assert type(dm).__name__ == name
        assert dm.clip.sampling == "segment" and dm.clip.num_frames == 8 and dm.train_transform.flip is False
        assert dm.flip == args.get("flip", False) and dm.test_split == "validation"
    cfg = parser.parse_object(
        {
            "data": {
                "class_path": "datamodules.RawFrameListDataModule",
                "init_args": {
                    "root": str(tmp_path),
                    "train_list": "train.txt",
                    "frame_template": "{:06d}.png",
                    "frame_start_index": 0,
                },
            }
        }
    )
    dm = instantiate(cfg).data
    rec = dm.records("train")[1]
    assert isinstance(rec, FrameRecord) and (rec.template, rec.start_index, rec.num_frames) == ("{:06d}.png", 0, 8)
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_object(
            {
                "data": {
                    "class_path": "datamodules.SomethingSomethingV1DataModule",
                    "init_args": {"root": "x", "test_split": "val"},
                }
            }
        )


@pytest.mark.slow
def test_ddp_on_a_frame_dataset(clips, tmp_path):
    lines = []
    for k in range(6):
        write_jpeg_folder(tmp_path / f"f{k}", video_frames(clips, k, length=8))
        lines.append(f"f{k} 8 {k % 2}")
    (tmp_path / "empty").mkdir()
    lines.append("empty 8 0")  # 7 folders, one unreadable: an odd count the stock sampler would pad
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    seen = run_datamodule_ddp(
        tmp_path,
        "RawFrameListDataModule",
        dict(
            train_list="list.txt",
            test_list="list.txt",
            batch_size=2,
            num_frames=4,
            frame_interval=1,
            sampling="segment",
            train_short_side=(32, 32),
            eval_short_side=32,
            crop_size=24,
            test_clips=1,
            test_crops=1,
            test_batch_size=1,
            num_workers=1,
            pin_memory=False,
        ),
    )
    assert len(seen[0]["train"]) + len(seen[1]["train"]) == 8  # 7 padded to 8 by the training sampler
    assert set(seen[0]["train"]) | set(seen[1]["train"]) <= set(range(6))
    assert sorted(seen[0]["test"] + seen[1]["test"]) == list(range(6))  # each good folder once
    assert not set(seen[0]["test"]) & set(seen[1]["test"])
    assert seen[0]["test_bad"] + seen[1]["test_bad"] == [6]
    assert all(s == [3, 4, 24, 24] for r in seen for s in r["shapes"])


def _tiny_cli_config(out, data_class: str, data_args: dict) -> dict:
    from helpers.cli import tiny_config

    cfg = tiny_config(out, out / "runs", max_epochs=1)
    tiny = {**TINY, "num_frames": 8, "batch_size": 3, "train_short_side": [32, 36], "test_clips": 2}
    cfg["data"] = {"class_path": f"datamodules.{data_class}", "init_args": {**tiny, **data_args}}
    return cfg


def _test_report(out) -> dict:
    return json.loads((out / "runs" / "lightning_logs" / "version_1" / "test_results.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_vmm_fit_test_predict_on_a_ssv2_webm_tree(clips, tmp_path, capsys):
    """The console script `vmm fit`; then in process `vmm test` (a corrupt WebM excluded and
    counted), `vmm predict` on the unlabelled test split, and `vmm test` refusing that split."""
    import warnings

    from helpers.cli import run_vmm, write_config

    from lightning_modules.cli import main

    root = tmp_path / "ssv2"
    ids = make_ssv2_tree(
        root,
        clips,
        {
            "train": [L2R, R2L, "Holding something", L2R, R2L, "Holding something"],
            "validation": [L2R, R2L, "Holding something"],
            "test": ["", ""],
        },
    )
    (root / "20bn-something-something-v2" / f"{ids['validation'][2]}.webm").write_bytes(b"\x1a\x45\xdf\xa3junk")
    cfg = write_config(
        tmp_path / "ssv2.yaml",
        _tiny_cli_config(tmp_path, "SomethingSomethingV2DataModule", {"root": str(root), "flip": True}),
    )
    run_vmm(["fit", "--config", str(cfg)], cwd=tmp_path)
    best = next((tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints").glob("best-*.ckpt"))
    preds = tmp_path / "preds.json"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        main(["test", "--config", str(cfg), "--ckpt_path", str(best)])
        assert "could not be used" in capsys.readouterr().out
        report = _test_report(tmp_path)
        assert report["num_videos"] == 2 and report["num_clips"] == 4 and report["excluded_videos"] == 1
        main(
            [
                "predict",
                "--config",
                str(cfg),
                "--ckpt_path",
                str(best),
                "--data.init_args.test_split",
                "test",
                "--predictions",
                str(preds),
            ]
        )
        named = [p["video"] for p in json.loads(preds.read_text(encoding="utf-8"))["predictions"]]
        assert named == [str(root / "20bn-something-something-v2" / f"{i}.webm") for i in ids["test"]]
        with pytest.raises(ValueError, match="test split has no labels"):
            main(["test", "--config", str(cfg), "--ckpt_path", str(best), "--data.init_args.test_split", "test"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ssv1", "rawframes"])
def test_vmm_fit_and_test_on_frame_trees(clips, tmp_path, layout):
    """`vmm fit` then `vmm test` (in process) on a V1 frame tree and on a rawframe list, one frame
    folder of the test split unreadable (excluded and counted)."""
    import warnings

    from helpers.cli import write_config

    from lightning_modules.cli import main

    root = tmp_path / layout
    if layout == "ssv1":
        ids = make_ssv1_tree(root, clips, NAMES[:6], {"train": [0, 1, 2, 3, 4, 5], "validation": [0, 1, 2]})
        bad = root / "20bn-something-something-v1" / ids["validation"][1] / "00003.jpg"
        args = {"root": str(root)}
        data_class = "SomethingSomethingV1DataModule"
    else:
        lines = []
        for k in range(6):
            write_jpeg_folder(root / "frames" / f"v{k}", video_frames(clips, k))
            lines.append(f"frames/v{k} 12 {k % 3}")
        (root / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (root / "val.txt").write_text("\n".join(lines[:3]) + "\n", encoding="utf-8")
        bad = root / "frames" / "v1" / "img_00003.jpg"
        args = {
            "root": str(root),
            "train_list": "train.txt",
            "val_list": "val.txt",
            "test_list": "val.txt",
            "class_names": ["a", "b", "c"],
            "sampling": "segment",
        }
        data_class = "RawFrameListDataModule"
    cfg = write_config(tmp_path / "cfg.yaml", _tiny_cli_config(tmp_path, data_class, args))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        main(["fit", "--config", str(cfg)])
        best = next((tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints").glob("best-*.ckpt"))
        bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")  # after training: an unreadable frame at test time
        main(["test", "--config", str(cfg), "--ckpt_path", str(best)])
        report = _test_report(tmp_path)
        assert report["num_videos"] == 2 and report["excluded_videos"] == 1
        if layout == "ssv1":  # `vmm predict` on frame folders: the template is read from the file names
            folders = [root / "20bn-something-something-v1" / i for i in ids["validation"]]
            out = tmp_path / "folders.json"
            main(["predict", "--ckpt_path", str(best), *map(str, folders), "--predictions", str(out)])
            result = json.loads(out.read_text(encoding="utf-8"))
            assert [p["video"] for p in result["predictions"]] == [str(folders[0]), str(folders[2])]
            assert all(p["views"] == 2 for p in result["predictions"])  # the checkpoint's 2 clips x 1 crop
            assert result["failed"] == [{"video_id": 1, "video": str(folders[1])}]


def test_clean_lists_of_ssv1_name_their_frame_template_and_skip_the_unlabelled_split(clips, tmp_path):
    from datamodules.check import check_datamodule, write_clean_lists

    names = NAMES[:4]
    make_ssv1_tree(tmp_path, clips, names, {"train": [0, 1], "validation": [2], "test": [0]})
    dm = SomethingSomethingV1DataModule(root=str(tmp_path), test_split="test", **TINY)
    report = check_datamodule(dm, splits=["train", "test"], num_workers=0, print_table=False)
    with pytest.warns(UserWarning, match="'test' is unlabelled"):
        (written,) = write_clean_lists(dm, report, tmp_path / "clean.txt")
    header = written.read_text(encoding="utf-8").splitlines()[0]
    assert header == "# frame_template: '{:05d}.jpg'  frame_start_index: 1"
    relisted = RawFrameListDataModule(
        root="/", train_list=str(written), frame_template="{:05d}.jpg", num_classes=len(names), **TINY
    )
    assert [r.label for r in relisted.records("train")] == [0, 1]


def test_class_names_match_across_case_and_white_space_on_both_sides():
    from datamodules.something import _class_lookup

    lookup = _class_lookup(["Pushing  something from left to right", "Holding something"])
    assert lookup("pushing something from left to right") == 0  # the label file's double space folds too
    assert lookup(" HOLDING   something ") == 1
    assert lookup("Holding nothing") is None


def test_ssv2_accepts_the_long_annotation_file_names(tmp_path):
    """MMAction2 and TSM keep the download's names, something-something-v2-{labels,train,...}.json."""
    labels = tmp_path / "labels"
    labels.mkdir()
    names = ["Pushing something from left to right", "Holding something"]
    (labels / "something-something-v2-labels.json").write_text(json.dumps({names[0]: "0", names[1]: "1"}), "utf-8")
    for split, rows in (("train", [("7", 1), ("8", 0)]), ("validation", [("9", 0)]), ("test", [("10", None)])):
        entries = [{"id": v} if y is None else {"id": v, "template": names[y]} for v, y in rows]
        (labels / f"something-something-v2-{split}.json").write_text(json.dumps(entries), encoding="utf-8")
    dm = SomethingSomethingV2DataModule(root=str(tmp_path), test_split="test")
    assert dm.class_names == names
    assert [(r.path.rsplit("/", 1)[1], r.label) for r in dm.records("train")] == [("7.webm", 1), ("8.webm", 0)]
    assert [r.label for r in dm.records("val")] == [0] and [r.label for r in dm.records("test")] == [-1]
    (labels / "something-something-v2-validation.json").rename(labels / "other.json")
    with pytest.raises(AnnotationError, match=r"validation.json: annotation file not found .*something-something-v2"):
        SomethingSomethingV2DataModule(root=str(tmp_path)).records("val")


def test_ssv1_class_ids_follow_the_labels_file_or_sorted_names(tmp_path):
    names = ["Zooming in", "Approaching something", "Moving something"]  # the file's order is not sorted
    (tmp_path / "something-something-v1-labels.csv").write_text("\n".join(names) + "\n", encoding="utf-8")
    (tmp_path / "something-something-v1-train.csv").write_text("1;Zooming in\n2;Moving something\n", "utf-8")
    dm = SomethingSomethingV1DataModule(root=str(tmp_path))  # MMAction2: ids in the file's order
    assert dm.class_names == names and [r.label for r in dm.records("train")] == [0, 2]
    tsm = SomethingSomethingV1DataModule(root=str(tmp_path), class_order="sorted")  # TSM's lists
    assert tsm.class_names == sorted(names) and [r.label for r in tsm.records("train")] == [2, 1]
    with pytest.raises(ValueError, match="class_order: expected 'file' or 'sorted'"):
        SomethingSomethingV1DataModule(root=str(tmp_path), class_order="alphabetical")


@pytest.mark.parametrize("bad", [True, 1.5, 2.0, None, [3]])
def test_ssv2_video_and_class_ids_that_are_not_integers_or_strings_are_refused(tmp_path, bad):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "labels.json").write_text(json.dumps({"Holding something": "0"}), encoding="utf-8")
    entries = [{"id": 5, "template": "Holding [something]"}, {"id": bad, "template": "Holding [something]"}]
    (labels / "train.json").write_text(json.dumps(entries), encoding="utf-8")
    dm = SomethingSomethingV2DataModule(root=str(tmp_path))
    with pytest.raises(
        AnnotationError, match=rf"train.json: entry 1: expected an 'id' string or integer, got {re.escape(repr(bad))}"
    ):
        dm.records("train")
    (labels / "labels.json").write_text(json.dumps({"Holding something": "0", "Other": bad}), encoding="utf-8")
    with pytest.raises(
        AnnotationError, match=rf"labels.json: expected integer class ids .*'Other' has {re.escape(repr(bad))}"
    ):
        _ = SomethingSomethingV2DataModule(root=str(tmp_path)).class_names
