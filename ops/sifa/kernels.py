"""The SIFA ops on the CUDA kernels: torch custom ops ``vmm::deform_correlation``,
``vmm::deform_aggregation`` and ``vmm::deform_attention`` with fake implementations and registered backward
ops (torch >= 2.4, see ops/library.py), autograd Functions on older torch.

CUDA tensors launch through CuPy; CPU tensors run the same kernels through host emulation (the test
suite's way of executing them without a GPU — slow, not a CPU backend). Two implementations, chosen
inside each op at run time by :func:`ops.kernel_loader.kernel_variant`:

**"fast"** (opt-in until it has run on a GPU; ``kernels/sifa_fast.cu``): channels-last maps, a lane
group per sampling point with vector loads over contiguous channels, group sums by warp shuffles. Two
kernels, each in four builds (vector or scalar loads × 32- or 64-bit indices, :func:`fast_plan`):
``sifa_fast_forward_*`` (correlation, aggregation or the SIFA step's both in one launch) and
``sifa_fast_backward_*`` (every gradient of any of the three ops in one launch; d kv by atomicAdd,
d offset written in a fixed order). Inputs are made channels-last (free when they already are);
temporaries are accumulation-type buffers of d kv, d offset and, when the aggregation's term is
present, its d attn (attn-sized).

**"simple"** (the default; ``kernels/sifa.cu``, the kernels verified on a GPU): NCHW, one thread per
output element. Four kernels serve both ops and their backward passes (see the header of ``sifa.cu``):

* correlation: forward ``sifa_correlate``; backward d query = ``sifa_aggregate`` of d attn,
  d key = ``sifa_scatter``, d offset = ``sifa_offset_grad``.
* aggregation: forward ``sifa_aggregate``; backward d attn = ``sifa_correlate`` of d out,
  d value = ``sifa_scatter``, d offset = ``sifa_offset_grad``.
* the SIFA step (correlation then aggregation of the same map, ``vmm::deform_attention``): the same
  kernels, with both ops' contributions to d kv and to d offset taken in one two-term pass each.

Memory: the forward saves only its inputs (the SIFA step also its attn; the reference saves K² sampled
maps per op), and the simple backward's temporaries are one accumulation-type map for d key / d value and
the partial sums of the channel-split reductions (output-sized, or about 2·TARGET_THREADS elements when
split), so no tensor larger than the inputs is needed. d key / d value are accumulated with atomicAdd, so
on a GPU their last bits vary from run to run (and ``torch.use_deterministic_algorithms(True)`` raises, as
for grid_sample's CUDA backward); every other gradient is written once per element by one thread, in a
fixed order.
Double backward is not supported (the backward ops have no autograd formula of their own).

Memory format of the results (both variants, and the fake implementations): each output and each gradient
has the memory format of the input it belongs to (:func:`memory_format_of`): channels-last when that input
is (query for attn and the SIFA step's out, value for the aggregation's out, every input for its own
gradient), else contiguous. A network that runs channels-last therefore pays no layout copy on the fast
kernels; NCHW inputs cost one copy in and one out.

NaN / Inf: the reference's rule (see ``reference.py`` and ``sifa.cu``'s ``sifa_locate``): NaN/Inf values
propagate through every product, also with zero weights or off-map samples, and a NaN or ±Inf offset
makes its tap's sample NaN. Kernels and reference give the same NaN pattern in values and gradients.
"""

from __future__ import annotations

import warnings

import torch
from torch.autograd.function import once_differentiable

from ..kernel_loader import MAX_BLOCKS, KernelSource, kernel_variant
from ..library import CUSTOM_OPS, check_kernel_device, needed, placeholder
from ..validation import OpArgumentError, compute_dtype

SIFA_SOURCE = KernelSource("sifa.cu", ("sifa_correlate", "sifa_aggregate", "sifa_offset_grad", "sifa_scatter"))
FAST_SOURCE = KernelSource(
    "sifa_fast.cu",
    tuple(f"sifa_fast_{op}_{path}" for op in ("forward", "backward") for path in ("v32", "s32", "v64", "s64")),
)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The memory format the ops give the result that belongs to ``t`` (see the module docstring):
    ``torch.channels_last`` when ``t`` is channels-last and not also plainly contiguous, else
    ``torch.contiguous_format``. A function of shape and strides only, so fake tensors get the same."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _dense_strides(shape: tuple[int, ...], layout: torch.memory_format) -> tuple[int, ...]:
    """The strides torch.empty(shape, memory_format=layout) gives (4-D shapes for channels_last)."""
    order = (1, 3, 2, 0) if layout == torch.channels_last else tuple(range(len(shape) - 1, -1, -1))
    strides, step = [0] * len(shape), 1
    for dim in order:  # innermost first
        strides[dim] = step
        step *= max(shape[dim], 1)
    return tuple(strides)


def _in_format_of(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``result`` with exactly the strides of a new tensor in ``like``'s memory format (what the fake
    implementations give): a copy unless it has them already. Also for shapes where both formats are
    dense (C = 1, H = W = 1), whose size-1 dimensions' strides differ between the two."""
    layout = memory_format_of(like)
    if result.stride() == _dense_strides(tuple(result.shape), layout):
        return result
    return result.clone(memory_format=layout)


def _geometry(x: torch.Tensor, groups: int, kernel_size: int, dilation: int) -> tuple[int, ...]:
    batch, channels, height, width = x.shape
    return (batch, channels, groups, height, width, kernel_size, dilation)


#: Threads a reduction kernel aims for: about one full wave of a large GPU (132 SMs × 2048 threads).
TARGET_THREADS = 1 << 18
#: Fewest channels a chunk of a split channel sum gets (below that the partial sums cost more than they save).
MIN_CHUNK = 16


def split_channels(outputs: int, channels: int, device: torch.device) -> tuple[int, int]:
    """(chunks, chunk): how to split a sum over ``channels`` computed for ``outputs`` output elements, so a
    GPU runs about TARGET_THREADS threads. One chunk off CUDA (host emulation gains nothing by it)."""
    if device.type != "cuda" or channels <= MIN_CHUNK:
        return 1, channels
    wanted = min(-(-TARGET_THREADS // max(outputs, 1)), channels // MIN_CHUNK)
    chunk = -(-channels // max(wanted, 1))
    return -(-channels // chunk), chunk


def _chunked(chunks: int | None, channels: int, outputs: int, device: torch.device) -> tuple[int, int]:
    if chunks is None:
        return split_channels(outputs, channels, device)
    chunk = -(-channels // chunks)
    return -(-channels // chunk), chunk


def _sum_partials(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (buf[0] if buf.shape[0] == 1 else buf.sum(0)).to(dtype)


def correlate(
    q: torch.Tensor,
    img: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    scale: float,
    chunks: int | None = None,
) -> torch.Tensor:
    """``[B,G·K²,H,W]``: scale · Σ_{c∈g} q · bilinear(img) per tap (contiguous inputs of one dtype).

    ``chunks`` splits each group's channel sum into that many partial sums (None: chosen for the device).
    """
    batch, channels, height, width = q.shape
    shape = (batch, groups * kernel_size**2, height, width)
    n_chunks, chunk = _chunked(chunks, channels // groups, shape[0] * shape[1] * height * width, q.device)
    buf = torch.empty((n_chunks, *shape), dtype=compute_dtype(q.dtype), device=q.device)
    SIFA_SOURCE.launch(
        "sifa_correlate",
        (q, img, offset, buf, *_geometry(q, groups, kernel_size, dilation), n_chunks, chunk, float(scale)),
        dtype=q.dtype,
        numel=buf.numel(),
    )
    return _sum_partials(buf, q.dtype)


def aggregate(
    img: torch.Tensor,
    attn: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    scale: float,
) -> torch.Tensor:
    """``[B,C,H,W]``: scale · Σ_k attn[g(c), k] · bilinear(img[c]) (contiguous inputs of one dtype)."""
    out = torch.empty_like(img)
    SIFA_SOURCE.launch(
        "sifa_aggregate",
        (img, attn, offset, out, *_geometry(img, groups, kernel_size, dilation), float(scale)),
        dtype=img.dtype,
        numel=out.numel(),
    )
    return out


#: An optional second (attn, q, scale) term of offset_grad / scatter (the fused SIFA step's backward).
Second = tuple[torch.Tensor, torch.Tensor, float] | None


def _pair_args(attn: torch.Tensor, q: torch.Tensor, scale: float, second: Second) -> tuple:
    if second is None:  # the kernel does not read the second pair; any tensor of the right device will do
        return (attn, q, attn, q), 1, float(scale), 0.0
    attn2, q2, scale2 = second
    return (attn, q, attn2, q2), 2, float(scale), float(scale2)


def offset_grad(
    attn: torch.Tensor,
    q: torch.Tensor,
    img: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    scale: float,
    chunks: int | None = None,
    second: Second = None,
) -> torch.Tensor:
    """``[B,2K²,H,W]``: Σ_c (scale · attn[g(c),k] · q[c] (+ scale2 · attn2[g(c),k] · q2[c])) ·
    ∇_(Δy,Δx) bilinear(img[c]) per tap.

    ``chunks`` splits the channel sum into that many partial sums (None: chosen for the device);
    ``second`` = (attn2, q2, scale2) adds a second term in the same pass.
    """
    batch, channels, height, width = q.shape
    n_chunks, chunk = _chunked(chunks, channels, batch * kernel_size**2 * height * width, q.device)
    buf = torch.empty((n_chunks, *offset.shape), dtype=compute_dtype(q.dtype), device=q.device)
    pair, pairs, s1, s2 = _pair_args(attn, q, scale, second)
    SIFA_SOURCE.launch(
        "sifa_offset_grad",
        (*pair, img, offset, buf, *_geometry(q, groups, kernel_size, dilation), n_chunks, chunk, pairs, s1, s2),
        dtype=q.dtype,
        numel=buf.numel() // 2,
    )
    return _sum_partials(buf, q.dtype)


def _alert_not_deterministic(what: str) -> None:
    # The same contract as torch's own atomicAdd backwards (e.g. grid_sample's on CUDA).
    if torch.are_deterministic_algorithms_enabled():
        message = f"{what} uses atomicAdd and is not deterministic (nor is the reference's grid_sample on CUDA)"
        if torch.is_deterministic_algorithms_warn_only_enabled():
            warnings.warn(message, stacklevel=3)
        else:
            raise RuntimeError(message)


def scatter(
    attn: torch.Tensor,
    q: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    scale: float,
    second: Second = None,
) -> torch.Tensor:
    """``[B,C,H,W]``: the transpose of sampling — each (b,c,h,w) sends scale · attn · q (+ scale2 · attn2 ·
    q2 for ``second`` = (attn2, q2, scale2)) through the bilinear corners of its K² sample points
    (atomicAdd into an accumulation-type buffer)."""
    if q.device.type == "cuda":
        _alert_not_deterministic("the CuPy backward of deform_correlation / deform_aggregation (d key, d value)")
    buf = torch.zeros(q.shape, dtype=compute_dtype(q.dtype), device=q.device)
    pair, pairs, s1, s2 = _pair_args(attn, q, scale, second)
    SIFA_SOURCE.launch(
        "sifa_scatter",
        (*pair, offset, buf, *_geometry(q, groups, kernel_size, dilation), pairs, s1, s2),
        dtype=q.dtype,
        numel=q.numel(),
    )
    return buf.to(q.dtype)


# ------------------------------------------------------------------------ the fast kernels (sifa_fast.cu)

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
            _alert_not_deterministic("the CuPy backward of deform_correlation / deform_aggregation (d key, d value)")
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


Needs = tuple[bool, bool, bool]
Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def correlation_forward(
    query: torch.Tensor, key: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> torch.Tensor:
    """attn ``[B,G·K²,H,W]`` of ``deform_correlation`` (validated inputs of one dtype and device), in the
    memory format of query."""
    scale = groups / query.shape[1]  # the channel mean within a group
    if kernel_variant() == "fast":
        _, attn = fast_forward(query, key, offset, None, kernel_size, dilation, groups, scale, None)
    else:
        attn = correlate(
            query.contiguous(), key.contiguous(), offset.contiguous(), kernel_size, dilation, groups, scale
        )
    return _in_format_of(attn, query)


def correlation_backward(
    grad_attn: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    needs: Needs,
) -> Grads:
    """(d query, d key, d offset) of ``deform_correlation``, None where ``needs`` says False."""
    need_q, need_k, need_o = needs
    scale = groups / query.shape[1]
    if kernel_variant() == "fast":
        window = (kernel_size, dilation, groups, (need_q, need_k, need_o, False), scale)
        grad_q, grad_k, grad_o, _ = fast_backward(query, key, offset, None, None, grad_attn, *window)
    else:
        q, k, o, ga = query.contiguous(), key.contiguous(), offset.contiguous(), grad_attn.contiguous()
        window = (kernel_size, dilation, groups, scale)
        grad_q = aggregate(k, ga, o, *window) if need_q else None
        grad_k = scatter(ga, q, o, *window) if need_k else None
        grad_o = offset_grad(ga, q, k, o, *window) if need_o else None
    return _formats((grad_q, grad_k, grad_o), (query, key, offset))


def _formats(grads: tuple[torch.Tensor | None, ...], inputs: tuple[torch.Tensor, ...]) -> Grads:
    """Each gradient in the memory format of its input."""
    return tuple(None if g is None else _in_format_of(g, x) for g, x in zip(grads, inputs, strict=True))


def aggregation_forward(
    value: torch.Tensor, attn: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> torch.Tensor:
    """out ``[B,C,H,W]`` of ``deform_aggregation`` (validated inputs of one dtype and device), in the memory
    format of value."""
    if kernel_variant() == "fast":
        out, _ = fast_forward(None, value, offset, attn, kernel_size, dilation, groups, 1.0, 1.0)
    else:
        out = aggregate(value.contiguous(), attn.contiguous(), offset.contiguous(), kernel_size, dilation, groups, 1.0)
    return _in_format_of(out, value)


def aggregation_backward(
    grad_out: torch.Tensor,
    value: torch.Tensor,
    attn: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    needs: Needs,
) -> Grads:
    """(d value, d attn, d offset) of ``deform_aggregation``, None where ``needs`` says False."""
    need_v, need_a, need_o = needs
    if kernel_variant() == "fast":
        window = (kernel_size, dilation, groups, (False, need_v, need_o, need_a), 1.0)
        _, grad_v, grad_o, grad_a = fast_backward(None, value, offset, attn, grad_out, None, *window)
    else:
        v, a, o, go = value.contiguous(), attn.contiguous(), offset.contiguous(), grad_out.contiguous()
        window = (kernel_size, dilation, groups, 1.0)
        grad_v = scatter(a, go, o, *window) if need_v else None
        grad_a = correlate(go, v, o, *window) if need_a else None
        grad_o = offset_grad(a, go, v, o, *window) if need_o else None
    return _formats((grad_v, grad_a, grad_o), (value, attn, offset))


def attention_forward(
    query: torch.Tensor, kv: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out ``[B,C,H,W]``, attn ``[B,G·K²,H,W]``) of the SIFA step, from one correlation pass, in the memory
    format of query."""
    scale = groups / query.shape[1]
    if kernel_variant() == "fast":
        out, attn = fast_forward(query, kv, offset, None, kernel_size, dilation, groups, scale, 1.0)
    else:
        q, kv, offset = query.contiguous(), kv.contiguous(), offset.contiguous()
        attn = correlate(q, kv, offset, kernel_size, dilation, groups, scale)
        out = aggregate(kv, attn, offset, kernel_size, dilation, groups, 1.0)
    return _in_format_of(out, query), _in_format_of(attn, query)


def attention_backward(
    grad_out: torch.Tensor | None,
    grad_attn_in: torch.Tensor | None,
    query: torch.Tensor,
    kv: torch.Tensor,
    offset: torch.Tensor,
    attn: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    needs: Needs,
) -> Grads:
    """(d query, d kv, d offset) of the SIFA step from the gradients on out and on attn (either may be None:
    an unused output costs no work). Fast: one launch for all three. Simple: d kv and d offset of both ops
    are taken in one two-term pass each."""
    if grad_out is None and grad_attn_in is None:
        return None, None, None
    scale = groups / query.shape[1]
    need_q, need_kv, need_o = needs
    if kernel_variant() == "fast":
        window = (kernel_size, dilation, groups, (need_q, need_kv, need_o, False), scale)
        grad_q, grad_kv, grad_o, _ = fast_backward(query, kv, offset, attn, grad_out, grad_attn_in, *window)
        return _formats((grad_q, grad_kv, grad_o), (query, kv, offset))
    inputs = (query, kv, offset)
    query, kv, offset = query.contiguous(), kv.contiguous(), offset.contiguous()
    geometry = (kernel_size, dilation, groups)
    # out = Σ_k attn_k · S_k(kv): d attn through the aggregation (plus any d attn from outside), then
    # the correlation's chain
    grad_attn, direct = None, None
    if grad_out is not None:
        grad_out = grad_out.contiguous()
        grad_attn = correlate(grad_out, kv, offset, *geometry, 1.0)
        direct = (attn.contiguous(), grad_out, 1.0)  # the aggregation's own dependence on kv and offset
    if grad_attn_in is not None:
        grad_attn_in = grad_attn_in.contiguous()
        grad_attn = grad_attn_in if grad_attn is None else grad_attn + grad_attn_in
    grad_q = aggregate(kv, grad_attn, offset, *geometry, scale) if need_q else None
    grad_kv = scatter(grad_attn, query, offset, *geometry, scale, second=direct) if need_kv else None
    grad_o = offset_grad(grad_attn, query, kv, offset, *geometry, scale, second=direct) if need_o else None
    return _formats((grad_q, grad_kv, grad_o), inputs)


# ------------------------------------------------------------------ autograd Functions (torch < 2.4)


class DeformCorrelationFunction(torch.autograd.Function):
    """``deform_correlation`` on the kernels; inputs validated by the caller (one dtype and device). The
    path on torch without ``torch.library.custom_op`` (eager only: torch.compile breaks the graph here)."""

    @staticmethod
    def forward(ctx, query, key, offset, kernel_size: int, dilation: int, groups: int):
        ctx.save_for_backward(query, key, offset)
        ctx.window = (kernel_size, dilation, groups)
        return correlation_forward(query, key, offset, kernel_size, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_attn):
        query, key, offset = ctx.saved_tensors
        grads = correlation_backward(grad_attn, query, key, offset, *ctx.window, ctx.needs_input_grad[:3])
        return (*grads, None, None, None)


class DeformAggregationFunction(torch.autograd.Function):
    """``deform_aggregation`` on the kernels (see :class:`DeformCorrelationFunction`)."""

    @staticmethod
    def forward(ctx, value, attn, offset, kernel_size: int, dilation: int, groups: int):
        ctx.save_for_backward(value, attn, offset)
        ctx.window = (kernel_size, dilation, groups)
        return aggregation_forward(value, attn, offset, kernel_size, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        value, attn, offset = ctx.saved_tensors
        grads = aggregation_backward(grad_out, value, attn, offset, *ctx.window, ctx.needs_input_grad[:3])
        return (*grads, None, None, None)


class DeformAttentionFunction(torch.autograd.Function):
    """``deform_aggregation(kv, deform_correlation(query, kv, offset), offset)`` on the kernels (the SIFA
    step, key = value), returning ``(out, attn)``. The backward takes d kv and d offset of both ops in one
    pass each (two-term sifa_scatter / sifa_offset_grad): half the atomics and corner reads of running the
    two Functions. A gradient arriving on ``attn`` itself (e.g. from the block's correlation features) is
    added to the aggregation's d attn before the correlation's backward, so it costs one addition, not a
    second correlation pass."""

    @staticmethod
    def forward(ctx, query, kv, offset, kernel_size: int, dilation: int, groups: int):
        out, attn = attention_forward(query, kv, offset, kernel_size, dilation, groups)
        ctx.save_for_backward(query, kv, offset, attn)
        ctx.window = (kernel_size, dilation, groups)
        ctx.set_materialize_grads(False)  # an unused output sends None: no zero map, no work for it
        return out, attn

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_attn_in):
        query, kv, offset, attn = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        grads = attention_backward(grad_out, grad_attn_in, query, kv, offset, attn, *ctx.window, needs)
        return (*grads, None, None, None)


# ------------------------------------------------------------ torch.library custom ops (torch >= 2.4)

if CUSTOM_OPS:
    # Schemas are given, not inferred: torch 2.4 / 2.5 cannot read them from this module's postponed
    # annotations (strings) nor from list[bool] / Tensor | None (tests/test_custom_op_schemas.py).
    # One node each for torch.compile / torch.export (docs/architecture.md §3.1); see ops/library.py.
    # The backward ops return an empty placeholder for a gradient that is not needed.

    def _fake_grads(needs: list[bool], inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(
            torch.empty_like(x, memory_format=memory_format_of(x)) if n else placeholder(x)
            for n, x in zip(needs, inputs, strict=True)
        )

    def _real_or_placeholder(grads: Grads, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(placeholder(x) if g is None else g for g, x in zip(grads, inputs, strict=True))

    def _save_inputs_and_window(ctx, inputs, output) -> None:
        # (three tensors, kernel_size, dilation, groups): the inputs of deform_correlation / deform_aggregation
        *tensors, kernel_size, dilation, groups = inputs
        ctx.save_for_backward(*tensors)
        ctx.window = (kernel_size, dilation, groups)

    def _grad_through(backward_op):
        """The autograd formula of a three-input op whose backward is the custom op ``backward_op``."""

        def grad(ctx, grad_output):
            needs = [bool(n) for n in ctx.needs_input_grad[:3]]
            grads = backward_op(grad_output, *ctx.saved_tensors, *ctx.window, needs)
            return (*(needed(g, n) for g, n in zip(grads, needs, strict=True)), None, None, None)

        return grad

    @torch.library.custom_op(
        "vmm::deform_correlation",
        mutates_args=(),
        schema=(
            "(Tensor query, Tensor key, Tensor offset, SymInt kernel_size, SymInt dilation, SymInt groups) -> Tensor"
        ),
    )
    def _correlation_op(
        query: torch.Tensor, key: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
    ) -> torch.Tensor:
        check_kernel_device("deform_correlation", query)
        return correlation_forward(query, key, offset, kernel_size, dilation, groups)

    @_correlation_op.register_fake
    def _(query, key, offset, kernel_size, dilation, groups):
        batch, _, height, width = query.shape
        shape = (batch, groups * kernel_size**2, height, width)
        return torch.empty(shape, dtype=query.dtype, device=query.device, memory_format=memory_format_of(query))

    @torch.library.custom_op(
        "vmm::deform_correlation_backward",
        mutates_args=(),
        schema=(
            "(Tensor grad_attn, Tensor query, Tensor key, Tensor offset, SymInt kernel_size, SymInt dilation, "
            "SymInt groups, bool[] needs) -> (Tensor, Tensor, Tensor)"
        ),
    )
    def _correlation_backward_op(
        grad_attn: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        offset: torch.Tensor,
        kernel_size: int,
        dilation: int,
        groups: int,
        needs: list[bool],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_kernel_device("deform_correlation_backward", query)
        grads = correlation_backward(grad_attn, query, key, offset, kernel_size, dilation, groups, tuple(needs))
        return _real_or_placeholder(grads, (query, key, offset))

    @_correlation_backward_op.register_fake
    def _(grad_attn, query, key, offset, kernel_size, dilation, groups, needs):
        return _fake_grads(needs, (query, key, offset))

    _correlation_op.register_autograd(
        _grad_through(torch.ops.vmm.deform_correlation_backward), setup_context=_save_inputs_and_window
    )

    @torch.library.custom_op(
        "vmm::deform_aggregation",
        mutates_args=(),
        schema=(
            "(Tensor value, Tensor attn, Tensor offset, SymInt kernel_size, SymInt dilation, SymInt groups) -> Tensor"
        ),
    )
    def _aggregation_op(
        value: torch.Tensor, attn: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
    ) -> torch.Tensor:
        check_kernel_device("deform_aggregation", value)
        return aggregation_forward(value, attn, offset, kernel_size, dilation, groups)

    @_aggregation_op.register_fake
    def _(value, attn, offset, kernel_size, dilation, groups):
        return torch.empty_like(value, memory_format=memory_format_of(value))

    @torch.library.custom_op(
        "vmm::deform_aggregation_backward",
        mutates_args=(),
        schema=(
            "(Tensor grad_out, Tensor value, Tensor attn, Tensor offset, SymInt kernel_size, SymInt dilation, "
            "SymInt groups, bool[] needs) -> (Tensor, Tensor, Tensor)"
        ),
    )
    def _aggregation_backward_op(
        grad_out: torch.Tensor,
        value: torch.Tensor,
        attn: torch.Tensor,
        offset: torch.Tensor,
        kernel_size: int,
        dilation: int,
        groups: int,
        needs: list[bool],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_kernel_device("deform_aggregation_backward", value)
        grads = aggregation_backward(grad_out, value, attn, offset, kernel_size, dilation, groups, tuple(needs))
        return _real_or_placeholder(grads, (value, attn, offset))

    @_aggregation_backward_op.register_fake
    def _(grad_out, value, attn, offset, kernel_size, dilation, groups, needs):
        return _fake_grads(needs, (value, attn, offset))

    _aggregation_op.register_autograd(
        _grad_through(torch.ops.vmm.deform_aggregation_backward), setup_context=_save_inputs_and_window
    )

    @torch.library.custom_op(
        "vmm::deform_attention",
        mutates_args=(),
        schema=(
            "(Tensor query, Tensor kv, Tensor offset, SymInt kernel_size, SymInt dilation, "
            "SymInt groups) -> (Tensor, Tensor)"
        ),
    )
    def _attention_op(
        query: torch.Tensor, kv: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_kernel_device("deform_attention", query)
        return attention_forward(query, kv, offset, kernel_size, dilation, groups)

    @_attention_op.register_fake
    def _(query, kv, offset, kernel_size, dilation, groups):
        batch, _, height, width = query.shape
        layout = memory_format_of(query)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device, memory_format=layout)
        shape = (batch, groups * kernel_size**2, height, width)
        return out, torch.empty(shape, dtype=query.dtype, device=query.device, memory_format=layout)

    @torch.library.custom_op(
        "vmm::deform_attention_backward",
        mutates_args=(),
        schema=(
            "(Tensor? grad_out, Tensor? grad_attn, Tensor query, Tensor kv, Tensor offset, Tensor attn, "
            "SymInt kernel_size, SymInt dilation, SymInt groups, bool[] needs) -> (Tensor, Tensor, Tensor)"
        ),
    )
    def _attention_backward_op(
        grad_out: torch.Tensor | None,
        grad_attn: torch.Tensor | None,
        query: torch.Tensor,
        kv: torch.Tensor,
        offset: torch.Tensor,
        attn: torch.Tensor,
        kernel_size: int,
        dilation: int,
        groups: int,
        needs: list[bool],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_kernel_device("deform_attention_backward", query)
        window = (kernel_size, dilation, groups, tuple(needs))
        grads = attention_backward(grad_out, grad_attn, query, kv, offset, attn, *window)
        return _real_or_placeholder(grads, (query, kv, offset))

    @_attention_backward_op.register_fake
    def _(grad_out, grad_attn, query, kv, offset, attn, kernel_size, dilation, groups, needs):
        some = grad_out is not None or grad_attn is not None
        return _fake_grads([n and some for n in needs], (query, kv, offset))

    def _attention_setup(ctx, inputs, output) -> None:
        query, kv, offset, kernel_size, dilation, groups = inputs
        ctx.save_for_backward(query, kv, offset, output[1])
        ctx.window = (kernel_size, dilation, groups)
        ctx.set_materialize_grads(False)  # an unused output sends None: no zero map, no work for it

    def _attention_grad(ctx, grad_out, grad_attn):
        if grad_out is None and grad_attn is None:
            return None, None, None, None, None, None
        query, kv, offset, attn = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[:3]]
        grads = torch.ops.vmm.deform_attention_backward(
            grad_out, grad_attn, query, kv, offset, attn, *ctx.window, needs
        )
        return (*(needed(g, n) for g, n in zip(grads, needs, strict=True)), None, None, None)

    _attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


def deform_correlation_kernels(
    query: torch.Tensor, key: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> torch.Tensor:
    """The kernel path of ``deform_correlation`` for validated, non-empty inputs on any device the
    loader runs (CUDA through CuPy, CPU through host emulation): the custom op ``vmm::deform_correlation``
    (torch >= 2.4), else :class:`DeformCorrelationFunction`."""
    if CUSTOM_OPS:
        return torch.ops.vmm.deform_correlation(query, key, offset, kernel_size, dilation, groups)
    return DeformCorrelationFunction.apply(query, key, offset, kernel_size, dilation, groups)


def deform_aggregation_kernels(
    value: torch.Tensor, attn: torch.Tensor, offset: torch.Tensor, kernel_size: int, dilation: int, groups: int
) -> torch.Tensor:
    """The kernel path of ``deform_aggregation`` (see :func:`deform_correlation_kernels`)."""
    if CUSTOM_OPS:
        return torch.ops.vmm.deform_aggregation(value, attn, offset, kernel_size, dilation, groups)
    return DeformAggregationFunction.apply(value, attn, offset, kernel_size, dilation, groups)


def deform_attention_kernels(
    query: torch.Tensor,
    kv: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int,
    dilation: int,
    groups: int,
    return_attn: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The kernel path of ``deform_attention`` (see :func:`deform_correlation_kernels`): out ``[B,C,H,W]``,
    or with ``return_attn`` the pair (out, attn ``[B,G·K²,H,W]``) from the same correlation pass. The op
    always returns both; an unused attn costs nothing in the backward."""
    if CUSTOM_OPS:
        out, attn = torch.ops.vmm.deform_attention(query, kv, offset, kernel_size, dilation, groups)
    else:
        out, attn = DeformAttentionFunction.apply(query, kv, offset, kernel_size, dilation, groups)
    return (out, attn) if return_attn else out
