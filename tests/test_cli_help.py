"""A new user's first commands: `vmm --help` starts without torch, an unknown command names every
command, and a tiny `vmm fit` / `vmm test` prints vmm's own messages (the test views and how to lower
them, the report files, a lowered worker count) without third-party noise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli import VMM_COMMAND, generate_tiny_dataset, run_vmm, tiny_config, write_config

from datamodules.base import usable_cpus
from lightning_modules.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]

# What `vmm <args>` imported, from a subprocess that runs `main` as the console script does.
_IMPORTED = """
import sys
from lightning_modules.cli import main
try:
    main({args!r})
except SystemExit:
    pass
print("IMPORTED", " ".join(sorted(m for m in ("torch", "lightning", "torchmetrics") if m in sys.modules)))
"""


def _imported_by(args: list[str]) -> tuple[str, list[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORTED.format(args=args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    head, _, imported = proc.stdout.rpartition("IMPORTED")
    return head, imported.split()


@pytest.mark.parametrize("args", [["--help"], [], ["fuse-scores", "--help"]])
def test_help_does_not_import_torch_or_lightning(args):
    text, imported = _imported_by(args)
    assert imported == [], f"vmm {' '.join(args)} imported {imported}"
    assert text.startswith("usage: vmm"), text[:200]


def test_top_level_help_lists_every_command():
    text, _ = _imported_by(["--help"])
    first = text.splitlines()[0]
    for command in COMMANDS:
        assert command in first
        assert f"\n  {command} " in text


def test_an_unknown_command_prints_a_usage_with_every_command():
    proc = subprocess.run(
        [*VMM_COMMAND, "fux"], capture_output=True, text=True, encoding="utf-8", timeout=120, cwd=REPO
    )
    assert proc.returncode == 2
    usage, error = proc.stderr.splitlines()[:2]
    assert usage == "usage: vmm {fit,validate,test,predict,demo,check-data,prepare,fuse-scores} [options]"
    assert error.startswith("vmm: error: unknown command 'fux'")
    assert "fuse-scores" in error and "prepare" in error


# Third-party lines that are not the user's business (see lightning_modules.cli._THIRD_PARTY_WARNINGS).
NOISE = (
    "litlogger",
    "tensorboardX",
    "LeafSpec",
    "does not have many workers",
    "worker processes in total",
    "The dirpath has changed",
    "Warning:",
)


@pytest.mark.slow  # a `vmm fit` and a `vmm test` of the tiny network, each a fresh process
def test_fit_and_test_print_vmm_messages_without_third_party_noise(tmp_path):
    root = tmp_path / "data"
    generate_tiny_dataset(root)
    cfg = tiny_config(root, tmp_path / "runs", max_epochs=1)
    # One more worker than this process may use: vmm lowers it, once, and torch has nothing to warn.
    cfg["data"]["init_args"]["num_workers"] = usable_cpus() + 1
    config = write_config(tmp_path / "tiny.yaml", cfg)
    fit = run_vmm(["fit", "--config", str(config)], cwd=tmp_path)
    for noise in NOISE:
        assert noise not in fit.stderr, f"{noise!r} in vmm fit's stderr:\n{fit.stderr}"
    lowered = f"num_workers {usable_cpus() + 1} lowered to {usable_cpus()}"
    assert fit.stderr.count(lowered) == 1, fit.stderr

    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    test = run_vmm(["test", "--config", str(config), "--ckpt_path", str(ckpt)], cwd=tmp_path)
    for noise in NOISE:
        assert noise not in test.stderr, f"{noise!r} in vmm test's stderr:\n{test.stderr}"
    # 4 classes x 3 test videos, 2 clips x 1 crop (helpers.cli.TINY_DATA)
    views = "[vmm] testing 12 videos x 2 views each (2 clips x 1 crops"
    assert views in test.stdout, test.stdout
    assert "--data.init_args.test_clips 1 --data.init_args.test_crops 1" in test.stdout
    report = [line for line in test.stdout.splitlines() if line.startswith("[vmm] test report written: ")]
    assert len(report) == 1, test.stdout
    paths = [Path(p) for p in report[0].split(": ", 1)[1].split(", ")]
    # the .png only where matplotlib is installed
    assert [p.name for p in paths][:3] == ["test_results.json", "scores_test.json", "confusion_matrix_test.csv"]
    assert all(p.is_file() for p in paths)


TRAINER_COMMANDS = ("fit", "validate", "test", "predict", "demo")
OWN_HELP_COMMANDS = tuple(c for c in COMMANDS if c != "fuse-scores")  # fuse-scores' help is argparse's own


@pytest.mark.parametrize("command", OWN_HELP_COMMANDS)
def test_a_command_help_is_short_and_starts_with_its_own_options(command):
    text, imported = _imported_by([command, "--help"])
    assert imported == [], f"vmm {command} --help imported {imported}"
    lines = text.splitlines()
    assert lines[0].startswith(f"usage: vmm {command} ")
    assert len(lines) < 45, text
    # the description whole: it ends a sentence before the options
    description = " ".join(lines[2 : lines.index(f"{command} options:")]).strip()
    assert description.endswith("."), description
    assert "required" not in text.replace("(required)", "") or command != "predict"
    assert f"vmm {command} --help-all" in lines[-1]


def _full_help(capsys, argv: list[str]) -> str:
    from lightning_modules.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


def test_each_option_a_short_help_names_is_in_the_full_list(capsys):
    import inspect

    from datamodules import VideoDataModule
    from lightning_modules.cli import HELP_ALL, command_help

    data_options = set(inspect.signature(VideoDataModule.__init__).parameters) | {"root"}
    for command in OWN_HELP_COMMANDS:
        full = _full_help(capsys, [command, HELP_ALL])
        named = {w.rstrip(",)") for w in command_help(command).split() if w.startswith("--") and "NAME" not in w}
        named -= {HELP_ALL, "--debug", "--help", "--config"}  # vmm's own flags; --config is "-c, --config"
        # a datamodule's options are listed by --data.help CLASS_PATH: VideoDataModule's (root: every layout's)
        data = {w for w in named if w.startswith("--data.init_args.")}
        assert {w.rpartition(".")[2] for w in data} <= data_options, data
        missing = sorted(w for w in named - data if f"{w} " not in full and f"{w}\n" not in full)
        assert not missing, f"vmm {command} --help names options its full list lacks: {missing}"


def test_the_full_predict_help_marks_only_what_is_required(capsys):
    from lightning_modules.cli import HELP_ALL

    full = _full_help(capsys, ["predict", HELP_ALL])
    assert len(full.splitlines()) < 700
    videos = full[full.index("\n  videos ") : full.index("\noptions:")]
    assert "(optional, type: str" in " ".join(videos.split())
    assert "(required unless --ckpt_path gives the checkpoint's network" in " ".join(full.split())
    headers = [line for line in full.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert headers[0] == "positional arguments:"
    assert not [h for h in headers if "<function" in h or len(h) > 130], headers
    assert any(h.startswith("Data options (--data CLASS_PATH") for h in headers), headers
    # torch's and torchmetrics' Module classes are counted, not listed
    assert "torchmetrics." not in full and "torch.nn.Identity" not in full


@pytest.mark.parametrize("command", ["check-data", "prepare"])
def test_data_command_help_has_readable_groups(capsys, command):
    full = _full_help(capsys, [command, "--help-all"])
    headers = [line for line in full.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert f"{command} options:" in headers, headers
    assert any(h.startswith("Data options (") for h in headers), headers
    assert not any("DataModule standardizes" in h or h.startswith("`vmm") for h in headers), headers
