"""Checkpoints and `vmm` runs under hostile and careless input: untrusted checkpoints, class
order, mean-class accuracy, signals and exit statuses, --ckpt_path against the configuration,
atomic report/checkpoint files, an all-unreadable test split, `vmm predict` arguments.

The fast tests use the tiny in-memory network and data of helpers/classifier.py with real Trainer
runs; the CLI tests train the real SIFA network on the tiny synthetic set (`slow`).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import REPO_ROOT
from helpers.classifier import MovingSquare, SquareData, TinyNet, collate
from helpers.cli import TINY_FCF, VMM_COMMAND, cpu_trainer, generate_tiny_dataset, tiny_config, write_config
from torch.utils.data import DataLoader

from lightning_modules import VideoClassifier
from lightning_modules.cli import INTERRUPTED_CKPT, VMMCLI, VMMTrainer, main, predict_files
from lightning_modules.io import (
    AtomicCheckpointIO,
    CheckpointError,
    atomic_write_text,
    atomic_writer,
    load_vmm_checkpoint,
)
from lightning_modules.networks.pretrained import load_pretrained_2d
from lightning_modules.reports import TestReportWriter


def _strict_json(path: Path):
    """json.loads that fails on NaN/Infinity (which Python's json would accept)."""
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=lambda c: pytest.fail(f"{path} holds bare {c}"))


def _trainer(tmp_path, **kw) -> VMMTrainer:
    return cpu_trainer(tmp_path, **{"max_epochs": 3, "log_every_n_steps": 1, **kw})


def _leftover_temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------- 1. untrusted files


class _TouchOnUnpickle:
    """Unpickling this creates `marker` (a harmless stand-in for code a crafted checkpoint runs)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def hostile_files(tmp_path) -> dict[str, Path]:
    marker = tmp_path / "MARKER"
    payload = {"state_dict": {}, "hyper_parameters": {"x": _TouchOnUnpickle(marker)}}
    files = {
        "marker": marker,
        "zip": tmp_path / "evil.ckpt",
        "legacy": tmp_path / "evil_legacy.ckpt",
        "garbage": tmp_path / "garbage.ckpt",
        "truncated": tmp_path / "truncated.ckpt",
    }
    torch.save(payload, files["zip"])
    with open(files["legacy"], "wb") as f:
        pickle.dump(payload, f)
    files["garbage"].write_bytes(b"this is not a checkpoint\n" * 20)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, good)
    files["truncated"].write_bytes(good.read_bytes()[:2000])
    # The payload is live: an unsafe load runs it (the check that this test can fail).
    torch.load(files["zip"], weights_only=False)
    assert marker.exists()
    marker.unlink()
    return files


def _assert_refused(exc_info, path: Path) -> None:
    msg = str(exc_info.value)
    assert msg.startswith(f"not a vmm checkpoint: {path}: "), msg
    assert "weights_only=False" not in msg and "\n" not in msg


@pytest.mark.parametrize("kind", ["zip", "legacy", "garbage", "truncated"])
def test_hostile_checkpoint_is_refused_without_running_it(hostile_files, kind, tmp_path):
    path = hostile_files[kind]
    with pytest.raises(CheckpointError) as exc:
        load_vmm_checkpoint(path)
    _assert_refused(exc, path)
    if kind in ("zip", "legacy"):
        assert "nothing in it was run" in str(exc.value) or "without running it" in str(exc.value)
    # Lightning's own loads (fit/validate/test/predict --ckpt_path) go through the same check.
    with pytest.raises(CheckpointError) as exc:
        _trainer(tmp_path, logger=False).test(VideoClassifier(TinyNet(2)), datamodule=SquareData(), ckpt_path=path)
    _assert_refused(exc, path)
    assert not hostile_files["marker"].exists()


def test_hostile_checkpoint_in_vmm_predict_and_cli_and_pretrained(hostile_files, tmp_path, monkeypatch):
    evil = hostile_files["zip"]
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as exc:
        main(["predict", "--ckpt_path", str(evil), str(clip)])
    _assert_refused(exc, evil)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(tmp_path / "nodata", tmp_path / "runs"))
    for sub in ("fit", "validate", "test", "predict"):
        with pytest.raises(CheckpointError) as exc:
            main([sub, "--config", str(cfg), "--ckpt_path", str(evil)])
        _assert_refused(exc, evil)
    from lightning_modules.networks import SIFAResNet

    with pytest.raises(CheckpointError, match=r"^not a 2D ResNet state dict file \(pretrained\): .*evil"):
        load_pretrained_2d(SIFAResNet(2, depth=18, width_mult=0.125), evil)
    assert not hostile_files["marker"].exists()


def test_checkpoint_hyperparameters_are_plain_data(tmp_path):
    """Namespaces and paths in the hyperparameters are stored as dicts and strings, so every
    checkpoint loads with weights_only=True."""
    from jsonargparse import Namespace

    model = VideoClassifier(TinyNet(2))
    ckpt = {
        "state_dict": {},
        "hyper_parameters": {
            "net": Namespace(class_path="x.Y", init_args=Namespace(a=1)),
            "root": Path("/data/k400"),
            "mean": (0.5, 0.5, 0.5),
        },
    }
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "c.ckpt")
    hp = load_vmm_checkpoint(tmp_path / "c.ckpt")["hyper_parameters"]
    assert hp == {"net": {"class_path": "x.Y", "init_args": {"a": 1}}, "root": "/data/k400", "mean": (0.5, 0.5, 0.5)}


# ---------------------------------------------------------------------------- 2. class order


class _Relabelled(pl.LightningDataModule):
    """SquareData's clips under other class names/order: `mapping[old_label]` is the new label."""

    def __init__(self, class_names: list[str], mapping: list[int]) -> None:
        super().__init__()
        self.class_names, self.num_classes, self.mapping = class_names, len(class_names), mapping
        self.eval = MovingSquare(12, 2, seed=2)

    def test_dataloader(self):
        def relabel(items):
            batch = collate(items)
            batch["label"] = torch.tensor([self.mapping[int(y)] for y in batch["label"]], dtype=torch.int64)
            return batch

        return DataLoader(self.eval, batch_size=8, collate_fn=relabel)

    val_dataloader = train_dataloader = test_dataloader


@pytest.fixture(scope="module")
def trained_square(tmp_path_factory) -> tuple[Path, float]:
    """A TinyNet classifier trained on SquareData (classes right, left): its checkpoint and test top-1."""
    tmp = tmp_path_factory.mktemp("square")
    torch.manual_seed(0)
    model = VideoClassifier(TinyNet(2), lr=0.5, warmup_epochs=0.5)
    trainer = _trainer(tmp, max_epochs=4, logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=SquareData())
    trainer.test(model, datamodule=SquareData(), verbose=False)
    ckpt = tmp / "square.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, model.last_eval["test"]["top1"]


def test_class_order_of_the_datamodule_is_remapped_at_test(trained_square, tmp_path):
    ckpt, top1 = trained_square
    assert top1 >= 0.8
    swapped = _Relabelled(["left", "right"], mapping=[1, 0])
    model = VideoClassifier(TinyNet(2))
    with pytest.warns(UserWarning, match=r"another order.*\['right', 'left'\].*\['left', 'right'\]"):
        _trainer(tmp_path, logger=False).test(model, datamodule=swapped, ckpt_path=ckpt, verbose=False)
    assert model.last_eval["test"]["top1"] == pytest.approx(top1)  # 1 - top1 without the remap
    assert model.class_names == ["left", "right"]
    # Saved again, the checkpoint still names the network's own output order.
    trainer = _trainer(tmp_path, logger=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "again.ckpt")
    assert load_vmm_checkpoint(tmp_path / "again.ckpt")["class_names"] == ["right", "left"]


def test_class_set_mismatch_and_reordered_resume_are_refused(trained_square, tmp_path):
    ckpt, _ = trained_square
    other = _Relabelled(["right", "up"], mapping=[0, 1])
    with pytest.raises(
        ValueError,
        match=r"not the datamodule's \(checkpoint: \['right', 'left'\]; datamodule: "
        r"\['right', 'up'\]\)",
    ):
        _trainer(tmp_path, logger=False).test(VideoClassifier(TinyNet(2)), datamodule=other, ckpt_path=ckpt)
    swapped = _Relabelled(["left", "right"], mapping=[1, 0])
    with pytest.raises(ValueError, match="cannot resume training"):
        _trainer(tmp_path, logger=False, max_epochs=5, limit_val_batches=0).fit(
            VideoClassifier(TinyNet(2)), datamodule=swapped, ckpt_path=ckpt
        )


# ---------------------------------------------------------------------------- 3. mean_class


def test_mean_class_averages_only_classes_with_test_videos():
    from lightning_modules.evaluation import EvalAccumulator

    acc = EvalAccumulator()
    p = torch.tensor
    # Labels 0, 0, 1, 1 (class 2 has no video); video 3 is predicted as class 2.
    probs = p([[0.9, 0.1, 0.0], [0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7]])
    acc.add(p([0, 1, 2, 3]), p([0, 0, 0, 0]), p([0, 0, 1, 1]), probs, p([1.0, 1.0, 1.0, 1.0]))
    res = acc.compute(num_classes=3, top_k=1)
    assert res["top1"] == 0.75
    assert res["mean_class"] == pytest.approx((1.0 + 0.5) / 2)  # not (1 + 0.5 + 0) / 3
    assert res["mean_class_num_classes"] == 2
    assert res["clip_mean_class"] == pytest.approx(0.75)


# ---------------------------------------------------------------------------- 8. atomic files


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_writer(target) as f:
        f.write("half of the new")
        raise RuntimeError("disk on fire")
    assert target.read_text(encoding="utf-8") == "old\n" and _leftover_temps(tmp_path) == []
    (tmp_path / "a_dir").mkdir()
    with pytest.raises(IsADirectoryError, match="a_dir"):
        atomic_write_text(tmp_path / "a_dir", "x")
    assert _leftover_temps(tmp_path) == []
    atomic_write_text(target, "new\n")
    assert target.read_text(encoding="utf-8") == "new\n" and oct(target.stat().st_mode & 0o777) != oct(0o600)


_DISK_FULL_SCRIPT = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests!r})
    from lightning_modules.evaluation import EvalAccumulator
    from lightning_modules.io import AtomicCheckpointIO
    from lightning_modules.reports import write_test_report

    out = Path(sys.argv[1])
    acc = EvalAccumulator()
    acc.add(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([0, 2]), torch.eye(3)[[0, 2]], torch.ones(2))
    res = acc.compute(3)
    write_test_report(res, out, ["a", "b", "c"])  # the old report, fully written
    AtomicCheckpointIO().save_checkpoint({{"w": torch.zeros(4096)}}, out / "last.ckpt")
    # From here on no file may grow past 300 bytes: the next writes fail part-way, as on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))
    failures = 0
    for write in (lambda: write_test_report(res, out, ["a" * 50, "b" * 50, "c" * 50]),
                  lambda: AtomicCheckpointIO().save_checkpoint({{"w": torch.ones(8192)}}, out / "last.ckpt")):
        try:
            write()
        except (OSError, RuntimeError) as exc:  # torch.save reports the failed write as RuntimeError
            failures += 1
            print("failed as expected:", exc)
    sys.exit(0 if failures == 2 else 3)
""")


@pytest.mark.slow
def test_disk_full_leaves_reports_and_checkpoints_intact(tmp_path):
    script = tmp_path / "disk_full.py"
    script.write_text(_DISK_FULL_SCRIPT.format(tests=str(REPO_ROOT / "tests")), encoding="utf-8")
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, str(script), str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = _strict_json(out / "test_results.json")  # the old report, whole
    assert report["num_videos"] == 2 and report["top1"] == 1.0
    assert (out / "confusion_matrix_test.csv").read_text(encoding="utf-8").startswith("true\\pred,a,b,c\n")
    assert torch.equal(torch.load(out / "last.ckpt", weights_only=True)["w"], torch.zeros(4096))
    assert _leftover_temps(out) == []


def test_checkpoints_are_written_through_the_atomic_io(tmp_path):
    trainer = _trainer(tmp_path, max_epochs=1, logger=False, limit_val_batches=0)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    trainer.fit(VideoClassifier(TinyNet(2), lr=0.1), datamodule=SquareData(n_train=8, n_eval=2, views=1))
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    assert load_vmm_checkpoint(ckpt)["global_step"] == 1
    assert _leftover_temps(ckpt.parent) == []


_TAG_AS_CUDA = [False]


def _cuda_tag(storage):
    """While _TAG_AS_CUDA[0]: record CPU storages as 'cuda:0', as a checkpoint saved on a GPU holds them."""
    return "cuda:0" if _TAG_AS_CUDA[0] and storage.device.type == "cpu" else None


torch.serialization.register_package(0, _cuda_tag, lambda storage, location: None)


def test_a_gpu_checkpoint_loads_on_the_cpu_through_the_checkpoint_io(trained_square, tmp_path):
    """Lightning's Strategy.load_checkpoint passes no map_location: the IO must map to the CPU itself,
    or a GPU-trained checkpoint fails to load on a CPU machine (and lands on cuda:0 on every DDP rank)."""
    ckpt, top1 = trained_square
    gpu_ckpt = tmp_path / "gpu.ckpt"
    _TAG_AS_CUDA[0] = True
    try:
        torch.save(torch.load(ckpt, weights_only=True), gpu_ckpt)
    finally:
        _TAG_AS_CUDA[0] = False
    if not torch.cuda.is_available():  # the check that this test can fail: torch's own load refuses it
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(gpu_ckpt, weights_only=True)
    loaded = AtomicCheckpointIO().load_checkpoint(gpu_ckpt)
    assert {t.device.type for t in loaded["state_dict"].values()} == {"cpu"}
    model = VideoClassifier(TinyNet(2))
    _trainer(tmp_path, logger=False).test(model, datamodule=SquareData(), ckpt_path=gpu_ckpt, verbose=False)
    assert model.last_eval["test"]["top1"] == pytest.approx(top1)


# ---------------------------------------------------------------------------- 9. nothing to test


def test_all_unreadable_test_split_fails_and_writes_null(tmp_path):
    data = SquareData(n_train=8, n_eval=4, views=1, bad=range(4))
    model = VideoClassifier(TinyNet(2))
    with pytest.raises(RuntimeError, match=r"no test video could be used \(4 failed to decode\)"):
        _trainer(tmp_path, callbacks=[TestReportWriter()]).test(model, datamodule=data, verbose=False)
    report = _strict_json(tmp_path / "lightning_logs" / "version_0" / "test_results.json")
    assert report["num_videos"] == 0 and report["excluded_videos"] == 4
    assert report["top1"] is None and report["mean_class"] is None and report["loss"] is None


# ---------------------------------------------------------------------------- CLI runs (real networks)


@pytest.fixture(scope="module")
def sigterm_fit(tmp_path_factory):
    """`vmm fit` in a subprocess, stopped by SIGTERM once its first epoch's checkpoint exists."""
    root = tmp_path_factory.getbasetemp() / "vmm_synthetic"
    generate_tiny_dataset(root)
    out = tmp_path_factory.mktemp("sigterm")
    cfg = write_config(out / "tiny.yaml", tiny_config(root, out / "runs", max_epochs=200))
    proc, stdout = _run_until_checkpoint(["fit", "--config", str(cfg)], out, signal.SIGTERM)
    ckpt_dir = out / "runs" / "lightning_logs" / "version_0" / "checkpoints"
    return {"proc": proc, "stdout": stdout, "ckpt_dir": ckpt_dir, "cfg": cfg, "root": root, "out": out}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_until_checkpoint(args: list[str], cwd: Path, sig: int) -> tuple[subprocess.Popen, str]:
    """Start `vmm <args>`, wait for the first last.ckpt, let a few steps run, send `sig`, wait."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(
        [*VMM_COMMAND, *args],
        cwd=cwd,
        env=env,
        # A shell without job control starts background jobs with SIGINT ignored, and Python keeps an
        # ignored SIGINT: a suite run as `make test &` from a script would hand vmm a Ctrl+C it ignores.
        preexec_fn=_default_sigint,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    last = cwd / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # into the second epoch
    if proc.poll() is None:
        proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=240)
    return proc, stdout


@pytest.mark.slow
def test_sigterm_during_fit_saves_and_exits_143(sigterm_fit):
    proc, ckpt_dir = sigterm_fit["proc"], sigterm_fit["ckpt_dir"]
    assert proc.returncode == 143, sigterm_fit["stdout"][-3000:]
    assert "stopped by SIGTERM" in sigterm_fit["stdout"]
    ckpt = load_vmm_checkpoint(ckpt_dir / INTERRUPTED_CKPT)  # weights_only=True
    assert ckpt["global_step"] >= load_vmm_checkpoint(ckpt_dir / "last.ckpt")["global_step"] >= 6
    assert _leftover_temps(ckpt_dir) == []


@pytest.mark.slow
def test_sigint_during_demo_says_interrupted_and_exits_130(sigterm_fit, tmp_path):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(sigterm_fit["root"], tmp_path / "runs", max_epochs=200))
    proc, stdout = _run_until_checkpoint(["demo", "--config", str(cfg)], tmp_path, signal.SIGINT)
    assert proc.returncode == 130, stdout[-3000:]
    assert (
        "vmm demo interrupted by SIGINT (Ctrl+C) during training; the test was not run; resume with "
        "--ckpt_path" in stdout
    )
    assert "vmm demo finished" not in stdout


def _cli(args: list[str]) -> VMMCLI:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        return VMMCLI(args=args)


@pytest.mark.slow
def test_ckpt_path_with_another_network_in_the_config_is_refused(sigterm_fit, tmp_path):
    ckpt = sigterm_fit["ckpt_dir"] / "last.ckpt"
    fcf = write_config(tmp_path / "fcf.yaml", tiny_config(sigterm_fit["root"], tmp_path / "runs", net=TINY_FCF))
    with pytest.raises(
        ValueError,
        match=r"holds a lightning_modules\.networks\.SIFAResNet network, but the "
        r"configuration names model\.net lightning_modules\.networks\.FCFR2Plus1D",
    ):
        main(["test", "--config", str(fcf), "--ckpt_path", str(ckpt)])
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_ckpt_path_alone_defines_the_model_and_overrides_are_named(sigterm_fit, tmp_path):
    ckpt = sigterm_fit["ckpt_dir"] / "last.ckpt"
    cfg = tiny_config(sigterm_fit["root"], tmp_path / "runs")
    del cfg["model"]
    data_only = write_config(tmp_path / "data_only.yaml", cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no override, so no warning about one
        warnings.filterwarnings("ignore", message="(?!--ckpt_path)")
        cli = _cli(["validate", "--config", str(data_only), "--ckpt_path", str(ckpt)])
    assert type(cli.model.net).__name__ == "SIFAResNet" and cli.model.last_eval["val"]["num_videos"] == 8
    with pytest.warns(
        UserWarning,
        match=r"--ckpt_path .*last\.ckpt: the model is rebuilt from the checkpoint "
        r"\(lightning_modules\.networks\.SIFAResNet.*will not apply: "
        r"model\.lr=0\.3 \(checkpoint: 0\.05\), "
        r"model\.net\.init_args\.dropout=0\.5 \(checkpoint: 0\.0\)",
    ):
        cli = _cli(
            [
                "validate",
                "--config",
                str(sigterm_fit["cfg"]),
                "--ckpt_path",
                str(ckpt),
                "--model.lr",
                "0.3",
                "--model.net.init_args.dropout",
                "0.5",
                "--trainer.default_root_dir",
                str(tmp_path / "runs2"),
            ]
        )
    assert cli.model.hparams.lr == 0.05  # what the warning said


@pytest.mark.slow
def test_remote_ckpt_path_is_checked_and_tested(sigterm_fit, tmp_path):
    """A --ckpt_path URL (fsspec; memory:// here) loads through the checkpoint IO, and is still checked
    against the configured network."""
    import fsspec

    url = "memory://vmm-review/last.ckpt"
    with fsspec.open(url, "wb") as f:
        f.write((sigterm_fit["ckpt_dir"] / "last.ckpt").read_bytes())
    try:
        fcf = write_config(tmp_path / "fcf.yaml", tiny_config(sigterm_fit["root"], tmp_path / "runs", net=TINY_FCF))
        with pytest.raises(ValueError, match=r"holds a lightning_modules\.networks\.SIFAResNet network"):
            main(["test", "--config", str(fcf), "--ckpt_path", url])
        cfg = write_config(tmp_path / "tiny.yaml", tiny_config(sigterm_fit["root"], tmp_path / "runs"))
        cli = _cli(["test", "--config", str(cfg), "--ckpt_path", url])
        assert cli.model.last_eval["test"]["num_videos"] > 0
        assert cli._ckpt is None  # the parsed checkpoint is not held in memory for the whole run
    finally:
        fsspec.filesystem("memory").rm(url, recursive=True)


@pytest.mark.slow
def test_file_predict_checks_output_and_top_k_before_inference(sigterm_fit, tmp_path, monkeypatch):
    ckpt = sigterm_fit["ckpt_dir"] / "last.ckpt"
    video = sorted(sigterm_fit["root"].rglob("*.mp4"))[0]
    monkeypatch.chdir(tmp_path)
    for bad in ("0", "-2"):
        with pytest.raises(ValueError, match=rf"top_k must be an integer >= 1, got {bad}"):
            main(["predict", "--ckpt_path", str(ckpt), str(video), "--top_k", bad])
    with pytest.raises(ValueError, match=r"--predictions must be a file path, got the existing directory"):
        main(["predict", "--ckpt_path", str(ckpt), str(video), "--predictions", str(tmp_path)])
    a_file = tmp_path / "a_file"
    a_file.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"--predictions: cannot write .*a_file/p\.json.*is not writable"):
        main(["predict", "--ckpt_path", str(ckpt), str(video), "--predictions", str(a_file / "p.json")])
    with pytest.raises(ValueError, match=r"--predictions must be a file path, got the existing directory"):
        main(["predict", "--config", str(sigterm_fit["cfg"]), "--ckpt_path", str(ckpt), "--predictions", str(tmp_path)])
    assert list(tmp_path.glob("*.json")) == []
    # Default: <checkpoint name>.predictions.json in the working directory, not beside the checkpoint.
    results = predict_files(ckpt, [video], top_k=2)
    assert len(results) == 1 and len(results[0]["top_k"]) == 2
    assert _strict_json(tmp_path / "last.predictions.json")["predictions"][0]["video"] == str(video)
    assert not (ckpt.parent / "last.predictions.json").exists()
