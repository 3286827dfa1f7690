// The TV-L1 iteration of Representation Flow (docs/repflow.md §1) with one thread block per (b, c)
// plane: the "fast" kernel variant for planes of up to tvl1_plane_limits<A>::MAX_PIXELS pixels (larger
// planes run tvl1.cu, the "simple" variant). Same layouts, arguments and results as tvl1.cu.
//
// Every plane is solved independently (depthwise stencils), so a block can run all n_iter iterations
// of its plane in one launch: the state of the plane lives in registers (thread t owns pixel t, and
// t + blockDim, ... where a thread owns several, so warps touch consecutive addresses) and neighbours
// exchange values through shared memory, two barriers per iteration:
//   primal step (reads p of the left and upper neighbours) -> u to shared -> barrier ->
//   dual step (reads u of the right and lower neighbours)  -> p to shared -> barrier.
// Global memory is touched once per plane: gx, gy, rho_c in, u out, plus the checkpoint states the
// backward needs (written from registers). The threshold divides by the constant |grad i1|^2 + eps:
// its reciprocal is taken once per pixel; the dual step multiplies by 1/s.
//
// tvl1_plane_backward runs the whole reverse sweep of a plane in one block: for each checkpoint
// segment, last first, it recomputes the segment's states once (slot s of a per-block scratch in
// global memory holds the state after start + s iterations; a 28x28 segment does not fit in 48 KiB
// of shared memory), then runs the adjoint iterations in reverse, with the adjoints (ubar, pbar) and
// the gradients of gx, gy, rho_c in registers and two barriers per iteration (gbar, then the full
// ubar, through shared memory). The per-channel parameter and stencil gradient sums are reduced by a
// fixed tree of warp shuffles and shared memory (deterministic, no atomics): one value per plane and
// acc row; torch sums the planes of a channel.
// Blocks walk the planes with a block-stride loop, so the scratch is sized by the grid, not the batch.
#include "tvl1_common.cuh"

// Per compute type: the largest plane (pixels) a block holds and the pixels one thread of each
// kernel owns. Shared memory is dynamic, sized by the plane (tvl1_plane_*_shared_bytes below), so a
// small plane's block leaves the SM's shared memory to other blocks: the largest plane takes 6 maps in
// the forward, 10 in the backward (24 and 40 KiB for both types), under the 48 KiB a block gets without
// cudaFuncSetAttribute. The forward keeps one pixel per thread in
// blocks of up to TVL1_PLANE_THREADS: its state fits the 64 registers such a block allows, and many
// warps per SM hide the barriers' latency. The backward holds about twice the state per pixel
// (adjoints, gradient sums, the recomputed state): blocks of up to TVL1_PLANE_BACKWARD_THREADS leave
// it 128 registers, which hold two float pixels per thread without spilling (one double pixel spills
// a few dozen bytes). ops/repflow/kernels.py mirrors these numbers (PLANE_MAX_PIXELS,
// PLANE_MAX_THREADS, PLANE_PIXELS_PER_THREAD) to choose the kernels and the block.
#define TVL1_PLANE_THREADS 1024
#define TVL1_PLANE_BACKWARD_THREADS 512
template <typename A>
struct tvl1_plane_limits;
template <>
struct tvl1_plane_limits<float> {
    static const int MAX_PIXELS = 1024;
    static const int FORWARD_PIXELS_PER_THREAD = 1;
    static const int BACKWARD_PIXELS_PER_THREAD = 2;
};
template <>
struct tvl1_plane_limits<double> {
    static const int MAX_PIXELS = 512;
    static const int FORWARD_PIXELS_PER_THREAD = 1;
    static const int BACKWARD_PIXELS_PER_THREAD = 1;
};

// Whether a block of nt threads (at most max_threads, ppt pixels each) can hold an H x W plane (the
// launcher guarantees it; a kernel that finds otherwise writes NaN rather than a partial result). nt
// must be whole warps (the reduction).
template <typename A>
__device__ __forceinline__ bool tvl1_plane_fits(vmm_i64 H, vmm_i64 W, int nt, int max_threads, int ppt) {
    return H >= 1 && W >= 1 && H * W <= tvl1_plane_limits<A>::MAX_PIXELS && nt >= 32 && nt <= max_threads &&
           nt % 32 == 0 && (vmm_i64)nt * ppt >= H * W;
}

// Bytes of dynamic shared memory each kernel needs for a plane of hw pixels; the launcher passes these
// (ops/repflow/kernels.py, plane_shared_bytes, mirrors them) and a kernel given less refuses the launch.
// Forward: 6 maps hw values apart (u1, u2, p11, p12, p21, p22; map m of pixel i at m * hw + i, so a
// warp's pixels are consecutive words). Backward: gbar (4 values a pixel) and U (2), at least
// 32 * ACC_ROWS values (the per-plane reduction reuses them) rounded up to 4, then the image terms (4).
template <typename A>
__device__ __forceinline__ vmm_i64 tvl1_plane_forward_shared_bytes(vmm_i64 hw) {
    return 6 * hw * (vmm_i64)sizeof(A);
}
__device__ __forceinline__ vmm_i64 tvl1_plane_backward_work_values(vmm_i64 hw) {
    const vmm_i64 n = 6 * hw > 32 * ACC_ROWS ? 6 * hw : 32 * ACC_ROWS;
    return (n + 3) / 4 * 4;  // the image terms after it stay 16-byte aligned
}
template <typename A>
__device__ __forceinline__ vmm_i64 tvl1_plane_backward_shared_bytes(vmm_i64 hw) {
    return (tvl1_plane_backward_work_values(hw) + 4 * hw) * (vmm_i64)sizeof(A);
}

// The backward keeps a pixel's values in shared memory together (pixel-major: gbar's 4 maps, U's 2, the
// 4 image terms), at constant offsets from one address per pixel: maps hw values apart would each take
// a register for their offset, and the backward's float pixels fit its registers only without them.
// Aligned so that the compiler may move a pixel's values in one vector access.
template <typename A, int N>
struct alignas(N * sizeof(A) < 16 ? N * sizeof(A) : 16) tvl1_shared_vec {
    A v[N];
};
template <typename A>
struct alignas(16) tvl1_plane_image_terms {
    A g1, g2, rc, inv_grad;
};

// One pixel a thread owns: its index in the plane and which neighbours exist.
struct tvl1_pixel {
    int i;
    bool valid, left, right, up, down;
};

__device__ __forceinline__ tvl1_pixel tvl1_make_pixel(int i, int H, int W) {
    tvl1_pixel q;
    q.i = i;
    q.valid = i < H * W;
    const int h = q.valid ? i / W : 0;
    const int w = i - h * W;
    q.left = w > 0;
    q.right = w < W - 1;
    q.up = h > 0;
    q.down = h < H - 1;
    return q;
}

// tvl1_coef with the reciprocal of grad given (grad is constant over the iterations). Same branches
// and NaN policy; -rho * (1/grad) for -rho / grad (a rounding apart).
template <typename A>
__device__ __forceinline__ A tvl1_coef_r(A rho, A grad, A inv_grad, A lt) {
    const A nan_of_rho = rho * (A)0;
    if (rho < -(lt * grad)) return lt + nan_of_rho;
    if (rho > lt * grad) return -lt + nan_of_rho;
    if (grad <= (A)TVL1_EPS) return (A)0 + nan_of_rho;
    return -rho * inv_grad + nan_of_rho;
}

// The divergence of (p_m1, p_m2) at pixel q, given its own values (pa = p_m1, pb = p_m2) and the
// left / upper neighbours' values (read only where they exist): the last column of p_m1 and the last
// row of p_m2 read 0 (p~ of tvl1.cu).
template <typename A>
__device__ __forceinline__ A tvl1_plane_div(const tvl1_taps<A>& k, const tvl1_pixel& q, A a_left, A pa, A b_up,
                                            A pb) {
    const A a_here = q.right ? pa : (A)0;
    const A b_here = q.down ? pb : (A)0;
    return (k.dx0 * (q.left ? a_left : (A)0) + k.dx1 * a_here) + (k.dy0 * (q.up ? b_up : (A)0) + k.dy1 * b_here);
}

// What a pixel's steps need of the images, constant over the iterations: the gradient (g1, g2) of i1,
// rho_c, and grad = |(g1, g2)|^2 + eps with its reciprocal (tvl1_coef_r).
template <typename A>
struct tvl1_plane_image {
    A g1, g2, rc, grad, inv_grad;
};

template <typename A>
__device__ __forceinline__ A tvl1_plane_grad(A g1, A g2) {
    return g1 * g1 + g2 * g2 + (A)TVL1_EPS;
}

template <typename T>
__device__ __forceinline__ tvl1_plane_image<typename vmm_acc<T>::type> tvl1_plane_load_image(
    const T* __restrict__ gx, const T* __restrict__ gy, const T* __restrict__ rho_c, vmm_i64 at) {
    typedef typename vmm_acc<T>::type A;
    tvl1_plane_image<A> im;
    im.g1 = vmm_load(gx, at);
    im.g2 = vmm_load(gy, at);
    im.rc = vmm_load(rho_c, at);
    im.grad = tvl1_plane_grad(im.g1, im.g2);
    im.inv_grad = (A)1 / im.grad;
    return im;
}

// The primal step at a pixel: u_m := u_m + coef(rho(u)) g_m + theta div(p_m1, p_m2), m = 1, 2.
// tvl1_plane_primal_coef gives coef (from u before the step), tvl1_plane_primal_u the new u_m.
template <typename A>
__device__ __forceinline__ A tvl1_plane_primal_coef(const tvl1_plane_image<A>& im, const A (&u)[2], A lt) {
    const A rho = im.rc + im.g1 * u[0] + im.g2 * u[1];
    return tvl1_coef_r(rho, im.grad, im.inv_grad, lt);
}

// The new u_m at pixel q, from the pixel's own p (p11, p12, p21, p22) and p_at(map, i, d) = p[map] at
// pixel i + d (map 0..3), called only for the left and upper neighbours that exist (shared memory in
// the forward, the backward's scratch). One component a call, so that the backward stores each u_m
// as it is made.
template <typename A, typename PAt>
__device__ __forceinline__ A tvl1_plane_primal_u(const tvl1_taps<A>& k, const tvl1_pixel& q, int W,
                                                 const tvl1_plane_image<A>& im, A coef, A theta, int m, A u,
                                                 const A (&p)[4], const PAt& p_at) {
    const A a_left = q.left ? p_at(2 * m, q.i, -1) : (A)0;
    const A b_up = q.up ? p_at(2 * m + 1, q.i, -W) : (A)0;
    const A div = tvl1_plane_div(k, q, a_left, p[2 * m], b_up, p[2 * m + 1]);
    return u + coef * (m == 0 ? im.g1 : im.g2) + theta * div;
}

// The terms of the dual step of one component z = u_m at pixel q: the forward differences zx, zy (0
// where the right / lower neighbour does not exist), n = sqrt(zx^2 + zy^2 + eps), 1 / n (for the
// adjoint; where unused it is not computed) and 1 / s = 1 / (1 + r n). z_right() and z_down() give
// the neighbours' z; each is called only where that neighbour exists. The step itself is
// tvl1_plane_dual_p (tvl1_plane_dual_step); the backward's adjoint of the dual step uses the terms too.
template <typename A>
struct tvl1_plane_dual_terms {
    A zx, zy, n, inv_n, inv_s;
};

template <typename A, typename ZRight, typename ZDown>
__device__ __forceinline__ tvl1_plane_dual_terms<A> tvl1_plane_dual_terms_at(const tvl1_taps<A>& k,
                                                                             const tvl1_pixel& q, A r, A z,
                                                                             const ZRight& z_right,
                                                                             const ZDown& z_down) {
    tvl1_plane_dual_terms<A> d;
    d.zx = q.right ? k.fx0 * z + k.fx1 * z_right() : (A)0;
    d.zy = q.down ? k.fy0 * z + k.fy1 * z_down() : (A)0;
    d.n = tvl1_sqrt(d.zx * d.zx + d.zy * d.zy + (A)TVL1_EPS);
    d.inv_n = (A)1 / d.n;
    d.inv_s = (A)1 / (1 + r * d.n);
    return d;
}

// p_new = (p_old + r z') / s for one p map and its forward difference z' (d.zx or d.zy).
template <typename A>
__device__ __forceinline__ A tvl1_plane_dual_p(A p_old, A r, A diff, A inv_s) {
    return (p_old + r * diff) * inv_s;
}

// The dual step of component m at pixel q: (p_m1, p_m2) := (p_m1 + r zx, p_m2 + r zy) / s, from the
// pixel's own u_m and u_at(m, i, d) = u_m at pixel i + d, called only for the right and lower
// neighbours that exist. One component a call, so that the callers store each component's p as it is
// made.
template <typename A, typename UAt>
__device__ __forceinline__ void tvl1_plane_dual_step(const tvl1_taps<A>& k, const tvl1_pixel& q, int W, A r, int m,
                                                     A z, A (&p)[4], const UAt& u_at) {
    const tvl1_plane_dual_terms<A> d = tvl1_plane_dual_terms_at(
        k, q, r, z, [&] { return u_at(m, q.i, 1); }, [&] { return u_at(m, q.i, W); });
    p[2 * m] = tvl1_plane_dual_p(p[2 * m], r, d.zx, d.inv_s);
    p[2 * m + 1] = tvl1_plane_dual_p(p[2 * m + 1], r, d.zy, d.inv_s);
}

// NaN in every element of `maps` maps of hw pixels at out + base + m * stride (a launch that the block
// cannot hold: see tvl1_plane_fits).
template <typename T, typename A>
__device__ __forceinline__ void tvl1_plane_nan_fill(T* out, vmm_i64 base, vmm_i64 stride, int maps, int hw,
                                                    int t, int nt) {
    const A nan = (A)vmm_bits_to_float(0x7fc00000u);
    for (int m = 0; m < maps; ++m)
        for (int i = t; i < hw; i += nt) vmm_store(out + base + m * stride + i, nan);
}

// n_iter iterations of each (b, c) plane from the zero state. u_out [B,2C,H,W] = u_{n_iter}. The states
// (u_k, p_k) after k = seg, 2 seg, ..., n_ckpt seg (< n_iter) go to ckpt_u [n_ckpt,B,2C,H,W] and
// ckpt_p [n_ckpt,B,4C,H,W] (slot k / seg - 1), as tvl1_forward's launches write them.
template <typename T>
__global__ void __launch_bounds__(TVL1_PLANE_THREADS)
    tvl1_plane_forward(const T* __restrict__ gx, const T* __restrict__ gy, const T* __restrict__ rho_c,
                       const T* __restrict__ params, const T* __restrict__ st, T* __restrict__ u_out,
                       T* __restrict__ ckpt_u, T* __restrict__ ckpt_p, vmm_i64 B, vmm_i64 C, vmm_i64 H,
                       vmm_i64 W, vmm_i64 n_iter, vmm_i64 seg, vmm_i64 n_ckpt) {
    typedef typename vmm_acc<T>::type A;
    typedef tvl1_plane_limits<A> lim;
    const int PPT = lim::FORWARD_PIXELS_PER_THREAD;
    VMM_DYNAMIC_SHARED(sh_bytes);
    const int nt = blockDim.x, t = threadIdx.x;
    const vmm_i64 n_planes = B * C;
    if (!tvl1_plane_fits<A>(H, W, nt, TVL1_PLANE_THREADS, PPT) ||
        (vmm_i64)vmm_dynamic_shared_bytes() < tvl1_plane_forward_shared_bytes<A>(H * W)) {
        for (vmm_i64 bc = blockIdx.x; bc < n_planes; bc += gridDim.x) {
            const vmm_i64 b = bc / C;
            tvl1_plane_nan_fill<T, A>(u_out, (bc + b * C) * H * W, C * H * W, 2, (int)(H * W), t, nt);
        }
        return;
    }
    const int Hi = (int)H, Wi = (int)W, hw = Hi * Wi;
    A* const sh_u = reinterpret_cast<A*>(sh_bytes);  // u1, u2 after the last primal step
    A* const sh_p = sh_u + 2 * hw;                    // p11, p12, p21, p22 after the last dual step
    const vmm_i64 CHW = C * hw;
    const A theta = vmm_load(params, 0), lt = vmm_load(params, 1), r = vmm_load(params, 2);
    for (vmm_i64 bc = blockIdx.x; bc < n_planes; bc += gridDim.x) {
        const vmm_i64 b = bc / C, c = bc - b * C;
        const tvl1_taps<A> k = tvl1_load_taps(st, c);
        const vmm_i64 g_base = bc * hw, u_base = (bc + b * C) * hw, p_base = (bc + 3 * b * C) * hw;
        tvl1_pixel px[PPT];
        tvl1_plane_image<A> im[PPT];
        A u[PPT][2], p[PPT][4];
        __syncthreads();  // the previous plane's last reads of sh_p are done
        #pragma unroll
        for (int j = 0; j < PPT; ++j) {
            px[j] = tvl1_make_pixel(t + j * nt, Hi, Wi);
            if (!px[j].valid) continue;
            const int i = px[j].i;
            im[j] = tvl1_plane_load_image(gx, gy, rho_c, g_base + i);
            u[j][0] = u[j][1] = (A)0;
            #pragma unroll
            for (int q = 0; q < 4; ++q) {
                p[j][q] = (A)0;
                sh_p[q * hw + i] = (A)0;
            }
        }
        __syncthreads();
        // The neighbours' values, as the steps read them (map m at pixel i + d).
        const auto p_at = [=](int m, int i, int d) { return sh_p[m * hw + i + d]; };
        const auto u_at = [=](int m, int i, int d) { return sh_u[m * hw + i + d]; };
        vmm_i64 next_ckpt = seg, slot = 0;  // the next checkpoint iteration and its slot
        for (vmm_i64 it = 1; it <= n_iter; ++it) {
            // Primal step: u_it from (u_{it-1}, p_{it-1}).
            #pragma unroll
            for (int j = 0; j < PPT; ++j) {
                if (!px[j].valid) continue;
                const A coef = tvl1_plane_primal_coef(im[j], u[j], lt);
                #pragma unroll
                for (int m = 0; m < 2; ++m)
                    u[j][m] = tvl1_plane_primal_u(k, px[j], Wi, im[j], coef, theta, m, u[j][m], p[j], p_at);
            }
            if (it == n_iter) break;  // the last dual step cannot change u
            #pragma unroll
            for (int j = 0; j < PPT; ++j) {
                if (!px[j].valid) continue;
                sh_u[px[j].i] = u[j][0];
                sh_u[hw + px[j].i] = u[j][1];
            }
            __syncthreads();
            // Dual step: p_it from (u_it, p_{it-1}). Every read of sh_p (primal step) is done.
            #pragma unroll
            for (int j = 0; j < PPT; ++j) {
                if (!px[j].valid) continue;
                #pragma unroll
                for (int m = 0; m < 2; ++m) {
                    tvl1_plane_dual_step(k, px[j], Wi, r, m, u[j][m], p[j], u_at);
                    sh_p[2 * m * hw + px[j].i] = p[j][2 * m];
                    sh_p[(2 * m + 1) * hw + px[j].i] = p[j][2 * m + 1];
                }
            }
            __syncthreads();
            if (it == next_ckpt && slot < n_ckpt) {
                T* cu = ckpt_u + slot * B * 2 * CHW + u_base;
                T* cp = ckpt_p + slot * B * 4 * CHW + p_base;
                #pragma unroll
                for (int j = 0; j < PPT; ++j) {
                    if (!px[j].valid) continue;
                    #pragma unroll
                    for (int m = 0; m < 2; ++m) vmm_store(cu + m * CHW + px[j].i, u[j][m]);
                    #pragma unroll
                    for (int q = 0; q < 4; ++q) vmm_store(cp + q * CHW + px[j].i, p[j][q]);
                }
            }
            if (it == next_ckpt) {  // a counter, not it % seg: 64-bit division costs as much as a step
                next_ckpt += seg;
                ++slot;
            }
        }
        #pragma unroll
        for (int j = 0; j < PPT; ++j) {
            if (!px[j].valid) continue;
            #pragma unroll
            for (int m = 0; m < 2; ++m) vmm_store(u_out + u_base + m * CHW + px[j].i, u[j][m]);
        }
    }
}

// The adjoint of tvl1_plane_forward (and of tvl1_forward: the same checkpoints). In: grad_u
// [B,2C,H,W] (d u_{n_iter}), the checkpoints (n_iter / seg rounded up, minus one, states). Out: ggx,
// ggy, grho [B,C,H,W] (every element written), acc [11, B*C] (row ACC_*, column b*C + c: this plane's
// sum). scratch: (seg + 1) * 6 * H*W elements per block of the grid.
//
// Registers: a thread holds per pixel the adjoints (ubar, pbar), the gradients of gx, gy, rho_c and,
// while a segment is recomputed, its state; per plane the 11 sums. Everything else a step reads is kept
// out of registers, so that two float pixels fit the 128 registers of a 512-thread block without
// spilling: the image terms and the stencil taps live in shared memory (read where used: the barriers
// keep the compiler from hoisting them back into registers), loop counters are 32-bit, and the scratch
// is pixel-major (slot s, pixel i, map q at (s * H*W + i) * 6 + q), so a pixel's six values and its
// left and right neighbours' lie at constant offsets from one address rather than each taking one; so
// is the shared memory (tvl1_shared_vec), whose size is the plane's.
// (The explicit "1 block per SM" lets ptxas use all the registers the block size allows.)
template <typename T>
__global__ void __launch_bounds__(TVL1_PLANE_BACKWARD_THREADS, 1)
    tvl1_plane_backward(const T* __restrict__ gx, const T* __restrict__ gy, const T* __restrict__ rho_c,
                        const T* __restrict__ params, const T* __restrict__ st, const T* __restrict__ grad_u,
                        const T* __restrict__ ckpt_u, const T* __restrict__ ckpt_p, T* scratch,
                        T* __restrict__ ggx, T* __restrict__ ggy, T* __restrict__ grho, T* __restrict__ acc,
                        vmm_i64 B, vmm_i64 C, vmm_i64 H, vmm_i64 W, vmm_i64 n_iter, vmm_i64 seg) {
    typedef typename vmm_acc<T>::type A;
    typedef tvl1_plane_limits<A> lim;
    const int PPT = lim::BACKWARD_PIXELS_PER_THREAD;
    VMM_DYNAMIC_SHARED(sh_bytes);
    __shared__ tvl1_taps<A> sh_k;  // the plane's stencil taps
    const int nt = blockDim.x, t = threadIdx.x;
    const vmm_i64 n_planes = B * C;
    // 32-bit iteration counts (and scratch offsets: (seg + 1) * 6 * H*W stays far below 2^31).
    if (!tvl1_plane_fits<A>(H, W, nt, TVL1_PLANE_BACKWARD_THREADS, PPT) || n_iter > 0x7fffffff ||
        (vmm_i64)vmm_dynamic_shared_bytes() < tvl1_plane_backward_shared_bytes<A>(H * W)) {
        for (vmm_i64 bc = blockIdx.x; bc < n_planes; bc += gridDim.x) {
            const int hw = (int)(H * W);
            tvl1_plane_nan_fill<T, A>(ggx, bc * H * W, 0, 1, hw, t, nt);
            tvl1_plane_nan_fill<T, A>(ggy, bc * H * W, 0, 1, hw, t, nt);
            tvl1_plane_nan_fill<T, A>(grho, bc * H * W, 0, 1, hw, t, nt);
            if (t < ACC_ROWS) vmm_store(acc + t * n_planes + bc, (A)vmm_bits_to_float(0x7fc00000u));
        }
        return;
    }
    const int Hi = (int)H, Wi = (int)W, hw = Hi * Wi;
    A* const sh = reinterpret_cast<A*>(sh_bytes);
    // gbar: adjoints of u1x, u1y, u2x, u2y (zero where the difference is), and the full adjoint of u_k,
    // both components.
    tvl1_shared_vec<A, 4>* const sh_g = reinterpret_cast<tvl1_shared_vec<A, 4>*>(sh);
    tvl1_shared_vec<A, 2>* const sh_U = reinterpret_cast<tvl1_shared_vec<A, 2>*>(sh + 4 * hw);
    // The plane's g1, g2, rho_c and 1 / grad (tvl1_plane_image).
    tvl1_plane_image_terms<A>* const sh_im =
        reinterpret_cast<tvl1_plane_image_terms<A>*>(sh + tvl1_plane_backward_work_values(hw));
    const int n_it = (int)n_iter, sg = (int)seg;
    const vmm_i64 CHW = C * hw;
    const A eps = (A)TVL1_EPS;
    const A theta = vmm_load(params, 0), lt = vmm_load(params, 1), r = vmm_load(params, 2);
    // Slot s of this block's scratch: u1, u2, p11, p12, p21, p22 of the state after start + s iterations.
    T* sc = scratch + (vmm_i64)blockIdx.x * (seg + 1) * 6 * hw;
    const int n_seg = (n_it + sg - 1) / sg;
    // A pixel's image terms, as tvl1_plane_load_image made them.
    const auto image_at = [&](int i) {
        const tvl1_plane_image_terms<A> e = sh_im[i];
        tvl1_plane_image<A> g;
        g.g1 = e.g1;
        g.g2 = e.g2;
        g.rc = e.rc;
        g.grad = tvl1_plane_grad(g.g1, g.g2);
        g.inv_grad = e.inv_grad;
        return g;
    };
    for (vmm_i64 bc = blockIdx.x; bc < n_planes; bc += gridDim.x) {
        const vmm_i64 b = bc / C, c = bc - b * C;
        // sh_k and sh_im are free: the previous plane's last reads come before its reduction's barriers.
        if (t == 0) sh_k = tvl1_load_taps(st, c);
        const tvl1_taps<A>& k = sh_k;  // read after the first segment's barrier
        const vmm_i64 g_base = bc * hw, u_base = (bc + b * C) * hw, p_base = (bc + 3 * b * C) * hw;
        tvl1_pixel px[PPT];
        A ubar[2][PPT], pbar[4][PPT], U[2][PPT], g1bar[PPT], g2bar[PPT], rhobar_sum[PPT];
        A u[PPT][2], p[PPT][4];  // the state being recomputed (own pixels)
        A sum[ACC_ROWS];
        #pragma unroll
        for (int a = 0; a < ACC_ROWS; ++a) sum[a] = (A)0;
        #pragma unroll
        for (int j = 0; j < PPT; ++j) {
            px[j] = tvl1_make_pixel(t + j * nt, Hi, Wi);
            if (!px[j].valid) continue;
            const int i = px[j].i;
            const tvl1_plane_image<A> g = tvl1_plane_load_image(gx, gy, rho_c, g_base + i);
            tvl1_plane_image_terms<A> e;
            e.g1 = g.g1;
            e.g2 = g.g2;
            e.rc = g.rc;
            e.inv_grad = g.inv_grad;
            sh_im[i] = e;
            #pragma unroll
            for (int m = 0; m < 2; ++m) ubar[m][j] = vmm_load(grad_u, u_base + m * CHW + i);
            #pragma unroll
            for (int q = 0; q < 4; ++q) pbar[q][j] = (A)0;
            g1bar[j] = g2bar[j] = rhobar_sum[j] = (A)0;
        }
        for (int si = n_seg - 1; si >= 0; --si) {
            const int start = si * sg;
            const int len = (n_it - start < sg ? n_it - start : sg);
            // Slot 0: the segment's checkpoint (the zero state for the first segment), copied by the whole
            // block, then each thread's own pixels read back after the barrier.
            __syncthreads();  // the previous segment's (or plane's) reads of the scratch are done
            for (int q = 0; q < 6; ++q) {
                for (int e = t; e < hw; e += nt) {
                    A v = (A)0;
                    if (si > 0) {
                        const vmm_i64 slot = si - 1;
                        v = q < 2 ? vmm_load(ckpt_u, slot * B * 2 * CHW + u_base + q * CHW + e)
                                  : vmm_load(ckpt_p, slot * B * 4 * CHW + p_base + (q - 2) * CHW + e);
                    }
                    vmm_store(sc + e * 6 + q, v);
                }
            }
            __syncthreads();
            #pragma unroll
            for (int j = 0; j < PPT; ++j) {
                if (!px[j].valid) continue;
                #pragma unroll
                for (int m = 0; m < 2; ++m) u[j][m] = vmm_load(sc, px[j].i * 6 + m);
                #pragma unroll
                for (int q = 0; q < 4; ++q) p[j][q] = vmm_load(sc, px[j].i * 6 + 2 + q);
            }
            // Slots 1 .. len - 1 (states), and slot len's u when the adjoint of iteration start + len has
            // a dual step (start + len < n_iter): each state computed once, from the one before it.
            const int primal_steps = start + len < n_it ? len : len - 1;
            for (int s = 1; s <= primal_steps; ++s) {
                T* prev = sc + (s - 1) * 6 * hw;
                T* cur = sc + s * 6 * hw;
                // The neighbours' values, as the steps read them (map m at pixel i + d).
                const auto p_at = [&](int m, int i, int d) -> A { return vmm_load(prev, (i + d) * 6 + 2 + m); };
                const auto u_at = [&](int m, int i, int d) -> A { return vmm_load(cur, (i + d) * 6 + m); };
                #pragma unroll
                for (int j = 0; j < PPT; ++j) {
                    if (!px[j].valid) continue;
                    const tvl1_plane_image<A> g = image_at(px[j].i);
                    const A coef = tvl1_plane_primal_coef(g, u[j], lt);
                    #pragma unroll
                    for (int m = 0; m < 2; ++m) {
                        u[j][m] = tvl1_plane_primal_u(k, px[j], Wi, g, coef, theta, m, u[j][m], p[j], p_at);
                        vmm_store(cur + px[j].i * 6 + m, u[j][m]);
                    }
                }
                __syncthreads();
                if (s == len) break;  // only u of slot len is needed
                #pragma unroll
                for (int j = 0; j < PPT; ++j) {
                    if (!px[j].valid) continue;
                    #pragma unroll
                    for (int m = 0; m < 2; ++m) {
                        tvl1_plane_dual_step(k, px[j], Wi, r, m, u[j][m], p[j], u_at);
                        vmm_store(cur + px[j].i * 6 + 2 + 2 * m, p[j][2 * m]);
                        vmm_store(cur + px[j].i * 6 + 3 + 2 * m, p[j][2 * m + 1]);
                    }
                }
                __syncthreads();
            }
            // The adjoint of iterations start + len, ..., start + 1: iteration start + s runs from the
            // state of slot s - 1; its dual step (when it has one) produced u_k of slot s.
            for (int s = len; s >= 1; --s) {
                const T* prev = sc + (s - 1) * 6 * hw;
                const T* cur = sc + s * 6 * hw;
                const bool has_dual = start + s < n_it;
                if (has_dual) {
                    // Adjoint of the dual step: pbar := pbar / s, gbar to shared, sums of r and fwd taps.
                    #pragma unroll
                    for (int j = 0; j < PPT; ++j) {
                        if (!px[j].valid) continue;
                        const int i = px[j].i;
                        tvl1_shared_vec<A, 4> gbar;  // this pixel's, stored whole
                        #pragma unroll
                        for (int m = 0; m < 2; ++m) {
                            const A z = vmm_load(cur, i * 6 + m);
                            const A z_right = px[j].right ? vmm_load(cur, (i + 1) * 6 + m) : (A)0;
                            const A z_down = px[j].down ? vmm_load(cur, (i + Wi) * 6 + m) : (A)0;
                            const tvl1_plane_dual_terms<A> d = tvl1_plane_dual_terms_at(
                                k, px[j], r, z, [&] { return z_right; }, [&] { return z_down; });
                            const A zx = d.zx, zy = d.zy, n = d.n, inv_n = d.inv_n, inv_s = d.inv_s;
                            const A pa = tvl1_plane_dual_p(vmm_load(prev, i * 6 + 2 + 2 * m), r, zx, inv_s);
                            const A pb = tvl1_plane_dual_p(vmm_load(prev, i * 6 + 3 + 2 * m), r, zy, inv_s);
                            const A ba = pbar[2 * m][j], bb = pbar[2 * m + 1][j];
                            // p_new = (p_old + r z') / s, s = 1 + r n: dp_new/ds = -p_new / s, ds/dz' = r z' / n.
                            const A qs = ba * pa + bb * pb;
                            const A zxbar = px[j].right ? (r * ba - qs * r * zx * inv_n) * inv_s : (A)0;
                            const A zybar = px[j].down ? (r * bb - qs * r * zy * inv_n) * inv_s : (A)0;
                            sum[ACC_R] += (ba * zx + bb * zy - qs * n) * inv_s;
                            sum[ACC_FX0] += zxbar * z;
                            sum[ACC_FX0 + 1] += zxbar * z_right;
                            sum[ACC_FX0 + 2] += zybar * z;
                            sum[ACC_FX0 + 3] += zybar * z_down;
                            pbar[2 * m][j] = ba * inv_s;
                            pbar[2 * m + 1][j] = bb * inv_s;
                            gbar.v[2 * m] = zxbar;
                            gbar.v[2 * m + 1] = zybar;
                        }
                        sh_g[i] = gbar;
                    }
                    __syncthreads();
                }
                // The full adjoint of u_k: from iteration k + 1, plus the transpose of the forward
                // differences applied to gbar (reads the left and upper neighbours' gbar).
                #pragma unroll
                for (int j = 0; j < PPT; ++j) {
                    if (!px[j].valid) continue;
                    const int i = px[j].i;
                    tvl1_shared_vec<A, 2> u_here;
                    #pragma unroll
                    for (int m = 0; m < 2; ++m) {
                        A v = ubar[m][j];
                        if (has_dual) {
                            v += k.fx0 * sh_g[i].v[2 * m] + k.fy0 * sh_g[i].v[2 * m + 1];
                            if (px[j].left) v += k.fx1 * sh_g[i - 1].v[2 * m];
                            if (px[j].up) v += k.fy1 * sh_g[i - Wi].v[2 * m + 1];
                        }
                        U[m][j] = v;
                        u_here.v[m] = v;
                    }
                    sh_U[i] = u_here;
                }
                __syncthreads();
                // Adjoint of the primal step from the state of slot s - 1.
                #pragma unroll
                for (int j = 0; j < PPT; ++j) {
                    if (!px[j].valid) continue;
                    const int i = px[j].i;
                    const tvl1_pixel& q = px[j];
                    tvl1_shared_vec<A, 2> U_right, U_down;
                    if (q.right) U_right = sh_U[i + 1];
                    if (q.down) U_down = sh_U[i + Wi];
                    #pragma unroll
                    for (int m = 0; m < 2; ++m) {
                        // The divergence's transpose: p~_m1[h,w] feeds div at (h,w) (tap 1) and (h,w+1) (tap 0).
                        const A u_right = q.right ? U_right.v[m] : (A)0;
                        const A u_down = q.down ? U_down.v[m] : (A)0;
                        if (q.right) pbar[2 * m][j] += theta * (k.dx0 * u_right + k.dx1 * U[m][j]);
                        if (q.down) pbar[2 * m + 1][j] += theta * (k.dy0 * u_down + k.dy1 * U[m][j]);
                        // The divergence itself, for the gradients of theta_e and the divergence taps.
                        const A a_left = q.left ? vmm_load(prev, (i - 1) * 6 + 2 + 2 * m) : (A)0;
                        const A a_here = q.right ? vmm_load(prev, i * 6 + 2 + 2 * m) : (A)0;
                        const A b_up = q.up ? vmm_load(prev, (i - Wi) * 6 + 3 + 2 * m) : (A)0;
                        const A b_here = q.down ? vmm_load(prev, i * 6 + 3 + 2 * m) : (A)0;
                        const A Um = U[m][j];
                        sum[ACC_THETA] += Um * ((k.dx0 * a_left + k.dx1 * a_here) + (k.dy0 * b_up + k.dy1 * b_here));
                        sum[ACC_DX0] += theta * Um * a_left;
                        sum[ACC_DX0 + 1] += theta * Um * a_here;
                        sum[ACC_DX0 + 2] += theta * Um * b_up;
                        sum[ACC_DX0 + 3] += theta * Um * b_here;
                    }
                    // The threshold step v(rho(u_{k-1})); coef as in tvl1_coef_r, whose "+ rho * 0" (NaN
                    // policy) adds rhobar += 0 * coefbar in every branch.
                    const A u1 = vmm_load(prev, i * 6), u2 = vmm_load(prev, i * 6 + 1);
                    const tvl1_plane_image<A> g = image_at(i);
                    const A rho = g.rc + g.g1 * u1 + g.g2 * u2;
                    const A coefbar = U[0][j] * g.g1 + U[1][j] * g.g2;
                    const A nan_of_rho = rho * (A)0;
                    A coef, rhobar = coefbar * (A)0, gradbar = 0;
                    if (rho < -(lt * g.grad)) {  // coef = lt
                        coef = lt + nan_of_rho;
                        sum[ACC_LT] += coefbar;
                    } else if (rho > lt * g.grad) {  // coef = -lt
                        coef = -lt + nan_of_rho;
                        sum[ACC_LT] -= coefbar;
                    } else if (g.grad <= eps) {  // flat image: coef = 0
                        coef = (A)0 + nan_of_rho;
                    } else {  // coef = -rho / grad (also where rho or grad is NaN)
                        const A step = -rho * g.inv_grad;
                        coef = step + nan_of_rho;
                        rhobar += -coefbar * g.inv_grad;
                        gradbar = -step * coefbar * g.inv_grad;  // d step / d grad = rho / grad^2
                    }
                    g1bar[j] += coef * U[0][j] + 2 * g.g1 * gradbar + rhobar * u1;
                    g2bar[j] += coef * U[1][j] + 2 * g.g2 * gradbar + rhobar * u2;
                    rhobar_sum[j] += rhobar;
                    ubar[0][j] = U[0][j] + rhobar * g.g1;
                    ubar[1][j] = U[1][j] + rhobar * g.g2;
                }
                // No barrier here: the next writes to sh_g come after every read of sh_g (before the
                // barrier above), and the next writes to sh_U after the next iteration's first barrier.
            }
        }
        #pragma unroll
        for (int j = 0; j < PPT; ++j) {
            if (!px[j].valid) continue;
            vmm_store(ggx + g_base + px[j].i, g1bar[j]);
            vmm_store(ggy + g_base + px[j].i, g2bar[j]);
            vmm_store(grho + g_base + px[j].i, rhobar_sum[j]);
        }
        // The plane's sums: a fixed tree (deterministic): within each warp by shuffles, then the warps'
        // sums (at most 32) by warp 0.
        const int lane = t % 32, warp = t / 32;
        // The warps' sums go to sh[0, 32 * ACC_ROWS), over the gbar and U maps (past them on a small plane:
        // the region holds at least that, never reaching sh_im), whose last reads come before this
        // barrier; it also orders them after the previous plane's reads by warp 0 when a plane runs no
        // adjoint iteration.
        __syncthreads();
        #pragma unroll
        for (int a = 0; a < ACC_ROWS; ++a) {
            A v = sum[a];
            for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
            if (lane == 0) sh[a * 32 + warp] = v;
        }
        // Not optional: without it warp 0 can read slots other warps have not written yet. Only the
        // emulation's "warps" order shows it (the lockstep orders advance the warps together through the
        // shuffles above, so every warp's sums are written before warp 0 reads them).
        __syncthreads();
        if (warp == 0) {
            #pragma unroll
            for (int a = 0; a < ACC_ROWS; ++a) {
                A v = lane < nt / 32 ? sh[a * 32 + lane] : (A)0;
                for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
                if (lane == 0) vmm_store(acc + a * n_planes + bc, v);
            }
        }
    }
}
