"""PyAV decoding: packet index, pts-exact frame selection (CFR, VFR, B-frames, AVI), bad files."""

from __future__ import annotations

import av
import numpy as np
import pytest

from datamodules.decode import VideoDecodeError, VideoReader, build_index, decode_frames, probe_full_decode
from datamodules.encode import write_video

REAL = {
    # file: (frames, fps, width, height) from the shared videos' README
    "kinetics_arm_wrestling.mp4": (280, 28, 340, 256),
    "h264_340x256.mp4": (300, 30, 340, 256),
    "mpeg4_320x240.avi": (164, 25, 320, 240),
}


def _sequential(path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _id_frames(n: int, h: int = 64, w: int = 96) -> np.ndarray:
    """Frames whose index is written as 6 bits in big black/white blocks (survives lossy coding),
    over a moving texture so the encoder makes P/B-frames."""
    rng = np.random.default_rng(1)
    base = (rng.random((h, w, 3)) * 120 + 60).astype(np.uint8)
    out = np.stack([np.roll(base, 2 * k, axis=1) for k in range(n)])
    for k in range(n):
        for b in range(6):
            out[k, : h // 4, b * (w // 6) : (b + 1) * (w // 6)] = 255 if (k >> b) & 1 else 0
    return out


def _read_ids(frames: np.ndarray) -> list[int]:
    h, w = frames.shape[1:3]
    ids = []
    for f in frames:
        bits = [f[2 : h // 4 - 2, b * (w // 6) + 2 : (b + 1) * (w // 6) - 2].mean() > 127 for b in range(6)]
        ids.append(sum(int(v) << b for b, v in enumerate(bits)))
    return ids


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_clip_index_and_frames_match_sequential_decode(shared_videos, name):
    path = shared_videos / name
    frames, fps, w, h = REAL[name]
    ref = _sequential(path)
    with VideoReader(path) as reader:
        index = reader.index
        assert index.num_frames == frames == len(ref)
        assert (index.width, index.height) == (w, h)
        assert index.fps == pytest.approx(fps, rel=1e-3)
        # A training-style clip (16 frames at interval 2) and a scattered, repeated selection.
        clip = np.arange(16) * 2 + 101
        got = reader.decode(clip)
        for k, i in enumerate(clip):
            np.testing.assert_array_equal(got[k], ref[i])
        sel = [frames - 1, 0, 5, 5, frames // 2]
        got = reader.decode(sel)
        for k, i in enumerate(sel):
            np.testing.assert_array_equal(got[k], ref[i])
    # Timestamps of the sampled clip: evenly spaced at the nominal rate for these CFR files.
    np.testing.assert_allclose(index.times(clip), (np.arange(16) * 2 + 101) / fps, atol=1e-6)


def test_decoder_side_resize_and_threads(shared_videos):
    path = shared_videos / "kinetics_arm_wrestling.mp4"
    index = build_index(path)
    sel = [10, 40, 200, 250, 279, 5]  # several runs from different keyframes, each drained
    one = decode_frames(index, sel, short_side=128, threads=1)
    two = decode_frames(index, sel, short_side=128, threads=2)
    assert one.shape == (6, 128, 170, 3) and one.dtype == np.uint8
    np.testing.assert_array_equal(one, two)  # frame threading does not change the result
    full = decode_frames(index, [10])[0].astype(np.float32)
    # The swscale result is a downscaled version of the full frame (close in mean colour).
    assert abs(full.mean() - one[0].astype(np.float32).mean()) < 3.0


def test_lossless_known_frames_exact(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    frames = np.stack([np.roll(base, k, axis=1) for k in range(40)])
    path = tmp_path / "lossless.mp4"
    write_video(path, frames, fps=25, lossless=True, gop=8)
    with VideoReader(path) as reader:
        assert reader.index.num_frames == 40
        assert len(reader.index.keyframe_pts) == 5  # several GOPs, so seeks are exercised
        for sel in ([0, 1, 2], [7, 8, 9], [39], [33, 12, 12, 25], list(range(3, 40, 4))):
            got = reader.decode(sel)
            for k, i in enumerate(sel):
                np.testing.assert_array_equal(got[k], frames[i], err_msg=f"frame {i}")


@pytest.mark.parametrize("container", ["mkv", "mp4"])
def test_variable_frame_rate_index_is_by_timestamp(tmp_path, container):
    rng = np.random.default_rng(2)
    n = 36
    pts_ms = np.concatenate([[0], np.cumsum(rng.integers(10, 120, n - 1))])
    frames = _id_frames(n)
    path = tmp_path / f"vfr.{container}"
    write_video(path, frames, pts_ms=pts_ms, gop=10, crf=18)
    with VideoReader(path) as reader:
        index = reader.index
        assert index.num_frames == n
        np.testing.assert_allclose(index.times(np.arange(n)), pts_ms / 1000, atol=1.5e-3)
        # A constant-frame-rate assumption would map these indices to other frames.
        sel = [30, 3, 17, 18, 35, 9]
        assert _read_ids(reader.decode(sel)) == sel
        win = reader.window(pts_ms[10] / 1000, pts_ms[20] / 1000)
        assert win.num_frames == 10
        assert _read_ids(reader.decode([0, 9])) == [10, 19]


def test_b_frames_lossy_ids(tmp_path):
    frames = _id_frames(50)
    path = tmp_path / "bframes.mp4"
    write_video(path, frames, fps=25, gop=12, b_frames=3, crf=18)
    with av.open(str(path)) as c:
        pts_decode_order = [p.pts for p in c.demux(video=0) if p.size]
    assert pts_decode_order != sorted(pts_decode_order), "expected B-frames (reordered packets)"
    with VideoReader(path) as reader:
        for sel in ([0, 2, 4, 6], [13, 14, 15], [49, 48], list(range(21, 50, 3))):
            assert _read_ids(reader.decode(sel)) == sel
            assert _read_ids(reader.decode(sel, skip_nonref=False)) == sel


def test_bad_files_raise_decode_error(tmp_path, shared_videos):
    with pytest.raises(VideoDecodeError, match="file not found"):
        build_index(tmp_path / "missing.mp4")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="zero-byte"):
        build_index(empty)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoDecodeError):
        build_index(garbage)
    data = (shared_videos / "kinetics_arm_wrestling.mp4").read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 3])  # its moov atom is at the end: cannot be opened
    with pytest.raises(VideoDecodeError, match="cannot open"):
        build_index(truncated)
    data = (shared_videos / "mpeg4_320x240.avi").read_bytes()
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(data[: len(data) // 3])  # header intact, most frames gone
    with pytest.raises(VideoDecodeError, match="truncated: 49 of the 164 frames"):
        build_index(truncated)


def test_truncated_faststart_mp4(tmp_path, shared_videos):
    """A partial download of an mp4 whose index (moov) precedes the data."""
    faststart = tmp_path / "faststart.mp4"
    with av.open(str(shared_videos / "kinetics_arm_wrestling.mp4")) as src:
        with av.open(str(faststart), "w", options={"movflags": "faststart"}) as out:
            stream = out.add_stream_from_template(src.streams.video[0])
            for packet in src.demux(video=0):
                if packet.dts is not None:
                    packet.stream = stream
                    out.mux(packet)
    data = faststart.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    assert build_index(faststart).num_frames == 280
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match="truncated"):
        build_index(cut)


def test_decode_argument_validation(shared_videos):
    index = build_index(shared_videos / "mpeg4_320x240.avi")
    with pytest.raises(ValueError, match="frame_indices"):
        decode_frames(index, [])
    with pytest.raises(ValueError, match=r"frame_indices: expected values in \[0, 164\)"):
        decode_frames(index, [0, 164])


def test_probe_full_decode(shared_videos):
    info = probe_full_decode(shared_videos / "mpeg4_320x240.avi")
    assert info["frames"] == 164 and info["codec"] == "mpeg4"
    assert info["fps"] == pytest.approx(25, rel=1e-3)


def test_decode_benchmark_runs(shared_videos, capsys):
    """benchmarks/bench_decode.py stays runnable (figures come from full runs, not from here)."""
    import importlib.util

    from helpers import REPO_ROOT

    spec = importlib.util.spec_from_file_location("bench_decode", REPO_ROOT / "benchmarks" / "bench_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rates = bench.main(["--video", str(shared_videos / "kinetics_arm_wrestling.mp4"), "--clips", "2", "--repeats", "1"])
    assert set(rates) == {"naive", "ours", "ours, index cached"} and all(r > 0 for r in rates.values())
    assert "x naive" in capsys.readouterr().out


def test_avi_with_b_frames_and_many_gops_matches_sequential_decode(tmp_path):
    """AVI has no real pts: frames are located by counting decoder output from a keyframe."""
    frames = _id_frames(50)
    path = tmp_path / "packed.avi"
    write_video(path, frames, fps=25, encoder="mpeg4", gop=10, b_frames=2)
    ref = _sequential(path)
    with VideoReader(path) as reader:
        assert reader.index.num_frames == 50 and not reader.index.pts_reliable
        for sel in ([0, 1, 2, 3], [13, 14, 15, 16], [49, 48, 22], list(range(21, 50, 3))):
            got = reader.decode(sel)
            for k, i in enumerate(sel):
                np.testing.assert_array_equal(got[k], ref[i], err_msg=f"frame {i}")
            assert _read_ids(got) == sel


def test_pyav_without_metadata_errors_argument(shared_videos, monkeypatch):
    """PyAV 19 (seen on a CUDA image) rejects `av.open(..., metadata_errors=...)` with TypeError; the
    reader must fall back to a plain open instead of failing every clip."""
    import datamodules.decode as decode

    real_open = av.open

    def open_like_pyav19(*args, **kwargs):
        if "metadata_errors" in kwargs:
            raise TypeError("open() got an unexpected keyword argument 'metadata_errors'")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(decode.av, "open", open_like_pyav19)
    monkeypatch.setattr(decode, "_OPEN_KWARGS", {"metadata_errors": "ignore"})
    path = shared_videos / "kinetics_arm_wrestling.mp4"
    ref = _sequential(path)
    with VideoReader(path) as reader:
        np.testing.assert_array_equal(reader.decode([3])[0], ref[3])
    assert decode._OPEN_KWARGS == {}  # decided once, not retried per clip
    with VideoReader(path) as reader:
        assert reader.index.num_frames == len(ref)
