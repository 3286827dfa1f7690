// Definitions shared by the TV-L1 kernels: tvl1.cu (the "simple" variant: one thread per pixel, one
// launch per step) and tvl1_plane.cu (the "fast" variant: one thread block per (b, c) plane).
#pragma once
#include "vmm_common.cuh"

#define TVL1_EPS 1e-12

// Rows of the accumulator of per-channel parameter and stencil gradient sums (acc [11, ...]).
#define ACC_R 0      // d/dr
#define ACC_FX0 1    // fwd_x taps, fwd_y taps (4 rows)
#define ACC_THETA 5  // d/dtheta_e through theta_e * div(p)
#define ACC_LT 6     // d/d(lambda * theta_e)
#define ACC_DX0 7    // div_x taps, div_y taps (4 rows)
#define ACC_ROWS 11

// Square root in the accumulation type (sqrtf for float, so a float kernel never promotes to double).
__device__ __forceinline__ float tvl1_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double tvl1_sqrt(double x) { return sqrt(x); }

// The per-channel stencil taps st [C,8]: fwd_x (2), fwd_y (2), div_x (2), div_y (2).
template <typename A>
struct tvl1_taps {
    A fx0, fx1, fy0, fy1, dx0, dx1, dy0, dy1;
};

template <typename T>
__device__ __forceinline__ tvl1_taps<typename vmm_acc<T>::type> tvl1_load_taps(const T* st, vmm_i64 c) {
    tvl1_taps<typename vmm_acc<T>::type> k;
    k.fx0 = vmm_load(st, c * 8 + 0);
    k.fx1 = vmm_load(st, c * 8 + 1);
    k.fy0 = vmm_load(st, c * 8 + 2);
    k.fy1 = vmm_load(st, c * 8 + 3);
    k.dx0 = vmm_load(st, c * 8 + 4);
    k.dx1 = vmm_load(st, c * 8 + 5);
    k.dy0 = vmm_load(st, c * 8 + 6);
    k.dy1 = vmm_load(st, c * 8 + 7);
    return k;
}

// The threshold coefficient: v = coef * (g1, g2). NaN policy, as the reference's
// threshold_coefficient: a NaN rho or image gradient fails both comparisons and is not flat, so it
// takes the linear step; "+ rho * 0" makes a NaN or infinite residual a NaN step in every branch.
template <typename A>
__device__ __forceinline__ A tvl1_coef(A rho, A grad, A lt) {
    const A nan_of_rho = rho * (A)0;
    if (rho < -(lt * grad)) return lt + nan_of_rho;
    if (rho > lt * grad) return -lt + nan_of_rho;
    if (grad <= (A)TVL1_EPS) return (A)0 + nan_of_rho;
    return -rho / grad + nan_of_rho;
}
