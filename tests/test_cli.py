"""The `vmm` CLI end to end on a tiny synthetic motion dataset with the real networks.

`vmm demo` (fit + test of the best checkpoint) runs once per module; validate, test, predict (on
the datamodule and on files), resume and bf16-mixed then use its outputs. Most runs are
in-process (`VMMCLI(args=...)`), the console script itself runs in subprocesses.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli import TINY_FCF, VMM, generate_tiny_dataset, run_vmm, tiny_config, write_config

from lightning_modules.cli import PREDICT_SETTINGS_KEY, VMMCLI, main

pytestmark = pytest.mark.slow  # trains real networks (about a minute for the module on 2 cores)

CLASS_NAMES = ["translate_right", "translate_left", "translate_down", "translate_up"]


def _cli(args: list[str]) -> VMMCLI:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        return VMMCLI(args=args)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "vmm_synthetic"
    generate_tiny_dataset(root)
    return root


@pytest.fixture(scope="module")
def demo(tmp_path_factory, data_root):
    """`vmm demo` on the tiny set: its config, stdout, log dir and best checkpoint."""
    out = tmp_path_factory.mktemp("demo")
    cfg = write_config(out / "tiny.yaml", tiny_config(data_root, out / "runs", max_epochs=1))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        main(["demo", "--config", str(cfg)])
    stdout = buf.getvalue()
    log_dir = out / "runs" / "lightning_logs" / "version_0"
    best = next((log_dir / "checkpoints").glob("best-*.ckpt"))
    return {"cfg": cfg, "stdout": stdout, "log_dir": log_dir, "best": best, "root": data_root, "out": out}


def test_console_script_help(tmp_path, capsys):
    top = run_vmm(["--help"], cwd=tmp_path).stdout  # the installed entry point
    for cmd in ("fit", "validate", "test", "predict", "demo", "check-data"):
        assert f"  {cmd}" in top
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help-all"])  # every option
    assert exc.value.code == 0
    fit = capsys.readouterr().out
    assert "--model.net" in fit and "--data" in fit and "--model.flow_lr_scale" in fit
    main(["predict", "--help"])  # the command's own options first
    pred = capsys.readouterr().out
    assert "--ckpt_path" in pred and "videos" in pred and "--help-all" in pred


def test_demo_trains_tests_and_reports(demo):
    out = demo["stdout"]
    assert "vmm demo finished" in out and "test accuracy (video level): top-1" in out
    assert f"checkpoint: {demo['best'].resolve()}" in out
    # The synthetic datamodule's own summary line (result_notes), not the CLI's knowledge of the set
    assert (
        "K = 4 classes: chance 25.0%; on the synthetic motion set a model blind to frame order is capped at "
        "50% (the pair, never the member)" in out
    )
    report = json.loads((demo["log_dir"] / "test_results.json").read_text(encoding="utf-8"))
    # 4 classes x 3 test videos, 2 clips each; every view of a video averaged into one prediction
    assert report["num_videos"] == 12 and report["num_clips"] == 24 and report["excluded_videos"] == 0
    assert 0.0 <= report["top1"] <= report["top5"] <= 1.0
    assert report["mean_class_num_classes"] == 4  # mean recall over the 4 classes that have test videos
    assert (demo["log_dir"] / "confusion_matrix_test.png").is_file()
    assert (demo["log_dir"] / "config.yaml").is_file()

    ckpt = torch.load(demo["best"], map_location="cpu", weights_only=True)
    assert ckpt["class_names"] == CLASS_NAMES
    hp = ckpt["hyper_parameters"]
    assert hp["net"]["class_path"] == "lightning_modules.networks.SIFAResNet"
    assert hp["net"]["init_args"]["num_classes"] == 4 and hp["num_classes"] == 4  # linked from the data
    assert ckpt[PREDICT_SETTINGS_KEY]["num_frames"] == 8 and ckpt[PREDICT_SETTINGS_KEY]["test_clips"] == 2


def test_vmm_installs_the_data_time_monitor(demo):
    import csv

    with open(demo["log_dir"] / "metrics.csv", encoding="utf-8") as fh:
        shares = [float(r["train/data_time"]) for r in csv.DictReader(fh) if r.get("train/data_time")]
    assert len(shares) == 6 and all(0.0 <= s <= 1.0 for s in shares), shares  # every step of the 1 epoch


def test_validate_and_test_reproduce_the_demo_metrics(demo):
    args = ["--config", str(demo["cfg"]), "--ckpt_path", str(demo["best"])]
    val = _cli(["validate", *args]).model.last_eval["val"]
    assert val["num_videos"] == 8 and val["num_clips"] == 8  # val: 1 centre clip per video
    test = _cli(["test", *args]).model.last_eval["test"]
    report = json.loads((demo["log_dir"] / "test_results.json").read_text(encoding="utf-8"))
    for key in ("num_videos", "num_clips", "top1", "top5", "mean_class", "clip_top1"):
        assert test[key] == pytest.approx(report[key], abs=1e-6), key
    assert test["loss"] == pytest.approx(report["loss"], rel=1e-5)


def test_predict_on_the_datamodule_writes_named_predictions(demo, tmp_path):
    out = tmp_path / "preds.json"
    _cli(["predict", "--config", str(demo["cfg"]), "--ckpt_path", str(demo["best"]), "--predictions", str(out)])
    preds = json.loads(out.read_text(encoding="utf-8"))["predictions"]
    assert len(preds) == 12
    for p in preds:
        assert Path(p["video"]).is_file() and p["views"] == 2
        assert len(p["top_k"]) == 4  # top-5 capped at K = 4
        assert {t["class_name"] for t in p["top_k"]} == set(CLASS_NAMES)
        assert sum(t["prob"] for t in p["top_k"]) == pytest.approx(1.0, abs=1e-4)


def test_predict_files_without_a_dataset(demo, tmp_path, shared_videos):
    test_videos = sorted((demo["root"]).rglob("*.mp4"))[:2]
    real = shared_videos / "mpeg4_320x240.avi"
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"")
    out = tmp_path / "files.json"
    proc = run_vmm(
        [
            "predict",
            "--ckpt_path",
            str(demo["best"]),
            *map(str, test_videos),
            str(real),
            str(broken),
            "--predictions",
            str(out),
            "--top_k",
            "3",
        ],
        cwd=tmp_path,
    )
    result = json.loads(out.read_text(encoding="utf-8"))
    names = [p["video"] for p in result["predictions"]]
    assert names == [*map(str, test_videos), str(real)]
    for p in result["predictions"]:
        assert len(p["top_k"]) == 3 and p["top_k"][0]["class_name"] in CLASS_NAMES
        assert p["views"] == 2  # the checkpoint's test views: 2 clips x 1 crop
        assert p["top_k"][0]["prob"] >= p["top_k"][1]["prob"] >= p["top_k"][2]["prob"]
    assert result["failed"] == [{"video_id": 3, "video": str(broken)}]
    assert f"{real}: " in proc.stdout and "could not be decoded" in proc.stdout


def test_resume_restores_step_and_optimizer_state(demo, tmp_path):
    last = demo["log_dir"] / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    cli = _cli(
        [
            "fit",
            "--config",
            str(demo["cfg"]),
            "--ckpt_path",
            str(last),
            "--trainer.max_epochs",
            "2",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.callbacks+=helpers.cli.ResumeProbe",
        ]
    )
    probe = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ResumeProbe")
    assert probe.global_step == ckpt["global_step"] == 6  # 1 epoch x 6 steps (24 clips, batch 4)
    assert probe.epoch == ckpt["epoch"] + 1 == 1
    saved, resumed = ckpt["optimizer_states"][0], probe.optimizer_state
    assert saved["param_groups"] == resumed["param_groups"]
    assert saved["state"].keys() == resumed["state"].keys() and len(saved["state"]) > 0
    for k, st in saved["state"].items():
        torch.testing.assert_close(resumed["state"][k]["momentum_buffer"], st["momentum_buffer"], rtol=0, atol=0)
    assert probe.scheduler_state["last_epoch"] == ckpt["lr_schedulers"][0]["last_epoch"]
    assert cli.trainer.global_step == 8  # + 2 batches of the second epoch


def test_fcf_network_bf16_mixed_on_cpu(demo, tmp_path):
    """FCF-(2+1)D with flow parameters at 0.01x lr, trained through the CLI under bf16 autocast on the
    CPU (this tiny net's last stage has maps smaller than its kernels: networks.blocks.GuardedConv3d)."""
    cfg = tiny_config(
        demo["root"],
        tmp_path,
        net=TINY_FCF,
        precision="bf16-mixed",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
    )
    cfg["data"]["init_args"]["num_frames"] = 4  # FCF after layer2 needs 3 frames
    cfg["model"]["flow_lr_scale"] = 0.01
    cli = _cli(["fit", "--config", str(write_config(tmp_path / "fcf.yaml", cfg))])
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    lrs = sorted({g["initial_lr"] for g in cli.trainer.optimizers[0].param_groups})  # before the schedule
    assert len(lrs) == 2 and lrs[0] == pytest.approx(lrs[1] * 0.01)
    assert cli.model.last_eval["val"]["num_videos"] > 0


def test_check_data_command(demo, capsys):
    main(["check-data", "--config", str(demo["cfg"]), "--num_workers", "0", "--splits", "[test]"])
    out = capsys.readouterr().out
    assert "12" in out and "checked 12 distinct videos" in out


def test_predict_folders_frame_folders_and_overrides(demo, tmp_path, shared_videos, monkeypatch):
    """`vmm predict CKPT <folder>`: videos and frame folders found recursively, decoded with the
    checkpoint's test views, `--data.init_args.*` / `--top_k` as everywhere; nothing but the
    predictions is written (no logs, no config.yaml)."""
    import numpy as np
    from helpers.frames import write_jpeg_folder

    clips = tmp_path / "clips"
    (clips / "nested").mkdir(parents=True)
    test_video = sorted(demo["root"].rglob("*.mp4"))[0]
    (clips / "nested" / "synthetic.mp4").symlink_to(test_video)
    (clips / "real.avi").symlink_to(shared_videos / "mpeg4_320x240.avi")
    write_jpeg_folder(clips / "frames", list(np.random.default_rng(0).integers(0, 255, (8, 40, 40, 3), np.uint8)))
    monkeypatch.chdir(tmp_path)
    main(
        [
            "predict",
            "--ckpt_path",
            str(demo["best"]),
            str(clips),
            "--top_k",
            "2",
            "--data.init_args.test_batch_size",
            "2",
        ]
    )
    result = json.loads((tmp_path / f"{demo['best'].stem}.predictions.json").read_text(encoding="utf-8"))
    assert [p["video"] for p in result["predictions"]] == [
        str(clips / "frames"),
        str(clips / "nested" / "synthetic.mp4"),
        str(clips / "real.avi"),
    ]
    assert all(p["views"] == 2 and len(p["top_k"]) == 2 for p in result["predictions"]) and result["failed"] == []
    assert {p.name for p in tmp_path.iterdir()} == {"clips", f"{demo['best'].stem}.predictions.json"}
    # With the run's config, the same files are decoded with its datamodule's test views.
    out = tmp_path / "with_config.json"
    _cli(
        [
            "predict",
            "--config",
            str(demo["cfg"]),
            "--ckpt_path",
            str(demo["best"]),
            str(test_video),
            "--predictions",
            str(out),
        ]
    )
    (pred,) = json.loads(out.read_text(encoding="utf-8"))["predictions"]
    assert pred["video"] == str(test_video) and pred["views"] == 2


def test_fuse_scores_of_two_test_runs(demo, tmp_path, capsys):
    """scores_test.json of the demo's test and of a second test (last.ckpt), fused."""
    last = demo["log_dir"] / "checkpoints" / "last.ckpt"
    _cli(["test", "--config", str(demo["cfg"]), "--ckpt_path", str(last), "--trainer.default_root_dir", str(tmp_path)])
    a, b = demo["log_dir"] / "scores_test.json", tmp_path / "lightning_logs" / "version_0" / "scores_test.json"
    capsys.readouterr()
    main(["fuse-scores", str(a), str(b), "--weights", "2", "1", "--output", str(tmp_path / "fused.json")])
    printed = capsys.readouterr().out
    fused = json.loads((tmp_path / "fused.json").read_text(encoding="utf-8"))
    dump_a, dump_b = json.loads(a.read_text(encoding="utf-8")), json.loads(b.read_text(encoding="utf-8"))
    assert len(fused["videos"]) == 12 and fused["class_names"] == CLASS_NAMES
    for f, x, y in zip(fused["videos"], dump_a["videos"], dump_b["videos"], strict=True):
        assert f["video_id"] == x["video_id"] == y["video_id"] and f["label"] == x["label"]
        expected = (2 * torch.tensor(x["probs"]) + torch.tensor(y["probs"])) / 3
        torch.testing.assert_close(torch.tensor(f["probs"]), expected)
    assert 0.0 <= fused["metrics"]["top1"] <= fused["metrics"]["top5"] <= 1.0
    assert "fused (weights 2, 1)" in printed and "12 videos fused" in printed


def test_file_predict_print_config_shows_the_file_mode_config(demo, shared_videos, capsys):
    clip = str(shared_videos / "h264_340x256.mp4")
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--ckpt_path", str(demo["best"]), clip, "--print_config"])
    assert exc.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["class_path"] == "datamodules.files.PredictFilesDataModule"
    assert printed["data"]["init_args"]["class_names"] == CLASS_NAMES
    assert printed["trainer"]["logger"] is False and printed["videos"] == [clip]


def test_file_predict_rejects_bad_arguments(demo, tmp_path):
    with pytest.raises(ValueError, match="ckpt_path"):
        main(["predict", "--ckpt_path", str(tmp_path / "missing.ckpt"), str(demo["best"])])
    with pytest.raises(ValueError, match="videos"):
        main(["predict", "--ckpt_path", str(demo["best"]), str(tmp_path / "missing.mp4")])
    assert VMM.is_file()
