// Shared definitions for vmm's CUDA kernels.
//
// The same sources are compiled three ways: by NVRTC through CuPy at run time, by nvcc in the test
// suite (compile check for sm_80/sm_90), and by the host C++ compiler with host_emulation.h
// force-included (CI executes kernels on the CPU that way). So: no standard headers, no CUDA
// headers (cuda_fp16.h is not on every NVRTC include path). Shared memory is fixed-size __shared__
// arrays or dynamic shared memory declared with VMM_DYNAMIC_SHARED (below; no other extern __shared__,
// which the emulator does not define); __syncthreads, __syncwarp, the __shfl*_sync shuffles and the
// __ballot/any/all_sync votes are what the emulator implements (its threads are cooperative fibers;
// see host_emulation.h). Index width and loop shape are each kernel's choice.
#pragma once

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

// Dynamic shared memory, sized per launch (KernelSource.launch(..., shared_mem=bytes)) so a kernel can
// take only what its problem needs and leave the rest of the SM to other blocks. VMM_DYNAMIC_SHARED(name)
// declares `name`, the block's dynamic shared memory as 16-byte aligned bytes (cast to the element
// type); vmm_dynamic_shared_bytes() is the size the launch gave, for a kernel to refuse too little. Up
// to 48 KiB per block with static shared memory included (more needs cudaFuncSetAttribute, which the
// launcher does not do). Host emulation defines both in host_emulation.h.
#ifndef VMM_HOST_EMULATION
#define VMM_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
VMM_INLINE unsigned int vmm_dynamic_shared_bytes() {
    unsigned int n;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
    return n;
}
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
