"""The SIFA ops' **fast** kernels (``kernels/sifa_fast.cu``, opt-in until they have run on a GPU): the
launch planner and the two launchers.

Channels-last maps, a lane group per sampling point with vector loads over contiguous channels, group
sums by warp shuffles. Two kernels, each in four builds (vector or scalar loads × 32- or 64-bit
indices, :func:`fast_plan`): ``sifa_fast_forward_*`` (correlation, aggregation or the SIFA step's both in
one launch, :func:`fast_forward`) and ``sifa_fast_backward_*`` (every gradient of any of the three ops
in one launch, :func:`fast_backward`; d kv by atomicAdd, d offset written in a fixed order). Inputs are
made channels-last (free when they already are); temporaries are accumulation-type buffers of d kv,
d offset and, when the aggregation's term is present, its d attn (attn-sized).
"""

from __future__ import annotations

import torch

from ..kernel_loader import MAX_BLOCKS, KernelSource
from ..library import alert_not_deterministic
from ..validation import OpArgumentError, compute_dtype

FAST_SOURCE = KernelSource(
    "sifa_fast.cu",
    tuple(f"sifa_fast_{op}_{path}" for op in ("forward", "backward") for path in ("v32", "s32", "v64", "s64")),
)

#: Threads per block of the fast kernels (a multiple of the warp size: lane groups never straddle warps).
FAST_THREADS = 256
#: sifa_fast_forward's modes and sifa_fast_backward's flags (the SIFA_FAST_* macros of sifa_fast.cu).
FAST_CORR, FAST_AGG = 1, 2
HAS_Q, HAS_OUT, HAS_GATTN, NEED_Q, NEED_KV, NEED_OFF, NEED_ABAR = 1, 2, 4, 8, 16, 32, 64
#: The largest index (plus a grid stride) that the 32-bit index path takes.
INDEX32_LIMIT = 2**31 - 1


def vector_width(dtype: torch.dtype) -> int:
    """Channels per 16-byte vector load: 4 float, 2 double, 8 float16 / bfloat16."""
    return 16 // dtype.itemsize


def fast_lanes(per_group: int, width: int) -> int:
    """Lanes per sampling point: the power of two (≤ 32) that covers a group's channels in one step of
    ``width`` channels per lane where it can (a group of 64 floats: 16 lanes, two points per warp)."""
    wanted = min(-(-per_group // width), 32)
    return 1 << (wanted - 1).bit_length()


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


#: Plan overrides of the fast kernels: lanes, vectorize, index32 (tests: every path on tiny shapes).
FastPlan = tuple[int | None, bool, bool | None]
DEFAULT_PLAN: FastPlan = (None, True, None)


def fast_plan(
    maps: tuple[torch.Tensor, ...], shape: tuple[int, ...], plan: FastPlan = DEFAULT_PLAN
) -> tuple[int, bool, bool]:
    """(lanes, vec, index32) of a fast launch over the B·H·W points of ``shape`` = (B, C, G, H, W, K, dil).
    ``maps`` are the channels-last tensors read or written by vectors: 16-byte vectors only when each of
    them is 16-byte aligned (a storage offset may break that) and the width divides C/G, scalar loads
    otherwise. ``plan`` = (lanes, vectorize, index32) overrides (None: chosen here; tests)."""
    batch, channels, groups, height, width, ksize, _ = shape
    lanes, vectorize, index32 = plan
    n_points = batch * height * width
    per_group = channels // groups
    dtype = maps[0].dtype
    vec = vectorize and per_group % vector_width(dtype) == 0 and all(t.data_ptr() % 16 == 0 for t in maps)
    if lanes is None:
        lanes = fast_lanes(per_group, vector_width(dtype) if vec else 1)
    if lanes not in (1, 2, 4, 8, 16, 32):
        raise OpArgumentError(f"lanes must be a power of two up to 32, got {lanes}")
    if index32 is None:
        largest = n_points * max(channels, 2 * ksize**2, groups * ksize**2) + _fast_grid(n_points, lanes) * FAST_THREADS
        index32 = largest <= INDEX32_LIMIT
    return lanes, bool(vec), bool(index32)


def _fast_grid(n_points: int, lanes: int) -> int:
    return max(1, min(MAX_BLOCKS, -(-n_points // (FAST_THREADS // lanes))))


def _fast_launch(
    kernel: str,
    pointers: tuple[torch.Tensor, ...],
    shape: tuple[int, ...],
    extra: tuple,
    maps: tuple[torch.Tensor, ...],
    plan: FastPlan,
) -> None:
    """Launch a fast kernel with explicit grid and block: ``FAST_THREADS`` threads, lanes of them per point,
    a grid-stride loop over the points (see :func:`fast_plan`)."""
    batch, channels, groups, height, width, ksize, dilation = shape
    lanes, vec, index32 = fast_plan(maps, shape, plan)
    n_points = batch * height * width
    geometry = (n_points, channels, groups, height, width, ksize, dilation)
    FAST_SOURCE.launch(
        f"{kernel}_{'v' if vec else 's'}{32 if index32 else 64}",
        (*pointers, *geometry, *extra, lanes),
        dtype=maps[0].dtype,
        grid=(_fast_grid(n_points, lanes), 1, 1),
        block=(FAST_THREADS, 1, 1),
    )


def fast_forward(
    query: torch.Tensor | None,
    kv: torch.Tensor,
    offset: torch.Tensor,
    attn: torch.Tensor | None,
    kernel_size: int,
    dilation: int,
    groups: int,
    scale_corr: float,
    scale_agg: float,
    plan: FastPlan = DEFAULT_PLAN,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(out, attn) channels-last, one ``sifa_fast_forward`` launch. With ``query``: attn = scale_corr ·
    Σ_{c∈g} query · S_k(kv) (the correlation); with ``attn`` given instead, that attn is used. ``scale_agg``
    not None: out = scale_agg · Σ_k attn · S_k(kv) (the aggregation), else out is None."""
    batch, channels, height, width = kv.shape
    shape = (batch, channels, groups, height, width, kernel_size, dilation)
    kv, offset = _channels_last(kv), _channels_last(offset)
    mode = 0
    if query is not None:
        mode |= FAST_CORR
        query = _channels_last(query)
        attn_shape = (batch, groups * kernel_size**2, height, width)
        attn = torch.empty(attn_shape, dtype=kv.dtype, device=kv.device, memory_format=torch.channels_last)
    else:
        attn = _channels_last(attn)
    out = None
    if scale_agg is not None:
        mode |= FAST_AGG
        out = torch.empty_like(kv, memory_format=torch.channels_last)
    maps = tuple(t for t in (query, kv, out) if t is not None)
    pointers = (kv if query is None else query, kv, offset, attn, kv if out is None else out)
    extra = (mode, float(scale_corr), float(1.0 if scale_agg is None else scale_agg))
    _fast_launch("sifa_fast_forward", pointers, shape, extra, maps, plan)
    return out, attn


def fast_backward(
    query: torch.Tensor | None,
    kv: torch.Tensor,
    offset: torch.Tensor,
    attn: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    grad_attn: torch.Tensor | None,
    kernel_size: int,
    dilation: int,
    groups: int,
    needs: tuple[bool, bool, bool, bool],
    scale: float,
    plan: FastPlan = DEFAULT_PLAN,
) -> tuple[torch.Tensor | None, ...]:
    """(d query, d kv, d offset, d attn) channels-last, one ``sifa_fast_backward`` launch, None where
    ``needs`` (same order) says False.

    The correlation's term (``query`` given, ``scale`` = 1/C_g) takes Ā = ``grad_attn`` plus, when
    ``grad_out`` is given, Σ_{c∈g} Ō · S_k(kv); the aggregation's term (``grad_out`` with the forward's
    ``attn``) sends attn · Ō to d kv and d offset. d attn (the aggregation's, without a correlation
    term) is that Σ Ō · S_k(kv)."""
    need_q, need_kv, need_off, need_attn = needs
    if query is not None and grad_out is None and grad_attn is None:
        raise OpArgumentError("fast_backward: the correlation's term needs grad_out or grad_attn")
    batch, channels, height, width = kv.shape
    shape = (batch, channels, groups, height, width, kernel_size, dilation)
    acc = compute_dtype(kv.dtype)
    cl = torch.channels_last
    kv, offset = _channels_last(kv), _channels_last(offset)
    flags = 0
    if query is not None:
        query = _channels_last(query)
        flags |= HAS_Q
    if grad_out is not None:
        grad_out, attn = _channels_last(grad_out), _channels_last(attn)
        flags |= HAS_OUT
    if grad_attn is not None:
        grad_attn = _channels_last(grad_attn)
        flags |= HAS_GATTN
    need_q = need_q and query is not None
    flags |= (NEED_Q if need_q else 0) | (NEED_KV if need_kv else 0) | (NEED_OFF if need_off else 0)
    need_attn = need_attn and grad_out is not None
    flags |= NEED_ABAR if need_attn else 0
    attn_shape = (batch, groups * kernel_size**2, height, width)
    abar = None
    if grad_out is not None and (query is not None or need_attn):
        abar = torch.empty(attn_shape, dtype=acc, device=kv.device, memory_format=cl)
    grad_q = torch.empty_like(query, memory_format=cl) if need_q else None
    if need_kv:
        if kv.device.type == "cuda":
            alert_not_deterministic("the CuPy backward of deform_correlation / deform_aggregation (d key, d value)")
        grad_kv = torch.empty(kv.shape, dtype=acc, device=kv.device, memory_format=cl).zero_()
    else:
        grad_kv = None
    grad_off = torch.empty(offset.shape, dtype=acc, device=kv.device, memory_format=cl) if need_off else None
    if flags & (NEED_Q | NEED_KV | NEED_OFF) or abar is not None:
        tensors = (query, kv, offset, attn, grad_out, grad_attn, abar, grad_q, grad_kv, grad_off)
        pointers = tuple(kv if t is None else t for t in tensors)
        maps = tuple(t for t in (query, kv, grad_out, grad_q) if t is not None)
        _fast_launch("sifa_fast_backward", pointers, shape, (flags, float(scale)), maps, plan)
    dtype = kv.dtype
    return (
        grad_q,
        None if grad_kv is None else grad_kv.to(dtype),
        None if grad_off is None else grad_off.to(dtype),
        abar.to(dtype) if need_attn else None,
    )
