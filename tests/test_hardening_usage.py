"""Careless and hostile input to the `vmm` command line: every expected error is one line naming
the fix (a traceback only under VMM_DEBUG=1 or for real bugs), pickles refused in torch's current
wording, output and input paths checked before any work, oversized or special score files and
alias-bomb configs refused, and checkpoints that outlive their pretrained weight file.
"""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from lightning_modules.io import CheckpointError, load_vmm_checkpoint


class _SystemOnUnpickle:
    """Unpickling this calls os.system: torch blocks the whole `os`/`posix` module by name."""

    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_blocked_pickle_is_reported_as_refused_objects_without_torch_advice(tmp_path, fmt):
    path = tmp_path / f"evil_{fmt}.ckpt"
    payload = {"state_dict": {}, "hyper_parameters": {"x": _SystemOnUnpickle()}}
    if fmt == "zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError) as exc:
        load_vmm_checkpoint(path)
    msg = str(exc.value)
    assert msg.startswith(f"not a vmm checkpoint: {path}: "), msg
    assert "holds objects that a safe load refuses" in msg, msg
    assert "truncated" not in msg and "weights_only" not in msg.replace("weights_only=True", ""), msg
    assert "Re-running" not in msg and "\n" not in msg, msg
    if fmt == "zip":
        assert "posix.system" in msg, msg


def test_fuse_scores_refuses_devices_fifos_and_oversized_files_without_reading_them(tmp_path):
    from lightning_modules.cli import fuse_scores
    from lightning_modules.reports import MAX_SCORE_FILE_BYTES

    a = tmp_path / "a.json"
    a.write_text('{"format": "vmm-scores/1", "class_names": ["x"], "videos": []}', encoding="utf-8")
    fifo = tmp_path / "scores.fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:  # sparse: no disk space used
        f.truncate(MAX_SCORE_FILE_BYTES + 1)
    for other, why in (("/dev/zero", "character device"), (fifo, "FIFO"), (huge, "larger than")):
        with pytest.raises(ValueError, match=f"{other}: .*{why}") as exc:
            fuse_scores([a, other])
        assert "\n" not in str(exc.value)


def _alias_bomb(levels: int) -> str:
    """A "billion laughs" YAML: 9**levels strings once its aliases are expanded, ~60 bytes a level."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    return "\n".join(lines) + f"\ntrainer:\n  callbacks: *l{levels - 1}\n"


def test_alias_bomb_config_is_refused_before_it_expands(tmp_path):
    from lightning_modules.cli import ConfigError, main

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb(9), encoding="utf-8")
    assert bomb.stat().st_size < 700
    for args in (["fit", "--config", str(bomb)], ["check-data", f"--config={bomb}"]):
        with pytest.raises(ConfigError, match=r"bomb.yaml: .*aliases .* expand to more than [\d,]+ values") as exc:
            main(args)
        assert "\n" not in str(exc.value)
    # A section read from a file or given inline: jsonargparse does not pass its file name on.
    for value in (str(bomb), bomb.read_text(encoding="utf-8")):
        with pytest.raises(ConfigError, match=r"^a YAML value: .*aliases .* expand to more than"):
            main(["fit", "--trainer", value])


@pytest.fixture(scope="module")
def pretrained_fit(tmp_path_factory):
    """A one-step `vmm fit` of the tiny SIFA network started from a 2D weight file that is then deleted."""
    from helpers.cli import generate_tiny_dataset, tiny_config, write_config

    from lightning_modules.cli import main

    root = tmp_path_factory.getbasetemp() / "vmm_synthetic"
    data_dir = generate_tiny_dataset(root)
    out = tmp_path_factory.mktemp("pretrained")
    weights = out / "resnet2d.pth"
    torch.save({"conv1.weight": torch.randn(8, 3, 7, 7)}, weights)  # the tiny network's stem (64 x 1/8)
    cfg = tiny_config(root, out / "runs", max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    cfg["model"]["net"]["init_args"]["pretrained"] = str(weights)
    cfg_path = write_config(out / "pretrained.yaml", cfg)
    main(["fit", "--config", str(cfg_path)])
    weights.unlink()
    ckpt = out / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    return {"ckpt": ckpt, "cfg": cfg_path, "out": out, "videos": sorted(data_dir.rglob("*.mp4"))}


@pytest.mark.slow
def test_a_checkpoint_outlives_its_pretrained_weight_file(pretrained_fit, monkeypatch):
    from lightning_modules import VideoClassifier
    from lightning_modules.cli import main

    ckpt, out = pretrained_fit["ckpt"], pretrained_fit["out"]
    monkeypatch.chdir(out)
    # Predict on files with the checkpoint alone, test under the (now stale) training config, and
    # rebuild the classifier in Python: the inflation happened once, its result is in the weights.
    main(["predict", "--ckpt_path", str(ckpt), str(pretrained_fit["videos"][0])])
    assert (out / "last.predictions.json").is_file()
    with pytest.warns(UserWarning, match=r"model.net.init_args.pretrained=.*resnet2d.pth"):
        main(["test", "--config", str(pretrained_fit["cfg"]), "--ckpt_path", str(ckpt)])
    model = VideoClassifier.load_from_checkpoint(ckpt)
    assert model.net.pretrained_report is None
