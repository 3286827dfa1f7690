// Test kernels for the host emulation's cooperative execution (tests/test_host_emulation.py): shared
// memory, barriers, warp shuffles and votes, and deliberately broken kernels the emulator must refuse.
// They compile with nvcc / NVRTC as well, so the same file could run on a GPU.
// Shared definitions for vmm's CUDA kernels.
//
// The same sources are compiled three ways: by NVRTC through CuPy at run time, by nvcc in the test
// suite (compile check for sm_80/sm_90), and by the host C++ compiler with host_emulation.h
// force-included (CI executes kernels on the CPU that way). So: no standard headers, no CUDA
// headers (cuda_fp16.h is not on every NVRTC include path), no shared memory or warp intrinsics
// (the emulator runs one thread at a time), 64-bit indices, grid-stride loops.


typedef long long vmm_i64;

// Storage-only 16-bit float types; arithmetic is always done after converting to float.
struct vmm_half { unsigned short bits; };
struct vmm_bfloat16 { unsigned short bits; };

#ifndef VMM_HOST_EMULATION
#define VMM_INLINE __device__ __forceinline__
#endif

VMM_INLINE float vmm_bits_to_float(unsigned int u) { return __uint_as_float(u); }
VMM_INLINE unsigned int vmm_float_to_bits(float f) { return __float_as_uint(f); }

// bfloat16 <-> float, round to nearest even (NaN kept quiet).
VMM_INLINE float vmm_to_float(vmm_bfloat16 v) { return vmm_bits_to_float(((unsigned int)v.bits) << 16); }
VMM_INLINE void vmm_store(vmm_bfloat16* p, float f) {
    unsigned int u = vmm_float_to_bits(f);
    unsigned short out;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        out = (unsigned short)((u >> 16) | 0x0040u);
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        out = (unsigned short)(u >> 16);
    }
    p->bits = out;
}

#ifndef VMM_HOST_EMULATION
// IEEE half <-> float through the PTX conversion instructions (round to nearest even).
VMM_INLINE float vmm_to_float(vmm_half v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
VMM_INLINE void vmm_store(vmm_half* p, float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    p->bits = h;
}
#else
VMM_EMULATION_HALF_CONVERSIONS
#endif

VMM_INLINE float vmm_to_float(float v) { return v; }
VMM_INLINE double vmm_to_float(double v) { return v; }
VMM_INLINE void vmm_store(float* p, float f) { *p = f; }
VMM_INLINE void vmm_store(double* p, double f) { *p = f; }

// Accumulation type: float for the 16-bit types and float, double for double.
template <typename T> struct vmm_acc { typedef float type; };
template <> struct vmm_acc<double> { typedef double type; };

// Load element i of a tensor of storage type T as its accumulation type.
template <typename T>
VMM_INLINE typename vmm_acc<T>::type vmm_load(const T* p, vmm_i64 i) {
    return (typename vmm_acc<T>::type)vmm_to_float(p[i]);
}

// Grid-stride loop over [0, n) with 64-bit indices.
#define VMM_KERNEL_LOOP(i, n)                                                              \
    for (vmm_i64 i = (vmm_i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n);              \
         i += (vmm_i64)blockDim.x * gridDim.x)


// out[block] = Σ x over the block's slice, by a shared-memory tree (blockDim.x = 128).
template <typename T>
__global__ void coop_block_sum(const T* __restrict__ x, T* __restrict__ out, vmm_i64 n) {
    __shared__ double partial[128];
    const vmm_i64 i = (vmm_i64)blockIdx.x * blockDim.x + threadIdx.x;
    partial[threadIdx.x] = i < n ? (double)vmm_load(x, i) : 0.0;
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) vmm_store(out + blockIdx.x, (typename vmm_acc<T>::type)partial[0]);
}

// Per lane (one warp of 32 lanes per block, any number of blocks): 8 results of the warp primitives.
template <typename T>
__global__ void coop_warp_ops(const T* __restrict__ x, T* __restrict__ out) {
    typedef typename vmm_acc<T>::type A;
    const unsigned lane = threadIdx.x;
    const vmm_i64 i = (vmm_i64)blockIdx.x * 32 + lane;
    const A v = vmm_load(x, i);
    A sum = v;  // butterfly: every lane ends with the warp's sum
    for (int m = 16; m > 0; m /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, m);
    const A down = __shfl_down_sync(0xffffffffu, v, 3);        // lane + 3, own value past lane 31
    const A up = __shfl_up_sync(0xffffffffu, v, 5, 16);        // lane - 5 within halves of 16
    const A bcast = __shfl_sync(0xffffffffu, v, 2, 8);         // lane 2 of each group of 8
    const unsigned ballot = __ballot_sync(0xffffffffu, v > (A)0);
    const int any = __any_sync(0xffffffffu, v > (A)100);
    const int all = __all_sync(0xffffffffu, v > (A)-100);
    __syncwarp();
    const long long idx = __shfl_xor_sync(0xffffffffu, (long long)i, 1);
    T* o = out + i * 8;
    vmm_store(o + 0, sum);
    vmm_store(o + 1, down);
    vmm_store(o + 2, up);
    vmm_store(o + 3, bcast);
    vmm_store(o + 4, (A)(double)ballot);
    vmm_store(o + 5, (A)any);
    vmm_store(o + 6, (A)all);
    vmm_store(o + 7, (A)idx);
}

// A race: each thread reads its neighbour's shared slot without a barrier (the emulator's order shows it).
template <typename T>
__global__ void coop_missing_barrier(const T* __restrict__ x, T* __restrict__ out) {
    __shared__ float slot[64];
    slot[threadIdx.x] = (float)vmm_load(x, threadIdx.x);
    vmm_store(out + threadIdx.x, (typename vmm_acc<T>::type)slot[(threadIdx.x + 1) % blockDim.x]);
}

// Divergent barrier: half the block skips it.
template <typename T>
__global__ void coop_divergent_barrier(const T* __restrict__ x, T* __restrict__ out) {
    if (threadIdx.x < blockDim.x / 2) __syncthreads();
    vmm_store(out + threadIdx.x, vmm_load(x, threadIdx.x));
}

// Divergent warp op: lanes 16..31 return before a full-mask shuffle.
template <typename T>
__global__ void coop_divergent_shuffle(const T* __restrict__ x, T* __restrict__ out) {
    if (threadIdx.x >= 16) return;
    vmm_store(out + threadIdx.x, __shfl_xor_sync(0xffffffffu, vmm_load(x, threadIdx.x), 1));
}

// A shuffle reading a lane outside its mask (lanes 0..15 take part; lane 8 + 8 = 16 is not in it).
template <typename T>
__global__ void coop_shuffle_outside_mask(const T* __restrict__ x, T* __restrict__ out) {
    if (threadIdx.x >= 16) return;
    vmm_store(out + threadIdx.x, __shfl_down_sync(0x0000ffffu, vmm_load(x, threadIdx.x), 8));
}

// An emulation-only check that fails for one thread.
template <typename T>
__global__ void coop_failed_check(const T* __restrict__ x, T* __restrict__ out) {
#ifdef VMM_HOST_EMULATION
    VMM_EMU_CHECK(threadIdx.x != 3, "thread 3 is not allowed here");
#endif
    vmm_store(out + threadIdx.x, vmm_load(x, threadIdx.x));
}

// A race only a warp running ahead shows: lane 0 of each warp publishes its warp's sum, warp 0 reads
// them after a __syncwarp, which orders warp 0's own lanes but does not wait for the other warps (a
// __syncthreads belongs there). Lockstep orders let the other warps write while warp 0 waits at its
// __syncwarp; "warps" runs warp 0 through it first.
template <typename T>
__global__ void coop_syncwarp_instead_of_barrier(const T* __restrict__ x, T* __restrict__ out) {
    __shared__ float partial[32];
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x / 32u;
    float v = (float)vmm_load(x, threadIdx.x);
    for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
    if (lane == 0) partial[warp] = v;
    if (warp == 0) {
        __syncwarp();
        float s = lane < blockDim.x / 32u ? partial[lane] : 0.0f;
        for (int m = 16; m > 0; m /= 2) s += __shfl_xor_sync(0xffffffffu, s, m);
        if (lane == 0) vmm_store(out, (typename vmm_acc<T>::type)s);
    }
}
