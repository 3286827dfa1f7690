"""The TV-L1 kernels as a torch custom op with a hand-written backward, in two variants
(``ops.backends.kernel_variant()``, docs/architecture.md §6):

* **fast** (opt-in until it has run on a GPU; ``kernels/tvl1_plane.cu``): one thread block per
  ``(b, c)`` plane runs all n_iter iterations in one launch, the plane's state in registers and shared
  memory (two barriers per iteration; dynamic shared memory sized by the plane,
  :func:`plane_shared_bytes`), and the backward's whole reverse sweep in one more launch. Used when a
  plane fits a block: ``H·W <= PLANE_MAX_PIXELS[dtype]`` (1024 pixels in float32, 512 in float64).
* **simple** (the default; ``kernels/tvl1.cu``, also the fallback for larger planes): one thread per
  pixel, one launch per iteration in the forward (the dual step of one iteration fused with the primal step of
  the next) and two per iteration in the backward, plus the launches that recompute the states (39 in
  all at n_iter 10).

The image gradient, ``rho_c = i1 - i0`` and the scalars ``(|θ|+ε, λ(|θ|+ε), τ/(|θ|+ε))`` are computed
by torch once per call (cheap, and autograd takes them back to i0, i1, the image stencils and θ, λ,
τ); the n_iter iterations run in the custom op ``vmm::tvl1_iterations`` (see ops/library.py), which
picks the variant at each call (:func:`tvl1_path`): :func:`plane_forward` / :func:`plane_backward` or
:func:`simple_forward` / :func:`simple_backward`.

Memory: the forward keeps only the state ``(u, p)`` (6 maps of ``[B,C,H,W]``) every
``L = ceil(sqrt(n_iter))`` iterations, plus gx, gy, rho_c (both variants write the same checkpoints,
so a forward of one variant can be differentiated by the other). The backward runs the adjoint of each
iteration in reverse. The simple backward recomputes the state before each iteration from its
segment's checkpoint into one work state (about n_iter·(L-1)/2 extra steps) and holds a working set
of about 23 maps (work state, adjoints, gradient accumulators). The fast backward recomputes each
segment once (fewer than n_iter extra steps in all) into a per-block scratch of ``6·(L+1)`` plane maps
(the grid is the blocks that can be resident at once, see :func:`resident_blocks`, so the scratch does
not grow with the batch), keeps the adjoints in registers and writes only the 3 input-gradient maps.
Saved maps: about ``6·n_iter/L + 3``, against ≈ 26·n_iter maps the autograd reference saves.

CUDA tensors launch through CuPy; CPU tensors run the same kernels through the host emulation, which
is how the tests check this path (values and float64 gradcheck) without a GPU.

NaN/Inf follow the reference's policy (``reference.threshold_coefficient``; ``tvl1_coef`` in the
kernels): same values, and NaN at the same places, forward and backward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..backends import check_kernel_device, kernel_variant
from ..kernel_loader import KernelSource, max_active_blocks_per_sm
from ..validation import check_int
from .reference import EPS, image_gradient

TVL1_SOURCE = KernelSource("tvl1.cu", ("tvl1_primal", "tvl1_dual", "tvl1_iter", "tvl1_dual_adj", "tvl1_primal_adj"))
TVL1_PLANE_SOURCE = KernelSource("tvl1_plane.cu", ("tvl1_plane_forward", "tvl1_plane_backward"))

#: The largest (b, c) plane, in pixels, one block of the fast kernels holds, per compute dtype: the
#: kernels' tvl1_plane_limits (kernels/tvl1_plane.cu), which this must match. Larger planes take the
#: simple kernels.
PLANE_MAX_PIXELS = {torch.float32: 1024, torch.float64: 512}
#: Each fast kernel's largest block and the pixels each of its threads owns, per compute dtype
#: (tvl1_plane.cu: TVL1_PLANE_THREADS, TVL1_PLANE_BACKWARD_THREADS, tvl1_plane_limits::FORWARD_ /
#: BACKWARD_PIXELS_PER_THREAD): the backward holds more state per pixel, so its blocks are smaller and
#: leave each thread more registers (128), enough for two float32 pixels. A block is whole warps.
PLANE_MAX_THREADS = {"tvl1_plane_forward": 1024, "tvl1_plane_backward": 512}
PLANE_PIXELS_PER_THREAD = {
    "tvl1_plane_forward": {torch.float32: 1, torch.float64: 1},
    "tvl1_plane_backward": {torch.float32: 2, torch.float64: 1},
}
#: Fast backward grid on CUDA: as many blocks as can be resident at once (CUDA's occupancy calculator on
#: the compiled kernel: its registers, shared memory (sized by the plane) and block size), each walking
#: several planes: the
#: scratch of recomputed states is per block, so blocks that would only wait would only hold memory.
#: Under host emulation the grid is EMULATED_PLANE_BLOCKS, so the tests exercise the block-stride loop
#: over planes.
EMULATED_PLANE_BLOCKS = 2

#: Pixels summed per thread in the adjoint kernels' per-channel reductions (acc holds numel / strip
#: slots): up to MAX_STRIP, but never so many that fewer than MIN_THREADS threads run.
MAX_STRIP = 8
MIN_THREADS = 1 << 18


def strip_length(numel: int) -> int:
    return max(1, min(MAX_STRIP, numel // MIN_THREADS))


ACC_ROWS = 11
# Rows of acc (kernels/tvl1.cu): r, fwd taps (4), theta_e, lt, div taps (4).
_ACC_STENCIL_ROWS = [1, 2, 3, 4, 7, 8, 9, 10]


def segment_length(n_iter: int) -> int:
    """Checkpoint spacing: √n_iter balances the stored checkpoints (n_iter/L states) against the
    backward's recomputation (up to L - 1 steps before each iteration's adjoint)."""
    return max(1, math.ceil(math.sqrt(n_iter)))


class _Launcher:
    """Launch helpers bound to one problem shape ``[B,C,H,W]`` and its compute dtype."""

    def __init__(self, gx: Tensor, gy: Tensor, rho_c: Tensor, params: Tensor, st: Tensor) -> None:
        self.gx, self.gy, self.rho_c, self.params, self.st = gx, gy, rho_c, params, st
        self.dtype = gx.dtype
        self.b, self.c, self.h, self.w = gx.shape
        self.numel = gx.numel()
        self.shape_args = (self.b, self.c, self.h, self.w)
        hw = self.h * self.w
        self.j = -(-hw // strip_length(self.numel))  # strip slots per (b, c) plane
        self.n_slots = self.b * self.c * self.j

    def primal(self, u_in: Tensor, u_out: Tensor, p: Tensor) -> None:
        args = (self.gx, self.gy, self.rho_c, self.params, self.st, u_in, u_out, p, *self.shape_args)
        TVL1_SOURCE.launch("tvl1_primal", args, dtype=self.dtype, numel=self.numel)

    def iterate(self, u_in: Tensor, p_in: Tensor, u_out: Tensor, p_out: Tensor) -> None:
        """(u_k, p_{k-1}) -> (u_{k+1}, p_k) in one launch; outputs must not alias inputs."""
        args = (self.gx, self.gy, self.rho_c, self.params, self.st, u_in, p_in, u_out, p_out, *self.shape_args)
        TVL1_SOURCE.launch("tvl1_iter", args, dtype=self.dtype, numel=self.numel)

    def dual(self, u: Tensor, p_in: Tensor, p_out: Tensor) -> None:
        args = (self.params, self.st, u, p_in, p_out, *self.shape_args)
        TVL1_SOURCE.launch("tvl1_dual", args, dtype=self.dtype, numel=self.numel)

    def dual_adj(self, u: Tensor, p: Tensor, pbar: Tensor, gbar: Tensor, acc: Tensor) -> None:
        args = (
            self.gx,
            self.gy,
            self.rho_c,
            self.params,
            self.st,
            u,
            p,
            pbar,
            gbar,
            acc,
            *self.shape_args,
            self.j,
            self.n_slots,
        )
        TVL1_SOURCE.launch("tvl1_dual_adj", args, dtype=self.dtype, numel=self.n_slots)

    def primal_adj(self, u, p, ubar_in, gbar, has_dual, ubar_out, pbar, ggx, ggy, grho, acc) -> None:
        args = (
            self.gx,
            self.gy,
            self.rho_c,
            self.params,
            self.st,
            u,
            p,
            ubar_in,
            gbar,
            int(has_dual),
            ubar_out,
            pbar,
            ggx,
            ggy,
            grho,
            acc,
            *self.shape_args,
            self.j,
            self.n_slots,
        )
        TVL1_SOURCE.launch("tvl1_primal_adj", args, dtype=self.dtype, numel=self.n_slots)

    def zero_state(self) -> tuple[Tensor, Tensor]:
        b, c, h, w = self.gx.shape
        return self.gx.new_zeros((b, 2 * c, h, w)), self.gx.new_zeros((b, 4 * c, h, w))

    def state_after(
        self,
        k: int,
        start: int,
        checkpoint: tuple[Tensor, Tensor] | None,
        work: tuple[Tensor, Tensor],
        scratch: tuple[Tensor, Tensor],
    ) -> tuple[Tensor, Tensor]:
        """The state ``(u_k, p_k)`` after ``k`` iterations, recomputed from the checkpoint after ``start``
        (None: the zero state at start 0) into ``work``, unless it is the checkpoint itself.

        ``k - start`` steps take ``k - start + 1`` launches: a primal step, fused iterations ping-ponging
        between ``work`` and ``scratch`` (whose contents are destroyed), and a final dual step. The
        ping-pong starts on the buffer that makes the result land in ``work``.
        """
        steps = k - start
        work_u, work_p = work
        scratch_u, scratch_p = scratch
        if steps == 0:
            if checkpoint is not None:
                return checkpoint
            work_u.zero_()
            work_p.zero_()
            return work
        u_bufs = (work_u, scratch_u) if (steps - 1) % 2 == 0 else (scratch_u, work_u)
        u = u_bufs[0]
        if checkpoint is None:
            u.zero_()
            scratch_p.zero_()
            self.primal(u, u, scratch_p)
            p = scratch_p
        else:
            self.primal(checkpoint[0], u, checkpoint[1])
            p = checkpoint[1]
        p_bufs = (work_p, scratch_p)
        for j in range(1, steps):
            u_out, p_out = u_bufs[j % 2], p_bufs[(j - 1) % 2]
            self.iterate(u, p, u_out, p_out)
            u, p = u_out, p_out
        self.dual(u, p, work_p)  # in place when p is already work_p
        return work

    def step(self, u: Tensor, p: Tensor, out: tuple[Tensor, Tensor] | None = None, dual: bool = True) -> None:
        """One forward iteration from (u, p) into ``out`` (default: in place); ``dual=False`` skips the
        dual update, which cannot change the u it returns."""
        u_out, p_out = (u, p) if out is None else out
        self.primal(u, u_out, p)
        if dual:
            self.dual(u_out, p, p_out)


def tvl1_path(dtype: torch.dtype, height: int, width: int) -> str:
    """Which kernels a call on ``[B,C,height,width]`` maps of compute dtype ``dtype`` runs now: "plane" (the
    fast whole-plane kernels: variant "fast" and the plane fits a block) or "simple"."""
    if kernel_variant() == "fast" and 1 <= height * width <= PLANE_MAX_PIXELS.get(dtype, 0):
        return "plane"
    return "simple"


def plane_shared_bytes(kernel: str, pixels: int, dtype: torch.dtype) -> int:
    """Bytes of dynamic shared memory a block of the fast kernel ``kernel`` needs for a plane of ``pixels``
    in compute dtype ``dtype``; tvl1_plane.cu's tvl1_plane_forward_shared_bytes /
    tvl1_plane_backward_shared_bytes, which this must match (a kernel given less writes NaN). Sized by the
    plane so that small planes leave the SM's shared memory to more blocks; the largest planes
    (PLANE_MAX_PIXELS) take 24 KiB (forward) and 40 KiB (backward) in both dtypes, within the 48 KiB a
    block gets without cudaFuncSetAttribute (the backward adds 32 or 64 bytes of static shared memory)."""
    size = torch.finfo(dtype).bits // 8
    if kernel == "tvl1_plane_forward":
        return 6 * pixels * size  # u (2 maps) and p (4 maps)
    # gbar (4 maps) and U (2 maps), at least the per-plane reduction's 32 * ACC_ROWS values, rounded to 4
    # values (16-byte alignment of what follows), then the image terms (4 maps).
    work = -(-max(6 * pixels, 32 * ACC_ROWS) // 4) * 4
    return (work + 4 * pixels) * size


def plane_threads(pixels: int, dtype: torch.dtype, kernel: str = "tvl1_plane_backward") -> int:
    """Threads of a block of the fast kernel ``kernel`` (default: the backward, whose grid
    :func:`plane_blocks` sizes by residency) for a plane of ``pixels`` in compute dtype ``dtype``: whole
    warps, PLANE_PIXELS_PER_THREAD[kernel] pixels each."""
    warps = -(-pixels // (32 * PLANE_PIXELS_PER_THREAD[kernel][dtype]))
    return min(PLANE_MAX_THREADS[kernel], 32 * max(1, warps))


_resident_blocks: dict[tuple[str, torch.dtype, int, int, int], int] = {}


def resident_blocks(
    kernel: str, dtype: torch.dtype, device: torch.device, threads: int, pixels: int | None = None
) -> int:
    """How many blocks of ``threads`` threads of the fast kernel ``kernel`` (compute dtype ``dtype``) on
    planes of ``pixels`` (default: the largest, PLANE_MAX_PIXELS) a CUDA device holds at once: the
    driver's occupancy calculator on the compiled kernel (through CuPy), given the plane's dynamic shared
    memory (:func:`plane_shared_bytes`), times the SMs. Cached per (kernel, dtype, device, threads,
    pixels)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    pixels = PLANE_MAX_PIXELS[dtype] if pixels is None else pixels
    key = (kernel, dtype, index, threads, pixels)
    if key not in _resident_blocks:
        shared = plane_shared_bytes(kernel, pixels, dtype)
        per_sm = max_active_blocks_per_sm(TVL1_PLANE_SOURCE, kernel, dtype, index, threads, shared_bytes=shared)
        sms = torch.cuda.get_device_properties(index).multi_processor_count
        _resident_blocks[key] = max(1, per_sm) * sms
    return _resident_blocks[key]


def plane_blocks(
    device: torch.device,
    planes: int,
    threads: int,
    resident_only: bool,
    dtype: torch.dtype = torch.float32,
    pixels: int | None = None,
) -> int:
    """Grid of a fast kernel over ``planes`` planes with blocks of ``threads``: one block per plane, or
    (``resident_only``: the backward, compute dtype ``dtype``, planes of ``pixels``; default the largest)
    on CUDA at most the blocks that can be resident at once (:func:`resident_blocks`);
    EMULATED_PLANE_BLOCKS under host emulation. At least 1: CUDA refuses a launch with an empty grid (no
    planes: the block's plane loop runs no iteration)."""
    if device.type != "cuda":
        return max(1, min(planes, EMULATED_PLANE_BLOCKS))
    if not resident_only:
        return max(1, min(planes, 2**31 - 1))
    return max(1, min(planes, resident_blocks("tvl1_plane_backward", dtype, device, threads, pixels)))


def plane_forward(
    gx: Tensor, gy: Tensor, rho_c: Tensor, params: Tensor, st: Tensor, n_iter: int, steps: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`tvl1_forward` on the fast kernel (tvl1_plane.cu): one block per plane, all iterations in
    one launch, checkpoints after the iterations ``steps``."""
    b, c, h, w = gx.shape
    u = gx.new_empty((b, 2 * c, h, w))
    ckpt_u = gx.new_empty((len(steps), b, 2 * c, h, w))
    ckpt_p = gx.new_empty((len(steps), b, 4 * c, h, w))
    args = (gx, gy, rho_c, params, st, u, ckpt_u, ckpt_p, b, c, h, w, n_iter, segment_length(n_iter), len(steps))
    threads = plane_threads(h * w, gx.dtype, "tvl1_plane_forward")
    grid = (plane_blocks(gx.device, b * c, threads, resident_only=False), 1, 1)
    shared = plane_shared_bytes("tvl1_plane_forward", h * w, gx.dtype)
    block = (threads, 1, 1)
    TVL1_PLANE_SOURCE.launch("tvl1_plane_forward", args, dtype=gx.dtype, grid=grid, block=block, shared_mem=shared)
    return u, ckpt_u, ckpt_p


def plane_backward(
    grad_u: Tensor,
    gx: Tensor,
    gy: Tensor,
    rho_c: Tensor,
    params: Tensor,
    st: Tensor,
    ckpt_u: Tensor,
    ckpt_p: Tensor,
    n_iter: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`tvl1_backward` on the fast kernel (tvl1_plane.cu): the whole reverse sweep in one launch."""
    b, c, h, w = gx.shape
    seg = segment_length(n_iter)
    threads = plane_threads(h * w, gx.dtype, "tvl1_plane_backward")
    blocks = plane_blocks(gx.device, b * c, threads, resident_only=True, dtype=gx.dtype, pixels=h * w)
    scratch = gx.new_empty((blocks, (seg + 1) * 6 * h * w))  # each block's recomputed segment states
    ggx, ggy, grho = torch.empty_like(gx), torch.empty_like(gx), torch.empty_like(gx)
    acc = gx.new_empty((ACC_ROWS, b * c))  # one sum per plane and row
    grad_u = grad_u.to(gx.dtype).contiguous()
    args = (gx, gy, rho_c, params, st, grad_u, ckpt_u, ckpt_p, scratch, ggx, ggy, grho, acc, b, c, h, w, n_iter, seg)
    shared = plane_shared_bytes("tvl1_plane_backward", h * w, gx.dtype)
    grid, block = (blocks, 1, 1), (threads, 1, 1)
    TVL1_PLANE_SOURCE.launch("tvl1_plane_backward", args, dtype=gx.dtype, grid=grid, block=block, shared_mem=shared)
    return (ggx, ggy, grho, *_parameter_gradients(acc.view(ACC_ROWS, b, c).sum(dim=1), params, st))


def _parameter_gradients(sums: Tensor, params: Tensor, st: Tensor) -> tuple[Tensor, Tensor]:
    """(d params [3], d st [C,8]) from the per-channel sums [11, C] of the acc rows."""
    grad_params = torch.stack([sums[5].sum(), sums[6].sum(), sums[0].sum()]).to(params.dtype)
    grad_st = sums[_ACC_STENCIL_ROWS].t().contiguous().to(st.dtype)
    return grad_params, grad_st


def checkpoint_steps(n_iter: int) -> list[int]:
    """The iterations k after which the forward keeps the state (u_k, p_k) for the backward: every
    :func:`segment_length` iterations, excluding 0 (the zero state) and n_iter (never needed)."""
    seg = segment_length(n_iter)
    return list(range(seg, n_iter, seg))


def tvl1_forward(
    gx: Tensor, gy: Tensor, rho_c: Tensor, params: Tensor, st: Tensor, n_iter: int, keep: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``n_iter`` fused iterations: ``(u [B,2C,H,W], ckpt_u [S,B,2C,H,W], ckpt_p [S,B,4C,H,W])``, the
    checkpoints being the states after the iterations of :func:`checkpoint_steps` (S = 0 unless
    ``keep``). The launches write the checkpoints straight into their slots (no copy); ``u`` never
    aliases them. The kernels: :func:`tvl1_path`."""
    # tvl1_flow validates n_iter; the ops check it too: the simple forward would run one step for n_iter 0
    # where the fast one runs none.
    check_int("n_iter", n_iter, minimum=1)
    steps = checkpoint_steps(n_iter) if keep else []
    if tvl1_path(gx.dtype, gx.shape[2], gx.shape[3]) == "plane":
        return plane_forward(gx, gy, rho_c, params, st, n_iter, steps)
    return simple_forward(gx, gy, rho_c, params, st, n_iter, steps)


def simple_forward(
    gx: Tensor, gy: Tensor, rho_c: Tensor, params: Tensor, st: Tensor, n_iter: int, steps: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`tvl1_forward` on the simple kernels (tvl1.cu): one launch per iteration, checkpoints after
    the iterations ``steps``."""
    run = _Launcher(gx, gy, rho_c, params, st)
    slot = {k: i for i, k in enumerate(steps)}
    ckpt_u = gx.new_empty((len(steps), run.b, 2 * run.c, run.h, run.w))
    ckpt_p = gx.new_empty((len(steps), run.b, 4 * run.c, run.h, run.w))
    # (u, p) = (u_k, p_{k-1}): after the primal step of iteration k, before its dual step.
    u, p = run.zero_state()
    run.primal(u, u, p)  # k = 1 from the zero state (never a checkpoint: the first one is k = L >= 2)
    free_u: list[Tensor] = []
    free_p: list[Tensor] = []
    for k in range(1, n_iter):
        # One launch: the dual step of k and the primal step of k+1. A checkpoint (u_k, p_k) is made of
        # this launch's p output and the previous launch's u output, so those land in its slot directly.
        u_out = ckpt_u[slot[k + 1]] if k + 1 in slot else (free_u.pop() if free_u else torch.empty_like(u))
        p_out = ckpt_p[slot[k]] if k in slot else (free_p.pop() if free_p else torch.empty_like(p))
        run.iterate(u, p, u_out, p_out)
        if k not in slot:  # u is u_k: reusable unless it is a checkpoint's
            free_u.append(u)
        if k - 1 not in slot:  # p is p_{k-1}
            free_p.append(p)
        u, p = u_out, p_out
    return u, ckpt_u, ckpt_p


def tvl1_backward(
    grad_u: Tensor,
    gx: Tensor,
    gy: Tensor,
    rho_c: Tensor,
    params: Tensor,
    st: Tensor,
    ckpt_u: Tensor,
    ckpt_p: Tensor,
    n_iter: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(d gx, d gy, d rho_c, d params, d st) of :func:`tvl1_forward` (run with ``keep``) from d u: the
    adjoint of each iteration in reverse, each state recomputed from its segment's checkpoint. The
    kernels: :func:`tvl1_path`."""
    check_int("n_iter", n_iter, minimum=1)  # as in tvl1_forward
    if tvl1_path(gx.dtype, gx.shape[2], gx.shape[3]) == "plane":
        return plane_backward(grad_u, gx, gy, rho_c, params, st, ckpt_u, ckpt_p, n_iter)
    return simple_backward(grad_u, gx, gy, rho_c, params, st, ckpt_u, ckpt_p, n_iter)


def simple_backward(
    grad_u: Tensor,
    gx: Tensor,
    gy: Tensor,
    rho_c: Tensor,
    params: Tensor,
    st: Tensor,
    ckpt_u: Tensor,
    ckpt_p: Tensor,
    n_iter: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`tvl1_backward` on the simple kernels (tvl1.cu): two launches per iteration, each state
    recomputed from its segment's checkpoint."""
    run = _Launcher(gx, gy, rho_c, params, st)
    seg = segment_length(n_iter)
    checkpoints = {k: (ckpt_u[i], ckpt_p[i]) for i, k in enumerate(checkpoint_steps(n_iter))}
    ubar = grad_u.to(gx.dtype).contiguous().clone()
    # Receives the adjoint of u_{k-1} (it cannot be written over ubar: neighbours read ubar); the two
    # buffers swap roles every iteration.
    spare = torch.empty_like(ubar)
    pbar = gx.new_zeros((run.b, 4 * run.c, run.h, run.w))
    gbar = torch.empty_like(pbar)
    ggx, ggy, grho = torch.zeros_like(gx), torch.zeros_like(gx), torch.zeros_like(gx)
    acc = gx.new_zeros((ACC_ROWS, run.n_slots))
    # One work state: the state before iteration k is recomputed from its segment's checkpoint for
    # every k (at most L - 1 steps), so the backward holds one state rather than a segment of them.
    work = run.zero_state()
    for start in reversed(range(0, n_iter, seg)):
        end = min(start + seg, n_iter)
        checkpoint = checkpoints.get(start)
        for k in range(end, start, -1):
            # spare and gbar are free until dual_adj/primal_adj write them: scratch for the recompute.
            u_old, p_old = run.state_after(k - 1, start, checkpoint, work, (spare, gbar))
            has_dual = k < n_iter
            if has_dual:
                run.dual_adj(u_old, p_old, pbar, gbar, acc)
            run.primal_adj(u_old, p_old, ubar, gbar, has_dual, spare, pbar, ggx, ggy, grho, acc)
            ubar, spare = spare, ubar
    sums = acc.view(ACC_ROWS, run.b, run.c, run.j).sum(dim=(1, 3))  # [11, C]
    return (ggx, ggy, grho, *_parameter_gradients(sums, params, st))


# ------------------------------------------------------------------------- torch.library custom op

# Schemas are given, not inferred: torch 2.4 / 2.5 cannot read them from this module's postponed
# annotations (strings) nor from list[bool] / Tensor | None (tests/test_custom_op_schemas.py).
# One node each for torch.compile / torch.export (docs/architecture.md §3.1; ops/library.py). The
# checkpoints are outputs of the forward op (custom ops keep no hidden state), not differentiable.


@torch.library.custom_op(
    "vmm::tvl1_iterations",
    mutates_args=(),
    schema=(
        "(Tensor gx, Tensor gy, Tensor rho_c, Tensor params, Tensor st, SymInt n_iter, "
        "bool keep) -> (Tensor, Tensor, Tensor)"
    ),
)
def _tvl1_op(
    gx: Tensor, gy: Tensor, rho_c: Tensor, params: Tensor, st: Tensor, n_iter: int, keep: bool
) -> tuple[Tensor, Tensor, Tensor]:
    check_kernel_device("tvl1_iterations", gx)
    return tvl1_forward(gx, gy, rho_c, params, st, n_iter, keep)


@_tvl1_op.register_fake
def _(gx, gy, rho_c, params, st, n_iter, keep):
    b, c, h, w = gx.shape
    n = len(checkpoint_steps(n_iter)) if keep else 0
    return gx.new_empty((b, 2 * c, h, w)), gx.new_empty((n, b, 2 * c, h, w)), gx.new_empty((n, b, 4 * c, h, w))


@torch.library.custom_op(
    "vmm::tvl1_iterations_backward",
    mutates_args=(),
    schema=(
        "(Tensor grad_u, Tensor gx, Tensor gy, Tensor rho_c, Tensor params, Tensor st, Tensor ckpt_u, "
        "Tensor ckpt_p, SymInt n_iter) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
)
def _tvl1_backward_op(
    grad_u: Tensor,
    gx: Tensor,
    gy: Tensor,
    rho_c: Tensor,
    params: Tensor,
    st: Tensor,
    ckpt_u: Tensor,
    ckpt_p: Tensor,
    n_iter: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_kernel_device("tvl1_iterations_backward", gx)
    return tvl1_backward(grad_u, gx, gy, rho_c, params, st, ckpt_u, ckpt_p, n_iter)


@_tvl1_backward_op.register_fake
def _(grad_u, gx, gy, rho_c, params, st, ckpt_u, ckpt_p, n_iter):
    like = (gx, gy, rho_c, params, st)
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in like)


def _tvl1_setup(ctx, inputs, output) -> None:
    gx, gy, rho_c, params, st, n_iter, keep = inputs
    _, ckpt_u, ckpt_p = output
    ctx.mark_non_differentiable(ckpt_u, ckpt_p)
    ctx.save_for_backward(gx, gy, rho_c, params, st, ckpt_u, ckpt_p)
    ctx.n_iter, ctx.keep = n_iter, keep


def _tvl1_grad(ctx, grad_u, _grad_ckpt_u, _grad_ckpt_p):
    if not ctx.keep:
        raise RuntimeError("vmm::tvl1_iterations was run with keep=False: it saved no checkpoints to backward")
    grads = torch.ops.vmm.tvl1_iterations_backward(grad_u, *ctx.saved_tensors, ctx.n_iter)
    return (*grads, None, None)


_tvl1_op.register_autograd(_tvl1_grad, setup_context=_tvl1_setup)


def tvl1_fused(
    i0: Tensor,
    i1: Tensor,
    n_iter: int,
    theta: Tensor | float,
    lam: Tensor | float,
    tau: Tensor | float,
    stencils: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor],
) -> Tensor:
    """Same contract as :func:`.reference.tvl1_reference` (validated inputs in the compute dtype), run by
    the kernels: CuPy for CUDA tensors, host emulation for CPU tensors."""
    sx, sy, fx, fy, dx, dy = stencils
    gx, gy = image_gradient(i1, sx, sy)
    rho_c = i1 - i0
    like = dict(dtype=i0.dtype, device=i0.device)
    theta_e = torch.as_tensor(theta, **like).abs() + EPS
    params = torch.stack([theta_e, torch.as_tensor(lam, **like) * theta_e, torch.as_tensor(tau, **like) / theta_e])
    st = torch.cat([fx, fy, dx, dy], dim=1).contiguous()
    inputs = (gx.contiguous(), gy.contiguous(), rho_c.contiguous(), params, st)
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    return torch.ops.vmm.tvl1_iterations(*inputs, n_iter, keep)[0]
