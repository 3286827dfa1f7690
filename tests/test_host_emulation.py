"""The host emulation's cooperative execution (ops/kernels/host_emulation.h): shared memory, barriers,
warp shuffles and votes run as on a GPU; divergent synchronisation and emulation-only checks fail the
launch with a message; VMM_EMULATION_ORDER changes the order threads run between synchronisation
points, which makes a missing barrier visible. The test kernels (tests/kernels/cooperative.cu) are
plain CUDA: nvcc and NVRTC compile them too."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import ops
from ops import compile_checks
from ops.host_emulation import EmulatedKernelError, host_compiler
from ops.kernel_loader import KernelSource

pytestmark = pytest.mark.skipif(host_compiler() is None, reason="host emulation needs a C++ compiler")

COOPERATIVE = KernelSource(
    str(Path(__file__).resolve().parent / "kernels" / "cooperative.cu"),
    (
        "coop_block_sum",
        "coop_warp_ops",
        "coop_missing_barrier",
        "coop_divergent_barrier",
        "coop_divergent_shuffle",
        "coop_shuffle_outside_mask",
        "coop_failed_check",
        "coop_syncwarp_instead_of_barrier",
        "coop_bounded_copy",
        "coop_dynamic_block_sum",
        "coop_dynamic_unwritten",
        "coop_dynamic_overrun",
    ),
)
ORDERS = ("forward", "reverse", "shuffle", "warps", "warps_reverse")
ONE_BLOCK = (128, 1, 1)


@pytest.fixture(params=ORDERS)
def order(request, monkeypatch):
    monkeypatch.setenv("VMM_EMULATION_ORDER", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_shared_memory_tree_reduction_with_barriers(order, dtype):
    x = torch.randn(1000, dtype=torch.float64)
    out = torch.zeros(8, dtype=dtype)
    COOPERATIVE.launch("coop_block_sum", (x.to(dtype), out, 1000), dtype=dtype, grid=(8, 1, 1), block=(128, 1, 1))
    expected = torch.stack([x.to(dtype).double()[i * 128 : (i + 1) * 128].sum() for i in range(8)])
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), expected.to(dtype).double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("per_thread", [1, 4])
def test_dynamic_shared_memory_sized_at_launch(order, dtype, per_thread):
    # A block of 64 threads reduces 64 * per_thread elements staged in a buffer of exactly that size.
    n, threads = 1000, 64
    blocks = -(-n // (threads * per_thread))
    acc_bytes = 8 if dtype == torch.float64 else 4
    x = torch.randn(n, dtype=torch.float64)
    out = torch.zeros(blocks, dtype=dtype)
    COOPERATIVE.launch(
        "coop_dynamic_block_sum",
        (x.to(dtype), out, n, per_thread),
        dtype=dtype,
        grid=(blocks, 1, 1),
        block=(threads, 1, 1),
        shared_mem=threads * per_thread * acc_bytes,
    )
    chunk = threads * per_thread
    expected = torch.stack([x.to(dtype).double()[i * chunk : (i + 1) * chunk].sum() for i in range(blocks)])
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), expected.to(dtype).double(), rtol=tol, atol=tol)


def test_kernel_sees_the_dynamic_shared_size_the_launch_gave():
    # One byte short of the slice: the kernel refuses (NaN) rather than run past its buffer.
    x, out = torch.ones(256), torch.zeros(1)
    args = (x, out, 256, 2)
    COOPERATIVE.launch(
        "coop_dynamic_block_sum",
        args,
        dtype=torch.float32,
        grid=(1, 1, 1),
        block=(128, 1, 1),
        shared_mem=128 * 2 * 4 - 1,
    )
    assert out.isnan().all()
    COOPERATIVE.launch(
        "coop_dynamic_block_sum", args, dtype=torch.float32, grid=(1, 1, 1), block=(128, 1, 1), shared_mem=128 * 2 * 4
    )
    assert out.item() == 256


def poison(dtype: torch.dtype) -> torch.Tensor:
    """One element of the emulator's poison (host_emulation.h's SHARED_POISON bytes) read as ``dtype``."""
    header = (Path(ops.__file__).parent / "kernels" / "host_emulation.h").read_text(encoding="utf-8")
    byte = int(re.search(r"SHARED_POISON = (0x[0-9a-f]+);", header).group(1), 16)
    size = torch.finfo(dtype).bits // 8
    return torch.frombuffer(bytearray([byte] * size), dtype=dtype)[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dynamic_shared_memory_starts_poisoned_in_every_block(dtype):
    # Block 0 writes and reads back its values; block 1 writes nothing and reads the emulator's poison,
    # not what block 0 left: a kernel that reads shared memory before writing it fails tests.
    x = torch.arange(1.0, 33.0, dtype=dtype)
    out = torch.zeros(2, 32, dtype=dtype)
    shared = 32 * x.element_size()
    COOPERATIVE.launch(
        "coop_dynamic_unwritten", (x, out), dtype=dtype, grid=(2, 1, 1), block=(32, 1, 1), shared_mem=shared
    )
    assert torch.equal(out[0], x) and (out[1] == poison(dtype)).all()
    assert 1e9 < poison(dtype).abs() < float("inf")


def test_write_past_the_dynamic_shared_memory_fails_the_launch():
    x = torch.ones(32)
    with pytest.raises(EmulatedKernelError, match=r"wrote byte 128 of its dynamic shared memory, outside the 128"):
        COOPERATIVE.launch(
            "coop_dynamic_overrun",
            (x, torch.zeros(32)),
            dtype=torch.float32,
            grid=(1, 1, 1),
            block=(32, 1, 1),
            shared_mem=32 * 4,
        )
    out = torch.zeros(32)  # one element more: in bounds (the last thread's write is the buffer's last element)
    COOPERATIVE.launch(
        "coop_dynamic_overrun", (x, out), dtype=torch.float32, grid=(1, 1, 1), block=(32, 1, 1), shared_mem=33 * 4
    )
    assert out[0] == poison(torch.float32) and torch.equal(out[1:], x[1:])


@pytest.mark.parametrize(
    ("shared_mem", "match"), [(48 * 1024 + 1, "exceed the 49152"), (-1, "non-negative"), (1.5, "non-negative")]
)
def test_launch_refuses_dynamic_shared_memory_a_gpu_would_not_give(shared_mem, match):
    from ops.validation import OpArgumentError

    x = torch.zeros(128)
    with pytest.raises(OpArgumentError, match=match):
        COOPERATIVE.launch(
            "coop_dynamic_block_sum",
            (x, x[:1].clone(), 128, 1),
            dtype=torch.float32,
            grid=(1, 1, 1),
            block=ONE_BLOCK,
            shared_mem=shared_mem,
        )


def _expected_warp_ops(x: torch.Tensor) -> torch.Tensor:
    """What CUDA defines for coop_warp_ops, lane by lane (one warp per block)."""
    rows = []
    for w in range(x.numel() // 32):
        v = x[w * 32 : (w + 1) * 32].tolist()
        ballot = sum(1 << lane for lane in range(32) if v[lane] > 0)
        for lane in range(32):
            down = v[lane + 3] if lane + 3 < 32 else v[lane]
            segment = lane // 16 * 16
            up = v[lane - 5] if lane - 5 >= segment else v[lane]
            bcast = v[lane // 8 * 8 + 2]
            index = w * 32 + (lane ^ 1)
            any_big = float(any(a > 100 for a in v))
            all_above = float(all(a > -100 for a in v))
            rows.append([sum(v), down, up, bcast, float(ballot), any_big, all_above, float(index)])
    return torch.tensor(rows, dtype=torch.float64)


def test_warp_shuffles_and_votes_follow_cuda_semantics(order):
    x = torch.randn(64, dtype=torch.float64)
    x[5] = 150.0  # one lane of warp 0 makes __any_sync true there, not in warp 1
    out = torch.zeros(64 * 8, dtype=torch.float64)
    COOPERATIVE.launch("coop_warp_ops", (x, out), dtype=torch.float64, grid=(2, 1, 1), block=(32, 1, 1))
    torch.testing.assert_close(out.view(64, 8), _expected_warp_ops(x), rtol=1e-12, atol=1e-12)


def test_thread_order_exposes_a_missing_barrier(monkeypatch):
    x = torch.arange(64, dtype=torch.float32) + 1
    results = {}
    for order in ORDERS:
        monkeypatch.setenv("VMM_EMULATION_ORDER", order)
        out = torch.zeros(64)
        COOPERATIVE.launch("coop_missing_barrier", (x, out), dtype=torch.float32, grid=(1, 1, 1), block=(64, 1, 1))
        results[order] = out
    # Forward: every thread reads its neighbour's slot before the neighbour wrote it this launch;
    # reverse: after. A race-free kernel gives one answer under every order.
    assert not torch.equal(results["forward"], results["reverse"])
    torch.testing.assert_close(results["reverse"], torch.roll(x, -1))


def test_warps_order_exposes_a_warp_that_reads_other_warps_without_a_barrier(monkeypatch):
    # Every warp's lanes hold 1, so the right answer is the block size; warp 0 running ahead of the
    # other warps reads their slots before they are written (0 from a fresh library's shared memory,
    # or whatever an earlier launch left there — anything but 128 from this launch's warps 1..3).
    x = torch.ones(128)
    results = {}
    for order in ORDERS:
        monkeypatch.setenv("VMM_EMULATION_ORDER", order)
        out = torch.full((1,), -1.0)
        COOPERATIVE.launch(
            "coop_syncwarp_instead_of_barrier",
            (x * (len(results) + 1), out),
            dtype=torch.float32,
            grid=(1, 1, 1),
            block=ONE_BLOCK,
        )
        results[order] = out.item() / (len(results) + 1)
    assert results["forward"] == results["reverse"] == results["shuffle"] == 128
    assert results["warps"] != 128 and results["warps_reverse"] == 128


def test_zero_grid_dimension_is_refused_as_cuda_does():
    x = torch.zeros(128)
    with pytest.raises(EmulatedKernelError, match="zero grid dimension"):
        COOPERATIVE.launch(
            "coop_block_sum", (x, x[:1].clone(), 128), dtype=torch.float32, grid=(0, 1, 1), block=ONE_BLOCK
        )


def test_unknown_thread_order_is_an_error(monkeypatch):
    monkeypatch.setenv("VMM_EMULATION_ORDER", "backwards")
    x = torch.zeros(128)
    args = (x, x[:1].clone(), 128)
    with pytest.raises(
        EmulatedKernelError, match="VMM_EMULATION_ORDER must be forward, reverse, shuffle, warps or warps_reverse"
    ):
        COOPERATIVE.launch("coop_block_sum", args, dtype=torch.float32, grid=(1, 1, 1), block=ONE_BLOCK)


@pytest.mark.parametrize(
    ("kernel", "threads", "match"),
    [
        ("coop_divergent_barrier", 64, r"divergent __syncthreads at line \d+: thread 32 has exited"),
        ("coop_divergent_shuffle", 32, r"divergent __shfl_xor_sync at line \d+ \(mask 0xffffffff\): lane 16"),
        ("coop_shuffle_outside_mask", 32, r"lane 8 reads lane 16, which is not in the mask 0x0000ffff"),
        ("coop_failed_check", 32, r"cooperative.cu:\d+: emulated kernel check failed: thread 3 is not allowed"),
    ],
)
def test_broken_synchronisation_fails_the_launch_loudly(kernel, threads, match):
    x = torch.zeros(64)
    with pytest.raises(EmulatedKernelError, match=match):
        COOPERATIVE.launch(kernel, (x, torch.zeros(64)), dtype=torch.float32, grid=(1, 1, 1), block=(threads, 1, 1))
    # The emulator is usable again after a failed launch.
    out = torch.zeros(1)
    COOPERATIVE.launch("coop_block_sum", (x + 1, out, 64), dtype=torch.float32, grid=(1, 1, 1), block=(128, 1, 1))
    assert out.item() == 64


def test_full_mask_on_a_partial_warp_is_an_error():
    # 48 threads: warp 1 has 16 lanes, so a full-mask shuffle names lanes that do not exist.
    x = torch.zeros(64 * 8, dtype=torch.float64)
    with pytest.raises(EmulatedKernelError, match="names lanes that do not exist"):
        COOPERATIVE.launch("coop_warp_ops", (x, x.clone()), dtype=torch.float64, grid=(1, 1, 1), block=(48, 1, 1))


def test_block_larger_than_cuda_allows_is_refused():
    x, huge = torch.zeros(2048), (2048, 1, 1)
    with pytest.raises(EmulatedKernelError, match="block of 2048 threads"):
        COOPERATIVE.launch("coop_block_sum", (x, x[:1].clone(), 2048), dtype=torch.float32, grid=(1, 1, 1), block=huge)


def test_block_larger_than_the_kernels_launch_bounds_is_refused():
    x = torch.arange(128, dtype=torch.float32)
    out = torch.zeros_like(x)
    COOPERATIVE.launch("coop_bounded_copy", (x, out), dtype=torch.float32, grid=(1, 1, 1), block=(64, 1, 1))
    assert torch.equal(out[:64], x[:64])
    with pytest.raises(EmulatedKernelError, match=r"block of 128 threads exceeds its __launch_bounds__\(64\)"):
        COOPERATIVE.launch("coop_bounded_copy", (x, out), dtype=torch.float32, grid=(1, 1, 1), block=(128, 1, 1))


def test_launch_bounds_are_read_from_every_kernel_source():
    # Macro-generated declarations (sifa_fast.cu) and macro bounds (tvl1_plane.cu) included.
    import ops  # noqa: F401  (registers every source)
    from ops.host_emulation import launch_bounds
    from ops.kernel_loader import expand_includes, registered_sources

    sources = registered_sources()
    fast = launch_bounds(expand_includes(sources["sifa_fast.cu"].path), host_compiler())
    assert set(sources["sifa_fast.cu"].kernels) <= set(fast), fast
    plane = launch_bounds(expand_includes(sources["tvl1_plane.cu"].path), host_compiler())
    assert set(plane) == {"tvl1_plane_forward", "tvl1_plane_backward"}
    assert all(expr.strip("() ").isdigit() for expr in plane.values()), plane


@pytest.mark.slow
def test_source_files_load_under_an_ascii_locale(tmp_path):
    # The kernel sources hold UTF-8 (§, ²); reading them with the locale's codec fails under LC_ALL=C.
    import subprocess
    import sys

    code = (
        "import torch, ops\n"
        "from ops.backends import use_kernel_variant\n"
        "for variant in ('simple', 'fast'):\n"
        "    with ops.kernel_host_emulation(), use_kernel_variant(variant):\n"
        "        ops.SIFA(4, backend='emulated')(torch.randn(1, 4, 2, 5, 5))\n"
        "        ops.FlowLayer(2, n_iter=2, backend='emulated')(torch.randn(1, 2, 3, 6, 6))\n"
        "print('loaded')\n"
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    env["VMM_CACHE"] = str(tmp_path)  # a fresh emulation cache: the compile path runs too
    proc = subprocess.run(
        [sys.executable, "-X", "utf8=0", "-c", code],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        timeout=600,
    )
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cooperative_test_kernels_are_valid_cuda():
    compile_checks.nvcc_compile_check(COOPERATIVE, archs=("sm_80",))
