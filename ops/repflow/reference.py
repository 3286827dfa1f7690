"""Pure-PyTorch reference of the TV-L1 iteration (docs/repflow.md §1), differentiable by autograd.

Everything here works on validated, already-cast tensors (see ``functional.py``): i0, i1
``[B,C,H,W]`` in the compute dtype (float32 or float64), per-channel stencils broadcast as
``[1,C,1,1]`` taps, scalars as 0-d tensors or Python floats.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The ε of the spec: added to |∇i1|² and to |∇u|² under the square root, and to |θ|.
EPS = 1e-12


def _tap(stencil: Tensor, j: int) -> Tensor:
    """Tap ``j`` of a ``[C,k]`` stencil as ``[1,C,1,1]`` for broadcasting over ``[B,C,H,W]``."""
    return stencil[:, j].reshape(1, -1, 1, 1)


def image_gradient(i1: Tensor, sx: Tensor, sy: Tensor) -> tuple[Tensor, Tensor]:
    """``(gx, gy)``: 3-tap correlations of ``i1`` along W and H with replicate padding.

    ``gx[h,w] = sx0·i1[h,w-1] + sx1·i1[h,w] + sx2·i1[h,w+1]`` (indices clamped to the image), which at
    ``sx = [-0.5, 0, 0.5]`` is OpenCV's central difference with the one-sided border rule.
    """
    left = torch.cat([i1[..., :1], i1[..., :-1]], dim=-1)
    right = torch.cat([i1[..., 1:], i1[..., -1:]], dim=-1)
    up = torch.cat([i1[..., :1, :], i1[..., :-1, :]], dim=-2)
    down = torch.cat([i1[..., 1:, :], i1[..., -1:, :]], dim=-2)
    gx = _tap(sx, 0) * left + _tap(sx, 1) * i1 + _tap(sx, 2) * right
    gy = _tap(sy, 0) * up + _tap(sy, 1) * i1 + _tap(sy, 2) * down
    return gx, gy


def forward_gradient(z: Tensor, fx: Tensor, fy: Tensor) -> tuple[Tensor, Tensor]:
    """``(zx, zy)``: 2-tap forward differences, zero in the last column (zx) / last row (zy)."""
    zx = _tap(fx, 0) * z[..., :-1] + _tap(fx, 1) * z[..., 1:]
    zy = _tap(fy, 0) * z[..., :-1, :] + _tap(fy, 1) * z[..., 1:, :]
    zx = torch.nn.functional.pad(zx, (0, 1))
    zy = torch.nn.functional.pad(zy, (0, 0, 0, 1))
    return zx, zy


def divergence(p1: Tensor, p2: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """``(dx0·p̃1[h,w-1] + dx1·p̃1[h,w]) + (dy0·p̃2[h-1,w] + dy1·p̃2[h,w])``.

    ``p̃1`` is p1 with its last column set to 0 (``p̃2``: last row), and index -1 reads 0; at the
    default taps ``[-1, 1]`` this is the negative adjoint of :func:`forward_gradient`.
    """
    p1t = torch.nn.functional.pad(p1[..., :-1], (0, 1))
    p2t = torch.nn.functional.pad(p2[..., :-1, :], (0, 0, 0, 1))
    p1prev = torch.nn.functional.pad(p1t[..., :-1], (1, 0))
    p2prev = torch.nn.functional.pad(p2t[..., :-1, :], (0, 0, 1, 0))
    return (_tap(dx, 0) * p1prev + _tap(dx, 1) * p1t) + (_tap(dy, 0) * p2prev + _tap(dy, 1) * p2t)


def threshold_coefficient(rho: Tensor, grad: Tensor, lt: Tensor | float, zeros: Tensor) -> Tensor:
    """The threshold step as a coefficient of ∇i1: ``v = coef·(gx, gy)`` (docs/repflow.md §1), ``[B,C,H,W]``.

    ``coef`` is ``λθ`` where ``rho < -λθ·grad``, ``-λθ`` where ``rho > λθ·grad``, 0 where the image is
    flat (``grad <= ε``: ∇i1 = 0) and ``-rho/grad`` otherwise.

    NaN policy (docs/repflow.md §1), shared with the fused kernels: non-finite values propagate as
    in torch arithmetic. A NaN residual or image gradient fails both comparisons and is not flat, so
    it takes the linear branch; ``+ 0·rho`` turns a NaN or ±Inf residual into a NaN step in every
    branch (a clipped or flat step would otherwise hide it). Gradients follow the selected branch
    only, and the unselected branch's inputs are zeroed before use (``torch.where`` on the inputs,
    not only on the outputs), so a value that was not used never reaches the backward as ``0·NaN``.
    """
    lt_grad = lt * grad
    below = rho < -lt_grad
    above = rho > lt_grad
    flat = grad <= EPS
    moving = ~(below | above | flat)
    # grad >= EPS > 0 for finite inputs, so the division is safe; rho is zeroed where the step is unused.
    step = torch.where(moving, -torch.where(moving, rho, zeros) / grad, zeros)
    return torch.where(below, lt, torch.where(above, -lt, step)) + rho * 0


def tvl1_reference(
    i0: Tensor,
    i1: Tensor,
    n_iter: int,
    theta: Tensor | float,
    lam: Tensor | float,
    tau: Tensor | float,
    stencils: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor],
) -> Tensor:
    """The spec's algorithm with ``torch.where`` branches; returns ``cat([u1, u2], 1)`` ``[B,2C,H,W]``.

    ``theta`` is used as ``|θ| + 1e-12``. Gradients flow through the selected threshold branch only.
    """
    sx, sy, fx, fy, dx, dy = stencils
    theta_e = abs(theta) + EPS
    lt = lam * theta_e
    r = tau / theta_e

    gx, gy = image_gradient(i1, sx, sy)
    grad = gx * gx + gy * gy + EPS
    rho_c = i1 - i0
    zeros = torch.zeros_like(rho_c)
    u1 = u2 = p11 = p12 = p21 = p22 = zeros
    for k in range(n_iter):
        rho = rho_c + gx * u1 + gy * u2
        coef = threshold_coefficient(rho, grad, lt, zeros)
        u1 = u1 + coef * gx + theta_e * divergence(p11, p12, dx, dy)
        u2 = u2 + coef * gy + theta_e * divergence(p21, p22, dx, dy)
        if k == n_iter - 1:
            break  # the last dual update cannot change the returned flow
        u1x, u1y = forward_gradient(u1, fx, fy)
        u2x, u2y = forward_gradient(u2, fx, fy)
        s1 = 1 + r * torch.sqrt(u1x * u1x + u1y * u1y + EPS)
        s2 = 1 + r * torch.sqrt(u2x * u2x + u2y * u2y + EPS)
        p11 = (p11 + r * u1x) / s1
        p12 = (p12 + r * u1y) / s1
        p21 = (p21 + r * u2x) / s2
        p22 = (p22 + r * u2y) / s2
    return torch.cat([u1, u2], dim=1)
