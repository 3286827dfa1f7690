"""Inputs for SIFA's kernel tests (test_sifa_kernels.py, test_sifa_fast_kernels.py): the window cases,
per-dtype tolerances, random inputs with sample points away from the integer grid, a fixed cotangent
and the NaN/Inf corruptions."""

from __future__ import annotations

import torch

CASES = [  # (C, groups, kernel_size, dilation)
    (4, 1, 3, 1),
    (4, 2, 3, 1),
    (6, 3, 3, 2),
    (3, 1, 1, 1),
    (2, 2, 5, 1),
]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def fractional_offsets(batch, kernel_size, height, width, spread=2, dtype=torch.float64, device="cpu"):
    """Offsets with fractional part in [0.2, 0.8]: sample points away from the integer coordinates where
    bilinear interpolation is not differentiable (and where two correct implementations may pick
    different one-sided derivatives). ``spread`` 6 on a small map pushes points partly and wholly off it."""
    shape = (batch, 2 * kernel_size**2, height, width)
    whole = torch.randint(-spread, spread + 1, shape)
    return (whole + 0.2 + 0.6 * torch.rand(shape, dtype=torch.float64)).to(dtype=dtype, device=device)


def random_inputs(
    channels, groups, kernel_size, batch=2, height=4, width=5, spread=2, dtype=torch.float64, device="cpu"
):
    def rnd(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(dtype=dtype, device=device)

    query = rnd(batch, channels, height, width)
    key = rnd(batch, channels, height, width)
    offset = fractional_offsets(batch, kernel_size, height, width, spread, dtype, device)
    attn = rnd(batch, groups * kernel_size**2, height, width)
    return query, key, offset, attn


def cotangent(t: torch.Tensor) -> torch.Tensor:
    """A fixed random cotangent shaped like ``t`` (seeded by its size)."""
    gen = torch.Generator().manual_seed(t.numel())
    return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype=t.dtype, device=t.device)


def nan_cases():
    """(name, tensor to corrupt, index, value): NaN and ±Inf in every input, at sample points on the map and
    off it (the offsets of pixel (1, 1) move the taps there)."""
    cases = []
    for value in (float("nan"), float("inf"), float("-inf")):
        tag = {True: "nan", False: "inf" if value > 0 else "-inf"}[value != value]
        cases += [
            (f"query {tag}", "query", (0, 1, 1, 1), value),
            (f"key {tag}", "key", (1, 2, 2, 3), value),
            (f"attn {tag}", "attn", (0, 4, 1, 1), value),
            (f"offset dy {tag}", "offset", (0, 2, 1, 1), value),
            (f"offset dx {tag}", "offset", (1, 9, 2, 2), value),
        ]
    return cases
