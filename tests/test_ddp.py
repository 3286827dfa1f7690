"""Two-process DDP on the CPU (gloo) through the installed `vmm` console script.

`vmm fit` trains with `trainer.strategy=ddp` and 2 processes; then the same checkpoint is tested
with 2 processes and with 1: the test set's video and clip counts and every metric must agree, so
gathering the views of each video across ranks (and not counting any clip twice) is exact.
SyncBatchNorm (`trainer.sync_batchnorm=true`) has no CPU implementation in PyTorch; its run is
the GPU test at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.cli import generate_tiny_dataset, run_vmm, tiny_config, write_config

DDP_ARGS = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


@pytest.mark.slow
def test_ddp_fit_then_test_matches_single_process(tmp_path_factory, tmp_path):
    root = tmp_path_factory.getbasetemp() / "vmm_synthetic"
    generate_tiny_dataset(root)
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(root, tmp_path / "runs", max_epochs=1))

    run_vmm(["fit", "--config", str(cfg), *DDP_ARGS], cwd=tmp_path)
    fit_dir = tmp_path / "runs" / "lightning_logs" / "version_0"
    last = fit_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    # 24 training clips over 2 ranks x batch 4: 3 optimizer steps per epoch.
    assert ckpt["global_step"] == 3

    results, scores = {}, {}
    for name, extra in (("ddp", DDP_ARGS), ("single", ["--trainer.devices", "1"])):
        out = tmp_path / f"test_{name}"
        run_vmm(
            ["test", "--config", str(cfg), "--ckpt_path", str(last), "--trainer.default_root_dir", str(out), *extra],
            cwd=tmp_path,
        )
        results[name] = json.loads(next(Path(out).rglob("test_results.json")).read_text(encoding="utf-8"))
        scores[name] = json.loads(next(Path(out).rglob("scores_test.json")).read_text(encoding="utf-8"))

    ddp, single = results["ddp"], results["single"]
    assert single["num_videos"] == ddp["num_videos"] == 12
    assert single["num_clips"] == ddp["num_clips"] == 24
    assert single["excluded_videos"] == ddp["excluded_videos"] == 0
    for key in ("top1", "top5", "mean_class", "clip_top1", "clip_top5", "clip_mean_class"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-4)
    # The per-video scores agree too: every video once, its views averaged across both ranks.
    pairs = list(zip(scores["ddp"]["videos"], scores["single"]["videos"], strict=True))
    assert [a["video_id"] for a, _ in pairs] == [b["video_id"] for _, b in pairs] == list(range(12))
    for a, b in pairs:
        assert a["num_views"] == b["num_views"] == 2 and a["label"] == b["label"] and a["name"] == b["name"]
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-5)


@pytest.mark.gpu
def test_sync_batchnorm_fit_on_gpu(tmp_path_factory, tmp_path):
    """`trainer.sync_batchnorm=true` under DDP on the available GPUs (2 when there are, else 1)."""
    root = tmp_path_factory.getbasetemp() / "vmm_synthetic"
    generate_tiny_dataset(root)
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(root, tmp_path / "runs", max_epochs=1))
    devices = str(min(2, torch.cuda.device_count()))
    run_vmm(
        [
            "fit",
            "--config",
            str(cfg),
            "--trainer.accelerator",
            "gpu",
            "--trainer.devices",
            devices,
            "--trainer.strategy",
            "ddp",
            "--trainer.sync_batchnorm",
            "true",
        ],
        cwd=tmp_path,
        gpu=True,
    )
    ckpt = torch.load(
        tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt",
        map_location="cpu",
        weights_only=True,
    )
    assert ckpt["global_step"] == 6 // int(devices)
