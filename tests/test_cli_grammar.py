"""One `vmm` grammar: check-data with the same data section as fit/test, layered configs and
num_classes, predict's path expansion, and fusing score dumps.

Fast: no network is trained here (the CLI runs that train are in test_cli.py).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT
from helpers.frames import write_jpeg_folder

from datamodules.files import expand_video_paths, is_frame_folder
from lightning_modules.cli import VMMCLI, fuse_scores, main


def _cli(args: list[str]) -> VMMCLI:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        return VMMCLI(args=args)


def _video_list_config(tmp_path: Path, shared_videos: Path, extra: str = "") -> Path:
    """A VideoListDataModule config over the shared clips (labels 0 and 1); train and test share a file."""
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "train.txt").write_text("kinetics_arm_wrestling.mp4 0\nh264_340x256.mp4 1\n", encoding="utf-8")
    (tmp_path / "test.txt").write_text(
        f"h264_340x256.mp4 1\nmpeg4_320x240.avi 1\n{tmp_path / 'zero.mp4'} 0\n", encoding="utf-8"
    )
    cfg = tmp_path / "video_list.yaml"
    cfg.write_text(
        "data:\n  class_path: datamodules.VideoListDataModule\n  init_args:\n"
        f"    root: {shared_videos}\n    train_list: {tmp_path / 'train.txt'}\n    test_list: {tmp_path / 'test.txt'}\n"
        f"    num_workers: 0\n{extra}",
        encoding="utf-8",
    )
    return cfg


# ---------------------------------------------------------------------------- check-data


def test_check_data_takes_a_full_run_config_and_the_shared_overrides(tmp_path, shared_videos, capsys):
    """`vmm check-data` layered on a repository config (model + trainer sections accepted), with a
    `--data.init_args.*` override as fit/test spell it; exits 1 on bad entries, writes clean lists."""
    cfg = _video_list_config(tmp_path, shared_videos)
    clean = tmp_path / "clean.txt"
    args = [
        "check-data",
        "--config",
        str(REPO_ROOT / "configs" / "demo_fcf_synthetic.yaml"),
        "--config",
        str(cfg),
        "--data.init_args.num_workers",
        "0",
        "--splits",
        "[train, test]",
        "--write_clean_list",
        str(clean),
    ]
    with pytest.warns(UserWarning, match=r"num_classes=2 was set for datamodules\.SyntheticMotionDataModule"):
        cli = _cli(args)
    report = cli.check_report
    assert list(report.splits) == ["train", "test"] and report.decoded == 4  # h264 in both lists: decoded once
    assert cli.datamodule.num_classes == 2
    assert (tmp_path / "clean_test.txt").read_text(encoding="utf-8") == (
        f"{shared_videos / 'h264_340x256.mp4'} 1\n{shared_videos / 'mpeg4_320x240.avi'} 1\n"
    )
    assert "clean list written to" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(args)
    assert exc.value.code == 1  # the zero-byte file


def test_explicit_num_classes_that_disagrees_with_the_data_is_an_error(tmp_path, shared_videos):
    cfg = _video_list_config(tmp_path, shared_videos, extra="    class_names: [a, b]\n")
    with pytest.raises(
        ValueError,
        match=r"data\.init_args\.num_classes=5 disagrees with the data: "
        r"VideoListDataModule has 2 classes",
    ):
        _cli(["check-data", "--config", str(cfg), "--data.init_args.num_classes", "5"])
    # Set in the same configuration as its datamodule class, a value is kept (and here agrees).
    cli = _cli(["check-data", "--config", str(cfg), "--data.init_args.num_classes", "2", "--splits", "[train]"])
    assert cli.datamodule.num_classes == 2


def test_check_data_help_lists_its_options(capsys):
    main(["check-data", "--help"])  # the short help: printed without building the parser
    short = capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["check-data", "--help-all"])
    assert exc.value.code == 0
    full = capsys.readouterr().out
    for out in (short, full):
        for option in ("--data", "--write_clean_list", "--num_workers", "--splits", "--config"):
            assert option in out
        assert "--predictions" not in out and "--top_k" not in out  # prediction's options stay on predict
    main(["fit", "--help"])  # the command's own options: printed without building the parser
    assert "--predictions" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fit", "--help-all"])
    assert "--predictions" not in capsys.readouterr().out


# ---------------------------------------------------------------------------- predict paths


def test_expand_video_paths_finds_videos_and_frame_folders(tmp_path, shared_videos):
    frames = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    write_jpeg_folder(tmp_path / "clips" / "frames_a", frames)
    write_jpeg_folder(tmp_path / "clips" / "nested" / "frames_b", frames)
    (tmp_path / "clips" / "nested" / "b.AVI").symlink_to(shared_videos / "mpeg4_320x240.avi")
    (tmp_path / "clips" / "a.mp4").symlink_to(shared_videos / "h264_340x256.mp4")
    (tmp_path / "clips" / "notes.txt").write_text("not a video", encoding="utf-8")
    (tmp_path / "empty").mkdir()
    single = tmp_path / "single"
    write_jpeg_folder(single, frames)
    assert is_frame_folder(single) and not is_frame_folder(tmp_path / "clips")
    assert not is_frame_folder(tmp_path / "empty")
    given = [str(shared_videos / "kinetics_arm_wrestling.mp4"), str(tmp_path / "clips"), str(single)]
    assert expand_video_paths(given) == [
        given[0],
        str(tmp_path / "clips" / "a.mp4"),
        str(tmp_path / "clips" / "frames_a"),
        str(tmp_path / "clips" / "nested" / "b.AVI"),
        str(tmp_path / "clips" / "nested" / "frames_b"),
        str(single),
    ]
    with pytest.raises(ValueError, match=r"videos must be existing files or folders; not found: .*missing\.mp4"):
        expand_video_paths([tmp_path / "missing.mp4"])
    with pytest.raises(ValueError, match=r"videos: the folder .*empty.* holds no video file"):
        expand_video_paths([tmp_path / "empty"])


def test_predict_on_files_needs_a_checkpoint_and_videos(tmp_path):
    with pytest.raises(ValueError, match=r"--ckpt_path: vmm predict on files needs the checkpoint"):
        main(["predict", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--ckpt_path .*none.ckpt: no such file"):
        main(["predict", "--ckpt_path", str(tmp_path / "none.ckpt"), str(tmp_path)])


def test_check_data_splits_without_a_value_is_an_error(tmp_path, shared_videos):
    config = _video_list_config(tmp_path, shared_videos)
    with pytest.raises(ValueError, match=r"--splits: expected one or more"):
        main(["check-data", "--config", str(config), "--splits"])


# ---------------------------------------------------------------------------- fuse-scores


def _dump(
    path: Path,
    probs: list[list[float]],
    labels: list[int],
    ids: list[int] | None = None,
    names: list[str] | None = None,
    class_names=("a", "b", "c"),
) -> Path:
    ids = list(range(len(probs))) if ids is None else ids
    videos = [
        {"video_id": v, "name": None if names is None else names[i], "label": y, "num_views": 2, "probs": p}
        for i, (v, y, p) in enumerate(zip(ids, labels, probs, strict=True))
    ]
    path.write_text(
        json.dumps(
            {
                "format": "vmm-scores/1",
                "split": "test",
                "class_names": list(class_names),
                "num_classes": len(class_names),
                "videos": videos,
                "excluded_video_ids": [],
            }
        ),
        encoding="utf-8",
    )
    return path


def test_fuse_scores_weighted_mean_and_accuracies(tmp_path, capsys):
    # Model A gets videos 0 and 1 right, B gets 1 and 2 right; each is confident only where right.
    a = _dump(
        tmp_path / "a.json",
        [[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.4, 0.3, 0.3], [0.5, 0.4, 0.1]],
        [0, 1, 2, 1],
        names=["v0", "v1", "v2", "v3"],
    )
    b = _dump(
        tmp_path / "b.json", [[0.3, 0.4, 0.3], [0.2, 0.7, 0.1], [0.05, 0.05, 0.9]], [0, 1, 2], names=["v0", "v1", None]
    )
    out = tmp_path / "fused.json"
    main(["fuse-scores", str(a), str(b), "--weights", "0.75", "0.25", "--output", str(out)])
    printed = capsys.readouterr().out
    fused = json.loads(out.read_text(encoding="utf-8"))
    assert [v["video_id"] for v in fused["videos"]] == [0, 1, 2]  # video 3 is only in a.json
    assert fused["excluded_video_ids"] == [3] and "1 not in every dump, left out" in printed
    torch.testing.assert_close(
        torch.tensor(fused["videos"][2]["probs"]),
        0.75 * torch.tensor([0.4, 0.3, 0.3]) + 0.25 * torch.tensor([0.05, 0.05, 0.9]),
    )
    assert fused["videos"][2]["name"] == "v2" and fused["fused_from"][1] == {"path": str(b), "weight": 0.25}
    # fused: video 0 -> a (0.75), 1 -> b, 2 -> 0.3125 vs 0.3 vs 0.45: class 2. All three right.
    assert fused["metrics"]["top1"] == 1.0 and fused["metrics"]["mean_class"] == 1.0
    assert re.search(r"a\.json +top-1  66\.7%", printed) and re.search(
        r"fused \(weights 0\.75, 0\.25\) +top-1 100\.0%", printed
    )
    equal = fuse_scores([a, b])  # equal weights: video 2 -> (0.225, 0.175, 0.6): still right
    assert equal["metrics"]["top1"] == 1.0


def test_fuse_scores_refuses_mismatched_dumps(tmp_path):
    a = _dump(tmp_path / "a.json", [[0.9, 0.1, 0.0]], [0], names=["v0"])
    with pytest.raises(ValueError, match=r"class_names differ"):
        fuse_scores([a, _dump(tmp_path / "b.json", [[0.9, 0.1, 0.0]], [0], class_names=("a", "c", "b"))])
    with pytest.raises(ValueError, match=r"labels of the common videos differ"):
        fuse_scores([a, _dump(tmp_path / "c.json", [[0.9, 0.1, 0.0]], [1])])
    with pytest.raises(ValueError, match=r"video ids \[0\] name other files"):
        fuse_scores([a, _dump(tmp_path / "d.json", [[0.9, 0.1, 0.0]], [0], names=["other"])])
    with pytest.raises(ValueError, match=r"no video_id in common"):
        fuse_scores([a, _dump(tmp_path / "e.json", [[0.9, 0.1, 0.0]], [0], ids=[7])])
    with pytest.raises(ValueError, match=r"weights: expected 2 non-negative numbers"):
        fuse_scores([a, a], weights=[1.0])
    with pytest.raises(ValueError, match=r"not a vmm score dump"):
        fuse_scores([a, _write(tmp_path / "f.json", {"videos": []})])


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path
