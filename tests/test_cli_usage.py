"""Careless and hostile input to the `vmm` command line: every expected error is one line naming
the fix (a traceback only under VMM_DEBUG=1 or for real bugs), pickles refused in torch's current
wording, output and input paths checked before any work, oversized or special score files and
alias-bomb configs refused, and checkpoints that outlive their pretrained weight file.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess

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
    assert "a safe load refuses" in msg and "nothing in it was run" in msg, msg
    assert "truncated" not in msg and "weights_only" not in msg.replace("weights_only=True", ""), msg
    assert "Re-running" not in msg and "\n" not in msg, msg
    if fmt == "zip":  # a protocol-2 pickle: torch reaches the global, and names it
        assert "holds objects that a safe load refuses (the Python object posix.system" in msg, msg


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
    # A checkpoint written before checkpoints stored pretrained=None names the file it needed.
    old = torch.load(ckpt, weights_only=True)
    old["hyper_parameters"]["net"]["init_args"]["pretrained"] = old.pop("vmm_pretrained_from")
    torch.save(old, out / "old.ckpt")
    main(["predict", "--ckpt_path", str(out / "old.ckpt"), str(pretrained_fit["videos"][0])])
    assert (out / "old.predictions.json").is_file()


# ---------------------------------------------------------------------------- one line per user mistake


def _console(args: list[str], capsys) -> tuple[int, list[str]]:
    """`vmm <args>` as the console script runs it, in-process: (exit status, stderr's lines)."""
    from lightning_modules.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args, console=True)
    return exc.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def user_mistakes(tmp_path, monkeypatch):
    monkeypatch.delenv("VMM_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "model.ckpt"
    net = {"class_path": "lightning_modules.networks.SIFAResNet", "init_args": {"depth": 18, "width_mult": 0.125}}
    torch.save({"state_dict": {}, "hyper_parameters": {"net": net}}, ckpt)
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint\n" * 10)
    (tmp_path / "bomb.yaml").write_text(_alias_bomb(9), encoding="utf-8")
    (tmp_path / "a.json").write_text('{"format": "vmm-scores/1", "class_names": [], "videos": []}', encoding="utf-8")
    (tmp_path / "list.txt").write_text("a.mp4 0 1 2 3 4\n", encoding="utf-8")  # malformed: bad data
    return tmp_path


def test_user_mistakes_print_one_line_naming_the_fix(user_mistakes, capsys):
    t = user_mistakes
    folder = ["--data", "datamodules.VideoFolderDataModule"]
    cases = [  # (arguments, exit status, what the one line must say)
        (["test", "--ckpt_path", "missing.ckpt"], 2, r"^vmm test: error: --ckpt_path missing.ckpt: no such file"),
        (["predict", "--ckpt_path", str(t / "garbage.ckpt"), "x.mp4"], 2, r"not a vmm checkpoint: .*garbage.ckpt"),
        (["test", "--ckpt_path", "model.ckpt"], 2, r"needs a dataset: give --config .* or --data"),
        (["check-data", *folder, "--data.init_args.root", str(t / "nowhere")], 2, r"give .*--data.init_args.root"),
        (["check-data", *folder], 2, r"--data.init_args.root"),
        (["fit", "--config", "bomb.yaml"], 2, r"bomb.yaml: .*aliases"),
        (["fuse-scores", "a.json", "/dev/zero"], 2, r"^vmm fuse-scores: error: /dev/zero: .*character device"),
        (["check-data", "--data", "datamodules.VideoListDataModule", "--data.init_args.root", str(t),
          "--data.init_args.train_list", "list.txt"], 1, r"list.txt:1: .*"),
    ]  # fmt: skip
    for args, status, says in cases:
        code, err = _console(args, capsys)
        assert (code, len(err)) == (status, 1), (args, code, err)
        assert re.search(says, err[0]), (args, err)
        assert "Traceback" not in err[0]


def test_debug_flag_and_env_give_the_traceback(user_mistakes, monkeypatch):
    from lightning_modules.cli import main

    with pytest.raises(ValueError, match="missing.ckpt: no such file"):
        main(["test", "--debug", "--ckpt_path", "missing.ckpt"], console=True)
    monkeypatch.setenv("VMM_DEBUG", "1")
    with pytest.raises(CheckpointError):
        main(["test", "--ckpt_path", "garbage.ckpt"], console=True)


def test_errors_raised_outside_vmm_are_bugs_with_a_traceback():
    import json

    from lightning_modules.cli import _expected_exit_status

    try:
        json.loads("{")  # raised inside the json module: not an input vmm checked
    except ValueError as exc:
        assert _expected_exit_status(exc) is None


@pytest.mark.slow
def test_console_script_prints_one_line_and_exits_2(tmp_path):
    from helpers.cli import VMM_COMMAND

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("VMM_DEBUG", None)
    proc = subprocess.run(
        [*VMM_COMMAND, "test", "--ckpt_path", "missing.ckpt"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "vmm test: error: --ckpt_path missing.ckpt: no such file (give the .ckpt file written by vmm fit, e.g. "
        "lightning_logs/version_0/checkpoints/last.ckpt)"
    ]


# ---------------------------------------------------------------------------- a checkpoint names no code


def test_a_checkpoint_cannot_make_vmm_import_a_module_outside_its_networks(tmp_path, monkeypatch):
    from lightning_modules.cli import main

    marker = tmp_path / "IMPORTED"
    (tmp_path / "vmm_test_payload.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n\nclass Net:\n    pass\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "plain.ckpt"
    hp = {"net": {"class_path": "vmm_test_payload.Net", "init_args": {}}}
    torch.save({"state_dict": {}, "hyper_parameters": hp, "class_names": ["a"], "vmm_test_settings": {}}, ckpt)
    (tmp_path / "x.mp4").write_bytes(b"")
    for args in (["predict", "--ckpt_path", str(ckpt), "x.mp4"], ["test", "--ckpt_path", str(ckpt)]):
        with pytest.raises(
            ValueError,
            match=r"vmm_test_payload.Net is not one of vmm.s networks .*--model.net.class_path vmm_test_payload.Net",
        ):
            main(args)
    assert not marker.exists()
