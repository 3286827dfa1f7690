// SIFA's deformable correlation / aggregation (docs/sifa.md §1): forward and backward as four kernels.
// The "simple" kernel variant (ops.backends.kernel_variant), the default on CUDA: verified on a GPU; the
// channels-last sifa_fast.cu (opt-in) is tested against it.
//
// Notation shared by every kernel: maps are contiguous [B, C, H, W]; attention-like tensors A are
// [B, G·K², H, W]; offsets are [B, 2K², H, W] with Δy at channel 2k and Δx at 2k+1 (DCN layout).
// Tap k = kh·K + kw samples channel c of `img` at
//     y = h - pad + kh·dil + Δy[b,k,h,w],   x = w - pad + kw·dil + Δx[b,k,h,w]
// with bilinear interpolation whose corners outside the map count as 0. g(c) = c / (C/G).
//
//   sifa_correlate   out[b,g·K²+k,h,w] = scale · Σ_{c∈g} Q[b,c,h,w] · bilinear(img[b,c], y_k, x_k)
//                    (correlation forward with scale 1/|g|; d attn of the aggregation with scale 1);
//                    partial sums over channel chunks, added up by the caller
//   sifa_aggregate   out[b,c,h,w] = scale · Σ_k A[b,g(c)·K²+k,h,w] · bilinear(img[b,c], y_k, x_k)
//                    (aggregation forward; d query of the correlation with scale 1/|g|)
//   sifa_offset_grad d offset of either op: scale · Σ_c A[b,g(c)·K²+k,h,w] · Q[b,c,h,w] · ∇bilinear
//                    (partial sums over channel chunks, like sifa_correlate); optionally a second
//                    (A2, Q2, scale2) term, so the fused SIFA step's two contributions take one pass
//   sifa_scatter     d img of either op: the transpose of bilinear sampling. Scatters through the four
//                    corners with atomicAdd into an accumulation-type buffer, so on a GPU the summation
//                    order (and the last bits of float gradients) varies from run to run. Optional
//                    second term as sifa_offset_grad (one atomic per corner for both contributions).
//
// Every kernel reads 16-bit storage and accumulates in float (double for double). All batch
// elements run in one launch; threads are laid out with w fastest so loads of Q, A, offsets and the
// outputs are coalesced and the bilinear corners of neighbouring threads are neighbours too.
// NaN / Inf propagate as IEEE arithmetic on these formulas, exactly as in the reference (see sifa_locate).
#include "vmm_common.cuh"

VMM_INLINE float sifa_floor(float v) { return floorf(v); }
VMM_INLINE double sifa_floor(double v) { return floor(v); }

// The four corners of one sample point: flat indices within an [H, W] map (valid only where the
// matching `in` flag is set) and the fractional position inside the cell.
template <typename A>
struct sifa_cell {
    vmm_i64 i00, i01, i10, i11;
    bool in00, in01, in10, in11;
    A ly, lx;
    bool any;  // some corner lies inside the map
};

// Locate (y, x). Points outside [-1, H] × [-1, W] (and NaN / ±Inf) have no corner inside the map; the
// range check also keeps the float -> integer conversion below in range.
// NaN policy (the reference's, i.e. IEEE arithmetic on the bilinear formula, docs/sifa.md §1): a finite
// point off the map samples 0 (four zero corners, finite weights), so a NaN/Inf factor it meets (query,
// attn, incoming gradient) still gives NaN (x · 0); a NaN or ±Inf coordinate has undefined weights
// (Inf - floor(Inf) is NaN), so its sample and its offset derivative are NaN and it scatters nothing.
// `v - v` is 0 for finite v and NaN otherwise (no fast-math in any of the three builds).
template <typename A>
VMM_INLINE sifa_cell<A> sifa_locate(A y, A x, vmm_i64 height, vmm_i64 width) {
    sifa_cell<A> p;
    p.any = (y >= (A)-1) && (y <= (A)height) && (x >= (A)-1) && (x <= (A)width);
    if (!p.any) {
        p.i00 = p.i01 = p.i10 = p.i11 = 0;
        p.in00 = p.in01 = p.in10 = p.in11 = false;
        p.ly = y - y;
        p.lx = x - x;
        return p;
    }
    const A fy = sifa_floor(y);
    const A fx = sifa_floor(x);
    const vmm_i64 y0 = (vmm_i64)fy;
    const vmm_i64 x0 = (vmm_i64)fx;
    p.ly = y - fy;
    p.lx = x - fx;
    const bool y0_in = y0 >= 0 && y0 < height;
    const bool y1_in = y0 + 1 < height;  // y0 >= -1 here
    const bool x0_in = x0 >= 0 && x0 < width;
    const bool x1_in = x0 + 1 < width;
    p.in00 = y0_in && x0_in;
    p.in01 = y0_in && x1_in;
    p.in10 = y1_in && x0_in;
    p.in11 = y1_in && x1_in;
    p.i00 = y0 * width + x0;
    p.i01 = p.i00 + 1;
    p.i10 = p.i00 + width;
    p.i11 = p.i10 + 1;
    p.any = p.in00 || p.in01 || p.in10 || p.in11;
    return p;
}

template <typename T, typename A>
VMM_INLINE void sifa_corners(const T* __restrict__ map, const sifa_cell<A>& p, A& v00, A& v01, A& v10, A& v11) {
    v00 = p.in00 ? (A)vmm_load(map, p.i00) : (A)0;
    v01 = p.in01 ? (A)vmm_load(map, p.i01) : (A)0;
    v10 = p.in10 ? (A)vmm_load(map, p.i10) : (A)0;
    v11 = p.in11 ? (A)vmm_load(map, p.i11) : (A)0;
}

template <typename A>
VMM_INLINE A sifa_blend(const sifa_cell<A>& p, A v00, A v01, A v10, A v11) {
    const A hy = (A)1 - p.ly;
    const A hx = (A)1 - p.lx;
    return hy * (hx * v00 + p.lx * v01) + p.ly * (hx * v10 + p.lx * v11);
}

// Sample point of tap k = kh·K + kw at pixel (h, w) of batch element b. Callers that loop over the taps
// pass kh, kw from nested loops: 64-bit integer division is slow on GPUs.
template <typename T, typename A>
VMM_INLINE sifa_cell<A> sifa_tap(const T* __restrict__ offset, vmm_i64 b, vmm_i64 kh, vmm_i64 kw, vmm_i64 h,
                                 vmm_i64 w, vmm_i64 ksize, vmm_i64 dil, vmm_i64 pad, vmm_i64 height,
                                 vmm_i64 width) {
    const vmm_i64 hw_size = height * width;
    const vmm_i64 kk = ksize * ksize;
    const vmm_i64 base = (b * 2 * kk + 2 * (kh * ksize + kw)) * hw_size + h * width + w;
    const A y = (A)(h - pad + kh * dil) + (A)vmm_load(offset, base);
    const A x = (A)(w - pad + kw * dil) + (A)vmm_load(offset, base + hw_size);
    return sifa_locate<A>(y, x, height, width);
}

// One thread per (chunk s, b, g, k, h, w): the partial sum over channel chunk s of group g (`chunk`
// channels each) goes to out[s, b, g·K²+k, h, w] in the accumulation type; the caller sums over s.
// Splitting the channel sum gives a GPU enough threads when B·G·K²·H·W alone is small (deep layers).
template <typename T>
__global__ void sifa_correlate(const T* __restrict__ q, const T* __restrict__ img, const T* __restrict__ offset,
                               typename vmm_acc<T>::type* __restrict__ out, vmm_i64 batch, vmm_i64 channels,
                               vmm_i64 groups, vmm_i64 height, vmm_i64 width, vmm_i64 ksize, vmm_i64 dil,
                               vmm_i64 chunks, vmm_i64 chunk, double scale) {
    typedef typename vmm_acc<T>::type A;
    const vmm_i64 kk = ksize * ksize;
    const vmm_i64 hw_size = height * width;
    const vmm_i64 per_group = channels / groups;
    const vmm_i64 pad = dil * (ksize - 1) / 2;
    const vmm_i64 n_out = batch * groups * kk * hw_size;
    VMM_KERNEL_LOOP(i, chunks * n_out) {
        const vmm_i64 hw = i % hw_size;
        const vmm_i64 k = (i / hw_size) % kk;
        const vmm_i64 bg = (i % n_out) / (hw_size * kk);
        const vmm_i64 g = bg % groups;
        const vmm_i64 b = bg / groups;
        const vmm_i64 s = i / n_out;
        const vmm_i64 h = hw / width;
        const vmm_i64 w = hw - h * width;
        const vmm_i64 c_begin = g * per_group + s * chunk;
        const vmm_i64 c_group_end = (g + 1) * per_group;
        const vmm_i64 c_end = c_begin + chunk < c_group_end ? c_begin + chunk : c_group_end;
        const vmm_i64 kh = k / ksize;
        const sifa_cell<A> p = sifa_tap<T, A>(offset, b, kh, k - kh * ksize, h, w, ksize, dil, pad, height, width);
        A acc = (A)0;
        // No shortcut for points off the map: q · 0 must stay NaN for a NaN/Inf q (see sifa_locate).
        for (vmm_i64 c = c_begin; c < c_end; ++c) {
            const vmm_i64 base = (b * channels + c) * hw_size;
            A v00, v01, v10, v11;
            sifa_corners<T, A>(img + base, p, v00, v01, v10, v11);
            acc += vmm_load(q, base + hw) * sifa_blend<A>(p, v00, v01, v10, v11);
        }
        out[i] = acc * (A)scale;
    }
}

// One thread per output element (b, c, h, w); loops over the K² taps.
template <typename T>
__global__ void sifa_aggregate(const T* __restrict__ img, const T* __restrict__ attn, const T* __restrict__ offset,
                               T* __restrict__ out, vmm_i64 batch, vmm_i64 channels, vmm_i64 groups,
                               vmm_i64 height, vmm_i64 width, vmm_i64 ksize, vmm_i64 dil, double scale) {
    typedef typename vmm_acc<T>::type A;
    const vmm_i64 kk = ksize * ksize;
    const vmm_i64 hw_size = height * width;
    const vmm_i64 per_group = channels / groups;
    const vmm_i64 pad = dil * (ksize - 1) / 2;
    VMM_KERNEL_LOOP(i, batch * channels * hw_size) {
        const vmm_i64 hw = i % hw_size;
        const vmm_i64 bc = i / hw_size;
        const vmm_i64 c = bc % channels;
        const vmm_i64 b = bc / channels;
        const vmm_i64 h = hw / width;
        const vmm_i64 w = hw - h * width;
        const T* map = img + bc * hw_size;
        const vmm_i64 attn_base = (b * groups + c / per_group) * kk * hw_size + hw;
        A acc = (A)0;
        for (vmm_i64 kh = 0, k = 0; kh < ksize; ++kh) {
            for (vmm_i64 kw = 0; kw < ksize; ++kw, ++k) {
                const sifa_cell<A> p = sifa_tap<T, A>(offset, b, kh, kw, h, w, ksize, dil, pad, height, width);
                // No shortcut off the map: attn · 0 stays NaN for a NaN/Inf attn (see sifa_locate).
                A v00, v01, v10, v11;
                sifa_corners<T, A>(map, p, v00, v01, v10, v11);
                acc += vmm_load(attn, attn_base + k * hw_size) * sifa_blend<A>(p, v00, v01, v10, v11);
            }
        }
        vmm_store(out + i, acc * (A)scale);
    }
}

// One thread per (chunk s, b, k, h, w): the partial sums over channels [s·chunk, (s+1)·chunk) of d/dΔy and
// d/dΔx of tap k go to out[s, b, 2k, h, w] and out[s, b, 2k+1, h, w] (accumulation type; the caller
// sums over s). With `pairs` = 2 the per-channel coefficient is scale·A·Q + scale2·A2·Q2 (the fused
// SIFA step, where both ops sample the same map at the same points); with 1, attn2/q2 are not read.
// Launch bounds: unbounded, ptxas gives this kernel 128 registers (2 blocks of 256 per SM); capped at
// 3 blocks it fits 80 without spills (sm_80/sm_90, every dtype). Launched with the loader's 256 threads.
template <typename T>
__global__ void __launch_bounds__(256, 3) sifa_offset_grad(const T* __restrict__ attn, const T* __restrict__ q, const T* __restrict__ attn2,
                                 const T* __restrict__ q2, const T* __restrict__ img, const T* __restrict__ offset,
                                 typename vmm_acc<T>::type* __restrict__ out, vmm_i64 batch, vmm_i64 channels,
                                 vmm_i64 groups, vmm_i64 height, vmm_i64 width, vmm_i64 ksize, vmm_i64 dil,
                                 vmm_i64 chunks, vmm_i64 chunk, vmm_i64 pairs, double scale, double scale2) {
    typedef typename vmm_acc<T>::type A;
    const vmm_i64 kk = ksize * ksize;
    const vmm_i64 hw_size = height * width;
    const vmm_i64 per_group = channels / groups;
    const vmm_i64 pad = dil * (ksize - 1) / 2;
    const vmm_i64 n_pix = batch * kk * hw_size;
    const bool two = pairs == 2;
    VMM_KERNEL_LOOP(i, chunks * n_pix) {
        const vmm_i64 hw = i % hw_size;
        const vmm_i64 k = (i / hw_size) % kk;
        const vmm_i64 b = (i % n_pix) / (hw_size * kk);
        const vmm_i64 s = i / n_pix;
        const vmm_i64 h = hw / width;
        const vmm_i64 w = hw - h * width;
        const vmm_i64 c_begin = s * chunk;
        const vmm_i64 c_end = c_begin + chunk < channels ? c_begin + chunk : channels;
        const vmm_i64 kh = k / ksize;
        const sifa_cell<A> p = sifa_tap<T, A>(offset, b, kh, k - kh * ksize, h, w, ksize, dil, pad, height, width);
        A gy = (A)0;
        A gx = (A)0;
        const A hy = (A)1 - p.ly;
        const A hx = (A)1 - p.lx;
        // No shortcut off the map: a NaN/Inf coefficient times the zero slope stays NaN (see sifa_locate).
        // Group by group: one division per group met, not per channel.
        for (vmm_i64 c = c_begin; c < c_end;) {
            const vmm_i64 g = c / per_group;
            const vmm_i64 g_end = (g + 1) * per_group < c_end ? (g + 1) * per_group : c_end;
            const vmm_i64 a_index = ((b * groups + g) * kk + k) * hw_size + hw;
            const A a = (A)scale * vmm_load(attn, a_index);
            const A a2 = two ? (A)scale2 * vmm_load(attn2, a_index) : (A)0;
            for (; c < g_end; ++c) {
                const vmm_i64 base = (b * channels + c) * hw_size;
                A coef = a * vmm_load(q, base + hw);
                if (two) coef += a2 * vmm_load(q2, base + hw);
                A v00, v01, v10, v11;
                sifa_corners<T, A>(img + base, p, v00, v01, v10, v11);
                gy += coef * (hx * (v10 - v00) + p.lx * (v11 - v01));
                gx += coef * (hy * (v01 - v00) + p.ly * (v11 - v10));
            }
        }
        const vmm_i64 o = ((s * batch + b) * 2 * kk + 2 * k) * hw_size + hw;
        out[o] = gy;
        out[o + hw_size] = gx;
    }
}

// One thread per source element (b, c, h, w): for each tap adds coef = scale · A[b,g(c)·K²+k,h,w] · Q[b,c,h,w]
// (+ scale2 · A2 · Q2 with `pairs` = 2, as in sifa_offset_grad) times each corner's bilinear weight into
// grad_img (zero-filled by the caller, accumulation type).
// atomicAdd: the order of the additions into one pixel is not deterministic on a GPU.
template <typename T>
__global__ void sifa_scatter(const T* __restrict__ attn, const T* __restrict__ q, const T* __restrict__ attn2,
                             const T* __restrict__ q2, const T* __restrict__ offset,
                             typename vmm_acc<T>::type* __restrict__ grad_img, vmm_i64 batch, vmm_i64 channels,
                             vmm_i64 groups, vmm_i64 height, vmm_i64 width, vmm_i64 ksize, vmm_i64 dil,
                             vmm_i64 pairs, double scale, double scale2) {
    typedef typename vmm_acc<T>::type A;
    const vmm_i64 kk = ksize * ksize;
    const vmm_i64 hw_size = height * width;
    const vmm_i64 per_group = channels / groups;
    const vmm_i64 pad = dil * (ksize - 1) / 2;
    const bool two = pairs == 2;
    VMM_KERNEL_LOOP(i, batch * channels * hw_size) {
        const vmm_i64 hw = i % hw_size;
        const vmm_i64 bc = i / hw_size;
        const vmm_i64 c = bc % channels;
        const vmm_i64 b = bc / channels;
        const vmm_i64 h = hw / width;
        const vmm_i64 w = hw - h * width;
        const A qv = vmm_load(q, i) * (A)scale;
        const A qv2 = two ? vmm_load(q2, i) * (A)scale2 : (A)0;
        A* map = grad_img + bc * hw_size;
        const vmm_i64 attn_base = (b * groups + c / per_group) * kk * hw_size + hw;
        for (vmm_i64 kh = 0, k = 0; kh < ksize; ++kh) {
            for (vmm_i64 kw = 0; kw < ksize; ++kw, ++k) {
                const sifa_cell<A> p = sifa_tap<T, A>(offset, b, kh, kw, h, w, ksize, dil, pad, height, width);
                // No corner on the map (nor for a NaN/Inf point): nothing to scatter, as in grid_sample's backward.
                if (!p.any) continue;
                A coef = qv * vmm_load(attn, attn_base + k * hw_size);
                if (two) coef += qv2 * vmm_load(attn2, attn_base + k * hw_size);
                const A hy = (A)1 - p.ly;
                const A hx = (A)1 - p.lx;
                if (p.in00) atomicAdd(map + p.i00, coef * hy * hx);
                if (p.in01) atomicAdd(map + p.i01, coef * hy * p.lx);
                if (p.in10) atomicAdd(map + p.i10, coef * p.ly * hx);
                if (p.in11) atomicAdd(map + p.i11, coef * p.ly * p.lx);
            }
        }
    }
}
