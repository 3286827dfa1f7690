"""benchmarks/bench_decode.py --peers: the comparison runs, and its frame check rejects a wrong reader
(figures come from full runs, not from here)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from helpers import REPO_ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_decode", REPO_ROOT / "benchmarks" / "bench_decode.py")
    module = importlib.util.module_from_spec(spec)
    # registered, so the worker pool can pickle its functions by name
    sys.modules["bench_decode"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["bench_decode"]


def _kinetics(bench, shared_videos, tmp_path):
    (w,) = bench.make_workloads(tmp_path, shared_videos / "kinetics_arm_wrestling.mp4", ["kinetics"])
    return w


def test_frame_check_rejects_a_reader_one_frame_late(bench, shared_videos, tmp_path):
    """A fast reader that returns the next frame instead of the asked one must fail the check."""
    w = _kinetics(bench, shared_videos, tmp_path)
    index = bench.build_index(w.path)
    clips = bench.recipe_clips(w.num_frames, 8, 8, 2, seed=0)
    size = bench._target_size(w, 256)

    def one_late(w, idx, size, short_side):
        return bench.read_vmm(w, np.minimum(idx + 1, w.num_frames - 1), size, short_side)

    bench.READERS["one late"] = one_late
    try:
        assert "pyav naive 0.00" in bench.check_readers(w, index, clips, ["vmm", "pyav naive"], 256, size)
        with pytest.raises(AssertionError, match=r"one late: frame \d+ (differs from vmm's|is nearer vmm's neighbour)"):
            bench.check_readers(w, index, clips, ["vmm", "one late"], 256, size)
    finally:
        del bench.READERS["one late"]


def test_limit_decodes_from_the_keyframe_to_each_sampled_frame(bench, shared_videos, tmp_path):
    w = _kinetics(bench, shared_videos, tmp_path)
    index = bench.build_index(w.path)
    key_pos = np.searchsorted(index.all_pts, index.keyframe_pts)
    idx = np.array([int(key_pos[1]) + 3, int(key_pos[1]) + 9])  # one run from the second keyframe
    assert bench.read_limit(w, idx, (340, 256), 256, index) == 10


def test_clips_are_the_same_for_every_reader_and_seeded(bench):
    a = bench.recipe_clips(280, 8, 0, 3, seed=5)
    b = bench.recipe_clips(280, 8, 0, 3, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(x.size == 8 and np.all(np.diff(x) > 0) for x in a)  # one frame per segment, sorted


@pytest.mark.slow
def test_peers_quick_runs(bench, shared_videos, tmp_path, capsys):
    pytest.importorskip("decord", reason="decord2 (the `bench` extra) is not installed")
    results = bench.main(
        [
            "--peers",
            "--quick",
            "--workdir",
            str(tmp_path),
            "--only",
            "kinetics",
            "--source",
            str(shared_videos / "kinetics_arm_wrestling.mp4"),
        ]
    )
    keys = {k[3] for k in results["cpu"]}
    assert {"vmm", "pyav naive", "decord2", "limit"} <= keys
    assert all(v > 0 for v in results["cpu"].values()) and all(v > 0 for v in results["wall"].values())
    out = capsys.readouterr().out
    assert "| kinetics 340x256 | 16x4 | 1 |" in out and "vmm/decord2" in out
    assert "torchcodec" in out  # its version, or why it does not load
