"""Networks: shapes per depth, heads, baselines, the per-frame probe backbone, init, inflation, bad input."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.networks import (
    FCFR2Plus1D,
    SIFAResNet,
    c2d_resnet50,
    fcf_r2plus1d_18,
    fcf_r2plus1d_34,
    fcf_r2plus1d_50,
    frame_resnet,
    inflate_2d_state_dict,
    r2plus1d_50,
    sifa_resnet18,
    sifa_resnet34,
    sifa_resnet50,
    sifa_resnet101,
)
from lightning_modules.networks.blocks import CorrelationBranch, r2plus1d_mid_channels

MOTIONS = ("none", "sifa", "fcf")
NARROW = 1 / 16  # stage widths 4/8/16/32 (basic) — enough to exercise every layer on a CPU in milliseconds
K = 6


def plain_2d(**kw) -> SIFAResNet:
    """The probe's plain arm: per-frame 2D ResNet-18, temporal average pooling."""
    args = dict(
        depth=18,
        stem_temporal_kernel=1,
        stem_temporal_stride=1,
        sifa=False,
        global_context=False,
        dual_path=False,
        width_mult=NARROW,
    )
    args.update(kw)
    return SIFAResNet(K, **args)


def fcf_2d(**kw) -> FCFR2Plus1D:
    args = dict(depth=18, temporal=False, fcf=True, width_mult=NARROW, fcf_bottleneck=4, fcf_n_iter=2)
    args.update(kw)
    return FCFR2Plus1D(K, **args)


def motion_modules(net: nn.Module) -> list[nn.Module]:
    import ops

    return [m for m in net.modules() if isinstance(m, (ops.SIFA, ops.FCFBlock, ops.FlowLayer))]


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# -- shapes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "builder", [sifa_resnet18, sifa_resnet34, sifa_resnet50, pytest.param(sifa_resnet101, marks=pytest.mark.slow)]
)
def test_sifa_resnet_shapes_every_depth(builder):
    net = builder(K, width_mult=NARROW).eval()
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        heads = net.forward_heads(x)
        out = net(x)
    assert len(heads) == 2  # main + dual path
    assert all(h.shape == (1, K) for h in heads)
    assert out.shape == (1, K)
    assert len([m for m in motion_modules(net)]) == {18: 4, 34: 7, 50: 7, 101: 15}[net.depth]


@pytest.mark.parametrize("builder", [fcf_r2plus1d_18, fcf_r2plus1d_34, fcf_r2plus1d_50])
def test_fcf_r2plus1d_shapes_every_depth(builder):
    net = builder(K, width_mult=NARROW, fcf_bottleneck=4, fcf_n_iter=2).eval()
    with torch.no_grad():
        heads = net.forward_heads(torch.randn(2, 3, 4, 32, 32))
    assert len(heads) == 1 and heads[0].shape == (2, K)


def test_stage_shapes_follow_the_spec_at_16x224():
    """docs/sifa.md §3: layer1..4 (256,4,56²)..(2048,4,7²), layer4_dual (2048,2,14²); on the meta device (no
    arithmetic). SIFA keeps shapes, so it is left out here."""
    with torch.device("meta"):
        net = SIFAResNet(400, depth=50, sifa=False)
        x = torch.empty(1, 3, 16, 224, 224)
        shapes = {}
        for name in ("layer1", "layer2", "layer3", "layer4", "layer4_dual"):
            getattr(net, name).register_forward_hook(lambda m, i, o, n=name: shapes.__setitem__(n, tuple(o.shape)))
        heads = net.forward_heads(x)
    assert shapes == {
        "layer1": (1, 256, 4, 56, 56),
        "layer2": (1, 512, 4, 28, 28),
        "layer3": (1, 1024, 4, 14, 14),
        "layer4": (1, 2048, 4, 7, 7),
        "layer4_dual": (1, 2048, 2, 14, 14),
    }
    assert [tuple(h.shape) for h in heads] == [(1, 400), (1, 400)]


def test_sifa_r50_parameter_count_matches_spec():
    with torch.device("meta"):
        net = sifa_resnet50(400)
        plain = c2d_resnet50(400, dual_path=False, global_context=False)
    total = n_params(net)
    dual = n_params(net.layer4_dual)
    assert abs(total / 1e6 - 43) < 1.0, total  # docs/sifa.md §3: ≈ 43 M with the dual path
    assert abs(dual / 1e6 - 16) < 1.0, dual  # ≈ 16 M in layer4_dual
    # The plain 2D ResNet-50 body is torchvision's (23.5 M without fc) plus the 4-frame stem's extra taps.
    assert n_params(plain) - 2048 * 400 - 400 == 23_508_032 + 3 * 64 * 3 * 7 * 7


def test_sifa_r50_multiply_accumulates_match_spec():
    """≈ 24 GMACs per 16×224² view (docs/sifa.md §3); counted over convs and fc on the meta device (SIFA's two
    ops add a few hundred MMACs and are left out)."""
    total = 0

    def count(m, inputs, out):
        nonlocal total
        total += out.numel() * (m.weight[0].numel() if isinstance(m, nn.Conv3d) else m.in_features)

    with torch.device("meta"):
        net = sifa_resnet50(400, sifa=False)
        for m in net.modules():
            if isinstance(m, (nn.Conv3d, nn.Linear)):
                m.register_forward_hook(count)
        net.forward_heads(torch.empty(1, 3, 16, 224, 224))
    assert abs(total / 1e9 - 24) < 1.0, total


def test_fcf_r2plus1d50_stage_widths():
    net = FCFR2Plus1D(10, depth=50, width_mult=NARROW, fcf_stages=(1, 2, 3, 4), fcf_bottleneck=2)
    assert net.stage_channels == (16, 32, 64, 128)
    assert net.layer1[0].conv1.weight.shape[2:] == (3, 1, 1)  # temporal first conv of the (2+1)D bottleneck
    assert net.conv1.weight.shape[2:] == (3, 7, 7)
    assert sorted(net.fcf) == ["layer1", "layer2", "layer3", "layer4"]


def test_r2plus1d_basic_block_uses_tran_mid_channels():
    net = FCFR2Plus1D(10, depth=18, fcf=False)
    conv = net.layer1[0].conv1
    assert r2plus1d_mid_channels(64, 64, 3) == 144  # 3·9·64·64 / (9·64 + 3·64)
    assert conv.spatial.weight.shape == (144, 64, 1, 3, 3)
    assert conv.temporal.weight.shape == (64, 144, 3, 1, 1)


# -- heads ---------------------------------------------------------------------------------------------


def test_forward_is_log_mean_softmax_of_heads():
    net = sifa_resnet18(K, width_mult=NARROW, global_context=True).eval()
    x = torch.randn(3, 3, 8, 32, 32)
    with torch.no_grad():
        heads = net.forward_heads(x)
        out = net(x)
    expected = torch.log((F.softmax(heads[0], 1) + F.softmax(heads[1], 1)) / 2)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(3))
    assert not torch.allclose(heads[0], heads[1])  # two separate heads

    single = plain_2d().eval()
    with torch.no_grad():
        (h,) = single.forward_heads(x)
        torch.testing.assert_close(single(x), F.log_softmax(h, 1))


def test_both_heads_get_gradients_and_train_step_runs():
    net = sifa_resnet18(K, width_mult=NARROW, zero_init_residual=False)
    x = torch.randn(2, 3, 16, 32, 32)  # 4 frames after the stem, 2 in the dual path: every SIFA has a pair
    y = torch.tensor([1, 4])
    loss = sum(F.cross_entropy(h, y) for h in net.forward_heads(x))
    loss.backward()
    assert net.fc.weight.grad.abs().sum() > 0 and net.fc_dual.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


# -- baselines and switches ----------------------------------------------------------------------------


def test_baselines_have_no_motion_module():
    assert motion_modules(c2d_resnet50(K, width_mult=NARROW)) == []
    assert motion_modules(r2plus1d_50(K, width_mult=NARROW)) == []
    assert motion_modules(plain_2d()) == []
    # ... and differ from the motion nets only by the modules: same remaining keys.
    sifa_keys = {k for k in sifa_resnet50(K, width_mult=NARROW).state_dict() if ".motion." not in k}
    assert sifa_keys == set(c2d_resnet50(K, width_mult=NARROW).state_dict())
    fcf_keys = {k for k in fcf_r2plus1d_50(K, width_mult=NARROW).state_dict() if not k.startswith("fcf.")}
    assert fcf_keys == set(r2plus1d_50(K, width_mult=NARROW).state_dict())


def test_sifa_sits_in_odd_blocks_and_gc_in_even_blocks_of_layer2_to_4():
    net = SIFAResNet(K, depth=50, width_mult=NARROW)
    where_sifa = [n for n, m in net.named_modules() if m in motion_modules(net)]
    assert where_sifa == [
        "layer2.1.motion", "layer2.3.motion", "layer3.1.motion", "layer3.3.motion", "layer3.5.motion",
        "layer4.1.motion", "layer4_dual.1.motion",
    ]  # fmt: skip
    where_gc = [n for n, m in net.named_modules() if n.endswith(".gc") and m is not None]
    assert where_gc == [
        "layer2.0.gc", "layer2.2.gc", "layer3.0.gc", "layer3.2.gc", "layer3.4.gc",
        "layer4.0.gc", "layer4.2.gc", "layer4_dual.0.gc", "layer4_dual.2.gc",
    ]  # fmt: skip
    only3 = SIFAResNet(K, depth=18, width_mult=NARROW, sifa_stages=[3], global_context=False, dual_path=False)
    assert [n for n, m in only3.named_modules() if m in motion_modules(only3)] == ["layer3.1.motion"]
    assert not any(n.endswith(".gc") for n, _ in only3.named_modules())


def test_temporal_stem_configurable():
    x = torch.randn(1, 3, 12, 32, 32)
    for (kt, st), t_out in {(4, 4): 3, (1, 1): 12, (2, 2): 6, (3, 1): 10}.items():
        net = SIFAResNet(K, depth=18, width_mult=NARROW, stem_temporal_kernel=kt, stem_temporal_stride=st)
        frames = []
        net.layer1.register_forward_hook(lambda m, i, o, f=frames: f.append(o.shape[2]))
        net.eval()(x)
        assert frames == [t_out]


def test_temporal_off_removes_every_temporal_conv():
    net = FCFR2Plus1D(K, depth=50, temporal=False, fcf=False, width_mult=NARROW)
    kernels = {m.kernel_size[0] for m in net.modules() if isinstance(m, nn.Conv3d)}
    assert kernels == {1}
    net3d = FCFR2Plus1D(K, depth=50, temporal=True, fcf=False, width_mult=NARROW)
    assert {m.kernel_size[0] for m in net3d.modules() if isinstance(m, nn.Conv3d)} == {1, 3}


# -- the motion probe's backbone -----------------------------------------------------------------------


def test_probe_plain_arm_is_one_network_from_either_class():
    torch.manual_seed(3)
    a = plain_2d()
    torch.manual_seed(3)
    b = FCFR2Plus1D(K, depth=18, temporal=False, fcf=False, width_mult=NARROW)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    x = torch.randn(2, 3, 5, 32, 32)
    torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_probe_arms_share_the_backbone_init():
    """Same seed → the SIFA and FCF arms start from exactly the plain arm's weights; only the module differs."""
    torch.manual_seed(5)
    plain = plain_2d().state_dict()
    torch.manual_seed(5)
    sifa = plain_2d(sifa=True).state_dict()
    torch.manual_seed(5)
    fcf = fcf_2d().state_dict()
    assert {k for k in sifa if ".motion." not in k} == set(plain)
    assert {k for k in fcf if not k.startswith("fcf.")} == set(plain)
    for k, v in plain.items():
        assert torch.equal(v, sifa[k]) and torch.equal(v, fcf[k]), k


def _randomise_bn(net: nn.Module) -> nn.Module:
    """Non-trivial BN affine and running statistics, so that every residual branch (and FCF) is active."""
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
    return net.eval()


def test_plain_2d_arm_is_blind_to_frame_order_and_motion_arms_are_not():
    x = torch.randn(1, 3, 6, 32, 32)
    rev = x.flip(2)
    perm = x[:, :, torch.tensor([3, 0, 5, 1, 4, 2])]
    arms = {
        "plain": _randomise_bn(plain_2d()),
        "sifa": _randomise_bn(plain_2d(sifa=True)),
        "fcf": _randomise_bn(fcf_2d()),
    }
    with torch.no_grad():
        out = {name: (net(x), net(rev), net(perm)) for name, net in arms.items()}
    fwd, back, shuffled = out["plain"]
    torch.testing.assert_close(back, fwd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shuffled, fwd, rtol=1e-5, atol=1e-5)
    for name in ("sifa", "fcf"):
        fwd, back, _ = out[name]
        assert (fwd - back).abs().max() > 1e-3, name


# -- init ----------------------------------------------------------------------------------------------


def _last_bns(net: nn.Module) -> list[nn.BatchNorm3d]:
    bns = []
    for name, m in net.named_modules():
        if name.startswith("layer") and name.count(".") == 1:
            bns.append(m.bn3 if hasattr(m, "bn3") else m.bn2)
    return bns


@pytest.mark.parametrize(
    "make",
    [
        lambda **k: sifa_resnet50(K, width_mult=NARROW, **k),
        lambda **k: fcf_r2plus1d_18(K, width_mult=NARROW, fcf_bottleneck=4, **k),
    ],
)
def test_zero_init_residual_gamma(make):
    net = make()
    bns = _last_bns(net)
    assert len(bns) >= 8
    assert all(torch.count_nonzero(bn.weight) == 0 for bn in bns)
    others = [m for m in net.modules() if isinstance(m, nn.BatchNorm3d) and all(m is not b for b in bns)]
    assert others and all(torch.all(m.weight == 1) for m in others if not _inside_motion(net, m))
    assert all(torch.all(bn.weight == 1) for bn in _last_bns(make(zero_init_residual=False)))


def _inside_motion(net: nn.Module, module: nn.Module) -> bool:
    return any(module is m for mm in motion_modules(net) for m in mm.modules())


def test_network_init_leaves_the_sifa_offset_conv_at_zero():
    """docs/sifa.md §2: the released network-wide Kaiming init overwrote the zero offset init; ours must not."""
    net = sifa_resnet18(K, width_mult=NARROW)
    sifas = motion_modules(net)
    assert sifas
    for m in sifas:
        convs = [c for c in m.modules() if isinstance(c, (nn.Conv3d, nn.Conv2d))]
        assert convs and all(torch.count_nonzero(c.weight) == 0 for c in convs)


@pytest.mark.parametrize("builder", [sifa_resnet18, sifa_resnet34, sifa_resnet50, sifa_resnet101])
def test_correlation_features_switch_on_every_sifa_builder(builder):
    """docs/sifa.md §5: every block with a SIFA module gets a correlation branch (1x1 conv from the G·K² taps
    to the block's output channels, BN with gamma 1); the rest of the network is the paper's, weight for
    weight, and checkpoints without the option load (only the branches are missing)."""
    common = dict(width_mult=NARROW)
    torch.manual_seed(0)
    paper = builder(K, **common).eval()
    torch.manual_seed(0)
    corr = builder(K, correlation_features=True, **common).eval()
    blocks = [m for m in corr.modules() if getattr(m, "motion", None) is not None]
    assert blocks and all(isinstance(b.correlation, CorrelationBranch) for b in blocks)
    assert not any(getattr(m, "correlation", None) for m in paper.modules())
    for b in blocks:
        out_channels = (b.bn3 if hasattr(b, "bn3") else b.bn2).num_features
        taps = b.motion.groups * b.motion.kernel_size**2
        assert b.correlation.proj.weight.shape == (out_channels, taps, 1, 1, 1)
        assert torch.count_nonzero(b.correlation.proj.weight) > 0 and torch.all(b.correlation.bn.weight == 1)
        assert not b.motion.correlation_features  # the branch, not the in-block P
    extra = set(corr.state_dict()) - set(paper.state_dict())
    assert all(".correlation." in k for k in extra) and len(extra) == 6 * len(blocks)
    paper_state = paper.state_dict()
    assert all(torch.equal(paper_state[k], v) for k, v in corr.state_dict().items() if k in paper_state)
    # (BatchNorm does not report a missing num_batches_tracked)
    missing = set(corr.load_state_dict(paper_state, strict=False).missing_keys)
    assert missing == {k for k in extra if not k.endswith("num_batches_tracked")}
    builder(K, correlation_features=False, **common).load_state_dict(paper_state)  # strict: same keys


def test_correlation_branch_carries_frame_order_from_the_first_step():
    # Live at init (BN gamma 1, beside the zero-initialised residual BN): the fresh network already depends
    # on frame order, and the branch's weights get gradient from the first step.
    kw = dict(width_mult=NARROW, stem_temporal_kernel=1, stem_temporal_stride=1, global_context=False, dual_path=False)
    torch.manual_seed(0)
    net = sifa_resnet18(2, correlation_features=True, **kw)
    clip = torch.randn(2, 3, 6, 32, 32)
    net.train()
    net(clip).sum().backward()
    branch = net.layer2[1].correlation
    assert branch.proj.weight.grad is not None and torch.count_nonzero(branch.proj.weight.grad) > 0
    net.eval()
    with torch.no_grad():
        assert (net(clip) - net(clip.flip(2))).abs().max() > 1e-4
        plain = sifa_resnet18(2, **kw).eval()
        assert (plain(clip) - plain(clip.flip(2))).abs().max() < 1e-5  # SIFA's branch starts silent


def test_correlation_branch_of_one_frame_is_zero():
    branch = CorrelationBranch(9, 8)
    out = branch(torch.zeros(2, 9, 0, 4, 5))
    assert out.shape == (2, 8, 1, 4, 5) and not out.any()
    y = branch(torch.randn(2, 9, 3, 4, 5))
    assert y.shape == (2, 8, 4, 4, 5) and not y[:, :, -1].any()  # the last frame has no pair


# -- width multiplier ----------------------------------------------------------------------------------


def test_width_multiplier_keeps_integer_channels_and_group_divisibility():
    net = SIFAResNet(K, depth=18, width_mult=0.01, dual_path=False)
    assert net.stage_channels == (1, 1, 3, 5)
    net = SIFAResNet(K, depth=18, width_mult=0.05, sifa_groups=4, dual_path=False)
    assert all(c % 4 == 0 and c >= 4 for c in net.stage_channels)
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 4, 32, 32)).shape == (1, K)


# -- pretrained inflation ------------------------------------------------------------------------------


def torchvision_resnet_state_dict(depth: int, num_classes: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with torchvision's ResNet keys and shapes, written out from torchvision's layout."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def bn(prefix: str, c: int) -> None:
        sd[f"{prefix}.weight"] = torch.rand(c, generator=g) + 0.5
        sd[f"{prefix}.bias"] = torch.randn(c, generator=g) * 0.1
        sd[f"{prefix}.running_mean"] = torch.randn(c, generator=g) * 0.1
        sd[f"{prefix}.running_var"] = torch.rand(c, generator=g) + 0.5
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(100)

    def conv(key: str, o: int, i: int, k: int) -> None:
        sd[key] = torch.randn(o, i, k, k, generator=g) * math.sqrt(2 / (i * k * k))

    bottleneck = depth >= 50
    counts = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}[depth]
    exp = 4 if bottleneck else 1
    conv("conv1.weight", 64, 3, 7)
    bn("bn1", 64)
    cin = 64
    for s, (planes, n) in enumerate(zip((64, 128, 256, 512), counts, strict=True), start=1):
        for b in range(n):
            p = f"layer{s}.{b}"
            if bottleneck:
                conv(f"{p}.conv1.weight", planes, cin, 1)
                conv(f"{p}.conv2.weight", planes, planes, 3)
                conv(f"{p}.conv3.weight", planes * 4, planes, 1)
                for j, c in ((1, planes), (2, planes), (3, planes * 4)):
                    bn(f"{p}.bn{j}", c)
            else:
                conv(f"{p}.conv1.weight", planes, cin, 3)
                conv(f"{p}.conv2.weight", planes, planes, 3)
                bn(f"{p}.bn1", planes)
                bn(f"{p}.bn2", planes)
            if b == 0 and (s > 1 or cin != planes * exp):
                conv(f"{p}.downsample.0.weight", planes * exp, cin, 1)
                bn(f"{p}.downsample.1", planes * exp)
            cin = planes * exp
    sd["fc.weight"] = torch.randn(num_classes, cin, generator=g) * 0.01
    sd["fc.bias"] = torch.zeros(num_classes)
    return sd


def test_sifa_inflation_places_2d_kernels_and_reports(tmp_path):
    sd2d = torchvision_resnet_state_dict(18)
    path = tmp_path / "resnet18.pth"
    torch.save(sd2d, path)
    net = SIFAResNet(10, depth=18, pretrained=str(path))
    rep = net.pretrained_report
    stem = net.conv1.weight
    assert stem.shape == (64, 3, 4, 7, 7)
    assert torch.equal(stem[:, :, 2], sd2d["conv1.weight"])  # temporal index 2 of 4
    assert torch.count_nonzero(stem[:, :, [0, 1, 3]]) == 0
    assert torch.equal(net.layer3[1].conv2.weight[:, :, 0], sd2d["layer3.1.conv2.weight"])
    assert torch.equal(net.layer4_dual[0].downsample[0].weight[:, :, 0], sd2d["layer4.0.downsample.0.weight"])
    assert torch.equal(net.layer4_dual[1].bn2.running_var, sd2d["layer4.1.bn2.running_var"])
    assert torch.equal(net.layer2[0].bn2.weight, sd2d["layer2.0.bn2.weight"])  # replaces the zero gamma
    assert sorted(rep.skipped_head) == ["fc.bias", "fc.weight", "fc_dual.bias", "fc_dual.weight"]
    assert rep.unexpected == [] and rep.mismatched == []
    assert all(".motion." in k or ".gc." in k for k in rep.kept_init) and rep.kept_init
    assert len(rep.loaded) == len(sd2d) - 2 + sum(1 for k in sd2d if k.startswith("layer4."))
    assert "skipped (class count differs)" in rep.summary()
    # the SIFA offset convs keep their zero init
    assert all(torch.count_nonzero(p) == 0 for n, p in net.named_parameters() if ".motion." in n)

    same_classes = inflate_2d_state_dict(SIFAResNet(1000, depth=18, sifa=False, global_context=False), sd2d)
    assert same_classes.skipped_head == [] and "fc_dual.weight" in same_classes.loaded


def test_inflated_stem_reads_frame_2_of_each_group_of_4():
    """Numerically: the 4/4-stem network on a clip equals the 1/1-stem network on frames 2, 6, 10, ..."""
    sd2d = torchvision_resnet_state_dict(18)
    common = dict(depth=18, sifa=False, global_context=False, dual_path=False, dropout=0.0)
    net4 = SIFAResNet(10, **common).eval()
    net1 = SIFAResNet(10, stem_temporal_kernel=1, stem_temporal_stride=1, **common).eval()
    for net in (net4, net1):
        inflate_2d_state_dict(net, sd2d)
    net1.fc.load_state_dict(net4.fc.state_dict())
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net4.forward_heads(x)[0], net1.forward_heads(x[:, :, 2::4])[0])


@pytest.mark.slow
def test_r2plus1d50_inflation_equals_the_2d_net_per_frame(tmp_path):
    """Centre inflation of the (3,7,7) stem and the temporal (3,1,1) conv1: the inflated (2+1)D-50 computes
    the 2D ResNet-50 frame by frame at init."""
    sd2d = torchvision_resnet_state_dict(50, num_classes=10)
    path = tmp_path / "r50.pth"
    torch.save({"state_dict": sd2d}, path)
    net3d = FCFR2Plus1D(10, depth=50, fcf=False, pretrained=str(path), dropout=0.0).eval()
    net2d = FCFR2Plus1D(10, depth=50, fcf=False, temporal=False, pretrained=str(path), dropout=0.0).eval()
    assert net3d.pretrained_report.kept_init == [] and net3d.pretrained_report.unexpected == []
    w = net3d.layer2[1].conv1.weight
    assert w.shape[2] == 3 and torch.count_nonzero(w[:, :, [0, 2]]) == 0
    x = torch.randn(1, 3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net3d(x), net2d(x), rtol=1e-4, atol=1e-5)


def test_r2plus1d_basic_block_inflation_reports_mismatches():
    net = FCFR2Plus1D(10, depth=18, fcf=False)
    rep = inflate_2d_state_dict(net, torchvision_resnet_state_dict(18))
    mismatched = {k for k, _, _ in rep.mismatched}
    assert "layer1.0.conv1.spatial.weight" in mismatched  # Tran mid channels: 144 != 64
    assert "layer1.0.conv1.temporal.weight" in rep.kept_init
    assert "conv1.weight" in rep.loaded and "layer2.0.downsample.0.weight" in rep.loaded
    assert "mismatched:" in rep.summary()


def test_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="pretrained"):
        SIFAResNet(10, depth=18, pretrained=str(tmp_path / "missing.pth"))
    path = tmp_path / "r18.pth"
    torch.save(torchvision_resnet_state_dict(18), path)
    with pytest.raises(ValueError, match="no backbone tensor matches"):
        SIFAResNet(10, depth=18, width_mult=0.5, pretrained=str(path))
    with pytest.raises(TypeError, match="state_dict_2d"):
        inflate_2d_state_dict(plain_2d(), {"conv1.weight": 3})


# -- bad arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: SIFAResNet(K, depth=20), ValueError, "depth"),
        (lambda: FCFR2Plus1D(K, depth=101), ValueError, "depth"),
        (lambda: SIFAResNet(0, depth=18), ValueError, "num_classes"),
        (lambda: SIFAResNet(K, depth=18, width_mult=0.0), ValueError, "width_mult"),
        (lambda: SIFAResNet(K, depth=18, dropout=1.0), ValueError, "dropout"),
        (lambda: SIFAResNet(K, depth=18, sifa_stages=[5]), ValueError, "sifa_stages"),
        (lambda: SIFAResNet(K, depth=18, sifa_stages=3), TypeError, "sifa_stages"),
        (lambda: SIFAResNet(K, depth=18, sifa_kernel_size=4), ValueError, "sifa_kernel_size"),
        (lambda: SIFAResNet(K, depth=18, stem_temporal_stride=0), ValueError, "stem_temporal_stride"),
        (lambda: SIFAResNet(K, depth=18, sifa="yes"), TypeError, "sifa"),
        (lambda: SIFAResNet(K, depth=18, correlation_features=1), TypeError, "correlation_features"),
        (lambda: FCFR2Plus1D(K, depth=18, fcf_stages=[2, 2]), ValueError, "fcf_stages"),
        (lambda: FCFR2Plus1D(K, depth=18, fcf_learnable=(True, True)), ValueError, "fcf_learnable"),
        (lambda: FCFR2Plus1D(K, depth=18, fcf_n_iter=0), ValueError, "fcf_n_iter"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_bad_input_raises_clear_errors():
    net = plain_2d()
    with pytest.raises(ValueError, match=r"x: expected shape \[N,3,T,H,W\], got \[2, 3, 32, 32\]"):
        net(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[N,3,T,H,W\], got \[2, 1, 4, 32, 32\]"):
        net(torch.randn(2, 1, 4, 32, 32))
    with pytest.raises(ValueError, match="floating-point"):
        net(torch.zeros(2, 3, 4, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        net([1, 2, 3])


def test_too_few_frames_raise_clear_errors():
    sifa = SIFAResNet(K, depth=18, width_mult=NARROW)  # 4/4 stem + dual path: 8 frames
    with pytest.raises(ValueError, match="at least 8 frames"):
        sifa(torch.randn(1, 3, 7, 32, 32))
    no_dual = SIFAResNet(K, depth=18, width_mult=NARROW, dual_path=False)
    assert no_dual.eval()(torch.randn(1, 3, 4, 32, 32)).shape == (1, K)
    with pytest.raises(ValueError, match="at least 4 frames"):
        no_dual(torch.randn(1, 3, 3, 32, 32))
    fcf = fcf_2d(fcf_stages=(2, 3))  # two FCF blocks remove 4 frames
    with pytest.raises(ValueError, match="at least 5 frames"):
        fcf(torch.randn(1, 3, 4, 32, 32))
    assert fcf.eval()(torch.randn(1, 3, 5, 32, 32)).shape == (1, K)


# -- LightningCLI-style construction -------------------------------------------------------------------


def test_networks_build_from_class_path_config():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--net", type=nn.Module)
    # `instantiate_classes` is deprecated since jsonargparse 4.49 in favour of `instantiate`.
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    cfg = parser.parse_args(
        [
            "--net.class_path=lightning_modules.networks.SIFAResNet",
            "--net.init_args.num_classes=5",
            "--net.init_args.depth=18",
            "--net.init_args.width_mult=0.0625",
            "--net.init_args.sifa_stages=[3, 4]",
            "--net.init_args.dual_path=false",
        ]
    )
    net = instantiate(cfg).net
    assert isinstance(net, SIFAResNet) and net.num_classes == 5 and not net.dual_path
    cfg = parser.parse_args(
        [
            "--net.class_path=lightning_modules.networks.FCFR2Plus1D",
            "--net.init_args.num_classes=5",
            "--net.init_args.depth=18",
            "--net.init_args.width_mult=0.0625",
            "--net.init_args.fcf_learnable=[true, true, true, true, true]",
            "--net.init_args.fcf_bottleneck=4",
        ]
    )
    net = instantiate(cfg).net
    assert isinstance(net, FCFR2Plus1D) and net.fcf_stages == (2,)


# -- options passed to the ops, mixed precision --------------------------------------------------------


def test_motion_module_options_reach_the_ops():
    sifa = SIFAResNet(K, depth=18, width_mult=NARROW, sifa_offset_init="kaiming", backend="torch", sifa_dilation=2)
    modules = motion_modules(sifa)
    assert modules and all(m.backend == "torch" and m.dilation == 2 for m in modules)
    assert all(torch.count_nonzero(m.conv_offset.weight) > 0 for m in modules)
    fcf = fcf_2d(backend="torch", fcf_n_iter=3, fcf_learnable=(True, False, True, False, True), fcf_bottleneck=5)
    flows = [m for m in motion_modules(fcf) if type(m).__name__ == "FlowLayer"]
    assert len(flows) == 2 and all(f.backend == "torch" and f.n_iter == 3 for f in flows)
    assert all(tuple(f.learnable) == (True, False, True, False, True) for f in flows)
    assert fcf.fcf["layer2"].channels == fcf.stage_channels[1]


@pytest.mark.parametrize("make", [lambda: plain_2d(sifa=True), fcf_2d], ids=["sifa", "fcf"])
def test_bf16_autocast_forward_backward_on_cpu(make):
    net = make()
    x = torch.randn(2, 3, 5, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        heads = net.forward_heads(x)
        loss = sum(F.cross_entropy(h, torch.tensor([0, 1])) for h in heads)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_frame_resnet_builds_the_three_probe_arms_from_one_options_dict():
    options = dict(width_mult=NARROW, dropout=0.2, sifa_stages=(3, 4), fcf_stages=(3,), fcf_bottleneck=4, fcf_n_iter=2)
    options["correlation_features"] = True  # a SIFA option too: only the SIFA arm takes it
    nets = {}
    for motion in ("none", "sifa", "fcf"):
        torch.manual_seed(11)
        nets[motion] = frame_resnet(K, motion, **options)
    assert motion_modules(nets["none"]) == []
    assert [n for n, m in nets["sifa"].named_modules() if m in motion_modules(nets["sifa"])] == [
        "layer3.1.motion",
        "layer4.1.motion",
    ]
    assert all(
        isinstance(b.correlation, CorrelationBranch) for b in nets["sifa"].modules() if getattr(b, "motion", None)
    )
    assert list(nets["fcf"].fcf) == ["layer3"]
    plain = nets["none"].state_dict()
    for motion in ("sifa", "fcf"):
        sd = nets[motion].state_dict()
        module_keys = (".motion.", ".correlation.")
        backbone = {k: v for k, v in sd.items() if not any(m in k for m in module_keys) and not k.startswith("fcf.")}
        assert backbone.keys() == plain.keys()
        assert all(torch.equal(v, plain[k]) for k, v in backbone.items()), motion
    assert all(net.dropout.p == 0.2 for net in nets.values())
    with pytest.raises(ValueError, match="motion"):
        frame_resnet(K, "flow")


# -- a real clip ---------------------------------------------------------------------------------------


def _decode_clip(path, num_frames: int, size: tuple[int, int]) -> torch.Tensor:
    """`num_frames` consecutive frames decoded by PyAV, resized, normalised: float `[1, 3, T, H, W]`."""
    import av

    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
            if len(frames) == num_frames:
                break
    clip = torch.stack(frames).permute(3, 0, 1, 2).float().div(255)  # [3, T, H, W]
    clip = F.interpolate(clip, size=size, mode="bilinear", align_corners=False, antialias=True)
    return ((clip - 0.45) / 0.225).unsqueeze(0)


def test_networks_on_a_real_clip(shared_videos):
    clip = _decode_clip(shared_videos / "kinetics_arm_wrestling.mp4", 8, (32, 40))
    assert clip.shape == (1, 3, 8, 32, 40)
    with torch.no_grad():
        for net in (sifa_resnet18(K, width_mult=NARROW), fcf_r2plus1d_18(K, width_mult=NARROW, fcf_bottleneck=4)):
            out = net.eval()(clip)
            assert out.shape == (1, K) and torch.isfinite(out).all()
            torch.testing.assert_close(out.exp().sum(1), torch.ones(1))
        # On real (small) motion too: the per-frame arm ignores frame order, the SIFA and FCF arms do not.
        arms = {m: _randomise_bn(frame_resnet(K, m, width_mult=NARROW, fcf_bottleneck=4)) for m in MOTIONS}
        diff = {m: (net(clip) - net(clip.flip(2))).abs().max().item() for m, net in arms.items()}
    assert diff["none"] < 1e-5 and diff["sifa"] > 1e-3 and diff["fcf"] > 1e-3, diff


def test_networks_raise_the_ops_error_types():
    """One exception type per kind of mistake, shared by ops and networks (still ValueErrors)."""
    import ops
    from lightning_modules.networks import SIFAResNet

    with pytest.raises(ops.OpArgumentError, match="sifa_kernel_size"):
        SIFAResNet(num_classes=2, depth=18, width_mult=0.25, sifa_kernel_size=2)
    with pytest.raises(ops.OpArgumentError, match="dropout"):
        SIFAResNet(num_classes=2, depth=18, width_mult=0.25, dropout=1.5)
    net = SIFAResNet(num_classes=2, depth=18, width_mult=0.25, stem_temporal_kernel=1, stem_temporal_stride=1)
    with pytest.raises(ops.OpShapeError, match="x: expected shape"):
        net(torch.zeros(1, 3, 4, 32))
    with pytest.raises(ops.OpDtypeError, match="floating-point"):
        net(torch.zeros(1, 3, 4, 32, 32, dtype=torch.int64))


def test_networks_and_ops_reject_the_same_bad_arguments_alike():
    """The networks check their arguments with ops' helpers and backend names: the same mistake raises the
    same exception type from a network as from the op or module it configures, with the argument's name."""
    import ops
    from lightning_modules.networks import FCFR2Plus1D, SIFAResNet

    assert ops.BACKENDS == ("auto", "torch", "cupy")
    cases = [
        (lambda: SIFAResNet(K, depth=18, backend="numpy"), lambda: ops.SIFA(4, backend="numpy"), ops.BackendError),
        (lambda: FCFR2Plus1D(K, depth=18, backend="cuda"), lambda: ops.FlowLayer(2, backend="cuda"), ops.BackendError),
        (lambda: FCFR2Plus1D(K, depth=18, fcf_n_iter=2.0), lambda: ops.FlowLayer(2, n_iter=2.0), TypeError),
        (lambda: SIFAResNet(K, depth=18, sifa_kernel_size=4), lambda: ops.SIFA(4, kernel_size=4), ops.OpArgumentError),
        (lambda: SIFAResNet(K, depth=18, dual_path=1), lambda: ops.SIFA(4, correlation_features=1), TypeError),
    ]
    for network_call, op_call, kind in cases:
        errors = []
        for call in (network_call, op_call):
            with pytest.raises(kind) as info:
                call()
            errors.append(info.value)
        assert type(errors[0]) is type(errors[1]), errors
        assert isinstance(errors[0], ops.OpError), errors
    # "emulated" is the ops' test backend: a network accepts it where the ops do, inside host emulation
    with pytest.raises(ops.BackendError, match="kernel_host_emulation"):
        SIFAResNet(K, depth=18, backend="emulated")
    with ops.kernel_host_emulation():
        SIFAResNet(K, depth=18, width_mult=NARROW, backend="emulated")


@pytest.mark.parametrize("frames, kernel", [(2, 3), (4, 5), (3, 3)])
def test_temporal_conv_weight_gradient_is_right_under_cpu_bfloat16_autocast(frames, kernel):
    # torch's CPU bfloat16 conv3d gives a wrong weight gradient (NaN or ~1e37) for fewer frames than
    # the temporal kernel; GuardedConv3d computes those in float32. Compared with a float64 reference.
    from lightning_modules.networks.blocks import conv3d

    torch.manual_seed(0)
    conv = conv3d(48, 32, (kernel, 1, 1))
    x = torch.randn(4, 48, frames, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16  # what autocast would have returned
    y.float().square().sum().backward()
    ref = conv.weight.detach().double().requires_grad_()
    torch.nn.functional.conv3d(x.double(), ref, padding=conv.padding).square().sum().backward()
    scale = ref.grad.abs().max()
    assert torch.isfinite(conv.weight.grad).all()
    assert (conv.weight.grad.double() - ref.grad).abs().max() < 0.05 * scale


def test_strided_conv_on_a_one_pixel_map_under_cpu_bfloat16_keeps_the_heap_whole():
    # torch's CPU bfloat16 conv3d backward, 3x3 kernel at stride 2 on a 1x1 map, corrupts the heap
    # (abort, bus error or segfault with glibc's heap checks on); GuardedConv3d runs it in float32.
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from lightning_modules.networks.blocks import conv3d\n"
        "conv = conv3d(16, 16, (1, 3, 3), stride=(1, 2, 2))\n"
        "for _ in range(30):\n"
        "    x = torch.randn(2, 16, 4, 1, 1, requires_grad=True)\n"
        "    with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "        y = conv(x)\n"
        "    assert y.dtype == torch.bfloat16\n"
        "    y.float().sum().backward()\n"
        "assert torch.isfinite(conv.weight.grad).all()\n"
    )
    env = {**os.environ, "MALLOC_CHECK_": "3"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")[-2000:]
