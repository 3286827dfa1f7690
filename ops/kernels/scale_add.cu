// out = alpha * x + y over 2-D strided tensors: the trivial kernel that proves the loader, the
// nvcc compile check and the host emulation harness (tests/test_kernel_infra.py).
#include "vmm_common.cuh"

template <typename T>
__global__ void scale_add_2d(const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ out,
                             vmm_i64 rows, vmm_i64 cols,
                             vmm_i64 x_stride0, vmm_i64 x_stride1,
                             vmm_i64 y_stride0, vmm_i64 y_stride1,
                             double alpha) {
    typedef typename vmm_acc<T>::type acc_t;
    VMM_KERNEL_LOOP(i, rows * cols) {
        const vmm_i64 r = i / cols;
        const vmm_i64 c = i - r * cols;
        const acc_t v = (acc_t)alpha * vmm_load(x, r * x_stride0 + c * x_stride1)
                        + vmm_load(y, r * y_stride0 + c * y_stride1);
        vmm_store(out + i, v);
    }
}
