// Test kernels for the host emulation's cooperative execution (tests/test_host_emulation.py): shared
// memory, barriers, warp shuffles and votes, and deliberately broken kernels the emulator must refuse.
// They compile with nvcc / NVRTC as well, so the same file could run on a GPU.
#include "../../ops/kernels/vmm_common.cuh"

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

// Declares at most 64 threads per block, through a macro as the project's kernels do: a larger block
// fails to launch on a GPU, and in emulation.
#define COOP_BOUNDED_THREADS 64
template <typename T>
__global__ void __launch_bounds__(COOP_BOUNDED_THREADS, 1) coop_bounded_copy(const T* __restrict__ x, T* __restrict__ out) {
    vmm_store(out + threadIdx.x, vmm_load(x, threadIdx.x));
}

// out[block] = Σ x over the block's slice of blockDim.x * per_thread elements, staged in dynamic shared
// memory that the launch sizes to that slice (per_thread a power of two, blockDim.x too): the buffer's
// size is a launch parameter, not a compile-time one. Too little of it: NaN, as the TV-L1 kernels do.
template <typename T>
__global__ void coop_dynamic_block_sum(const T* __restrict__ x, T* __restrict__ out, vmm_i64 n, vmm_i64 per_thread) {
    typedef typename vmm_acc<T>::type A;
    VMM_DYNAMIC_SHARED(raw);
    A* buf = reinterpret_cast<A*>(raw);
    const int len = (int)(blockDim.x * per_thread);
    if (vmm_dynamic_shared_bytes() < (unsigned)len * sizeof(A)) {
        if (threadIdx.x == 0) vmm_store(out + blockIdx.x, (A)vmm_bits_to_float(0x7fc00000u));
        return;
    }
    const vmm_i64 base = (vmm_i64)blockIdx.x * len;
    for (int k = threadIdx.x; k < len; k += blockDim.x) buf[k] = base + k < n ? vmm_load(x, base + k) : (A)0;
    __syncthreads();
    for (int stride = len / 2; stride > 0; stride /= 2) {
        for (int k = threadIdx.x; k < stride; k += blockDim.x) buf[k] += buf[k + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) vmm_store(out + blockIdx.x, buf[0]);
}

// Only block 0 writes its dynamic shared memory; every block reads it back. A block starts with shared
// memory it must write before reading: the emulator poisons it, so block 1 reads NaN, not block 0's data.
template <typename T>
__global__ void coop_dynamic_unwritten(const T* __restrict__ x, T* __restrict__ out) {
    typedef typename vmm_acc<T>::type A;
    VMM_DYNAMIC_SHARED(raw);
    A* buf = reinterpret_cast<A*>(raw);
    if (blockIdx.x == 0) buf[threadIdx.x] = vmm_load(x, threadIdx.x);
    __syncthreads();
    vmm_store(out + (vmm_i64)blockIdx.x * blockDim.x + threadIdx.x, buf[threadIdx.x]);
}

// Writes one element past the dynamic shared memory of blockDim.x elements the launch gives.
template <typename T>
__global__ void coop_dynamic_overrun(const T* __restrict__ x, T* __restrict__ out) {
    typedef typename vmm_acc<T>::type A;
    VMM_DYNAMIC_SHARED(raw);
    A* buf = reinterpret_cast<A*>(raw);
    buf[threadIdx.x + 1] = vmm_load(x, threadIdx.x);
    __syncthreads();
    vmm_store(out + threadIdx.x, buf[threadIdx.x]);
}
