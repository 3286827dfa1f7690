"""The motion probe's premise: its plain arm is exactly blind to frame order, its SIFA and FCF arms are not;
the same for the small controlled models of benchmarks/motion_cue.py.

(The training run itself is benchmarks/motion_probe.py; this checks the three arms it builds.)
"""

from __future__ import annotations

import argparse
import sys

import pytest
import torch
from _vmm_cli_helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import motion_cue  # noqa: E402
import motion_probe  # noqa: E402

ARGS = argparse.Namespace(
    depth=18, width=0.125, dropout=0.0, fcf_n_iter=3, fcf_bottleneck=4, sifa_stages=[2, 3, 4], sifa_dilation=1,
    stem_temporal=1,
)


def _wake_residuals(net: torch.nn.Module) -> None:
    """Give the zero-initialised last BN of every residual branch a non-zero scale (as training does)."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d) and not bool(m.weight.detach().abs().sum()):
            torch.nn.init.uniform_(m.weight, 0.5, 1.0)


@pytest.mark.parametrize("arm", motion_probe.ARMS)
def test_only_the_plain_arm_is_order_blind(arm):
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
