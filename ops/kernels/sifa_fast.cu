// SIFA's deformable correlation / aggregation (docs/sifa.md §1), the "fast" kernels: the same ops and
// gradients as sifa.cu (the "simple" kernels, GPU-verified, which these are tested against), laid out for
// memory bandwidth.
//
// Layout: channels-last. Maps are [B,H,W,C] in memory (torch.channels_last of the logical [B,C,H,W]),
// attention-like tensors [B,H,W,G·K²] (channel g·K²+k), offsets [B,H,W,2K²] (Δy of tap k at 2k, Δx at
// 2k+1). A sampling point p = (b·H + h)·W + w owns C contiguous channels, so its query, output and each
// bilinear corner of the sampled map are one contiguous run: coalesced, vector loads.
//
// Mapping: a lane group of `lanes` threads (a power of two ≤ 32, inside one warp) per point, grid-stride
// over points. Group g's channels are taken in steps of lanes·V: lane l holds channels
// g·C_g + s·lanes·V + l·V + [0, V), V = 16 bytes of storage (float4, double2, 8 halves) when every map
// pointer is 16-byte aligned and V divides C_g, else 1 (same code, scalar loads). The sampling geometry
// of a tap (offset pair, floor, weights, in-map flags) is computed once per (point, tap, group) by each
// lane, not per channel. Group sums (the correlation's Σ_{c∈g}) and the offset gradient's Σ_c are
// butterfly shuffles inside the lane group (every lane ends with the same, bitwise identical sum), no
// partial-sum buffers. Each kernel comes in four builds (see SIFA_FAST_FORWARD_KERNEL): vector or
// scalar loads, 32-bit indices (when the caller found that every index fits) or 64-bit ones.
//
//   sifa_fast_forward_* per point and group: (CORR) attn[g·K²+k] = scale_corr · Σ_{c∈g} q[c] · S_k(kv)[c],
//                       then (AGG) out[c] = scale_agg · Σ_k attn[g·K²+k] · S_k(kv)[c] with attn in storage
//                       precision, as the two simple kernels run in turn would: in one pass over the taps
//                       when the group's channels fit in SIFA_FAST_MAX_STEPS steps (the samples kept in
//                       registers), else in a second pass that reads back the attn lane 0 wrote (after
//                       __syncwarp). CORR alone is deform_correlation (and the aggregation's d attn), AGG
//                       alone deform_aggregation (and the correlation's d query, scale 1/C_g).
//   sifa_fast_backward_* per point and group, one kernel for the three backward ops. Phase A (HAS_OUT):
//                       Ā[g·K²+k] = Σ_{c∈g} Ō[c] · S_k(kv)[c] (+ the incoming d attn), written to `abar`
//                       (accumulation type) by lane 0 and read back after __syncwarp; when the group's
//                       channels fit in SIFA_FAST_MAX_STEPS steps, tap k's Ā is reduced just before its phase-B
//                       work instead (kept in registers, written only when NEED_ABAR asks for d attn).
//                       Phase B, one pass over kv's corners per (tap, channel step):
//                       d q[c] = scale · Σ_k Ā · S_k(kv)[c]; coef = scale · Ā · q[c] + attn · Ō[c] (the
//                       correlation's and the aggregation's terms, whichever are present); d kv gets coef
//                       times each corner's weight by atomicAdd (accumulation-type buffer; one atomic
//                       instruction of a lane group hits addresses V elements apart, lane l's channel
//                       l·V + v, so a corner's lanes·V channels take V instructions each spread over all
//                       of them: unmeasured against sm_90's vector atomicAdd; the order of the additions
//                       into one element varies between GPU runs); d offset = Σ_c coef · ∇bilinear,
//                       reduced in the lane group and added by lane 0 in a fixed order (deterministic).
//
// Registers: out / d q accumulators of SIFA_FAST_MAX_STEPS channel steps live in registers across the taps;
// a group with more steps is taken in several passes over the taps (geometry recomputed per pass). Two
// steps: 32 lanes hold groups of up to 256 float / 512 half channels. (16 channels per lane instead gave
// ptxas 128-234 registers, sm_90; unmeasured either way.)
// NaN / Inf: exactly as sifa.cu's sifa_locate (IEEE arithmetic on the bilinear formula, no shortcut for
// points off the map except the scatter, which sends nothing from a point with no corner on the map).
#include "vmm_common.cuh"

#define SIFA_FAST_MAX_STEPS 2
#define SIFA_FAST_CORR 1
#define SIFA_FAST_AGG 2
// sifa_fast_backward's flags
#define SIFA_FAST_HAS_Q 1       // the correlation's term: q and Ā (from grad_attn or phase A)
#define SIFA_FAST_HAS_OUT 2     // the aggregation's term: Ō = grad_out and the forward attn
#define SIFA_FAST_HAS_GATTN 4   // an incoming d attn (grad_attn)
#define SIFA_FAST_NEED_Q 8      // write grad_q
#define SIFA_FAST_NEED_KV 16    // scatter into grad_kv
#define SIFA_FAST_NEED_OFF 32   // write grad_offset
#define SIFA_FAST_NEED_ABAR 64  // write abar as an output (d attn of the aggregation); else it may be scratch

VMM_INLINE float sifa_fast_floor(float v) { return floorf(v); }
VMM_INLINE double sifa_fast_floor(double v) { return floor(v); }

// 16 bytes of storage: the vector a lane loads or stores in one instruction.
template <typename T>
struct alignas(16) sifa_pack {
    T v[16 / sizeof(T)];
};

template <typename T>
VMM_INLINE const sifa_pack<T>* sifa_as_pack(const T* p) {
#ifdef VMM_HOST_EMULATION
    // A misaligned vector access faults on a GPU; emulation would not notice by itself.
    VMM_EMU_CHECK(((unsigned long long)(const void*)p & 15ull) == 0, "16-byte vector access at a misaligned address");
#endif
    return reinterpret_cast<const sifa_pack<T>*>(p);
}

// Channels [i, i+V) of `p` as the accumulation type: one 16-byte load when V fills a pack, else V scalars
// (the modulo only keeps the dead branch's index in range when V is 1).
template <int V, typename T, typename A, typename I>
VMM_INLINE void sifa_load(const T* __restrict__ p, I i, A (&out)[V]) {
    if (V * sizeof(T) == 16) {
        const sifa_pack<T> pk = *sifa_as_pack(p + i);
#pragma unroll
        for (int v = 0; v < V; ++v) out[v] = (A)vmm_to_float(pk.v[v % (16 / sizeof(T))]);
    } else {
#pragma unroll
        for (int v = 0; v < V; ++v) out[v] = (A)vmm_to_float(p[i + v]);
    }
}

template <int V, typename T, typename A, typename I>
VMM_INLINE void sifa_store(T* __restrict__ p, I i, const A (&val)[V]) {
    if (V * sizeof(T) == 16) {
        sifa_pack<T> pk;
#pragma unroll
        for (int v = 0; v < V; ++v) vmm_store(&pk.v[v % (16 / sizeof(T))], val[v]);
        *const_cast<sifa_pack<T>*>(sifa_as_pack(p + i)) = pk;
    } else {
#pragma unroll
        for (int v = 0; v < V; ++v) vmm_store(p + i + v, val[v]);
    }
}

// One tap's sampling geometry at one point: the pixel index of corner (y0, x0) (the others are +1, +W,
// +W+1), which corners lie on the map, and the bilinear weights. The logic of sifa.cu's sifa_locate.
template <typename A, typename I>
struct sifa_fast_tap {
    I pix00;
    bool in00, in01, in10, in11, any;
    A ly, lx, hy, hx;
};

template <typename A, typename I>
VMM_INLINE sifa_fast_tap<A, I> sifa_fast_locate(A y, A x, I p, I h, I w, I height, I width) {
    sifa_fast_tap<A, I> t;
    t.any = (y >= (A)-1) && (y <= (A)height) && (x >= (A)-1) && (x <= (A)width);
    if (!t.any) {  // off the map, or NaN / ±Inf: no corner; the weights are 0 or NaN (see sifa_locate)
        t.pix00 = 0;
        t.in00 = t.in01 = t.in10 = t.in11 = false;
        t.ly = y - y;
        t.lx = x - x;
    } else {
        const A fy = sifa_fast_floor(y);
        const A fx = sifa_fast_floor(x);
        const I y0 = (I)fy;
        const I x0 = (I)fx;
        t.ly = y - fy;
        t.lx = x - fx;
        const bool y0_in = y0 >= 0 && y0 < height;
        const bool y1_in = y0 + 1 < height;  // y0 >= -1 here
        const bool x0_in = x0 >= 0 && x0 < width;
        const bool x1_in = x0 + 1 < width;
        t.in00 = y0_in && x0_in;
        t.in01 = y0_in && x1_in;
        t.in10 = y1_in && x0_in;
        t.in11 = y1_in && x1_in;
        t.pix00 = p + (y0 - h) * width + (x0 - w);  // same image b: p - h·W - w is its first pixel
        t.any = t.in00 || t.in01 || t.in10 || t.in11;
    }
    t.hy = (A)1 - t.ly;
    t.hx = (A)1 - t.lx;
    return t;
}

// Tap k = kh·K + kw of point p (at row h, column w); offsets are [points, 2K²].
template <typename T, typename A, typename I>
VMM_INLINE sifa_fast_tap<A, I> sifa_fast_tap_at(const T* __restrict__ offset, I p, I h, I w, I kh, I kw, I k, I kk,
                                                 I dil, I pad, I height, I width) {
    const I o = p * 2 * kk + 2 * k;
    const A y = (A)(h - pad + kh * dil) + (A)vmm_to_float(offset[o]);
    const A x = (A)(w - pad + kw * dil) + (A)vmm_to_float(offset[o + 1]);
    return sifa_fast_locate<A, I>(y, x, p, h, w, height, width);
}

// The four corners of channels [c, c+V) (0 where a corner is off the map).
template <int V, typename T, typename A, typename I>
VMM_INLINE void sifa_fast_corners(const T* __restrict__ map, const sifa_fast_tap<A, I>& t, I channels, I width, I c,
                                  A (&v00)[V], A (&v01)[V], A (&v10)[V], A (&v11)[V]) {
#pragma unroll
    for (int v = 0; v < V; ++v) v00[v] = v01[v] = v10[v] = v11[v] = (A)0;
    // Indices only for corners on the map (an off-map corner's pixel index may be negative).
    if (t.in00) sifa_load<V>(map, t.pix00 * channels + c, v00);
    if (t.in01) sifa_load<V>(map, (t.pix00 + 1) * channels + c, v01);
    if (t.in10) sifa_load<V>(map, (t.pix00 + width) * channels + c, v10);
    if (t.in11) sifa_load<V>(map, (t.pix00 + width + 1) * channels + c, v11);
}

template <typename A, typename I>
VMM_INLINE A sifa_fast_blend(const sifa_fast_tap<A, I>& t, A v00, A v01, A v10, A v11) {
    return t.hy * (t.hx * v00 + t.lx * v01) + t.ly * (t.hx * v10 + t.lx * v11);
}

// Sum over the lane group (butterfly: every lane gets the same sum, bitwise).
template <typename A>
VMM_INLINE A sifa_group_sum(A v, unsigned mask, int lanes) {
    for (int m = lanes >> 1; m > 0; m >>= 1) v += __shfl_xor_sync(mask, v, m);
    return v;
}

// The lane group of this thread: `lanes` consecutive threads of one warp (blockDim.x is a multiple of 32).
struct sifa_lane_group {
    int lane;       // 0 .. lanes-1
    unsigned mask;  // the group's lanes within the warp
    vmm_i64 slot;   // which lane group of the block (the point it starts at)
};

VMM_INLINE sifa_lane_group sifa_group_of_thread(int lanes) {
    sifa_lane_group g;
    const int warp_lane = (int)(threadIdx.x & 31u);
    g.lane = warp_lane & (lanes - 1);
    g.mask = lanes == 32 ? 0xffffffffu : (((1u << lanes) - 1u) << (warp_lane - g.lane));
    g.slot = (vmm_i64)(threadIdx.x / (unsigned)lanes);
    return g;
}

// The group dot of tap t: Σ_{c∈g} x[c] · S_t(kv)[c] over the group's channels [c_group, c_group + per_group)
// at the point whose channels start at map_base, each lane taking its V channels of every step, then summed
// over the lane group (every lane gets the sum). The forward's correlation (x = q) and the backward's
// aggregation d attn (x = Ō) share it. No shortcut for taps off the map: x · 0 must stay NaN for a NaN/Inf x.
template <int V, typename T, typename A, typename I>
VMM_INLINE A sifa_fast_group_dot(const T* __restrict__ x, const T* __restrict__ kv, const sifa_fast_tap<A, I>& t,
                                 I map_base, I c_group, I per_group, I steps, I step, I lane_ch, I channels, I width,
                                 const sifa_lane_group& lg, int lanes) {
    A dot = (A)0;
    for (I s = 0; s < steps; ++s) {
        const I j = s * step + lane_ch;
        if (j >= per_group) break;
        A xv[V], v00[V], v01[V], v10[V], v11[V];
        sifa_load<V>(x, map_base + c_group + j, xv);
        sifa_fast_corners<V>(kv, t, channels, width, c_group + j, v00, v01, v10, v11);
#pragma unroll
        for (int v = 0; v < V; ++v) dot += xv[v] * sifa_fast_blend(t, v00[v], v01[v], v10[v], v11[v]);
    }
    return sifa_group_sum(dot, lg.mask, lanes);
}

template <typename T, int V, typename I>
VMM_INLINE void sifa_fast_forward_body(const T* __restrict__ q, const T* __restrict__ kv, const T* __restrict__ offset,
                                       T* __restrict__ attn, T* __restrict__ out, I n_points, I channels, I groups,
                                       I height, I width, I ksize, I dil, int mode, double scale_corr,
                                       double scale_agg, int lanes) {
    typedef typename vmm_acc<T>::type A;
    const sifa_lane_group lg = sifa_group_of_thread(lanes);
    const I kk = ksize * ksize;
    const I per_group = channels / groups;
    const I pad = dil * (ksize - 1) / 2;
    const I step = (I)lanes * V;
    const I steps = (per_group + step - 1) / step;
    const I lane_ch = (I)lg.lane * V;
    const I points_per_block = (I)(blockDim.x / (unsigned)lanes);
    for (I p = (I)blockIdx.x * points_per_block + (I)lg.slot; p < n_points; p += (I)gridDim.x * points_per_block) {
        const I bh = p / width;
        const I w = p - bh * width;
        const I h = bh % height;
        const I map_base = p * channels;
        for (I g = 0; g < groups; ++g) {
            const I c_group = g * per_group;
            const I a_base = (p * groups + g) * kk;
            if (mode == (SIFA_FAST_CORR | SIFA_FAST_AGG) && steps <= SIFA_FAST_MAX_STEPS) {
                // The SIFA step with the group's channels in registers: each tap's samples serve both the
                // group sum and the aggregation, one read of kv's corners (the same values and order of
                // operations as the two passes below).
                A qv[SIFA_FAST_MAX_STEPS][V];
                A acc[SIFA_FAST_MAX_STEPS][V];
#pragma unroll
                for (int u = 0; u < SIFA_FAST_MAX_STEPS; ++u) {
#pragma unroll
                    for (int v = 0; v < V; ++v) qv[u][v] = acc[u][v] = (A)0;
                    const I j = (I)u * step + lane_ch;
                    if (u < steps && j < per_group) sifa_load<V>(q, map_base + c_group + j, qv[u]);
                }
                for (I kh = 0, k = 0; kh < ksize; ++kh) {
                    for (I kw = 0; kw < ksize; ++kw, ++k) {
                        const sifa_fast_tap<A, I> t =
                            sifa_fast_tap_at<T, A, I>(offset, p, h, w, kh, kw, k, kk, dil, pad, height, width);
                        A sample[SIFA_FAST_MAX_STEPS][V];
                        A dot = (A)0;
#pragma unroll
                        for (int u = 0; u < SIFA_FAST_MAX_STEPS; ++u) {
                            const I j = (I)u * step + lane_ch;
                            if (u >= steps || j >= per_group) break;
                            A v00[V], v01[V], v10[V], v11[V];
                            sifa_fast_corners<V>(kv, t, channels, width, c_group + j, v00, v01, v10, v11);
#pragma unroll
                            for (int v = 0; v < V; ++v) {
                                sample[u][v] = sifa_fast_blend(t, v00[v], v01[v], v10[v], v11[v]);
                                dot += qv[u][v] * sample[u][v];
                            }
                        }
                        dot = sifa_group_sum(dot, lg.mask, lanes);
                        T stored;  // attn as the aggregation reads it: rounded to the storage type
                        vmm_store(&stored, dot * (A)scale_corr);
                        if (lg.lane == 0) attn[a_base + k] = stored;
                        const A a = (A)vmm_to_float(stored);
#pragma unroll
                        for (int u = 0; u < SIFA_FAST_MAX_STEPS; ++u) {
                            const I j = (I)u * step + lane_ch;
                            if (u >= steps || j >= per_group) break;
#pragma unroll
                            for (int v = 0; v < V; ++v) acc[u][v] += a * sample[u][v];
                        }
                    }
                }
#pragma unroll
                for (int u = 0; u < SIFA_FAST_MAX_STEPS; ++u) {
                    const I j = (I)u * step + lane_ch;
                    if (u >= steps || j >= per_group) break;
#pragma unroll
                    for (int v = 0; v < V; ++v) acc[u][v] *= (A)scale_agg;
                    sifa_store<V>(out, map_base + c_group + j, acc[u]);
                }
                continue;
            }
            if (mode & SIFA_FAST_CORR) {
                for (I kh = 0, k = 0; kh < ksize; ++kh) {
                    for (I kw = 0; kw < ksize; ++kw, ++k) {
                        const sifa_fast_tap<A, I> t =
                            sifa_fast_tap_at<T, A, I>(offset, p, h, w, kh, kw, k, kk, dil, pad, height, width);
                        const A dot = sifa_fast_group_dot<V>(q, kv, t, map_base, c_group, per_group, steps, step,
                                                             lane_ch, channels, width, lg, lanes);
                        if (lg.lane == 0) vmm_store(attn + a_base + k, dot * (A)scale_corr);
                    }
                }
                if (mode & SIFA_FAST_AGG) __syncwarp(lg.mask);  // lane 0's attn, read back below by every lane
            }
            if (mode & SIFA_FAST_AGG) {
                for (I s0 = 0; s0 < steps; s0 += SIFA_FAST_MAX_STEPS) {
                    A acc[SIFA_FAST_MAX_STEPS][V];
#pragma unroll
                    for (int u = 0; u < SIFA_FAST_MAX_STEPS; ++u)
#pragma unroll
                        for (int v = 0; v < V; ++v) acc[u][v] = (A)0;
                    for (I kh = 0, k = 0; kh < ksize; ++kh) {
                        for (I kw = 0; kw < ksize; ++kw, ++k) {
                            const sifa_fast_tap<A, I> t =
                                sifa_fast_tap_at<T, A, I>(offset, p, h, w, kh, kw, k, kk, dil, pad, height, width);
                            const A a = vmm_load(attn, a_base + k);
#pragma unroll
                            for (int u = 0; u < SIFA_FAST_MAX_STEPS; ++u) {
                                const I j = (s0 + u) * step + lane_ch;
                                if (s0 + u >= steps || j >= per_group) break;
                                A v00[V], v01[V], v10[V], v11[V];
                                sifa_fast_corners<V>(kv, t, channels, width, c_group + j, v00, v01, v10, v11);
                                // No shortcut off the map: attn · 0 stays NaN for a NaN/Inf attn.
#pragma unroll
                                for (int v = 0; v < V; ++v) acc[u][v] += a * sifa_fast_blend(t, v00[v], v01[v], v10[v], v11[v]);
                            }
                        }
                    }
#pragma unroll
                    for (int u = 0; u < SIFA_FAST_MAX_STEPS; ++u) {
                        const I j = (s0 + u) * step + lane_ch;
                        if (s0 + u >= steps || j >= per_group) break;
#pragma unroll
                        for (int v = 0; v < V; ++v) acc[u][v] *= (A)scale_agg;
                        sifa_store<V>(out, map_base + c_group + j, acc[u]);
                    }
                }
            }
        }
    }
}

// Forward and backward of the three ops (see the header) as four kernels each: 16-byte vectors (`_v`,
// the caller checked alignment and that the width divides C/G) or scalar loads (`_s`), 32-bit (`32`, the
// caller checked that every index fits) or 64-bit indices. Separate kernels rather than a uniform branch:
// ptxas gives a kernel the registers of its heaviest path, and the 64-bit vector one needs the most.
// Launch bounds (256, 2): at most 128 registers, two blocks per SM at least; ptxas (sm_90) fits every
// 32-bit build in that without spills (it gave the 16-bit vector backward 196 unbounded: one block per SM).
// The 64-bit vector builds of the 16-bit types spill a few hundred bytes (maps over 2^31 elements only).
// Forward: mode SIFA_FAST_CORR, SIFA_FAST_AGG or both; scale_corr = 1/C_g for the correlation.
#define SIFA_FAST_FORWARD_KERNEL(NAME, V, I)                                                                    \
    template <typename T>                                                                                      \
    __global__ void __launch_bounds__(256, 2)                                                                  \
        NAME(const T* __restrict__ q, const T* __restrict__ kv, const T* __restrict__ offset, T* __restrict__ attn, \
             T* __restrict__ out, vmm_i64 n_points, vmm_i64 channels, vmm_i64 groups, vmm_i64 height,           \
             vmm_i64 width, vmm_i64 ksize, vmm_i64 dil, vmm_i64 mode, double scale_corr, double scale_agg,      \
             vmm_i64 lanes) {                                                                                   \
        sifa_fast_forward_body<T, V, I>(q, kv, offset, attn, out, (I)n_points, (I)channels, (I)groups, (I)height, \
                                        (I)width, (I)ksize, (I)dil, (int)mode, scale_corr, scale_agg, (int)lanes); \
    }
SIFA_FAST_FORWARD_KERNEL(sifa_fast_forward_v32, 16 / sizeof(T), int)
SIFA_FAST_FORWARD_KERNEL(sifa_fast_forward_s32, 1, int)
SIFA_FAST_FORWARD_KERNEL(sifa_fast_forward_v64, 16 / sizeof(T), vmm_i64)
SIFA_FAST_FORWARD_KERNEL(sifa_fast_forward_s64, 1, vmm_i64)

template <typename T, int V, typename I>
VMM_INLINE void sifa_fast_backward_body(const T* __restrict__ q, const T* __restrict__ kv,
                                        const T* __restrict__ offset, const T* __restrict__ attn,
                                        const T* __restrict__ grad_out, const T* __restrict__ grad_attn,
                                        typename vmm_acc<T>::type* __restrict__ abar, T* __restrict__ grad_q,
                                        typename vmm_acc<T>::type* __restrict__ grad_kv,
                                        typename vmm_acc<T>::type* __restrict__ grad_offset, I n_points, I channels,
                                        I groups, I height, I width, I ksize, I dil, int flags, double scale,
                                        int lanes) {
    typedef typename vmm_acc<T>::type A;
    const bool has_q = (flags & SIFA_FAST_HAS_Q) != 0;
    const bool has_out = (flags & SIFA_FAST_HAS_OUT) != 0;
    const bool has_gattn = (flags & SIFA_FAST_HAS_GATTN) != 0;
    const bool need_q = (flags & SIFA_FAST_NEED_Q) != 0;
    const bool need_kv = (flags & SIFA_FAST_NEED_KV) != 0;
    const bool need_off = (flags & SIFA_FAST_NEED_OFF) != 0;
    const bool phase_a = has_out && (has_q || (flags & SIFA_FAST_NEED_ABAR) != 0);
    const bool phase_b = need_q || need_kv || need_off;
    const bool write_abar = (flags & SIFA_FAST_NEED_ABAR) != 0;
    const bool need_corners = need_q || need_off;
    const sifa_lane_group lg = sifa_group_of_thread(lanes);
    const I kk = ksize * ksize;
    const I per_group = channels / groups;
    const I pad = dil * (ksize - 1) / 2;
    const I step = (I)lanes * V;
    const I steps = (per_group + step - 1) / step;
    // One pass over the taps when the group's channels fit in MAX_STEPS steps: tap k's Ā is reduced right
    // before its phase-B work, which then finds the corners in L1 (the values are those of two passes).
    const bool one_pass = phase_a && phase_b && steps <= SIFA_FAST_MAX_STEPS;
    const I lane_ch = (I)lg.lane * V;
    const I points_per_block = (I)(blockDim.x / (unsigned)lanes);
    for (I p = (I)blockIdx.x * points_per_block + (I)lg.slot; p < n_points; p += (I)gridDim.x * points_per_block) {
        const I bh = p / width;
        const I w = p - bh * width;
        const I h = bh % height;
        const I map_base = p * channels;
        for (I g = 0; g < groups; ++g) {
            const I c_group = g * per_group;
            const I a_base = (p * groups + g) * kk;
            if (phase_a && !one_pass) {  // Ā = Σ_{c∈g} Ō · S_k(kv) (+ incoming d attn): the aggregation's d attn
                for (I kh = 0, k = 0; kh < ksize; ++kh) {
                    for (I kw = 0; kw < ksize; ++kw, ++k) {
                        const sifa_fast_tap<A, I> t =
                            sifa_fast_tap_at<T, A, I>(offset, p, h, w, kh, kw, k, kk, dil, pad, height, width);
                        const A dot = sifa_fast_group_dot<V>(grad_out, kv, t, map_base, c_group, per_group, steps,
                                                             step, lane_ch, channels, width, lg, lanes);
                        if (lg.lane == 0) abar[a_base + k] = has_gattn ? dot + vmm_load(grad_attn, a_base + k) : dot;
                    }
                }
                __syncwarp(lg.mask);  // lane 0's Ā, read by every lane of the group below
            }
            if (!phase_b) continue;
            for (I s0 = 0; s0 < steps; s0 += SIFA_FAST_MAX_STEPS) {
                A dq[SIFA_FAST_MAX_STEPS][V];
#pragma unroll
                for (int u = 0; u < SIFA_FAST_MAX_STEPS; ++u)
#pragma unroll
                    for (int v = 0; v < V; ++v) dq[u][v] = (A)0;
                for (I kh = 0, k = 0; kh < ksize; ++kh) {
                    for (I kw = 0; kw < ksize; ++kw, ++k) {
                        const sifa_fast_tap<A, I> t =
                            sifa_fast_tap_at<T, A, I>(offset, p, h, w, kh, kw, k, kk, dil, pad, height, width);
                        // The correlation's term: scale · Ā (Ā from phase A, else the incoming d attn); the
                        // aggregation's: the forward attn.
                        A abar_k = (A)0;
                        if (one_pass) {  // phase A for this tap (s0 is 0: one pass)
                            const A dot = sifa_fast_group_dot<V>(grad_out, kv, t, map_base, c_group, per_group, steps,
                                                                 step, lane_ch, channels, width, lg, lanes);
                            abar_k = has_gattn ? dot + vmm_load(grad_attn, a_base + k) : dot;
                            if (write_abar && lg.lane == 0) abar[a_base + k] = abar_k;
                        } else if (has_q) {
                            abar_k = has_out ? abar[a_base + k] : vmm_load(grad_attn, a_base + k);
                        }
                        const A a1 = has_q ? (A)scale * abar_k : (A)0;
                        const A a2 = has_out ? vmm_load(attn, a_base + k) : (A)0;
                        A gy = (A)0;
                        A gx = (A)0;
#pragma unroll
                        for (int u = 0; u < SIFA_FAST_MAX_STEPS; ++u) {
                            const I j = (s0 + u) * step + lane_ch;
                            if (s0 + u >= steps || j >= per_group) break;
                            const I c = c_group + j;
                            A v00[V], v01[V], v10[V], v11[V];
                            if (need_corners) sifa_fast_corners<V>(kv, t, channels, width, c, v00, v01, v10, v11);
                            if (need_q) {
                                // No shortcut off the map: Ā · 0 stays NaN for a NaN/Inf Ā.
#pragma unroll
                                for (int v = 0; v < V; ++v) dq[u][v] += a1 * sifa_fast_blend(t, v00[v], v01[v], v10[v], v11[v]);
                            }
                            if (!(need_kv || need_off)) continue;
                            A coef[V];
                            if (has_q) {
                                A qv[V];
                                sifa_load<V>(q, map_base + c, qv);
#pragma unroll
                                for (int v = 0; v < V; ++v) coef[v] = a1 * qv[v];
                            }
                            if (has_out) {
                                A gov[V];
                                sifa_load<V>(grad_out, map_base + c, gov);
#pragma unroll
                                for (int v = 0; v < V; ++v) coef[v] = has_q ? coef[v] + a2 * gov[v] : a2 * gov[v];
                            }
                            if (need_off) {
                                // No shortcut off the map: a NaN/Inf coefficient times the zero slope stays NaN.
#pragma unroll
                                for (int v = 0; v < V; ++v) {
                                    gy += coef[v] * (t.hx * (v10[v] - v00[v]) + t.lx * (v11[v] - v01[v]));
                                    gx += coef[v] * (t.hy * (v01[v] - v00[v]) + t.ly * (v11[v] - v10[v]));
                                }
                            }
                            // No corner on the map (nor for a NaN/Inf point): nothing to scatter (grid_sample's rule).
                            if (need_kv && t.any) {
#pragma unroll
                                for (int v = 0; v < V; ++v) {
                                    if (t.in00) atomicAdd(grad_kv + t.pix00 * channels + c + v, coef[v] * t.hy * t.hx);
                                    if (t.in01) atomicAdd(grad_kv + (t.pix00 + 1) * channels + c + v, coef[v] * t.hy * t.lx);
                                    if (t.in10) atomicAdd(grad_kv + (t.pix00 + width) * channels + c + v, coef[v] * t.ly * t.hx);
                                    if (t.in11)
                                        atomicAdd(grad_kv + (t.pix00 + width + 1) * channels + c + v, coef[v] * t.ly * t.lx);
                                }
                            }
                        }
                        if (need_off) {
                            gy = sifa_group_sum(gy, lg.mask, lanes);
                            gx = sifa_group_sum(gx, lg.mask, lanes);
                            if (lg.lane == 0) {  // the only writer of this point's d offset: a fixed order of additions
                                const I o = p * 2 * kk + 2 * k;
                                const bool first = g == 0 && s0 == 0;
                                grad_offset[o] = first ? gy : grad_offset[o] + gy;
                                grad_offset[o + 1] = first ? gx : grad_offset[o + 1] + gx;
                            }
                        }
                    }
                }
                if (need_q) {
#pragma unroll
                    for (int u = 0; u < SIFA_FAST_MAX_STEPS; ++u) {
                        const I j = (s0 + u) * step + lane_ch;
                        if (s0 + u >= steps || j >= per_group) break;
                        sifa_store<V>(grad_q, map_base + c_group + j, dq[u]);
                    }
                }
            }
        }
    }
}

// Backward: `flags` are the SIFA_FAST_* bits above, `scale` the correlation's 1/C_g. Pointers a flag
// leaves unused may be any valid pointer; they are not read.
#define SIFA_FAST_BACKWARD_KERNEL(NAME, V, I)                                                                  \
    template <typename T>                                                                                     \
    __global__ void __launch_bounds__(256, 2)                                                                 \
        NAME(const T* __restrict__ q, const T* __restrict__ kv, const T* __restrict__ offset,                  \
             const T* __restrict__ attn, const T* __restrict__ grad_out, const T* __restrict__ grad_attn,      \
             typename vmm_acc<T>::type* __restrict__ abar, T* __restrict__ grad_q,                             \
             typename vmm_acc<T>::type* __restrict__ grad_kv, typename vmm_acc<T>::type* __restrict__ grad_offset, \
             vmm_i64 n_points, vmm_i64 channels, vmm_i64 groups, vmm_i64 height, vmm_i64 width, vmm_i64 ksize,  \
             vmm_i64 dil, vmm_i64 flags, double scale, vmm_i64 lanes) {                                        \
        sifa_fast_backward_body<T, V, I>(q, kv, offset, attn, grad_out, grad_attn, abar, grad_q, grad_kv,      \
                                         grad_offset, (I)n_points, (I)channels, (I)groups, (I)height, (I)width, \
                                         (I)ksize, (I)dil, (int)flags, scale, (int)lanes);                     \
    }
SIFA_FAST_BACKWARD_KERNEL(sifa_fast_backward_v32, 16 / sizeof(T), int)
SIFA_FAST_BACKWARD_KERNEL(sifa_fast_backward_s32, 1, int)
SIFA_FAST_BACKWARD_KERNEL(sifa_fast_backward_v64, 16 / sizeof(T), vmm_i64)
SIFA_FAST_BACKWARD_KERNEL(sifa_fast_backward_s64, 1, vmm_i64)
