"""The motion probe's premise: its plain arm is exactly blind to frame order, its SIFA and FCF arms are not;
the same for the small controlled models of benchmarks/motion_cue.py.

(The training run itself is benchmarks/motion_probe.py; this checks the three arms it builds.)
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys

import pytest
import torch
from helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import motion_cue  # noqa: E402
import motion_probe  # noqa: E402
import plot_curves  # noqa: E402

ARGS = argparse.Namespace(
    depth=18,
    width=0.125,
    dropout=0.0,
    fcf_n_iter=3,
    fcf_bottleneck=4,
    sifa_stages=[2, 3, 4],
    sifa_dilation=1,
    stem_temporal=1,
)


def _wake_residuals(net: torch.nn.Module) -> None:
    """Give the zero-initialised last BN of every residual branch a non-zero scale (as training does)."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d) and not bool(m.weight.detach().abs().sum()):
            torch.nn.init.uniform_(m.weight, 0.5, 1.0)


@pytest.mark.parametrize("arm", motion_probe.ARMS)
def test_only_the_plain_arm_is_order_blind(arm):
    if arm == "sifa-corr" and not motion_probe.has_correlation_features():
        with pytest.raises(ValueError, match="correlation_features"):
            motion_probe.build_net(arm, 4, ARGS)
        return
    net = motion_probe.build_net(arm, 4, ARGS)
    _wake_residuals(net)
    with torch.no_grad():
        for p in net.modules():
            if hasattr(p, "conv_offset"):  # SIFA offsets start at zero; any learned value will do
                torch.nn.init.normal_(p.conv_offset.weight, std=0.05)
    clip = torch.randn(2, 3, 6, 32, 32)
    sensitivity = motion_probe.order_sensitivity(net, clip)
    if arm == "plain":
        assert sensitivity < 1e-5  # per-frame features averaged over time: reversal changes nothing
    else:
        assert sensitivity > 1e-4, sensitivity


@pytest.mark.parametrize("mode", motion_cue.MODES)
def test_motion_cue_models_see_frame_order_except_plain(mode):
    if mode == "sifa-corr" and "correlation_features" not in inspect.signature(motion_cue.SIFA).parameters:
        with pytest.raises(ValueError, match="correlation_features"):
            motion_cue.CueNet(mode, num_classes=4)
        return
    torch.manual_seed(0)
    # float64: the plain model's sum over frames is then order-blind to ~1e-15, and the small (but real)
    # order dependence of a fresh SIFA model (~1e-5 in float32) stands far above rounding.
    net = motion_cue.CueNet(mode, num_classes=4, channels=12).double().eval()
    if mode.startswith("sifa"):
        torch.nn.init.normal_(net.sifa.conv_offset.weight, std=0.05)
    clip = torch.randn(2, 3, 5, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        logits = net(clip)
        diff = float((logits - net(clip.flip(2))).abs().max())
    assert logits.shape == (2, 4)
    if mode == "plain":
        assert diff < 1e-10, diff
    else:
        assert diff > 1e-7, diff


def test_motion_cue_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        motion_cue.CueNet("flow", num_classes=4)


def test_per_pair_splits_pair_and_member():
    # rows = true class; pair 0 = classes 0/1, pair 1 = classes 2/3
    confusion = [[6, 2, 2, 0], [4, 4, 0, 0], [0, 0, 5, 5], [0, 0, 5, 5]]
    pairs = motion_probe.per_pair(confusion)
    assert [q["pair"] for q in pairs] == [(0, 1), (2, 3)]
    assert pairs[0]["videos"] == 18 and pairs[0]["top1"] == pytest.approx(10 / 18)
    assert pairs[0]["pair_found"] == pytest.approx(16 / 18) and pairs[0]["member_given_pair"] == pytest.approx(10 / 16)
    assert pairs[1]["pair_found"] == 1.0 and pairs[1]["member_given_pair"] == 0.5  # order-blind on this pair
    assert motion_probe.binomial_sd(0.5, 128) == pytest.approx(0.0442, abs=1e-4)


@pytest.mark.parametrize("freeze", [False, True])
def test_pretrained_backbone_goes_into_every_arm(freeze):
    torch.manual_seed(0)
    source = motion_probe.build_net("plain", 4, ARGS)
    for p in source.parameters():
        torch.nn.init.normal_(p)
    state = source.state_dict()
    for arm in ("sifa", "fcf"):
        net = motion_probe.build_net(arm, 2, ARGS)
        copied = motion_probe.load_backbone(net, state, freeze)
        own = net.state_dict()
        assert copied > 50
        assert torch.equal(own["layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])
        assert not torch.equal(own["fc.weight"][:2], state["fc.weight"][:2])  # the classifier starts fresh
        module_params = [n for n, _ in net.named_parameters() if "conv_offset" in n or n.startswith("fcf.")]
        assert module_params
        trainable = {n for n, p in net.named_parameters() if p.requires_grad}
        assert set(module_params) <= trainable and "fc.weight" in trainable
        assert ("layer1.0.conv1.weight" in trainable) is not freeze


def _run_probe(tmp_path, *extra):
    out = tmp_path / "probe.json"
    res = motion_probe.main(
        [
            "--cache",
            str(tmp_path / "cache"),
            "--train-per-class",
            "3",
            "--val-per-class",
            "1",
            "--test-per-class",
            "2",
            "--epochs",
            "1",
            "--width",
            "0.125",
            "--crop",
            "32",
            "--frames",
            "4",
            "--video-frames",
            "8",
            "--workers",
            "0",
            "--json",
            str(out),
            *extra,
        ]
    )
    assert out.is_file()
    return res


@pytest.mark.slow
def test_probe_runs_direction_with_pairs_and_pretraining(tmp_path, capsys):
    res = _run_probe(
        tmp_path, "--num-classes", "4", "--arms", "plain", "sifa", "--pretrain-epochs", "1", "--freeze-backbone"
    )
    text = capsys.readouterr().out
    assert "[pretrain] appearance task" in text and "frozen" in text
    assert "translate_right / translate_left" in text and "order-blind ceiling 50%" in text
    assert res["chance"] == 0.25 and res["ceiling"] == 0.5 and res["pretrain"]["test_videos"] == 8
    for r in res["results"]:
        assert len(r["per_pair"]) == 2 and r["test_videos"] == 8 and r["pretrained_tensors"] > 50
        assert sum(map(sum, r["confusion"])) == 8


def test_probe_runs_coherence(tmp_path, capsys):
    res = _run_probe(tmp_path, "--num-classes", "2", "--task", "coherence", "--arms", "plain")
    text = capsys.readouterr().out
    assert "coherence task: K = 2 classes, chance 50.0%" in text
    assert res["results"][0]["test_videos"] == 4 and res["results"][0]["per_pair"] == []
    with pytest.raises(SystemExit):
        motion_probe.main(["--task", "coherence", "--num-classes", "4"])


@pytest.mark.slow
def test_probe_learning_curve_tests_at_the_chosen_epochs(tmp_path, capsys):
    res = _run_probe(tmp_path, "--num-classes", "2", "--arms", "plain", "--epochs", "4", "--curve-every", "2")
    (r,) = res["results"]
    assert [p["epoch"] for p in r["curve"]] == [2, 4]
    steps = [p["step"] for p in r["curve"]]
    assert steps[1] == 2 * steps[0] > 0
    # The curve's last point is the model the final test sees: the same test top-1.
    assert r["curve"][-1]["top1"] == r["top1"]
    assert "epoch   2 (step" in capsys.readouterr().out


def test_plot_curves_draws_mean_and_spread_over_runs(tmp_path):
    pytest.importorskip("matplotlib")

    def run(seed_shift):
        curve = [{"epoch": e, "step": 10 * e, "top1": 0.5 + 0.05 * e + seed_shift} for e in (2, 4, 6)]
        return {"task": "direction", "num_classes": 2, "results": [{"arm": "sifa-corr", "curve": curve}]}

    paths = []
    for i, shift in enumerate((0.0, 0.02, -0.02)):
        path = tmp_path / f"run{i}.json"
        path.write_text(json.dumps(run(shift)), encoding="utf-8")
        paths.append(path)
    panels = plot_curves.load_curves(paths)
    steps, mean, low, high = plot_curves.summarise(panels[("direction", 2, 1)]["SIFA + correlation branch"])
    assert steps == [20, 40, 60] and low[0] < mean[0] < high[0]
    assert abs(mean[2] - 0.8) < 1e-9
    out = tmp_path / "curves.png"
    assert plot_curves.main([*map(str, paths), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_curves_split_by_an_argument_draws_one_line_per_value(tmp_path):
    def run(lr, shift):
        curve = [{"epoch": e, "step": 10 * e, "top1": 0.5 + 0.05 * e + shift} for e in (1, 2)]
        return {
            "task": "direction",
            "num_classes": 2,
            "args": {"lr": lr},
            "results": [{"arm": "sifa-corr", "curve": curve}],
        }

    paths = []
    for i, (lr, shift) in enumerate(((1e-3, 0.1), (1e-3, 0.0), (3e-3, 0.0))):
        path = tmp_path / f"run{i}.json"
        path.write_text(json.dumps(run(lr, shift)), encoding="utf-8")
        paths.append(path)
    lines = plot_curves.load_curves(paths, ("lr",))[("direction", 2, 1)]
    corr = "SIFA + correlation branch"
    assert sorted(lines) == [f"{corr}, lr 0.001", f"{corr}, lr 0.003"]
    assert len(lines[f"{corr}, lr 0.001"]) == 2 and len(lines[f"{corr}, lr 0.003"]) == 1
    assert list(plot_curves.load_curves(paths)[("direction", 2, 1)]) == [corr]  # one band without it
    with pytest.raises(SystemExit):
        plot_curves.main([*map(str, paths), "--split-by", "warmup", "--out", str(tmp_path / "x.png")])


def test_plot_curves_puts_a_temporal_stem_in_its_own_panel_with_the_networks_names(tmp_path):
    curve = [{"epoch": 1, "step": 10, "top1": 0.6}]
    runs = [
        ({"stem_temporal": 1}, "plain"),
        ({"stem_temporal": 1}, "sifa"),
        ({"stem_temporal": 4, "sifa_net": True}, "plain"),
        ({"stem_temporal": 4, "sifa_net": True}, "sifa-corr"),
    ]
    paths = []
    for i, (args, arm) in enumerate(runs):
        path = tmp_path / f"run{i}.json"
        data = {"task": "direction", "num_classes": 2, "args": args, "results": [{"arm": arm, "curve": curve}]}
        path.write_text(json.dumps(data), encoding="utf-8")
        paths.append(path)
    panels = plot_curves.load_curves(paths)
    assert sorted(panels) == [("direction", 2, 1), ("direction", 2, 4)]
    assert sorted(panels[("direction", 2, 1)]) == ["SIFA (paper's block)", "plain (order-blind)"]
    assert sorted(panels[("direction", 2, 4)]) == ["C2D (temporal stem 4)", "SIFA-Net + correlation branch"]
    only = plot_curves.load_curves(paths, arms=("plain",))
    assert [list(lines) for _, lines in sorted(only.items())] == [["plain (order-blind)"], ["C2D (temporal stem 4)"]]


def test_plot_curves_table_gives_mean_range_and_each_runs_first_step_past_the_line(tmp_path, capsys):
    runs = [[0.5, 0.70, 0.9], [0.5, 0.55, 0.8]]  # 128 videos: the line is 63.3%
    paths = []
    for i, top1s in enumerate(runs):
        curve = [{"epoch": e, "step": 80 * e, "top1": t} for e, t in enumerate(top1s, start=1)]
        path = tmp_path / f"run{i}.json"
        data = {"task": "direction", "num_classes": 2, "args": {}, "results": [{"arm": "fcf", "curve": curve}]}
        path.write_text(json.dumps(data), encoding="utf-8")
        paths.append(path)
    assert plot_curves.main([*map(str, paths), "--table", "--no-figure"]) == 0
    text = capsys.readouterr().out
    assert "| FCF | 2 | 50.0 (50-50) | 62.5 (55-70) | 85.0 (80-90) | 160, 240 |" in text
    assert "first step > 63.3%" in text and "wrote" not in text


def test_sifa_net_option_builds_sifa_net_against_c2d_with_the_same_stem():
    args = argparse.Namespace(**{**vars(ARGS), "stem_temporal": 4, "sifa_net": True})
    sifa_net = motion_probe.build_net("sifa-corr", 2, args)
    c2d = motion_probe.build_net("plain", 2, args)
    for net in (sifa_net, c2d):
        assert net.conv1.kernel_size[0] == 4 and net.conv1.stride[0] == 4
    assert sifa_net.dual_path and any(getattr(b, "gc", None) is not None for b in sifa_net.modules())
    assert not c2d.dual_path and all(getattr(b, "gc", None) is None for b in c2d.modules())
    per_frame = motion_probe.build_net("sifa", 2, ARGS)  # without the option: the probe's per-frame arm
    assert not per_frame.dual_path and all(getattr(b, "gc", None) is None for b in per_frame.modules())


@pytest.mark.slow
def test_probe_scheduler_option_reaches_the_classifier(tmp_path):
    common = ("--num-classes", "2", "--arms", "plain", "--lr", "0.002", "--warmup", "0", "--epochs", "2")
    (constant,) = _run_probe(tmp_path, *common, "--scheduler", "constant")["results"]
    (cosine,) = _run_probe(tmp_path, *common)["results"]
    assert constant["final_lr"] == pytest.approx(0.002)
    assert cosine["final_lr"] < 0.002 * 0.1  # decayed towards lr / 100
    with pytest.raises(SystemExit):
        motion_probe.main(["--scheduler", "linear"])
