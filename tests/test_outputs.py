"""Output files and scores that must not lie: atomic writes through symlinks and onto devices or
FIFOs, non-finite scores refused by test / predict / fuse-scores, and `vmm predict` runs in which
nothing could be predicted. Real files and real Trainer runs on the tiny in-memory network of
helpers/classifier.py; the `vmm` runs (a one-step fit of the tiny FCF network) are `slow`."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch
from helpers.classifier import MovingSquare, SquareData, TinyNet, collate
from helpers.cli import TINY_FCF, cpu_trainer, generate_tiny_dataset, tiny_config, write_config
from torch.utils.data import DataLoader

from lightning_modules import VideoClassifier
from lightning_modules.cli import VMMTrainer, fuse_scores, main
from lightning_modules.io import atomic_write_bytes, atomic_write_text, check_writable_file
from lightning_modules.reports import PredictionWriter, TestReportWriter


def _trainer(tmp_path, **kw) -> VMMTrainer:
    return cpu_trainer(tmp_path, **kw)


def _predict_loader(n: int, bad=()) -> DataLoader:
    return DataLoader(MovingSquare(n, views=1, seed=3, bad=bad), batch_size=4, collate_fn=collate)


def test_atomic_write_to_a_symlink_writes_its_target_and_keeps_the_link(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "real.json").write_text("old\n", encoding="utf-8")
    link = tmp_path / "out.json"
    link.symlink_to(Path("store") / "real.json")  # relative, resolved from the link's directory
    chain = tmp_path / "chain.json"
    chain.symlink_to(link)
    atomic_write_text(chain, "new\n")
    assert chain.is_symlink() and link.is_symlink()
    assert (store / "real.json").read_text(encoding="utf-8") == "new\n"
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(store / "later.json")
    atomic_write_bytes(dangling, b"x")
    assert dangling.is_symlink() and (store / "later.json").read_bytes() == b"x"
    assert sorted(p.name for p in store.iterdir()) == ["later.json", "real.json"]  # no temporaries left
    assert check_writable_file(link, "--predictions") == link


def test_atomic_write_refuses_a_fifo_or_device_and_leaves_it(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "to_pipe"
    link.symlink_to(fifo)
    for target in (fifo, link):
        with pytest.raises(ValueError, match=rf"cannot write {target}: .*FIFO.*expected a regular file"):
            atomic_write_text(target, "x")
        with pytest.raises(ValueError, match=rf"--predictions: cannot write {target}: .*FIFO"):
            check_writable_file(target, "--predictions")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "to_pipe"]
    for device in ("/dev/full", "/dev/null"):
        if os.path.exists(device):
            with pytest.raises(ValueError, match=rf"--predictions: cannot write {device}: .*character device"):
                check_writable_file(device, "--predictions")
            assert stat.S_ISCHR(os.stat(device).st_mode)


# ---------------------------------------------------------------------------- non-finite scores


def _nan_weights(model: VideoClassifier) -> VideoClassifier:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return model


def test_non_finite_scores_fail_the_test_run_instead_of_giving_metrics(tmp_path):
    model = _nan_weights(VideoClassifier(TinyNet(2)))
    trainer = _trainer(tmp_path, callbacks=[TestReportWriter()])
    with pytest.raises(RuntimeError, match=r"test: 12 of 12 videos had non-finite scores \(NaN/Inf\)"):
        trainer.test(model, datamodule=SquareData(n_train=8, n_eval=12, views=1), verbose=False)
    res = model.last_eval["test"]
    assert res["nonfinite_videos"] == 12 and all(math.isnan(res[k]) for k in ("top1", "top5", "mean_class"))
    report = json.loads((tmp_path / "lightning_logs" / "version_0" / "test_results.json").read_text(encoding="utf-8"))
    assert report["top1"] is None and report["nonfinite_videos"] == 12
    with pytest.raises(RuntimeError, match=r"val: 12 of 12 videos had non-finite scores"):
        trainer.validate(model, datamodule=SquareData(n_train=8, n_eval=12, views=1), verbose=False)


def test_non_finite_scores_are_never_ranked_by_predict(tmp_path, capsys):
    model = _nan_weights(VideoClassifier(TinyNet(2)))
    out = tmp_path / "predictions.json"
    out.write_text('{"predictions": ["an earlier good run"]}\n', encoding="utf-8")
    trainer = _trainer(tmp_path, callbacks=[PredictionWriter(str(out))])
    with pytest.raises(RuntimeError, match=r"predict: no video could be predicted: 6 of 6 had non-finite scores"):
        trainer.predict(model, dataloaders=_predict_loader(6), return_predictions=False)
    assert "nan%" not in capsys.readouterr().out
    assert out.read_text(encoding="utf-8") == '{"predictions": ["an earlier good run"]}\n'


def _score_dump(path: Path, probs: list[list[float]]) -> Path:
    videos = [{"video_id": i, "name": f"v{i}", "label": 0, "num_views": 1, "probs": p} for i, p in enumerate(probs)]
    doc = {"format": "vmm-scores/1", "split": "test", "class_names": ["a", "b"], "num_classes": 2, "videos": videos}
    path.write_text(json.dumps(doc), encoding="utf-8")  # Python's json writes bare NaN, as a hand-made dump may hold
    return path


def test_fuse_scores_refuses_non_finite_scores(tmp_path):
    good = _score_dump(tmp_path / "good.json", [[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    bad = _score_dump(tmp_path / "bad.json", [[0.9, 0.1], [float("nan"), 0.4], [float("inf"), 0.0]])
    with pytest.raises(
        ValueError, match=rf"{bad}: 2 videos have non-finite scores \(NaN/Inf\), e\.g\. video ids \[1, 2\]"
    ):
        fuse_scores([good, bad])
    # null: what a NaN becomes in strict JSON
    nulls = _score_dump(tmp_path / "nulls.json", [[0.9, 0.1], [None, None], [0.2, 0.8]])
    with pytest.raises(ValueError, match=rf"{nulls}: 1 videos have non-finite scores"):
        fuse_scores([good, nulls])


# ---------------------------------------------------------------------------- predict with failures


def test_predict_lists_and_counts_partial_failures_and_fails_when_nothing_is_predicted(tmp_path, capsys):
    model = VideoClassifier(TinyNet(2))
    out = tmp_path / "predictions.json"
    _trainer(tmp_path, callbacks=[PredictionWriter(str(out))]).predict(
        model, dataloaders=_predict_loader(6, bad=(1, 4)), return_predictions=False
    )
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert [p["video_id"] for p in doc["predictions"]] == [0, 2, 3, 5]
    assert doc["failed"] == [{"video_id": 1, "video": "1"}, {"video_id": 4, "video": "4"}]
    printed = capsys.readouterr().out
    assert "4 of 6 videos predicted (2 could not be decoded, 0 had non-finite scores)" in printed
    good = out.read_bytes()
    with pytest.raises(
        RuntimeError, match=rf"predict: no video could be predicted: 6 of 6 could not be decoded; {out} was not written"
    ):
        _trainer(tmp_path, callbacks=[PredictionWriter(str(out))]).predict(
            model, dataloaders=_predict_loader(6, bad=range(6)), return_predictions=False
        )
    assert out.read_bytes() == good
    assert "0: could not be decoded" in capsys.readouterr().out


# ---------------------------------------------------------------------------- the same through `vmm`


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> dict[str, Path]:
    """A `vmm fit` checkpoint after one step on the tiny synthetic set, and a copy with NaN weights."""
    root = tmp_path_factory.getbasetemp() / "vmm_synthetic"
    generate_tiny_dataset(root)
    out = tmp_path_factory.mktemp("tiny_fit")
    limits = dict(max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    cfg = write_config(out / "tiny.yaml", tiny_config(root, out / "runs", net=TINY_FCF, **limits))
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        main(["fit", "--config", str(cfg)])
    ckpt = out / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    for t in state["state_dict"].values():
        if t.is_floating_point():
            t.fill_(float("nan"))
    torch.save(state, out / "nan.ckpt")
    return {"cfg": cfg, "ckpt": ckpt, "nan": out / "nan.ckpt", "video": sorted(root.rglob("*.mp4"))[0]}


@pytest.mark.slow
def test_vmm_predict_and_test_fail_on_nan_weights_and_unreadable_inputs(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "p.json"
    out.write_text('{"predictions": ["an earlier good run"]}\n', encoding="utf-8")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video")
    with pytest.raises(RuntimeError, match=r"no video could be predicted: 1 of 1 had non-finite scores"):
        main(["predict", "--ckpt_path", str(tiny_ckpt["nan"]), str(tiny_ckpt["video"]), "--predictions", str(out)])
    with pytest.raises(RuntimeError, match=r"no video could be predicted: 1 of 1 could not be decoded"):
        main(["predict", "--ckpt_path", str(tiny_ckpt["ckpt"]), str(garbage), "--predictions", str(out)])
    assert out.read_text(encoding="utf-8") == '{"predictions": ["an earlier good run"]}\n'
    assert "nan%" not in capsys.readouterr().out
    with pytest.raises(RuntimeError, match=r"test: 12 of 12 videos had non-finite scores"):
        main(["test", "--config", str(tiny_ckpt["cfg"]), "--ckpt_path", str(tiny_ckpt["nan"])])


def test_stale_temporaries_of_a_killed_save_are_removed_at_the_next_save(tmp_path):
    import fcntl

    from lightning_modules.io import AtomicCheckpointIO

    old = 10**9  # 2001: long before any live write
    stale, live, young, other = (tmp_path / f".{n}" for n in ("last.ckpt.k1ll3d.tmp", "last.ckpt.l1ve.tmp",
                                 "last.ckpt.n3w.tmp", "best.ckpt.k1ll3d.tmp"))  # fmt: skip
    for p in (stale, live, young, other):
        p.write_bytes(b"partial checkpoint")
    for p in (stale, live, other):
        os.utime(p, (old, old))
    with open(live, "rb") as held:  # a save still running holds its temporary's flock
        fcntl.flock(held, fcntl.LOCK_EX)
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "last.ckpt")
        left = sorted(p.name for p in tmp_path.iterdir())
    # Only this file's dead temporary goes: the live one is locked, the young one may be starting.
    assert left == sorted(["last.ckpt", live.name, young.name, other.name])
