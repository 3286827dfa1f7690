// The TV-L1 iteration of Representation Flow (docs/repflow.md §1), fused, and its hand-written adjoint.
//
// Layouts (all contiguous, T = the compute type, float or double in practice):
//   gx, gy, rho_c   [B,C,H,W]    image gradient of i1 and i1 - i0 (computed by torch, once per call)
//   u               [B,2C,H,W]   u1 (channels 0..C-1) then u2 (C..2C-1): exactly the op's output
//   p               [B,4C,H,W]   p11, p12, p21, p22 (p_m1 along W, p_m2 along H, for component m)
//   params          [3]          theta_e = |theta| + 1e-12, lt = lambda * theta_e, r = tau / theta_e
//   st              [C,8]        fwd_x (2 taps), fwd_y, div_x, div_y, per channel
//
// An iteration is a primal step (threshold + divergence + u update; it reads p of the left/upper
// neighbour) then a dual step (forward difference + p update; it reads the new u of the
// right/lower neighbour). Each thread owns one pixel of one (b, c) plane and both flow components.
// tvl1_primal and tvl1_dual run one step each (in place is safe); tvl1_iter runs the dual step of
// iteration k and the primal step of k+1 in one launch, recomputing the left/upper neighbours'
// dual updates instead of waiting for them (ping-pong buffers). A run of n iterations is therefore
// tvl1_primal, n - 1 tvl1_iter and, when the state (u_n, p_n) is wanted, tvl1_dual.
//
// The adjoint of one iteration is two launches, in gather form (no atomics), given the
// state (u_{k-1}, p_{k-1}) before the iteration: tvl1_dual_adj recomputes u_k where it needs it,
// writes the adjoint of the forward differences (gbar) and scales pbar; tvl1_primal_adj gathers
// gbar and the divergence's transpose from the neighbours. Gradients of the scalars and stencils
// are sums over (B, H, W) (per channel): each thread walks a strip of K pixels of one plane (pixel
// j, j+J, j+2J, ... so a warp still reads consecutive addresses), sums in registers, and adds its
// sums to its own slot of acc [11, n_slots]; torch reduces acc at the end. Slots are owned by one
// thread and the mapping is the same in every launch, so the result is deterministic.
#include "tvl1_common.cuh"

// Splits a linear index i < B*C*H*W into (plane bc = b*C + c, row h, column w). When every index
// fits in 32 bits (nearly always) the divisions run in 32-bit unsigned arithmetic, several times
// cheaper on the GPU than 64-bit division; the branch is uniform across the grid.
__device__ __forceinline__ void tvl1_split(vmm_i64 i, vmm_i64 HW, vmm_i64 W, bool narrow, vmm_i64& bc, vmm_i64& h,
                                           vmm_i64& w) {
    if (narrow) {
        const unsigned int ui = (unsigned int)i, uhw = (unsigned int)HW, uw = (unsigned int)W;
        const unsigned int ubc = ui / uhw;
        const unsigned int rest = ui - ubc * uhw;
        const unsigned int uh = rest / uw;
        bc = ubc;
        h = uh;
        w = rest - uh * uw;
    } else {
        bc = i / HW;
        const vmm_i64 rest = i - bc * HW;
        h = rest / W;
        w = rest - h * W;
    }
}

__device__ __forceinline__ vmm_i64 tvl1_div(vmm_i64 a, vmm_i64 b, bool narrow) {
    return narrow ? (vmm_i64)((unsigned int)a / (unsigned int)b) : a / b;
}

// The threshold step v(rho(u)) = coef * (g1, g2) at one pixel, both components (gradients of the
// backward follow the branch selected here). i indexes [B,C,H,W]. NaN policy: tvl1_coef.
template <typename T, typename A>
__device__ __forceinline__ void tvl1_threshold(const T* gx, const T* gy, const T* rho_c, A u1, A u2, A lt,
                                               vmm_i64 i, A& v1, A& v2) {
    const A eps = (A)TVL1_EPS;
    const A g1 = vmm_load(gx, i), g2 = vmm_load(gy, i);
    const A grad = g1 * g1 + g2 * g2 + eps;
    const A rho = vmm_load(rho_c, i) + g1 * u1 + g2 * u2;
    const A coef = tvl1_coef(rho, grad, lt);
    v1 = coef * g1;
    v2 = coef * g2;
}

// The primal step at one pixel: u_k = u_{k-1} + v(rho(u_{k-1})) + theta * div(p_{k-1}) for both
// components, from u = u_{k-1} and p = p_{k-1}. i indexes [B,C,H,W]; iu = u1's index in
// [B,2C,H,W] (u2 at iu + CHW); ip = p11's index in [B,4C,H,W] (p12, p21, p22 at +CHW, +2CHW, +3CHW).
template <typename T, typename A>
__device__ __forceinline__ void tvl1_primal_px(const T* gx, const T* gy, const T* rho_c, const T* u, const T* p,
                                               A theta, A lt, const tvl1_taps<A>& k, vmm_i64 i, vmm_i64 iu,
                                               vmm_i64 ip, vmm_i64 CHW, vmm_i64 h, vmm_i64 w, vmm_i64 H, vmm_i64 W,
                                               A& out1, A& out2) {
    const A u1 = vmm_load(u, iu), u2 = vmm_load(u, iu + CHW);
    A v1, v2;
    tvl1_threshold(gx, gy, rho_c, u1, u2, lt, i, v1, v2);
    A div[2];
    for (int m = 0; m < 2; ++m) {
        const vmm_i64 q = ip + 2 * m * CHW;  // p_m1; p_m2 at q + CHW
        // p~ along W: last column is 0, column -1 is 0; along H likewise with rows.
        const A a_left = (w > 0) ? vmm_load(p, q - 1) : (A)0;
        const A a_here = (w < W - 1) ? vmm_load(p, q) : (A)0;
        const A b_up = (h > 0) ? vmm_load(p, q + CHW - W) : (A)0;
        const A b_here = (h < H - 1) ? vmm_load(p, q + CHW) : (A)0;
        div[m] = (k.dx0 * a_left + k.dx1 * a_here) + (k.dy0 * b_up + k.dy1 * b_here);
    }
    out1 = u1 + v1 + theta * div[0];
    out2 = u2 + v2 + theta * div[1];
}

// The dual step at one pixel for one component: (p_m1, p_m2) of iteration k from u = u_k and
// p = p_{k-1}; iu = index of u_m, q = index of p_m1 (p_m2 at q + CHW).
template <typename T, typename A>
__device__ __forceinline__ void tvl1_dual_px(const T* u, const T* p, A r, const tvl1_taps<A>& k, vmm_i64 iu,
                                             vmm_i64 q, vmm_i64 CHW, vmm_i64 h, vmm_i64 w, vmm_i64 H, vmm_i64 W,
                                             A& pa, A& pb) {
    const A z = vmm_load(u, iu);
    const A zx = (w < W - 1) ? k.fx0 * z + k.fx1 * vmm_load(u, iu + 1) : (A)0;
    const A zy = (h < H - 1) ? k.fy0 * z + k.fy1 * vmm_load(u, iu + W) : (A)0;
    const A inv_s = (A)1 / (1 + r * tvl1_sqrt(zx * zx + zy * zy + (A)TVL1_EPS));  // one division, not two
    pa = (vmm_load(p, q) + r * zx) * inv_s;
    pb = (vmm_load(p, q + CHW) + r * zy) * inv_s;
}

// u_out may be u_in (in place: each thread reads and writes only its own pixel of u).
template <typename T>
__global__ void tvl1_primal(const T* __restrict__ gx, const T* __restrict__ gy, const T* __restrict__ rho_c,
                            const T* __restrict__ params, const T* __restrict__ st,
                            const T* u_in, T* u_out, const T* __restrict__ p,
                            vmm_i64 B, vmm_i64 C, vmm_i64 H, vmm_i64 W) {
    typedef typename vmm_acc<T>::type acc_t;
    const vmm_i64 HW = H * W;
    const vmm_i64 CHW = C * HW;
    const acc_t theta = vmm_load(params, 0);
    const acc_t lt = vmm_load(params, 1);
    const bool narrow = B * CHW <= 0xffffffffLL;
    VMM_KERNEL_LOOP(i, B * CHW) {
        vmm_i64 bc, h, w;
        tvl1_split(i, HW, W, narrow, bc, h, w);
        const vmm_i64 b = tvl1_div(bc, C, narrow);
        const tvl1_taps<acc_t> k = tvl1_load_taps(st, bc - b * C);
        const vmm_i64 iu = i + b * CHW;
        acc_t u1, u2;
        tvl1_primal_px(gx, gy, rho_c, u_in, p, theta, lt, k, i, iu, i + 3 * b * CHW, CHW, h, w, H, W, u1, u2);
        vmm_store(u_out + iu, u1);
        vmm_store(u_out + iu + CHW, u2);
    }
}

// p_out may be p_in (in place: each thread reads and writes only its own pixel of p).
template <typename T>
__global__ void tvl1_dual(const T* __restrict__ params, const T* __restrict__ st, const T* __restrict__ u,
                          const T* p_in, T* p_out, vmm_i64 B, vmm_i64 C, vmm_i64 H, vmm_i64 W) {
    typedef typename vmm_acc<T>::type acc_t;
    const vmm_i64 HW = H * W;
    const vmm_i64 CHW = C * HW;
    const acc_t r = vmm_load(params, 2);
    const bool narrow = B * CHW <= 0xffffffffLL;
    VMM_KERNEL_LOOP(i, B * CHW) {
        vmm_i64 bc, h, w;
        tvl1_split(i, HW, W, narrow, bc, h, w);
        const vmm_i64 b = tvl1_div(bc, C, narrow);
        const tvl1_taps<acc_t> k = tvl1_load_taps(st, bc - b * C);
        for (int m = 0; m < 2; ++m) {
            const vmm_i64 q = i + 3 * b * CHW + 2 * m * CHW;
            acc_t pa, pb;
            tvl1_dual_px(u, p_in, r, k, i + b * CHW + m * CHW, q, CHW, h, w, H, W, pa, pb);
            vmm_store(p_out + q, pa);
            vmm_store(p_out + q + CHW, pb);
        }
    }
}

// The dual step of iteration k fused with the primal step of iteration k+1, one launch: from
// (u_in = u_k, p_in = p_{k-1}) to (u_out = u_{k+1}, p_out = p_k). The new divergence needs p_k of
// the left and upper neighbours, so each thread recomputes those two dual updates (cheap arithmetic
// on cached loads) instead of waiting for a second launch. Outputs must not alias inputs.
template <typename T>
__global__ void tvl1_iter(const T* __restrict__ gx, const T* __restrict__ gy, const T* __restrict__ rho_c,
                          const T* __restrict__ params, const T* __restrict__ st, const T* __restrict__ u_in,
                          const T* __restrict__ p_in, T* __restrict__ u_out, T* __restrict__ p_out,
                          vmm_i64 B, vmm_i64 C, vmm_i64 H, vmm_i64 W) {
    typedef typename vmm_acc<T>::type acc_t;
    const vmm_i64 HW = H * W;
    const vmm_i64 CHW = C * HW;
    const acc_t theta = vmm_load(params, 0);
    const acc_t lt = vmm_load(params, 1);
    const acc_t r = vmm_load(params, 2);
    const bool narrow = B * CHW <= 0xffffffffLL;
    VMM_KERNEL_LOOP(i, B * CHW) {
        vmm_i64 bc, h, w;
        tvl1_split(i, HW, W, narrow, bc, h, w);
        const vmm_i64 b = tvl1_div(bc, C, narrow);
        const tvl1_taps<acc_t> k = tvl1_load_taps(st, bc - b * C);
        const vmm_i64 iu = i + b * CHW;
        const acc_t u1 = vmm_load(u_in, iu), u2 = vmm_load(u_in, iu + CHW);
        acc_t v1, v2;
        tvl1_threshold(gx, gy, rho_c, u1, u2, lt, i, v1, v2);
        acc_t div[2];
        for (int m = 0; m < 2; ++m) {
            const vmm_i64 ium = iu + m * CHW;
            const vmm_i64 q = i + 3 * b * CHW + 2 * m * CHW;
            acc_t pa, pb, unused;
            tvl1_dual_px(u_in, p_in, r, k, ium, q, CHW, h, w, H, W, pa, pb);
            vmm_store(p_out + q, pa);
            vmm_store(p_out + q + CHW, pb);
            acc_t a_left = 0, b_up = 0;
            if (w > 0) tvl1_dual_px(u_in, p_in, r, k, ium - 1, q - 1, CHW, h, w - 1, H, W, a_left, unused);
            if (h > 0) tvl1_dual_px(u_in, p_in, r, k, ium - W, q - W, CHW, h - 1, w, H, W, unused, b_up);
            // p~ as in tvl1_primal_px: the last column of p_m1 and the last row of p_m2 read 0.
            const acc_t a_here = (w < W - 1) ? pa : (acc_t)0;
            const acc_t b_here = (h < H - 1) ? pb : (acc_t)0;
            div[m] = (k.dx0 * a_left + k.dx1 * a_here) + (k.dy0 * b_up + k.dy1 * b_here);
        }
        vmm_store(u_out + iu, u1 + v1 + theta * div[0]);
        vmm_store(u_out + iu + CHW, u2 + v2 + theta * div[1]);
    }
}

// Adjoint of tvl1_dual. In: u = u_{k-1}, p = p_{k-1} (the state before iteration k; u_k is
// recomputed here at the pixel and its right and lower neighbours, which saves a launch and a
// stored map), pbar = adjoint of p_k. Out: pbar := adjoint of p_{k-1} through the dual step
// (pbar / s); gbar [B,4C,H,W] = adjoints of (u1x, u1y, u2x, u2y), zero where the difference is
// identically zero; acc rows ACC_R and ACC_FX0..+3 += this strip's sums.
template <typename T>
__global__ void tvl1_dual_adj(const T* __restrict__ gx, const T* __restrict__ gy, const T* __restrict__ rho_c,
                              const T* __restrict__ params, const T* __restrict__ st, const T* __restrict__ u,
                              const T* __restrict__ p, T* __restrict__ pbar, T* __restrict__ gbar,
                              T* __restrict__ acc, vmm_i64 B, vmm_i64 C, vmm_i64 H, vmm_i64 W, vmm_i64 J,
                              vmm_i64 n_slots) {
    typedef typename vmm_acc<T>::type acc_t;
    const vmm_i64 HW = H * W;
    const vmm_i64 CHW = C * HW;
    const acc_t eps = (acc_t)TVL1_EPS;
    const acc_t theta = vmm_load(params, 0);
    const acc_t lt = vmm_load(params, 1);
    const acc_t r = vmm_load(params, 2);
    const bool narrow = B * CHW <= 0xffffffffLL;
    VMM_KERNEL_LOOP(slot, n_slots) {
        const vmm_i64 bc = tvl1_div(slot, J, narrow);
        const vmm_i64 b = tvl1_div(bc, C, narrow);
        const vmm_i64 c = bc - b * C;
        const tvl1_taps<acc_t> k = tvl1_load_taps(st, c);
        const acc_t fx0 = k.fx0, fx1 = k.fx1, fy0 = k.fy0, fy1 = k.fy1;
        acc_t s_r = 0, s_fx0 = 0, s_fx1 = 0, s_fy0 = 0, s_fy1 = 0;
        for (vmm_i64 hw = slot - bc * J; hw < HW; hw += J) {
            const vmm_i64 h = tvl1_div(hw, W, narrow);
            const vmm_i64 w = hw - h * W;
            const vmm_i64 i = bc * HW + hw;
            const vmm_i64 iu0 = i + b * CHW, ip0 = i + 3 * b * CHW;
            const bool has_x = w < W - 1, has_y = h < H - 1;
            // u_k here, right and below (both components), recomputed from (u_{k-1}, p_{k-1}).
            acc_t here[2], right[2] = {0, 0}, down[2] = {0, 0};
            tvl1_primal_px(gx, gy, rho_c, u, p, theta, lt, k, i, iu0, ip0, CHW, h, w, H, W, here[0], here[1]);
            if (has_x)
                tvl1_primal_px(gx, gy, rho_c, u, p, theta, lt, k, i + 1, iu0 + 1, ip0 + 1, CHW, h, w + 1, H, W,
                               right[0], right[1]);
            if (has_y)
                tvl1_primal_px(gx, gy, rho_c, u, p, theta, lt, k, i + W, iu0 + W, ip0 + W, CHW, h + 1, w, H, W,
                               down[0], down[1]);
            for (int m = 0; m < 2; ++m) {
                const vmm_i64 q = ip0 + 2 * m * CHW;
                const acc_t z = here[m];
                const acc_t z_right = right[m];
                const acc_t z_down = down[m];
                const acc_t zx = has_x ? fx0 * z + fx1 * z_right : (acc_t)0;
                const acc_t zy = has_y ? fy0 * z + fy1 * z_down : (acc_t)0;
                const acc_t n = tvl1_sqrt(zx * zx + zy * zy + eps);
                // Reciprocals: two divisions instead of eight.
                const acc_t inv_n = (acc_t)1 / n;
                const acc_t inv_s = (acc_t)1 / (1 + r * n);
                const acc_t pa = (vmm_load(p, q) + r * zx) * inv_s;
                const acc_t pb = (vmm_load(p, q + CHW) + r * zy) * inv_s;
                const acc_t ba = vmm_load(pbar, q), bb = vmm_load(pbar, q + CHW);
                // p_new = (p_old + r z') / s with s = 1 + r n: dp_new/ds = -p_new / s, ds/dz' = r z' / n.
                const acc_t qs = ba * pa + bb * pb;
                const acc_t zxbar = has_x ? (r * ba - qs * r * zx * inv_n) * inv_s : (acc_t)0;
                const acc_t zybar = has_y ? (r * bb - qs * r * zy * inv_n) * inv_s : (acc_t)0;
                s_r += (ba * zx + bb * zy - qs * n) * inv_s;
                s_fx0 += zxbar * z;
                s_fx1 += zxbar * z_right;
                s_fy0 += zybar * z;
                s_fy1 += zybar * z_down;
                vmm_store(pbar + q, ba * inv_s);
                vmm_store(pbar + q + CHW, bb * inv_s);
                vmm_store(gbar + q, zxbar);
                vmm_store(gbar + q + CHW, zybar);
            }
        }
        const acc_t sums[5] = {s_r, s_fx0, s_fx1, s_fy0, s_fy1};
        for (int k = 0; k < 5; ++k) {
            T* a = acc + (ACC_R + k) * n_slots + slot;
            vmm_store(a, vmm_load(a, 0) + sums[k]);
        }
    }
}

// Adjoint of u_k at pixel (h, w) of component m: the adjoint arriving from iteration k+1 plus, when
// the dual step ran, the transpose of the forward differences applied to gbar.
template <typename T>
__device__ __forceinline__ typename vmm_acc<T>::type tvl1_full_ubar(
    const T* ubar_in, const T* gbar, bool has_dual, vmm_i64 iu, vmm_i64 q, vmm_i64 CHW, vmm_i64 h, vmm_i64 w,
    vmm_i64 W, typename vmm_acc<T>::type fx0, typename vmm_acc<T>::type fx1, typename vmm_acc<T>::type fy0,
    typename vmm_acc<T>::type fy1) {
    typedef typename vmm_acc<T>::type acc_t;
    acc_t v = vmm_load(ubar_in, iu);
    if (has_dual) {
        v += fx0 * vmm_load(gbar, q) + fy0 * vmm_load(gbar, q + CHW);
        if (w > 0) v += fx1 * vmm_load(gbar, q - 1);
        if (h > 0) v += fy1 * vmm_load(gbar, q + CHW - W);
    }
    return v;
}

// Adjoint of tvl1_primal. In: u = u_{k-1}, p = p_{k-1}, ubar_in = adjoint of u_k from iteration
// k+1, gbar from tvl1_dual_adj (if has_dual), pbar = adjoint of p_{k-1} through the dual step.
// Out: ubar_out = adjoint of u_{k-1} (a different buffer from ubar_in: neighbours read ubar_in);
// pbar += theta * div^T(ubar_k); ggx, ggy, grho += this iteration's adjoints of gx, gy, rho_c;
// acc rows ACC_THETA, ACC_LT, ACC_DX0..+3 += this strip's sums. Gradients follow the selected
// threshold branch, not the selection.
template <typename T>
__global__ void tvl1_primal_adj(const T* __restrict__ gx, const T* __restrict__ gy, const T* __restrict__ rho_c,
                                const T* __restrict__ params, const T* __restrict__ st, const T* __restrict__ u,
                                const T* __restrict__ p, const T* __restrict__ ubar_in, const T* __restrict__ gbar,
                                vmm_i64 has_dual, T* __restrict__ ubar_out, T* __restrict__ pbar,
                                T* __restrict__ ggx, T* __restrict__ ggy, T* __restrict__ grho, T* __restrict__ acc,
                                vmm_i64 B, vmm_i64 C, vmm_i64 H, vmm_i64 W, vmm_i64 J, vmm_i64 n_slots) {
    typedef typename vmm_acc<T>::type acc_t;
    const vmm_i64 HW = H * W;
    const vmm_i64 CHW = C * HW;
    const acc_t eps = (acc_t)TVL1_EPS;
    const acc_t theta = vmm_load(params, 0);
    const acc_t lt = vmm_load(params, 1);
    const bool dual = has_dual != 0;
    const bool narrow = B * CHW <= 0xffffffffLL;
    VMM_KERNEL_LOOP(slot, n_slots) {
        const vmm_i64 bc = tvl1_div(slot, J, narrow);
        const vmm_i64 b = tvl1_div(bc, C, narrow);
        const vmm_i64 c = bc - b * C;
        const acc_t fx0 = vmm_load(st, c * 8 + 0), fx1 = vmm_load(st, c * 8 + 1);
        const acc_t fy0 = vmm_load(st, c * 8 + 2), fy1 = vmm_load(st, c * 8 + 3);
        const acc_t dx0 = vmm_load(st, c * 8 + 4), dx1 = vmm_load(st, c * 8 + 5);
        const acc_t dy0 = vmm_load(st, c * 8 + 6), dy1 = vmm_load(st, c * 8 + 7);
        acc_t s_theta = 0, s_lt = 0, s_dx0 = 0, s_dx1 = 0, s_dy0 = 0, s_dy1 = 0;
        for (vmm_i64 hw = slot - bc * J; hw < HW; hw += J) {
            const vmm_i64 h = tvl1_div(hw, W, narrow);
            const vmm_i64 w = hw - h * W;
            const vmm_i64 i = bc * HW + hw;
            const bool has_x = w < W - 1, has_y = h < H - 1;
            acc_t U[2];
            for (int m = 0; m < 2; ++m) {
                const vmm_i64 iu = i + b * CHW + m * CHW;
                const vmm_i64 q = i + 3 * b * CHW + 2 * m * CHW;
                U[m] = tvl1_full_ubar(ubar_in, gbar, dual, iu, q, CHW, h, w, W, fx0, fx1, fy0, fy1);
                // The divergence's transpose: p~_m1[h,w] feeds div at (h,w) (tap 1) and (h,w+1) (tap 0).
                const acc_t u_right = has_x ? tvl1_full_ubar(ubar_in, gbar, dual, iu + 1, q + 1, CHW, h, w + 1, W,
                                                             fx0, fx1, fy0, fy1)
                                            : (acc_t)0;
                const acc_t u_down = has_y ? tvl1_full_ubar(ubar_in, gbar, dual, iu + W, q + W, CHW, h + 1, w, W,
                                                            fx0, fx1, fy0, fy1)
                                           : (acc_t)0;
                if (has_x) vmm_store(pbar + q, vmm_load(pbar, q) + theta * (dx0 * u_right + dx1 * U[m]));
                if (has_y) vmm_store(pbar + q + CHW, vmm_load(pbar, q + CHW) + theta * (dy0 * u_down + dy1 * U[m]));
                // The divergence itself, for the gradients of theta_e and the divergence taps.
                const acc_t a_left = (w > 0) ? vmm_load(p, q - 1) : (acc_t)0;
                const acc_t a_here = has_x ? vmm_load(p, q) : (acc_t)0;
                const acc_t b_up = (h > 0) ? vmm_load(p, q + CHW - W) : (acc_t)0;
                const acc_t b_here = has_y ? vmm_load(p, q + CHW) : (acc_t)0;
                s_theta += U[m] * ((dx0 * a_left + dx1 * a_here) + (dy0 * b_up + dy1 * b_here));
                s_dx0 += theta * U[m] * a_left;
                s_dx1 += theta * U[m] * a_here;
                s_dy0 += theta * U[m] * b_up;
                s_dy1 += theta * U[m] * b_here;
            }
            // The threshold step v(rho(u_{k-1})).
            const vmm_i64 iu = i + b * CHW;
            const acc_t g1 = vmm_load(gx, i), g2 = vmm_load(gy, i);
            const acc_t grad = g1 * g1 + g2 * g2 + eps;
            const acc_t u1 = vmm_load(u, iu), u2 = vmm_load(u, iu + CHW);
            const acc_t rho = vmm_load(rho_c, i) + g1 * u1 + g2 * u2;
            // coef as in tvl1_coef; its "+ rho * 0" (NaN policy) adds rhobar += 0 * coefbar in every branch.
            const acc_t coefbar = U[0] * g1 + U[1] * g2;
            const acc_t nan_of_rho = rho * (acc_t)0;
            acc_t coef, rhobar = coefbar * (acc_t)0, gradbar = 0;
            if (rho < -(lt * grad)) {  // coef = lt
                coef = lt + nan_of_rho;
                s_lt += coefbar;
            } else if (rho > lt * grad) {  // coef = -lt
                coef = -lt + nan_of_rho;
                s_lt -= coefbar;
            } else if (grad <= eps) {  // flat image: coef = 0
                coef = (acc_t)0 + nan_of_rho;
            } else {  // coef = -rho / grad (also where rho or grad is NaN)
                const acc_t step = -rho / grad;
                coef = step + nan_of_rho;
                rhobar += -coefbar / grad;
                gradbar = -step * coefbar / grad;  // d step / d grad = rho / grad^2
            }
            const acc_t g1bar = coef * U[0] + 2 * g1 * gradbar + rhobar * u1;
            const acc_t g2bar = coef * U[1] + 2 * g2 * gradbar + rhobar * u2;
            vmm_store(ubar_out + iu, U[0] + rhobar * g1);
            vmm_store(ubar_out + iu + CHW, U[1] + rhobar * g2);
            vmm_store(ggx + i, vmm_load(ggx, i) + g1bar);
            vmm_store(ggy + i, vmm_load(ggy, i) + g2bar);
            vmm_store(grho + i, vmm_load(grho, i) + rhobar);
        }
        const acc_t sums[6] = {s_theta, s_lt, s_dx0, s_dx1, s_dy0, s_dy1};
        for (int k = 0; k < 6; ++k) {
            T* a = acc + (ACC_THETA + k) * n_slots + slot;
            vmm_store(a, vmm_load(a, 0) + sums[k]);
        }
    }
}
