// Host emulation of the CUDA subset vmm's kernels use.
//
// Force-included (-include) before a kernel source when it is compiled with the system C++ compiler.
// Blocks run one after another; the threads of a block run as cooperative fibers (one stack each) on
// one OS thread, switching only at the synchronisation points defined below, so:
//   * __shared__ variables (fixed-size, declared in the kernel body) are `static`: one copy that every
//     fiber of the block sees, as on the GPU. Dynamic shared memory (VMM_DYNAMIC_SHARED, vmm_common.cuh)
//     is one buffer of the launch's size, refilled before each block with SHARED_POISON bytes so that
//     reads of memory the block never wrote show up in results, between guard zones of the same bytes
//     that are checked after each block: a write outside the buffer fails the launch.
//   * __syncthreads() waits until every thread of the block is waiting at the same call (same source
//     line); a thread that exits or waits elsewhere meanwhile is a divergent barrier: the launch fails
//     with a message instead of computing something.
//   * warp operations (__shfl*_sync, __syncwarp, __ballot/any/all_sync) wait until every lane named in
//     the mask waits at the same call with the same mask; a lane of the mask that exited, waits
//     elsewhere or does not exist, a caller outside its own mask and a shuffle reading a lane outside
//     the mask all fail the launch (undefined behaviour on a GPU).
//   * Between synchronisation points a fiber runs to its next one uninterrupted. The order in which
//     runnable fibers go is VMM_EMULATION_ORDER (read at each launch): "forward" (thread 0 first, the
//     default), "reverse", "shuffle" (a new random order each round, seeded by VMM_EMULATION_SEED),
//     all of which move the warps together from one synchronisation point to the next, or "warps" /
//     "warps_reverse" (each warp runs ahead through its own warp operations until it waits at a
//     barrier or exits, warp 0 first / last). A kernel whose result depends on the order has a race
//     (a missing barrier): tests run the cooperative kernels under all of them.
// atomicAdd is a plain add, exact under this execution. Errors (including VMM_EMU_CHECK failures inside
// a kernel) abort the launch and are reported to Python by vmm_emu_last_error().
#pragma once
#define VMM_HOST_EMULATION 1

// The fibers switch stacks with _setjmp/_longjmp; glibc's fortified longjmp refuses a jump to another
// stack, so fortification is off for this translation unit (the flags also pass -U_FORTIFY_SOURCE).
#undef _FORTIFY_SOURCE
// macOS declares the (deprecated, still working) ucontext routines only under _XOPEN_SOURCE.
#if defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 700
#endif

#include <ucontext.h>
#include <setjmp.h>
#include <cstdio>
#include <cstdlib>
#include <cstdarg>
#include <vector>
#include <random>
#include <algorithm>
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
// A kernel's __launch_bounds__ vanish in the emulation build; ops/host_emulation.py preprocesses the
// source once with VMM_EMULATION_MARK_LAUNCH_BOUNDS to read them, and refuses a launch whose block
// exceeds the bound, as a GPU would.
#ifdef VMM_EMULATION_MARK_LAUNCH_BOUNDS
#define __launch_bounds__(...) vmm_launch_bounds_marker(__VA_ARGS__)
#else
#define __launch_bounds__(...)
#endif
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

enum Wait { RUNNABLE = 0, AT_BARRIER, AT_WARP_OP, DONE };
enum WarpOp { OP_SYNC = 0, OP_SHFL, OP_XOR, OP_DOWN, OP_UP, OP_BALLOT, OP_ANY, OP_ALL };

struct Fiber {
    ucontext_t start;       // entry context (used once per thread)
    jmp_buf resume;         // where the fiber continues after a yield
    char* stack;
    bool started;
    int wait;
    int line;               // source line of the synchronisation call it waits at
    unsigned mask;
    int op, arg, width;
    unsigned long long value, result;  // warp-op payload (up to 8 bytes)
    unsigned tid;           // linear thread index in the block
};

constexpr std::size_t STACK_BYTES = 256 * 1024;

struct Scheduler {
    std::vector<Fiber*> fibers;  // grows only: stacks and entry contexts are made once and reused
    jmp_buf back;               // the scheduler's resume point
    ucontext_t scheduler_context;
    int current = -1;
    void (*body)(void*) = nullptr;
    void* body_arg = nullptr;
    bool failed = false;
    char error[1024] = {0};
};

static Scheduler sched;

// The launch's dynamic shared memory: `bytes` usable from `data`, guard zones of GUARD_BYTES before and
// max(bytes, GUARD_BYTES) after it. Grows only; blocks run one after another, so one buffer serves all.
constexpr std::size_t GUARD_BYTES = 256;
// 0x4f bytes read as about 3.5e9 in float, 1.1e74 in double, 29.2 in half: finite, so that a result built
// on them differs from the right one under any comparison (NaN compares false: a check written as
// `difference > tolerance` would read it as agreement), and far from any value a kernel computes.
constexpr unsigned char SHARED_POISON = 0x4f;
struct DynamicShared {
    unsigned char* base = nullptr;
    std::size_t capacity = 0;
    unsigned char* data = nullptr;
    std::size_t bytes = 0;
};
static DynamicShared dynamic_shared;

inline void record_error(const char* fmt, ...) {
    if (sched.failed) return;
    sched.failed = true;
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(sched.error, sizeof(sched.error), fmt, ap);
    va_end(ap);
}

inline std::size_t shared_tail_bytes(std::size_t bytes) { return bytes > GUARD_BYTES ? bytes : GUARD_BYTES; }

// Size the dynamic shared memory for a launch of `bytes` per block; false (error recorded) without memory.
inline bool reserve_dynamic_shared(std::size_t bytes) {
    const std::size_t need = GUARD_BYTES + bytes + shared_tail_bytes(bytes);
    if (need > dynamic_shared.capacity) {
        std::free(dynamic_shared.base);
        // 64-byte aligned (GUARD_BYTES keeps `data` so): at least the 16 bytes CUDA guarantees.
        dynamic_shared.base = static_cast<unsigned char*>(std::aligned_alloc(64, (need + 63) / 64 * 64));
        dynamic_shared.capacity = dynamic_shared.base ? need : 0;
        if (!dynamic_shared.base) {
            record_error("out of memory for %zu bytes of dynamic shared memory", bytes);
            return false;
        }
    }
    dynamic_shared.data = dynamic_shared.base + GUARD_BYTES;
    dynamic_shared.bytes = bytes;
    return true;
}

// A block's dynamic shared memory at its start: poison, so that nothing written by an earlier block (or
// never written) passes for a value.
inline void poison_dynamic_shared() {
    std::memset(dynamic_shared.base, SHARED_POISON, GUARD_BYTES + dynamic_shared.bytes +
                shared_tail_bytes(dynamic_shared.bytes));
}

// After a block: the guard zones must still hold the poison; false (error recorded) where a byte changed.
inline bool check_dynamic_shared_guards(unsigned bx, unsigned by, unsigned bz) {
    const std::size_t bytes = dynamic_shared.bytes;
    const unsigned char* base = dynamic_shared.base;
    const std::size_t end = GUARD_BYTES + bytes + shared_tail_bytes(bytes);
    for (std::size_t o = 0; o < end; o = o + 1 == GUARD_BYTES ? GUARD_BYTES + bytes : o + 1) {
        if (base[o] != SHARED_POISON) {
            record_error("block (%u,%u,%u) wrote byte %lld of its dynamic shared memory, outside the %zu bytes "
                         "the launch gave", bx, by, bz, (long long)o - (long long)GUARD_BYTES, bytes);
            return false;
        }
    }
    return true;
}

// The fiber running now gives control back to the scheduler; returns when the scheduler resumes it.
inline void yield_to_scheduler() {
    Fiber& f = *sched.fibers[sched.current];
    asm volatile("" ::: "memory");
    if (!_setjmp(f.resume)) _longjmp(sched.back, 1);
    asm volatile("" ::: "memory");
}

// A failed check inside a kernel: record it and leave the fiber for good (the launch is aborted).
inline void fail_in_kernel(const char* what, const char* file, int line) {
    record_error("%s:%d: emulated kernel check failed: %s (thread %u of block (%u,%u,%u))", file, line, what,
                 sched.fibers[sched.current]->tid, blockIdx.x, blockIdx.y, blockIdx.z);
    sched.fibers[sched.current]->wait = DONE;
    _longjmp(sched.back, 1);
}

inline void fiber_entry() {
    sched.body(sched.body_arg);
    sched.fibers[sched.current]->wait = DONE;
    _longjmp(sched.back, 1);
}

inline void set_thread_index(unsigned tid) {
    threadIdx.x = tid % blockDim.x;
    threadIdx.y = (tid / blockDim.x) % blockDim.y;
    threadIdx.z = tid / (blockDim.x * blockDim.y);
}

// Run fiber i until it yields or finishes.
inline void run_fiber(int i) {
    Fiber& f = *sched.fibers[i];
    sched.current = i;
    set_thread_index(f.tid);
    if (!_setjmp(sched.back)) {
        if (!f.started) {
            f.started = true;
            swapcontext(&sched.scheduler_context, &f.start);
        } else {
            _longjmp(f.resume, 1);
        }
    }
    asm volatile("" ::: "memory");
}

inline unsigned lanes_in_warp(unsigned nthreads, unsigned warp) {
    const unsigned first = warp * 32u;
    const unsigned n = nthreads - first < 32u ? nthreads - first : 32u;
    return n == 32u ? 0xffffffffu : ((1u << n) - 1u);
}

inline const char* op_name(int op) {
    static const char* names[] = {"__syncwarp", "__shfl_sync", "__shfl_xor_sync", "__shfl_down_sync",
                                  "__shfl_up_sync", "__ballot_sync", "__any_sync", "__all_sync"};
    return names[op];
}

// Complete the warp operation the lanes of `warp` wait at, if every lane of its mask is there.
// Returns true when lanes were released; records an error for divergence.
inline bool resolve_warp(unsigned nthreads, unsigned warp) {
    std::vector<Fiber*>& fs = sched.fibers;
    const unsigned base = warp * 32u;
    const unsigned exists = lanes_in_warp(nthreads, warp);
    int leader = -1;
    unsigned waiting = 0;
    for (unsigned l = 0; l < 32u; ++l) {
        if (!(exists >> l & 1u)) continue;
        if (fs[base + l]->wait == AT_WARP_OP) {
            waiting |= 1u << l;
            if (leader < 0) leader = (int)l;
        }
    }
    if (leader < 0) return false;
    const Fiber& lead = *fs[base + leader];
    const unsigned mask = lead.mask;
    if (mask & ~exists) {
        record_error("%s at line %d: mask 0x%08x names lanes that do not exist (warp %u has lanes 0x%08x)",
                     op_name(lead.op), lead.line, mask, warp, exists);
        return false;
    }
    for (unsigned l = 0; l < 32u; ++l) {
        if (!(waiting >> l & 1u)) continue;
        const Fiber& f = *fs[base + l];
        if (!(f.mask >> l & 1u)) {
            record_error("%s at line %d: lane %u calls it with mask 0x%08x, which does not include the lane",
                         op_name(f.op), f.line, l, f.mask);
            return false;
        }
    }
    // Lanes of the mask not waiting yet: runnable ones will come; exited or barrier-waiting ones never will.
    for (unsigned l = 0; l < 32u; ++l) {
        if (!(mask >> l & 1u) || (waiting >> l & 1u)) continue;
        const Fiber& f = *fs[base + l];
        if (f.wait == RUNNABLE) return false;
        record_error("divergent %s at line %d (mask 0x%08x): lane %u of warp %u %s", op_name(lead.op), lead.line,
                     mask, l, warp, f.wait == DONE ? "has exited" : "waits at __syncthreads");
        return false;
    }
    for (unsigned l = 0; l < 32u; ++l) {
        if (!(mask >> l & 1u)) continue;
        const Fiber& f = *fs[base + l];
        if (f.line != lead.line || f.op != lead.op || f.mask != mask || f.width != lead.width) {
            record_error("divergent warp operation in warp %u: lane %d waits at %s line %d (mask 0x%08x), lane %u "
                         "at %s line %d (mask 0x%08x)", warp, leader, op_name(lead.op), lead.line, mask, l,
                         op_name(f.op), f.line, f.mask);
            return false;
        }
    }
    // Lanes outside the mask that wait at a warp op form another group; they are resolved in a later call.
    const int width = lead.width;
    if (lead.op >= OP_SHFL && lead.op <= OP_UP && (width < 1 || width > 32 || (width & (width - 1)))) {
        record_error("%s at line %d: width %d is not a power of two in [1, 32]", op_name(lead.op), lead.line, width);
        return false;
    }
    unsigned ballot = 0;
    for (unsigned l = 0; l < 32u; ++l)
        if ((mask >> l & 1u) && fs[base + l]->value) ballot |= 1u << l;
    for (unsigned l = 0; l < 32u; ++l) {
        if (!(mask >> l & 1u)) continue;
        Fiber& f = *fs[base + l];
        const unsigned seg = l & ~(unsigned)(width - 1);  // first lane of this lane's width-segment
        unsigned src = l;
        switch (f.op) {
            case OP_SHFL: src = seg + ((unsigned)f.arg & (unsigned)(width - 1)); break;
            case OP_XOR: src = l ^ (unsigned)f.arg; if (src >= seg + (unsigned)width) src = l; break;
            case OP_DOWN: src = l + (unsigned)f.arg; if (src >= seg + (unsigned)width) src = l; break;
            case OP_UP: src = (l >= seg + (unsigned)f.arg) ? l - (unsigned)f.arg : l; break;
            default: break;
        }
        if (f.op >= OP_SHFL && f.op <= OP_UP) {
            if (src >= 32u || !(mask >> src & 1u)) {
                record_error("%s at line %d: lane %u reads lane %u, which is not in the mask 0x%08x",
                             op_name(f.op), f.line, l, src, mask);
                return false;
            }
            f.result = fs[base + src]->value;
        } else if (f.op == OP_BALLOT) {
            f.result = ballot;
        } else if (f.op == OP_ANY) {
            f.result = ballot != 0;
        } else if (f.op == OP_ALL) {
            f.result = ballot == mask;
        }
    }
    for (unsigned l = 0; l < 32u; ++l)
        if (mask >> l & 1u) fs[base + l]->wait = RUNNABLE;
    return true;
}

inline bool resolve_barrier(unsigned nthreads) {
    std::vector<Fiber*>& fs = sched.fibers;
    int line = -1;
    for (unsigned t = 0; t < nthreads; ++t) {
        if (fs[t]->wait != AT_BARRIER) continue;
        if (line < 0) line = fs[t]->line;
    }
    if (line < 0) return false;
    for (unsigned t = 0; t < nthreads; ++t) {
        const Fiber& f = *fs[t];
        if (f.wait == AT_BARRIER && f.line == line) continue;
        if (f.wait == RUNNABLE) return false;
        if (f.wait == AT_WARP_OP) continue;  // may still resolve; decided below when nothing else can move
        record_error("divergent __syncthreads at line %d: thread %u %s", line, t,
                     f.wait == DONE ? "has exited" : "waits at another __syncthreads");
        return false;
    }
    for (unsigned t = 0; t < nthreads; ++t)
        if (fs[t]->wait == AT_WARP_OP) return false;
    for (unsigned t = 0; t < nthreads; ++t) fs[t]->wait = RUNNABLE;
    return true;
}

inline int thread_order() {
    const char* v = std::getenv("VMM_EMULATION_ORDER");
    if (!v || !*v || !std::strcmp(v, "forward")) return 0;
    if (!std::strcmp(v, "reverse")) return 1;
    if (!std::strcmp(v, "shuffle")) return 2;
    if (!std::strcmp(v, "warps")) return 3;
    if (!std::strcmp(v, "warps_reverse")) return 4;
    record_error("VMM_EMULATION_ORDER must be forward, reverse, shuffle, warps or warps_reverse, got '%s'", v);
    return 0;
}

template <typename... Args, std::size_t... I>
inline void call_unpacked(void (*kernel)(Args...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<Args>>*>(args[I])...);
}

template <typename... Args>
struct KernelCall {
    void (*kernel)(Args...);
    void** args;
    static void run(void* self) {
        KernelCall* c = static_cast<KernelCall*>(self);
        call_unpacked(c->kernel, c->args, std::index_sequence_for<Args...>{});
    }
};

// Run the grid; returns 0, or 1 with the reason in sched.error.
template <typename... Args>
inline int launch(void (*kernel)(Args...), dim3 grid, dim3 block, std::size_t shared_bytes, void** args) {
    sched.failed = false;
    sched.error[0] = 0;
    gridDim = grid;
    blockDim = block;
    const unsigned nthreads = block.x * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) {
        record_error("grid (%u,%u,%u): CUDA refuses a launch with a zero grid dimension", grid.x, grid.y, grid.z);
        return 1;
    }
    if (nthreads == 0 || nthreads > 1024) {
        record_error("block of %u threads (a CUDA block has 1 to 1024)", nthreads);
        return 1;
    }
    const int order = thread_order();
    if (sched.failed) return 1;
    if (!reserve_dynamic_shared(shared_bytes)) return 1;
    const char* seed_text = std::getenv("VMM_EMULATION_SEED");
    std::mt19937 rng(seed_text ? (unsigned)std::strtoul(seed_text, nullptr, 10) : 0u);
    while (sched.fibers.size() < nthreads) {
        Fiber* f = new Fiber();
        f->stack = static_cast<char*>(std::malloc(STACK_BYTES));
        if (!f->stack) {
            delete f;
            record_error("out of memory for fiber stacks");
            return 1;
        }
        // The entry context only describes where a fiber starts; swapcontext reads it without changing
        // it, so one makecontext serves every thread this fiber runs.
        getcontext(&f->start);
        f->start.uc_stack.ss_sp = f->stack;
        f->start.uc_stack.ss_size = STACK_BYTES;
        f->start.uc_link = nullptr;
        makecontext(&f->start, (void (*)())fiber_entry, 0);
        sched.fibers.push_back(f);
    }
    KernelCall<Args...> call{kernel, args};
    sched.body = &KernelCall<Args...>::run;
    sched.body_arg = &call;
    const unsigned nwarps = (nthreads + 31u) / 32u;
    std::vector<int> runnable;
    runnable.reserve(nthreads);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx = {bx, by, bz};
                poison_dynamic_shared();
                for (unsigned t = 0; t < nthreads; ++t) {
                    Fiber& f = *sched.fibers[t];
                    f.started = false;
                    f.wait = RUNNABLE;
                    f.tid = t;
                }
                for (;;) {
                    if (order >= 3) {
                        // Warp by warp: each warp runs as far as it can — through its own warp operations —
                        // before the next warp starts, so a warp that reads what other warps write without
                        // waiting at a barrier first sees stale data.
                        for (unsigned i = 0; i < nwarps; ++i) {
                            const unsigned w = order == 3 ? i : nwarps - 1 - i;
                            const unsigned end = (w + 1) * 32u < nthreads ? (w + 1) * 32u : nthreads;
                            for (;;) {
                                for (unsigned t = w * 32u; t < end; ++t) {
                                    if (sched.fibers[t]->wait != RUNNABLE) continue;
                                    run_fiber((int)t);
                                    if (sched.failed) return 1;
                                }
                                if (!resolve_warp(nthreads, w)) break;
                            }
                            if (sched.failed) return 1;
                        }
                    }
                    runnable.clear();
                    for (unsigned t = 0; t < nthreads; ++t)
                        if (sched.fibers[t]->wait == RUNNABLE) runnable.push_back((int)t);
                    if (!runnable.empty()) {
                        if (order == 1) std::reverse(runnable.begin(), runnable.end());
                        if (order == 2) std::shuffle(runnable.begin(), runnable.end(), rng);
                        for (int t : runnable) {
                            run_fiber(t);
                            if (sched.failed) return 1;
                        }
                        continue;
                    }
                    bool done = true;
                    for (unsigned t = 0; t < nthreads; ++t) done = done && sched.fibers[t]->wait == DONE;
                    if (done) {
                        if (!check_dynamic_shared_guards(bx, by, bz)) return 1;
                        break;
                    }
                    bool moved = false;
                    for (unsigned w = 0; w < nwarps; ++w) moved = resolve_warp(nthreads, w) || moved;
                    if (sched.failed) return 1;
                    if (!moved) moved = resolve_barrier(nthreads);
                    if (sched.failed) return 1;
                    if (!moved) {
                        unsigned at_barrier = 0, at_warp = 0, exited = 0;
                        for (unsigned t = 0; t < nthreads; ++t) {
                            at_barrier += sched.fibers[t]->wait == AT_BARRIER;
                            at_warp += sched.fibers[t]->wait == AT_WARP_OP;
                            exited += sched.fibers[t]->wait == DONE;
                        }
                        record_error("deadlock in block (%u,%u,%u): %u threads at __syncthreads, %u at warp "
                                     "operations, %u exited — divergent synchronisation", bx, by, bz, at_barrier,
                                     at_warp, exited);
                        return 1;
                    }
                }
            }
    return 0;
}

// ---------------------------------------------------------------- the synchronisation primitives

inline void barrier(int line) {
    Fiber& f = *sched.fibers[sched.current];
    f.wait = AT_BARRIER;
    f.line = line;
    yield_to_scheduler();
}

template <typename T>
inline T warp_op(int op, unsigned mask, T value, int arg, int width, int line) {
    static_assert(sizeof(T) <= 8, "warp operations exchange at most 8 bytes");
    Fiber& f = *sched.fibers[sched.current];
    f.wait = AT_WARP_OP;
    f.op = op;
    f.mask = mask;
    f.arg = arg;
    f.width = width;
    f.line = line;
    f.value = 0;
    std::memcpy(&f.value, &value, sizeof(T));
    yield_to_scheduler();
    Fiber& g = *sched.fibers[sched.current];
    T out;
    std::memcpy(&out, &g.result, sizeof(T));
    return out;
}

}  // namespace vmm_emulation

#define __shared__ static
static constexpr int warpSize = 32;
// The block's dynamic shared memory (vmm_common.cuh declares it so for CUDA): a pointer to this launch's
// buffer where CUDA has an array; either converts to a pointer of the element type.
#define VMM_DYNAMIC_SHARED(name) unsigned char* const name = vmm_emulation::dynamic_shared.data
static inline unsigned int vmm_dynamic_shared_bytes() { return (unsigned int)vmm_emulation::dynamic_shared.bytes; }
// The primitives are functions with CUDA's signatures and defaults (full warp, width 32) plus a last
// defaulted argument, __builtin_LINE() (g++ and clang++), that records the caller's source line: the
// scheduler tells two different synchronisation calls apart by it.
inline void __syncthreads(int line = __builtin_LINE()) { vmm_emulation::barrier(line); }
inline void __syncwarp(unsigned mask = 0xffffffffu, int line = __builtin_LINE()) {
    vmm_emulation::warp_op<int>(vmm_emulation::OP_SYNC, mask, 0, 0, 32, line);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32, int line = __builtin_LINE()) {
    return vmm_emulation::warp_op<T>(vmm_emulation::OP_SHFL, mask, v, src_lane, width, line);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, int line = __builtin_LINE()) {
    return vmm_emulation::warp_op<T>(vmm_emulation::OP_XOR, mask, v, lane_mask, width, line);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, int line = __builtin_LINE()) {
    return vmm_emulation::warp_op<T>(vmm_emulation::OP_DOWN, mask, v, (int)delta, width, line);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, int line = __builtin_LINE()) {
    return vmm_emulation::warp_op<T>(vmm_emulation::OP_UP, mask, v, (int)delta, width, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, int line = __builtin_LINE()) {
    return vmm_emulation::warp_op<unsigned>(vmm_emulation::OP_BALLOT, mask, pred ? 1u : 0u, 0, 32, line);
}
inline int __any_sync(unsigned mask, int pred, int line = __builtin_LINE()) {
    return (int)vmm_emulation::warp_op<unsigned>(vmm_emulation::OP_ANY, mask, pred ? 1u : 0u, 0, 32, line);
}
inline int __all_sync(unsigned mask, int pred, int line = __builtin_LINE()) {
    return (int)vmm_emulation::warp_op<unsigned>(vmm_emulation::OP_ALL, mask, pred ? 1u : 0u, 0, 32, line);
}
// A check that exists only in emulation (e.g. the alignment a vector load needs); fails the launch.
#define VMM_EMU_CHECK(cond, what) \
    do { if (!(cond)) vmm_emulation::fail_in_kernel(what, __FILE__, __LINE__); } while (0)
