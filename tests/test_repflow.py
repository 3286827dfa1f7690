"""Representation Flow: the TV-L1 reference (values, gradients, known answers), FlowLayer and FCFBlock."""

from __future__ import annotations

import math

import pytest
import torch

import ops
from ops.repflow import FlowStencils, default_stencils
from ops.repflow.modules import FCFBlock, FlowLayer


def plain_loop_tvl1(i0, i1, n_iter, theta, lam, tau, stencils):
    """The spec's algorithm written pixel by pixel in Python floats: the independent check of the reference."""
    sx, sy, fx, fy, dx, dy = (s.tolist() for s in stencils)
    b_, c_, hh, ww = i0.shape
    a0, a1 = i0.tolist(), i1.tolist()
    out = torch.zeros(b_, 2 * c_, hh, ww, dtype=torch.float64)
    th = abs(theta) + 1e-12
    lt, r = lam * th, tau / th
    for b in range(b_):
        for c in range(c_):
            img0, img1 = a0[b][c], a1[b][c]

            def px(h, w, img=img1):
                return img[min(max(h, 0), hh - 1)][min(max(w, 0), ww - 1)]

            gx = [[sum(sx[c][j] * px(h, w - 1 + j) for j in range(3)) for w in range(ww)] for h in range(hh)]
            gy = [[sum(sy[c][j] * px(h - 1 + j, w) for j in range(3)) for w in range(ww)] for h in range(hh)]
            zero = [[0.0] * ww for _ in range(hh)]
            u = [[row[:] for row in zero] for _ in range(2)]
            p = [[[row[:] for row in zero] for _ in range(2)] for _ in range(2)]  # p[component][direction]
            for k in range(n_iter):
                new_u = [[row[:] for row in zero] for _ in range(2)]
                for h in range(hh):
                    for w in range(ww):
                        g = (gx[h][w], gy[h][w])
                        grad = g[0] ** 2 + g[1] ** 2 + 1e-12
                        rho = img1[h][w] - img0[h][w] + g[0] * u[0][h][w] + g[1] * u[1][h][w]
                        for m in range(2):
                            if rho < -lt * grad:
                                v = lt * g[m]
                            elif rho > lt * grad:
                                v = -lt * g[m]
                            elif grad > 1e-12:
                                v = -rho / grad * g[m]
                            else:
                                v = 0.0

                            def pt1(hq, wq, pm=p[m]):  # p̃ along W: last column and index -1 read 0
                                return pm[0][hq][wq] if 0 <= wq < ww - 1 else 0.0

                            def pt2(hq, wq, pm=p[m]):
                                return pm[1][hq][wq] if 0 <= hq < hh - 1 else 0.0

                            div = dx[c][0] * pt1(h, w - 1) + dx[c][1] * pt1(h, w)
                            div += dy[c][0] * pt2(h - 1, w) + dy[c][1] * pt2(h, w)
                            new_u[m][h][w] = u[m][h][w] + v + th * div
                u = new_u
                if k == n_iter - 1:
                    break
                for m in range(2):
                    for h in range(hh):
                        for w in range(ww):
                            zx = fx[c][0] * u[m][h][w] + fx[c][1] * u[m][h][w + 1] if w < ww - 1 else 0.0
                            zy = fy[c][0] * u[m][h][w] + fy[c][1] * u[m][h + 1][w] if h < hh - 1 else 0.0
                            s = 1 + r * math.sqrt(zx * zx + zy * zy + 1e-12)
                            p[m][0][h][w] = (p[m][0][h][w] + r * zx) / s
                            p[m][1][h][w] = (p[m][1][h][w] + r * zy) / s
            out[b, c] = torch.tensor(u[0], dtype=torch.float64)
            out[b, c_ + c] = torch.tensor(u[1], dtype=torch.float64)
    return out


def random_stencils(channels, generator=None, dtype=torch.float64):
    """Defaults plus a perturbation, so every tap and every channel differs."""
    base = default_stencils(channels, dtype=dtype)
    return FlowStencils(*(s + 0.2 * torch.randn(s.shape, dtype=dtype, generator=generator) for s in base))


def smooth_images(b=1, c=1, h=12, w=12, dtype=torch.float64):
    """A smooth random pattern (sum of low-frequency sinusoids), values roughly in [-1, 1] · 40."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    img = torch.zeros(b, c, h, w, dtype=dtype)
    for k in range(3):
        fx_, fy_, ph = torch.rand(3, dtype=dtype) * torch.tensor([0.5, 0.5, 6.28], dtype=dtype)
        img = img + torch.sin(fx_ * xx + fy_ * yy + ph) * 40 / (k + 1)
    return img


# ----------------------------------------------------------------------------- reference values


@pytest.mark.parametrize("n_iter", [1, 3])
def test_reference_matches_plain_loop(n_iter):
    i0 = torch.randn(2, 2, 4, 5, dtype=torch.float64) * 20
    i1 = torch.randn(2, 2, 4, 5, dtype=torch.float64) * 20
    st = random_stencils(2)
    got = ops.tvl1_flow(i0, i1, n_iter, 0.4, 0.2, 0.3, stencils=st, backend="torch")
    expected = plain_loop_tvl1(i0, i1, n_iter, 0.4, 0.2, 0.3, st)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_reference_matches_plain_loop_defaults_and_negative_theta():
    i0 = torch.randn(1, 1, 3, 4, dtype=torch.float64) * 5
    i1 = i0 + torch.randn(1, 1, 3, 4, dtype=torch.float64)
    got = ops.tvl1_flow(i0, i1, 4, theta=-0.3, backend="torch")
    expected = plain_loop_tvl1(i0, i1, 4, -0.3, 0.15, 0.25, default_stencils(1, dtype=torch.float64))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_all_three_threshold_branches_are_exercised():
    # Guards the plain-loop comparison above: with these inputs every branch of v is selected somewhere.
    i0 = torch.randn(2, 2, 4, 5, dtype=torch.float64) * 20
    i1 = torch.randn(2, 2, 4, 5, dtype=torch.float64) * 20
    sx = default_stencils(2, dtype=torch.float64)
    from ops.repflow.reference import image_gradient

    gx, gy = image_gradient(i1, sx.image_x, sx.image_y)
    grad = gx * gx + gy * gy + 1e-12
    rho = i1 - i0
    lt = 0.2 * 0.4
    assert (rho < -lt * grad).any() and (rho > lt * grad).any() and (rho.abs() <= lt * grad).any()


# ----------------------------------------------------------------------------- known answers


def test_identical_frames_give_zero_flow():
    i0 = torch.randn(2, 3, 7, 9)
    flow = ops.tvl1_flow(i0, i0.clone(), 10, backend="torch")
    assert flow.shape == (2, 6, 7, 9)
    assert torch.equal(flow, torch.zeros_like(flow))


def test_constant_images_give_zero_flow_without_nan():
    i0 = torch.full((1, 2, 5, 6), 3.0)
    i1 = torch.full((1, 2, 5, 6), 7.0)  # a brightness change with zero image gradient
    flow = ops.tvl1_flow(i0, i1, 10, backend="torch")
    assert torch.isfinite(flow).all() and torch.equal(flow, torch.zeros_like(flow))


@pytest.mark.parametrize("axis", ["x", "y"])
def test_subpixel_shift_gives_flow_of_right_sign_and_magnitude(axis):
    # i1(x) = i0(x - d): content moves by +d, so the flow (i0 -> i1) is +d along the shifted axis.
    d = 0.4
    h = w = 24
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")

    def pattern(x, y):
        return 60 * torch.sin(0.35 * x + 0.2 * y) + 40 * torch.cos(0.25 * y - 0.15 * x)

    i0 = pattern(xx, yy)[None, None]
    i1 = (pattern(xx - d, yy) if axis == "x" else pattern(xx, yy - d))[None, None]
    flow = ops.tvl1_flow(i0, i1, 30, backend="torch")
    u1, u2 = flow[0, 0, 4:-4, 4:-4], flow[0, 1, 4:-4, 4:-4]
    along, across = (u1, u2) if axis == "x" else (u2, u1)
    assert 0.5 * d < along.mean() < 1.5 * d
    assert across.abs().mean() < 0.25 * d


# ----------------------------------------------------------------------------- gradients


def _gradcheck_inputs():
    g = torch.Generator().manual_seed(3)
    i0 = (torch.randn(1, 2, 4, 5, dtype=torch.float64, generator=g) * 3).requires_grad_()
    i1 = (torch.randn(1, 2, 4, 5, dtype=torch.float64, generator=g) * 3).requires_grad_()
    scalars = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.35, 0.4, 0.3)]
    st = [s.requires_grad_() for s in random_stencils(2, g)]
    return i0, i1, scalars, st


def test_reference_gradcheck_all_inputs():
    i0, i1, (theta, lam, tau), st = _gradcheck_inputs()

    def f(i0, i1, theta, lam, tau, *st):
        return ops.tvl1_flow(i0, i1, 3, theta, lam, tau, stencils=st, backend="torch")

    assert torch.autograd.gradcheck(f, (i0, i1, theta, lam, tau, *st), eps=1e-6, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- validation


def test_validation_errors_name_the_argument():
    x = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="i0 must be 4-D"):
        ops.tvl1_flow(x[0], x)
    with pytest.raises(ValueError, match="same shape"):
        ops.tvl1_flow(x, torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="same dtype"):
        ops.tvl1_flow(x, x.double())
    with pytest.raises(ValueError, match="float tensor"):
        ops.tvl1_flow(x.long(), x.long())
    with pytest.raises(ValueError, match="n_iter"):
        ops.tvl1_flow(x, x, n_iter=0)
    with pytest.raises(ValueError, match="backend"):
        ops.tvl1_flow(x, x, backend="numpy")
    with pytest.raises(ValueError, match="theta"):
        ops.tvl1_flow(x, x, theta=torch.ones(2))
    with pytest.raises(ValueError, match="stencils.fwd_x"):
        st = list(default_stencils(2))
        st[2] = torch.zeros(2, 3)
        ops.tvl1_flow(x, x, stencils=st)
    with pytest.raises(ValueError, match="six tensors"):
        ops.tvl1_flow(x, x, stencils=list(default_stencils(2))[:5])
    # Devices: "meta" stands in for a second device on a CPU-only machine.
    with pytest.raises(ValueError, match="same device"):
        ops.tvl1_flow(x, x.to("meta"))
    with pytest.raises(ValueError, match="stencils.div_y must be on"):
        st = list(default_stencils(2))
        st[5] = st[5].to("meta")
        ops.tvl1_flow(x, x, stencils=st)
    with pytest.raises(ValueError, match="lam must be on"):
        ops.tvl1_flow(x, x, lam=torch.tensor(0.1, device="meta"))


def test_empty_batch_and_shared_stencils_and_half():
    assert ops.tvl1_flow(torch.zeros(0, 2, 4, 4), torch.zeros(0, 2, 4, 4)).shape == (0, 4, 4, 4)
    x0, x1 = torch.randn(2, 2, 5, 5) * 10, torch.randn(2, 2, 5, 5) * 10
    shared = [torch.tensor(t) for t in ((-0.5, 0.0, 0.5),) * 2 + ((-1.0, 1.0),) * 4]
    torch.testing.assert_close(ops.tvl1_flow(x0, x1, 3, stencils=shared), ops.tvl1_flow(x0, x1, 3))
    half = ops.tvl1_flow(x0.half(), x1.half(), 3, backend="torch")
    assert half.dtype == torch.float16
    expected = ops.tvl1_flow(x0.half().float(), x1.half().float(), 3)
    torch.testing.assert_close(half.float(), expected, rtol=1e-3, atol=1e-2)


def test_non_contiguous_inputs():
    x0 = torch.randn(2, 5, 6, 3).permute(0, 3, 1, 2)
    x1 = torch.randn(2, 5, 6, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(ops.tvl1_flow(x0, x1, 3), ops.tvl1_flow(x0.contiguous(), x1.contiguous(), 3))


# ----------------------------------------------------------------------------- FlowLayer


def test_flow_layer_shape_and_parameters():
    layer = FlowLayer(3, n_iter=2)
    out = layer(torch.randn(2, 3, 4, 6, 5))
    assert out.shape == (2, 6, 3, 6, 5)
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"fwd_x", "fwd_y", "div_x", "div_y", "theta", "lam", "tau"}
    all_learnable = FlowLayer(3, learn_image_stencils=True)
    assert {"image_x", "image_y"} <= {n for n, _ in all_learnable.named_parameters()}
    nothing = dict(learn_flow_stencils=False, learn_theta=False, learn_lam=False, learn_tau=False)
    assert dict(FlowLayer(3, **nothing).named_parameters()) == {}
    only_lam = FlowLayer(3, learn_flow_stencils=False, learn_theta=False, learn_tau=False)
    assert {n for n, _ in only_lam.named_parameters()} == {"lam"}
    assert only_lam.learnable == (False, False, False, True, False)


def test_flow_layer_deprecated_learnable_tuple_still_reads():
    # Old configs pass learnable=(image stencils, flow stencils, theta, lam, tau): same layer, same state
    # dict keys, and a DeprecationWarning naming the flags to use instead.
    with pytest.warns(DeprecationWarning, match="learn_image_stencils=a, learn_flow_stencils=b"):
        old = FlowLayer(3, 4, (True, False, True, False, True))
    new = FlowLayer(3, 4, learn_image_stencils=True, learn_flow_stencils=False, learn_lam=False)
    assert old.learnable == new.learnable == (True, False, True, False, True)
    assert [(n, type(t)) for n, t in old.state_dict(keep_vars=True).items()] == [
        (n, type(t)) for n, t in new.state_dict(keep_vars=True).items()
    ]
    new.load_state_dict(old.state_dict())
    with pytest.warns(DeprecationWarning, match="FCFBlock"):
        block = FCFBlock(8, bottleneck=4, n_iter=2, learnable=(False, True, True, False, True))
    assert block.flow1.learnable == block.flow2.learnable == (False, True, True, False, True)
    assert set(block.state_dict()) == set(FCFBlock(8, bottleneck=4, n_iter=2, learn_lam=False).state_dict())
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="not both"):
        FlowLayer(2, learnable=(True,) * 5, learn_theta=False)


def test_flow_layer_matches_tvl1_on_frame_pairs():
    x = torch.randn(2, 2, 3, 5, 4, dtype=torch.float64)
    layer = FlowLayer(2, n_iter=3).double()
    out = layer(x)
    for n in range(2):
        xn = x[n]
        xn = 255 * (xn - xn.min()) / (xn.max() - xn.min() + 1e-6)
        for t in range(2):
            f = ops.tvl1_flow(xn[:, t][None], xn[:, t + 1][None], 3, backend="torch")
            torch.testing.assert_close(out[n, :, t], f[0])


def test_flow_layer_batch_independence():
    layer = FlowLayer(2, n_iter=3)
    a = torch.randn(1, 2, 3, 6, 6)
    b = torch.randn(3, 2, 3, 6, 6) * 100 + 50
    alone = layer(a)
    together = layer(torch.cat([b[:1], a, b[1:]]))
    torch.testing.assert_close(together[1:2], alone)


def test_flow_layer_zero_range_input_is_finite():
    layer = FlowLayer(2, n_iter=3)
    x = torch.full((2, 2, 3, 4, 4), 5.0, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_flow_layer_empty_batch():
    x = torch.zeros(0, 2, 3, 4, 4, requires_grad=True)
    out = FlowLayer(2, n_iter=2)(x)
    assert out.shape == (0, 4, 2, 4, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_flow_layer_errors():
    layer = FlowLayer(2)
    with pytest.raises(ValueError, match="T >= 2"):
        layer(torch.zeros(1, 2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\[N,2,T,H,W\]"):
        layer(torch.zeros(1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match="5-D"):
        layer(torch.zeros(2, 2, 4, 4))
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="learnable"):
        FlowLayer(2, learnable=(True, True))
    with pytest.raises(ValueError, match="learn_tau must be a bool"):
        FlowLayer(2, learn_tau=1)
    with pytest.raises(ValueError, match="channels"):
        FlowLayer(0)
    with pytest.raises(ValueError, match="backend"):
        FlowLayer(2, backend="cuda")
    with pytest.raises(ValueError, match="n_iter"):
        FlowLayer(2, n_iter=0)


# ----------------------------------------------------------------------------- FCFBlock


def test_fcf_block_shape_and_identity_at_init():
    block = FCFBlock(6, bottleneck=3, n_iter=2)
    x = torch.randn(2, 6, 5, 6, 6)
    out = block(x)
    assert out.shape == (2, 6, 3, 6, 6)
    expected = torch.relu(torch.nn.functional.avg_pool3d(x, (3, 1, 1), stride=1))
    torch.testing.assert_close(out, expected)


def test_fcf_block_gradients_reach_both_flow_layers():
    block = FCFBlock(4, bottleneck=2, n_iter=2)
    torch.nn.init.ones_(block.bn.weight)  # open the flow path (gamma is zero at init)
    block(torch.randn(2, 4, 4, 5, 5)).square().sum().backward()
    for layer in (block.flow1, block.flow2):
        for name, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="T >= 3"):
        block(torch.zeros(1, 4, 2, 5, 5))


def test_fcf_block_under_autocast_keeps_the_activation_dtype():
    block = FCFBlock(4, bottleneck=2, n_iter=2)
    torch.nn.init.ones_(block.bn.weight)
    x = torch.randn(1, 4, 3, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        flow = block.flow1(block.reduce1(x))  # conv output is bfloat16 under autocast
        out = block(x)
    assert flow.dtype == torch.bfloat16 and torch.isfinite(flow.float()).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all() and block.flow1.lam.grad is not None


# ----------------------------------------------------------------------------- NaN policy and dtypes


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_flow_layer_non_finite_voxel_gives_nan_not_zero_flow(value):
    # One bad voxel used to give exactly zero flow for its sample (finite forward, NaN backward): the
    # threshold's "grad > eps" guard sent NaN gradients to the zero branch. Now NaN propagates.
    layer = FlowLayer(2, n_iter=3).double()
    x = torch.randn(2, 2, 3, 5, 5, dtype=torch.float64)
    x[0, 1, 1, 2, 2] = value
    x.requires_grad_()
    out = layer(x)
    # NaN, -Inf and +Inf alike make the whole sample's flow NaN (+Inf used to leave 92% of it 0).
    assert out[0].isnan().all(), "a non-finite voxel must make its sample's flow NaN, not partly zero"
    assert torch.isfinite(out[1]).all()  # the other sample is unaffected
    # The backward carries NaN along the same paths, and no further: the clean sample's gradient is
    # finite (the bad sample's entries of it are 0·NaN = NaN, as for any torch op with a NaN input).
    (grad,) = torch.autograd.grad(out[1].sum(), x, retain_graph=True)
    assert torch.isfinite(grad[1]).all()
    (grad,) = torch.autograd.grad(out[0].sum(), x)
    assert grad[0].isnan().any() and torch.equal(grad[1], torch.zeros_like(grad[1]))


def test_flow_layer_nan_image_gradient_in_one_direction_gives_nan_not_zero_flow():
    # A non-finite voxel makes its whole sample NaN, so both image-gradient components are NaN and every
    # branch of the threshold step gives NaN: that input cannot tell which branch a NaN ∇i1 takes. A NaN
    # y-stencil tap of one channel makes gy NaN but leaves gx finite; a threshold that sends the NaN
    # |∇i1|² to the flat branch ("grad > eps" fails for NaN) leaves that channel's u1 exactly 0.
    layer = FlowLayer(2, n_iter=3, learn_image_stencils=True).double()
    with torch.no_grad():
        layer.image_y[1, 0] = float("nan")
    x = torch.randn(2, 2, 3, 5, 5, dtype=torch.float64)
    out = layer(x)  # [N, 2C, T-1, H, W]: channels [u1 of c0, u1 of c1, u2 of c0, u2 of c1]
    assert out[:, [1, 3]].isnan().all(), "a NaN image gradient must make its channel's flow NaN, not zero"
    assert torch.isfinite(out[:, [0, 2]]).all()  # stencils are per channel: channel 0 is unaffected


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("flat_i1", [False, True])
def test_tvl1_non_finite_residual_propagates_in_every_branch(value, flat_i1):
    # A bad value in i0 only reaches the residual: with a flat i1 (step 0) or a clipped step it used
    # to vanish; the policy makes the flow NaN there, as torch arithmetic would.
    i1 = torch.zeros(1, 1, 4, 4, dtype=torch.float64) if flat_i1 else smooth_images(h=4, w=4)
    i0 = i1.clone()
    i0[0, 0, 1, 2] = value
    out = ops.tvl1_flow(i0, i1, 1, backend="torch")
    assert out[0, :, 1, 2].isnan().all()
    assert torch.isfinite(out[0, :, 3, 0]).all()  # a pixel the value cannot reach in one iteration


def test_flow_layer_and_fcf_block_reject_a_dtype_other_than_their_parameters():
    with pytest.raises(ValueError, match=r"x has dtype torch.float64 but the FlowLayer's parameters are torch.float32"):
        FlowLayer(2)(torch.randn(1, 2, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x has dtype torch.bfloat16 but the FlowLayer's parameters"):
        FlowLayer(2)(torch.randn(1, 2, 3, 4, 4).bfloat16())
    # Before: a raw conv3d RuntimeError from the block's first convolution.
    with pytest.raises(ValueError, match=r"x has dtype torch.float64 but the FCFBlock's parameters are torch.float32"):
        FCFBlock(4, bottleneck=2, n_iter=2)(torch.randn(1, 4, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="float tensor"):
        FCFBlock(4, bottleneck=2, n_iter=2)(torch.zeros(1, 4, 3, 4, 4, dtype=torch.long))
    # A converted module accepts its dtype; under autocast the autocast dtype is accepted as well.
    assert FlowLayer(2).double()(torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)).dtype == torch.float64
    block = FCFBlock(4, bottleneck=2, n_iter=2).double()
    assert block(torch.randn(1, 4, 3, 4, 4, dtype=torch.float64)).shape == (1, 4, 1, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert FlowLayer(2)(torch.randn(1, 2, 3, 4, 4).bfloat16()).dtype == torch.bfloat16
