"""SIFA ops, pure-PyTorch reference (docs/sifa.md §1–2): against naive loops, gradcheck, edge cases, validation,
and the ``ops.SIFA`` block."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ops


def naive_bilinear(img: list[list[float]], y: float, x: float) -> float:
    """Bilinear interpolation with zero padding, written out corner by corner."""
    height, width = len(img), len(img[0])
    y0, x0 = math.floor(y), math.floor(x)
    total = 0.0
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                total += wy * wx * img[yy][xx]
    return total


def naive_sample_points(offset, b, k, h, w, kernel_size, dilation):
    pad = dilation * (kernel_size - 1) // 2
    kh, kw = divmod(k, kernel_size)
    return h - pad + kh * dilation + offset[b][2 * k][h][w], w - pad + kw * dilation + offset[b][2 * k + 1][h][w]


def naive_correlation(query, key, offset, kernel_size, dilation, groups):
    batch, channels, height, width = query.shape
    q, kk, off = query.tolist(), key.tolist(), offset.tolist()
    per_group = channels // groups
    out = torch.zeros(batch, groups * kernel_size**2, height, width, dtype=torch.float64)
    for b in range(batch):
        for g in range(groups):
            for k in range(kernel_size**2):
                for h in range(height):
                    for w in range(width):
                        y, x = naive_sample_points(off, b, k, h, w, kernel_size, dilation)
                        acc = 0.0
                        for c in range(g * per_group, (g + 1) * per_group):
                            acc += q[b][c][h][w] * naive_bilinear(kk[b][c], y, x)
                        out[b, g * kernel_size**2 + k, h, w] = acc / per_group
    return out


def naive_aggregation(value, attn, offset, kernel_size, dilation, groups):
    batch, channels, height, width = value.shape
    v, a, off = value.tolist(), attn.tolist(), offset.tolist()
    per_group = channels // groups
    out = torch.zeros(batch, channels, height, width, dtype=torch.float64)
    for b in range(batch):
        for c in range(channels):
            g = c // per_group
            for h in range(height):
                for w in range(width):
                    acc = 0.0
                    for k in range(kernel_size**2):
                        y, x = naive_sample_points(off, b, k, h, w, kernel_size, dilation)
                        acc += a[b][g * kernel_size**2 + k][h][w] * naive_bilinear(v[b][c], y, x)
                    out[b, c, h, w] = acc
    return out


def fractional_offsets(batch, kernel_size, height, width, spread=2.0, dtype=torch.float64):
    """Offsets whose fractional part stays in [0.2, 0.8]: sample points away from integer coordinates,
    where bilinear interpolation is not differentiable."""
    whole = torch.randint(-int(spread), int(spread) + 1, (batch, 2 * kernel_size**2, height, width))
    frac = 0.2 + 0.6 * torch.rand(batch, 2 * kernel_size**2, height, width, dtype=torch.float64)
    return (whole + frac).to(dtype)


CASES = [  # (C, groups, kernel_size, dilation)
    (4, 1, 3, 1),
    (4, 2, 3, 1),
    (6, 3, 3, 2),
    (3, 1, 1, 1),
    (2, 1, 5, 1),
]


@pytest.mark.parametrize(("channels", "groups", "kernel_size", "dilation"), CASES)
def test_reference_matches_naive_loops(channels, groups, kernel_size, dilation):
    batch, height, width = 2, 4, 5
    query = torch.randn(batch, channels, height, width, dtype=torch.float64)
    key = torch.randn(batch, channels, height, width, dtype=torch.float64)
    # spread 6 pushes some sample points partly and some wholly off the 4x5 map
    offset = 6 * (2 * torch.rand(batch, 2 * kernel_size**2, height, width, dtype=torch.float64) - 1)
    attn = ops.deform_correlation(query, key, offset, kernel_size, dilation, groups, backend="torch")
    expected = naive_correlation(query, key, offset, kernel_size, dilation, groups)
    torch.testing.assert_close(attn, expected, rtol=1e-10, atol=1e-12)
    out = ops.deform_aggregation(key, attn, offset, kernel_size, dilation, groups, backend="torch")
    torch.testing.assert_close(out, naive_aggregation(key, attn, offset, kernel_size, dilation, groups))


def test_samples_wholly_off_the_map_give_zero():
    query = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    offset = torch.full((1, 18, 3, 3), 10.0, dtype=torch.float64)
    attn = ops.deform_correlation(query, query, offset, backend="torch")
    assert torch.count_nonzero(attn) == 0
    out = ops.deform_aggregation(query, torch.ones_like(attn), offset, backend="torch")
    assert torch.count_nonzero(out) == 0


def test_map_of_width_one():
    value = torch.randn(1, 2, 3, 1, dtype=torch.float64)
    offset = torch.zeros(1, 2, 3, 1, dtype=torch.float64)
    offset[:, 1] = -0.25  # a quarter pixel left: weight 0.75 on column 0, the rest in padding
    attn = torch.ones(1, 1, 3, 1, dtype=torch.float64)
    out = ops.deform_aggregation(value, attn, offset, kernel_size=1, backend="torch")
    torch.testing.assert_close(out, 0.75 * value)


@pytest.mark.parametrize(("channels", "groups", "kernel_size", "dilation"), [(4, 2, 3, 1), (2, 1, 3, 2)])
def test_reference_gradcheck(channels, groups, kernel_size, dilation):
    batch, height, width = 1, 3, 4
    query = torch.randn(batch, channels, height, width, dtype=torch.float64, requires_grad=True)
    key = torch.randn(batch, channels, height, width, dtype=torch.float64, requires_grad=True)
    offset = fractional_offsets(batch, kernel_size, height, width).requires_grad_()
    attn = torch.randn(batch, groups * kernel_size**2, height, width, dtype=torch.float64, requires_grad=True)

    def corr(q, k, o):
        return ops.deform_correlation(q, k, o, kernel_size, dilation, groups, backend="torch")

    def agg(v, a, o):
        return ops.deform_aggregation(v, a, o, kernel_size, dilation, groups, backend="torch")

    assert torch.autograd.gradcheck(corr, (query, key, offset))
    assert torch.autograd.gradcheck(agg, (key, attn, offset))


@pytest.mark.parametrize(("height", "width"), [(3, 4), (7, 7), (5, 13)])
def test_reference_offset_gradient_at_integer_points_is_the_right_derivative(height, width):
    # All sample points on the pixel grid (zero offsets, as SIFA starts): bilinear is not differentiable
    # there, and the reference must give the one-sided derivative of floor-based interpolation (the
    # cell to the bottom-right), the same on every map size. A step with positive components stays in
    # that cell, where f(offset + eps·d) is a quadratic in eps (bilinear in each tap's (Δy, Δx)), so the
    # Richardson combination of two difference quotients is its exact slope at 0, up to rounding.
    query = torch.randn(1, 4, height, width, dtype=torch.float64)
    key = torch.randn(1, 4, height, width, dtype=torch.float64)
    cot = torch.randn(1, 9, height, width, dtype=torch.float64)
    zero = torch.zeros(1, 18, height, width, dtype=torch.float64)
    direction = torch.rand_like(zero) + 0.5

    def f(o):
        return (ops.deform_correlation(query, key, o, backend="torch") * cot).sum()

    def quotient(eps):
        return (f(zero + eps * direction) - f(zero)) / eps

    offset = zero.clone().requires_grad_()
    (grad,) = torch.autograd.grad(f(offset), offset)
    slope = 2 * quotient(1e-3) - quotient(2e-3)
    torch.testing.assert_close(slope, (grad * direction).sum(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("groups", "dilation"), [(1, 1), (2, 2)])
def test_fused_attention_equals_the_two_ops(groups, dilation):
    # The SIFA block's reference path samples each tap once for both ops; values and gradients must be
    # those of calling the two ops in turn.
    query = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    offset = (3 * torch.randn(2, 18, 5, 6, dtype=torch.float64)).requires_grad_()
    fused = ops.sifa.deform_attention(query, kv, offset, 3, dilation, groups, backend="torch")
    attn = ops.deform_correlation(query, kv, offset, 3, dilation, groups, backend="torch")
    two = ops.deform_aggregation(kv, attn, offset, 3, dilation, groups, backend="torch")
    torch.testing.assert_close(fused, two)
    cot = torch.randn_like(fused)
    grads_fused = torch.autograd.grad(fused, (query, kv, offset), cot)
    grads_two = torch.autograd.grad(two, (query, kv, offset), cot)
    for g_fused, g_two in zip(grads_fused, grads_two, strict=True):
        torch.testing.assert_close(g_fused, g_two)
    with pytest.raises(ValueError, match="offset must have shape"):
        ops.sifa.deform_attention(query, kv, offset[:, :8])


def test_non_contiguous_inputs():
    base = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    query = base.transpose(2, 3)  # [2,5,3,4], non-contiguous
    key = torch.randn(2, 5, 3, 8, dtype=torch.float64)[..., ::2]
    offset = fractional_offsets(2, 3, 4, 3).transpose(2, 3)
    assert not (query.is_contiguous() or key.is_contiguous() or offset.is_contiguous())
    attn = ops.deform_correlation(query, key, offset, backend="torch")
    torch.testing.assert_close(attn, ops.deform_correlation(query.contiguous(), key.contiguous(), offset.contiguous()))
    out = ops.deform_aggregation(key, attn.transpose(2, 3).contiguous().transpose(2, 3), offset, backend="torch")
    torch.testing.assert_close(out, naive_aggregation(key, attn, offset, 3, 1, 1))


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3), (2, 4, 3, 0)])
def test_empty_inputs(shape):
    b, c, h, w = shape
    query = torch.randn(shape, requires_grad=True)
    offset = torch.zeros(b, 18, h, w, requires_grad=True)
    attn = ops.deform_correlation(query, query, offset, groups=2)
    assert attn.shape == (b, 18, h, w)
    out = ops.deform_aggregation(query, attn, offset, groups=2)
    assert out.shape == shape
    out.sum().backward()
    assert query.grad.shape == shape and offset.grad.shape == offset.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_low_precision_dtypes(dtype):
    query = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    offset = fractional_offsets(2, 3, 5, 5)
    expected_attn = ops.deform_correlation(query, query, offset, groups=2)
    expected_out = ops.deform_aggregation(query, expected_attn, offset, groups=2)
    q, o = query.to(dtype), offset.to(dtype)
    attn = ops.deform_correlation(q, q, o, groups=2)
    out = ops.deform_aggregation(q, attn, o, groups=2)
    assert attn.dtype == dtype and out.dtype == dtype
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(attn.double(), expected_attn, rtol=tol, atol=tol)
    torch.testing.assert_close(out.double(), expected_out, rtol=tol, atol=tol)


@pytest.mark.parametrize(("groups", "dilation"), [(1, 1), (2, 2)])
def test_fused_attention_returns_the_correlation_with_its_gradient(groups, dilation):
    # return_attn gives the correlation the aggregation used; a loss on both outputs has the gradients of
    # the two ops composed by hand (attn used twice).
    query = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    offset = (3 * torch.randn(2, 18, 5, 6, dtype=torch.float64)).requires_grad_()
    out, attn = ops.sifa.deform_attention(query, kv, offset, 3, dilation, groups, backend="torch", return_attn=True)
    attn_two = ops.deform_correlation(query, kv, offset, 3, dilation, groups, backend="torch")
    out_two = ops.deform_aggregation(kv, attn_two, offset, 3, dilation, groups, backend="torch")
    torch.testing.assert_close(attn, attn_two)
    torch.testing.assert_close(out, out_two)
    cot_out, cot_attn = torch.randn_like(out), torch.randn_like(attn)
    fused = torch.autograd.grad((out * cot_out).sum() + (attn * cot_attn).sum(), (query, kv, offset))
    two = torch.autograd.grad((out_two * cot_out).sum() + (attn_two * cot_attn).sum(), (query, kv, offset))
    for g_fused, g_two in zip(fused, two, strict=True):
        torch.testing.assert_close(g_fused, g_two)
    assert torch.autograd.gradcheck(
        lambda q, k, o: ops.sifa.deform_attention(q, k, o, 3, dilation, groups, backend="torch", return_attn=True),
        (query[:1, :, :3, :4], kv[:1, :, :3, :4], offset[:1, :, :3, :4] * 0 + 0.3),
    )
    with pytest.raises(ValueError, match="return_attn must be a bool"):
        ops.sifa.deform_attention(query, kv, offset, return_attn=1)


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3)])
def test_fused_attention_with_attn_on_empty_inputs(shape):
    b, c, h, w = shape
    query = torch.randn(shape, requires_grad=True)
    offset = torch.zeros(b, 18, h, w, requires_grad=True)
    out, attn = ops.sifa.deform_attention(query, query, offset, groups=2, return_attn=True)
    assert out.shape == shape and attn.shape == (b, 18, h, w)
    (out.sum() + attn.sum()).backward()
    assert query.grad.shape == shape and offset.grad.shape == offset.shape


def test_reference_nan_and_inf_policy():
    # docs/sifa.md §1: NaN/Inf propagate as IEEE arithmetic on the bilinear formula does. A NaN or ±Inf
    # offset makes its tap NaN (Inf - floor(Inf) is NaN), on every device (grid_sample's CUDA kernel alone
    # would call an Inf point off the map); a huge finite offset is off the map (0); NaN/Inf in query or
    # attn stays NaN even against a zero (off-map) sample.
    query = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    key = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    zero = torch.zeros(1, 18, 3, 3, dtype=torch.float64)
    for value in (float("nan"), float("inf"), -float("inf"), 1e300):
        offset = zero.clone()
        offset[0, 2 * 4, 1, 1] = value  # Δy of the centre tap at pixel (1, 1)
        attn = ops.deform_correlation(query, key, offset, backend="torch")
        out, fused_attn = ops.sifa.deform_attention(query, key, offset, backend="torch", return_attn=True)
        agg = ops.deform_aggregation(key, torch.ones_like(attn), offset, backend="torch")
        bad = attn.isnan()
        if value == 1e300:
            assert not bad.any() and attn[0, 4, 1, 1] == 0
        else:
            assert bad[0, 4, 1, 1] and bad.sum() == 1, value  # that tap only
            assert fused_attn.isnan().sum() == 1 and fused_attn[0, 4, 1, 1].isnan()
            assert out[0, :, 1, 1].isnan().all() and out.isnan().sum() == 2  # both channels, that pixel
            assert agg[0, :, 1, 1].isnan().all() and agg.isnan().sum() == 2
    far = torch.full_like(zero, 10.0)
    q_nan = query.clone()
    q_nan[0, 1, 2, 2] = float("nan")
    assert ops.deform_correlation(q_nan, key, far, backend="torch")[0, :, 2, 2].isnan().all()
    a_inf = torch.ones(1, 9, 3, 3, dtype=torch.float64)
    a_inf[0, 3, 0, 0] = float("inf")
    out = ops.deform_aggregation(key, a_inf, far, backend="torch")
    assert out[0, :, 0, 0].isnan().all() and out.isnan().sum() == 2  # Inf · 0 is NaN


def _good():
    q = torch.randn(2, 4, 3, 5)
    return q, q.clone(), torch.zeros(2, 18, 3, 5), torch.zeros(2, 18, 3, 5)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: {**a, "key": torch.randn(2, 4, 3, 4)}, r"key must have shape .*\(2, 4, 3, 4\)"),
        (lambda a: {**a, "offset": torch.zeros(2, 16, 3, 5)}, r"offset must have shape .*\(2, 16, 3, 5\)"),
        (lambda a: {**a, "groups": 3}, r"groups \(3\) must divide .*C = 4"),
        (lambda a: {**a, "kernel_size": 2}, "kernel_size must be odd"),
        (lambda a: {**a, "kernel_size": 0}, "kernel_size must be >= 1"),
        (lambda a: {**a, "dilation": 0}, "dilation must be >= 1"),
        (lambda a: {**a, "query": a["query"].long()}, "query must have a floating dtype.*int64"),
        (lambda a: {**a, "key": a["key"].double()}, "key must have the dtype of query"),
        (lambda a: {**a, "offset": a["offset"].to("meta")}, "offset must be on the device of query"),
        (lambda a: {**a, "query": a["query"][:, :, None]}, r"query must be 4-D .*\(2, 4, 1, 3, 5\)"),
        (lambda a: {**a, "backend": "cuda"}, "backend must be one of"),
    ],
)
def test_correlation_validation(change, match):
    q, k, o, _ = _good()
    args = change({"query": q, "key": k, "offset": o, "kernel_size": 3, "dilation": 1, "groups": 1})
    with pytest.raises(ValueError, match=match):
        ops.deform_correlation(**args)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: {**a, "attn": torch.zeros(2, 9, 3, 5), "groups": 2}, r"attn must have shape .*\(2, 9, 3, 5\)"),
        (lambda a: {**a, "offset": torch.zeros(1, 18, 3, 5)}, r"offset must have shape .*\(1, 18, 3, 5\)"),
        (lambda a: {**a, "value": a["value"].to(torch.int32)}, "value must have a floating dtype"),
        (lambda a: {**a, "attn": a["attn"].half()}, "attn must have the dtype of value"),
        (lambda a: {**a, "value": a["value"][None]}, "value must be 4-D"),
    ],
)
def test_aggregation_validation(change, match):
    v, _, o, a = _good()
    args = change({"value": v, "attn": a[:, :9], "offset": o, "kernel_size": 3, "dilation": 1, "groups": 1})
    with pytest.raises(ValueError, match=match):
        ops.deform_aggregation(**args)


def test_cupy_backend_rejects_cpu_tensors():
    q, k, o, _ = _good()
    with pytest.raises(ValueError, match="backend 'cupy' needs CUDA tensors"):
        ops.deform_correlation(q, k, o, backend="cupy")


# ------------------------------------------------------------------------------------------- SIFA block


def plain_inter_frame_attention(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The SIFA block with zero offsets, by hand: unfold frame t+1 into its K×K neighbourhoods."""
    n, c, t, h, w = x.shape
    y = x.clone()
    for i in range(t - 1):
        q, k = x[:, :, i], x[:, :, i + 1]
        neigh = F.unfold(k, kernel_size, padding=kernel_size // 2).view(n, c, kernel_size**2, h, w)
        attn = (q[:, :, None] * neigh).mean(dim=1, keepdim=True)  # [N,1,K²,H,W]
        y[:, :, i] = q + (attn * neigh).sum(dim=2)
    return y


@pytest.mark.parametrize("frames", [1, 2, 4])
def test_sifa_zero_offsets_is_plain_inter_frame_attention(frames):
    block = ops.SIFA(4).double()
    x = torch.randn(2, 4, frames, 5, 6, dtype=torch.float64)
    y = block(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y[:, :, -1], x[:, :, -1])  # last frame unchanged
    torch.testing.assert_close(y, plain_inter_frame_attention(x, 3))


@pytest.mark.parametrize("shape", [(0, 4, 3, 5, 5), (2, 4, 3, 1, 1), (1, 4, 2, 1, 7), (1, 4, 3, 0, 5), (2, 4, 3, 5, 0)])
def test_sifa_empty_batch_and_tiny_maps(shape):
    # Zero-size maps as the functional ops take them: an empty result of the input's shape.
    block = ops.SIFA(4, offset_init="kaiming")
    x = torch.randn(shape, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()


def test_sifa_gradients_reach_conv_offset():
    block = ops.SIFA(4, groups=2).double()
    assert torch.count_nonzero(block.conv_offset.weight) == 0  # zero-initialised
    x = torch.randn(1, 4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    block(x).square().sum().backward()
    assert block.conv_offset.weight.grad is not None
    assert torch.count_nonzero(block.conv_offset.weight.grad) > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_sifa_nonzero_offsets_use_the_key_frames_motion_map():
    torch.manual_seed(1)
    block = ops.SIFA(3, offset_init="kaiming").double()
    assert torch.count_nonzero(block.conv_offset.weight) > 0
    x = torch.randn(1, 3, 3, 4, 4, dtype=torch.float64)
    previous = torch.cat((x[:, :, :1], x[:, :, :-1]), dim=2)
    offset = block.conv_offset((1 + torch.sigmoid(x - previous)) * x)
    y = block(x)
    for t in range(2):
        attn = ops.deform_correlation(x[:, :, t], x[:, :, t + 1], offset[:, :, t + 1])
        agg = ops.deform_aggregation(x[:, :, t + 1], attn, offset[:, :, t + 1])
        torch.testing.assert_close(y[:, :, t], x[:, :, t] + agg)
    torch.testing.assert_close(y[:, :, 2], x[:, :, 2])


def test_sifa_under_cpu_autocast_keeps_the_input_dtype():
    block = ops.SIFA(4, groups=2, offset_init="kaiming")
    x = torch.randn(1, 4, 3, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y32 = block(x)
        y16 = block(x.bfloat16())
    assert y32.dtype == torch.float32 and y16.dtype == torch.bfloat16
    y16.float().sum().backward()
    assert torch.isfinite(block.conv_offset.weight.grad).all()
    # bf16 offsets (the conv runs in bf16) move sample points by up to ~1% of their size
    torch.testing.assert_close(y16.float(), block(x), rtol=0.1, atol=0.1)


def test_sifa_init_options_and_validation():
    assert "offset_init='zeros'" in repr(ops.SIFA(8, groups=2))
    block = ops.SIFA(2, offset_init="default")
    assert torch.count_nonzero(block.conv_offset.weight) > 0
    assert block.conv_offset.weight.shape == (18, 2, 1, 3, 3) and block.conv_offset.bias is None
    with pytest.raises(ValueError, match="offset_init"):
        ops.SIFA(2, offset_init="ones")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.SIFA(2, backend="triton")
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ops.SIFA(2, kernel_size=4)
    with pytest.raises(ValueError, match="groups"):
        ops.SIFA(6, groups=4)
    with pytest.raises(ValueError, match=r"x must be 5-D .*\(2, 2, 3, 3\)"):
        ops.SIFA(2)(torch.zeros(2, 2, 3, 3))
    with pytest.raises(ValueError, match="x must have 2 channels"):
        ops.SIFA(2)(torch.zeros(1, 3, 2, 3, 3))


def _block_pair(**kw):
    """The paper's block and one with correlation features, built from the same seed."""
    torch.manual_seed(2)
    paper = ops.SIFA(4, groups=2, backend="torch", **kw).double()
    torch.manual_seed(2)
    corr = ops.SIFA(4, groups=2, backend="torch", correlation_features=True, **kw).double()
    return paper, corr


@pytest.mark.parametrize("offset_init", ["zeros", "kaiming"])
def test_sifa_correlation_features_start_as_the_papers_block(offset_init):
    # docs/sifa.md §5: P is zero-initialised, so a new block computes exactly what the paper's block does,
    # value and gradient, while P itself gets a gradient to learn from.
    paper, corr = _block_pair(offset_init=offset_init)
    assert torch.equal(paper.conv_offset.weight, corr.conv_offset.weight)
    assert corr.attn_proj.weight.shape == (4, 18, 1, 1) and corr.attn_proj.bias is None
    assert torch.count_nonzero(corr.attn_proj.weight) == 0
    assert paper.attn_proj is None and "correlation_features=True" in repr(corr)
    x = torch.randn(2, 4, 3, 5, 6, dtype=torch.float64)
    x_paper, x_corr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_paper, y_corr = paper(x_paper), corr(x_corr)
    assert torch.equal(y_paper, y_corr)
    cot = torch.randn_like(y_paper)
    y_paper.backward(cot)
    y_corr.backward(cot)
    assert torch.equal(x_paper.grad, x_corr.grad)
    assert torch.equal(paper.conv_offset.weight.grad, corr.conv_offset.weight.grad)
    assert torch.count_nonzero(corr.attn_proj.weight.grad) > 0


def test_sifa_correlation_features_add_the_projected_attention():
    # y[t] = x[t] + agg[t] + P(attn[t]) for t < T-1, by hand from the two ops; the last frame has no pair.
    _, block = _block_pair(offset_init="kaiming")
    with torch.no_grad():
        block.attn_proj.weight.normal_()
    x = torch.randn(1, 4, 3, 4, 5, dtype=torch.float64)
    previous = torch.cat((x[:, :, :1], x[:, :, :-1]), dim=2)
    offset = block.conv_offset((1 + torch.sigmoid(x - previous)) * x)
    y = block(x)
    for t in range(2):
        attn = ops.deform_correlation(x[:, :, t], x[:, :, t + 1], offset[:, :, t + 1], groups=2)
        agg = ops.deform_aggregation(x[:, :, t + 1], attn, offset[:, :, t + 1], groups=2)
        expected = x[:, :, t] + agg + torch.einsum("oc,nchw->nohw", block.attn_proj.weight[:, :, 0, 0], attn)
        torch.testing.assert_close(y[:, :, t], expected)
    torch.testing.assert_close(y[:, :, 2], x[:, :, 2])


def test_sifa_correlation_features_gradcheck():
    _, block = _block_pair(offset_init="kaiming")
    with torch.no_grad():
        block.attn_proj.weight.normal_()
    x = torch.randn(1, 4, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    weights = (block.conv_offset.weight, block.attn_proj.weight)

    def run(x, w_offset, w_proj):
        return torch.func.functional_call(block, {"conv_offset.weight": w_offset, "attn_proj.weight": w_proj}, (x,))

    # fast mode (random projections): ~900 inputs would take minutes on a small CPU in full mode
    assert torch.autograd.gradcheck(run, (x, *weights), fast_mode=True)


def test_sifa_correlation_features_state_dicts_and_validation():
    # The paper's block has no new parameter, so its state dicts are unchanged; a block with the option
    # loads one with only attn_proj missing and then still computes the paper's block.
    paper, corr = _block_pair()
    assert list(paper.state_dict()) == ["conv_offset.weight"]
    missing = corr.load_state_dict(paper.state_dict(), strict=False).missing_keys
    assert missing == ["attn_proj.weight"]
    x = torch.randn(1, 4, 2, 3, 3, dtype=torch.float64)
    assert torch.equal(paper(x), corr(x))
    with pytest.raises(ValueError, match="correlation_features must be a bool"):
        ops.SIFA(4, correlation_features="yes")


@pytest.mark.parametrize("correlation_features", [False, True])
def test_sifa_rejects_an_input_dtype_other_than_its_parameters(correlation_features):
    # Not torch's raw conv error: the argument, the input dtype and the parameter dtype are named.
    block = ops.SIFA(4, correlation_features=correlation_features)
    with pytest.raises(ValueError, match=r"x has dtype torch.float64 .*parameters are torch.float32"):
        block(torch.randn(1, 4, 3, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x has dtype torch.bfloat16 .*parameters are torch.float32"):
        block(torch.randn(1, 4, 3, 5, 5, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the convs itself: allowed
        assert block(torch.randn(1, 4, 3, 5, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="x has dtype torch.float64"):
        block(torch.randn(1, 4, 3, 5, 5, dtype=torch.float64))  # autocast leaves float64 alone


def test_sifa_correlation_features_under_autocast_and_half():
    _, block = _block_pair(offset_init="kaiming")
    block = block.float()
    with torch.no_grad():
        block.attn_proj.weight.normal_()
    x = torch.randn(1, 4, 3, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = block(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    y16.float().sum().backward()
    assert torch.isfinite(block.attn_proj.weight.grad).all()
    torch.testing.assert_close(y16.float(), block(x), rtol=0.1, atol=0.1)
    half = ops.SIFA(4, groups=2, correlation_features=True).half()
    with torch.no_grad():
        half.attn_proj.weight.normal_()
    y = half(x.half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


def test_sifa_propagates_nan():
    block = ops.SIFA(4, correlation_features=True).double()
    x = torch.randn(1, 4, 3, 5, 5, dtype=torch.float64)
    x[0, 1, 1, 2, 2] = float("nan")
    y = block(x)
    assert y[0, :, 0, 2, 2].isnan().all()  # frame 0 attends to frame 1's NaN
    assert torch.isfinite(y[:, :, 2]).all()  # the last frame is x itself


# ------------------------------------------------------------------------------------- torch.jit.trace


def test_canvas_size_of_a_traced_size_equals_the_integer_rule():
    from ops.sifa.reference import canvas_size

    for n in [*range(1, 70), 127, 128, 129, 1000, 4096]:
        assert canvas_size(n) == int(canvas_size(torch.tensor(n))) >= n, n


# Recent torch (2.13 here) deprecates torch.jit.trace for torch.compile / torch.export; it still works and
# users still trace, so the reference must stay traceable.
@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*is deprecated:DeprecationWarning")
def test_reference_ops_and_sifa_block_trace_with_jit_trace():
    # The reference path records under torch.jit.trace (sizes arrive as 0-d tensors there); the trace
    # reproduces the eager outputs at the traced shape and at others (a map size that is a power of two,
    # one that is not, batch and frame counts changed).
    def inputs(batch, height, width):
        gen = torch.Generator().manual_seed(batch * 100 + height * 10 + width)
        q, k = (torch.randn(batch, 4, height, width, dtype=torch.float64, generator=gen) for _ in range(2))
        offset = 2 * torch.randn(batch, 18, height, width, dtype=torch.float64, generator=gen)
        attn = torch.randn(batch, 18, height, width, dtype=torch.float64, generator=gen)
        return q, k, offset, attn

    def corr(q, k, o):
        return ops.deform_correlation(q, k, o, 3, 1, 2, backend="torch")

    def agg(v, a, o):
        return ops.deform_aggregation(v, a, o, 3, 1, 2, backend="torch")

    def step(q, kv, o):
        return ops.deform_attention(q, kv, o, 3, 2, 2, backend="torch")

    q, k, o, a = inputs(2, 5, 6)
    with pytest.warns(torch.jit.TracerWarning):  # the argument checks become constants of the trace
        traced = (torch.jit.trace(corr, (q, k, o)), torch.jit.trace(agg, (k, a, o)), torch.jit.trace(step, (q, k, o)))
    for shape in [(2, 5, 6), (1, 7, 3), (3, 8, 8)]:
        q, k, o, a = inputs(*shape)
        torch.testing.assert_close(traced[0](q, k, o), corr(q, k, o), rtol=0, atol=0)
        torch.testing.assert_close(traced[1](k, a, o), agg(k, a, o), rtol=0, atol=0)
        torch.testing.assert_close(traced[2](q, k, o), step(q, k, o), rtol=0, atol=0)

    torch.manual_seed(0)
    block = ops.SIFA(4, groups=2, offset_init="kaiming", backend="torch", correlation_features=True).double()
    with torch.no_grad():
        block.attn_proj.weight.normal_()
    x = torch.randn(2, 4, 3, 5, 6, dtype=torch.float64)
    with pytest.warns(torch.jit.TracerWarning):
        traced_block = torch.jit.trace(block, (x,))
    for shape in [(2, 4, 3, 5, 6), (1, 4, 4, 7, 3)]:
        x = torch.randn(*shape, dtype=torch.float64)
        torch.testing.assert_close(traced_block(x), block(x), rtol=0, atol=0)


def test_sifa_returns_the_pairs_correlation_on_request():
    torch.manual_seed(0)
    block = ops.SIFA(4, groups=2, offset_init="kaiming").double()
    x = torch.randn(2, 4, 3, 5, 6, dtype=torch.float64)
    y, attn = block(x, return_attn=True)
    torch.testing.assert_close(y, block(x))
    assert attn.shape == (2, 2 * 9, 2, 5, 6)
    motion = (1 + torch.sigmoid(x[:, :, 1:] - x[:, :, :-1])) * x[:, :, 1:]
    offset = block.conv_offset(motion)
    for t in range(2):
        expected = ops.deform_correlation(x[:, :, t], x[:, :, t + 1], offset[:, :, t], 3, groups=2)
        torch.testing.assert_close(attn[:, :, t], expected)
    y1, attn1 = block(x[:, :, :1], return_attn=True)
    assert torch.equal(y1, x[:, :, :1]) and attn1.shape == (2, 18, 0, 5, 6)
