// Host emulation of the small CUDA subset vmm's kernels use.
//
// Force-included (-include) before a kernel source when it is compiled with the system C++
// compiler: the grid is run serially, one thread at a time, so kernels must not rely on
// __syncthreads, shared memory or warp intrinsics (they are deliberately not defined here, so such
// a kernel fails to compile instead of computing something wrong). atomicAdd is a plain add,
// which is exact under serial execution.
#pragma once
#define VMM_HOST_EMULATION 1

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <type_traits>

using std::sqrt;
using std::floor;
using std::fabs;
using std::exp;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define VMM_INLINE static inline

struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

static uint3 blockIdx, threadIdx;
static dim3 blockDim, gridDim;

static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static inline float atomicAdd(float* p, float v) { float old = *p; *p = old + v; return old; }
static inline double atomicAdd(double* p, double v) { double old = *p; *p = old + v; return old; }
template <typename T> static inline T __ldg(const T* p) { return *p; }
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
static inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }

// IEEE binary16 <-> binary32 in software (round to nearest even), standing in for cvt.f32.f16.
static inline float vmm_half_bits_to_float(unsigned short h) {
    unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    unsigned int exp = (h >> 10) & 0x1fu;
    unsigned int man = h & 0x3ffu;
    unsigned int u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {  // subnormal: renormalise
            int e = -1;
            do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
            u = sign | ((unsigned int)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    return __uint_as_float(u);
}
static inline unsigned short vmm_float_to_half_bits(float f) {
    unsigned int u = __float_as_uint(f);
    unsigned int sign = (u >> 16) & 0x8000u;
    unsigned int a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);       // NaN
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);      // rounds to inf
    if (a < 0x38800000u) {                                               // subnormal or zero
        if (a < 0x33000000u) return (unsigned short)sign;                // below half the smallest subnormal
        unsigned int man = (a & 0x7fffffu) | 0x800000u;
        int shift = 126 - (int)(a >> 23);                                // 14..24
        unsigned int half_man = man >> shift;
        unsigned int rem = man & ((1u << shift) - 1u);
        unsigned int halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (half_man & 1u))) ++half_man;
        return (unsigned short)(sign | half_man);
    }
    unsigned int h = ((a >> 13) - ((127u - 15u) << 10));
    unsigned int rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return (unsigned short)(sign | h);
}

#define VMM_EMULATION_HALF_CONVERSIONS                                                       \
    VMM_INLINE float vmm_to_float(vmm_half v) { return vmm_half_bits_to_float(v.bits); }     \
    VMM_INLINE void vmm_store(vmm_half* p, float f) { p->bits = vmm_float_to_half_bits(f); }

namespace vmm_emulation {

template <typename... Args, std::size_t... I>
inline void call_unpacked(void (*kernel)(Args...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<Args>>*>(args[I])...);
}

// Run every thread of every block, in order; args[i] points at the i-th kernel argument.
template <typename... Args>
inline void launch(void (*kernel)(Args...), dim3 grid, dim3 block, void** args) {
    gridDim = grid;
    blockDim = block;
    for (unsigned int bz = 0; bz < grid.z; ++bz)
        for (unsigned int by = 0; by < grid.y; ++by)
            for (unsigned int bx = 0; bx < grid.x; ++bx)
                for (unsigned int tz = 0; tz < block.z; ++tz)
                    for (unsigned int ty = 0; ty < block.y; ++ty)
                        for (unsigned int tx = 0; tx < block.x; ++tx) {
                            blockIdx = {bx, by, bz};
                            threadIdx = {tx, ty, tz};
                            call_unpacked(kernel, args, std::index_sequence_for<Args...>{});
                        }
}

}  // namespace vmm_emulation
