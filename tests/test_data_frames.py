"""Frame-folder decoding (datamodules.frames) on JPEG frames extracted from the shared real clips:
the same frames as PyAV decoding of the clip, reduced-scale JPEG decoding, templates, and the
bad-data policy (missing folder/file, empty folder, unreadable image) inside the clip datasets.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers.frames import read_frames, write_jpeg_folder
from PIL import Image

from datamodules import ClipSettings, ClipTransform, VideoClipDataset, VideoDecodeError
from datamodules.decode import VideoReader
from datamodules.frames import (
    FrameFolderReader,
    FrameIndex,
    FrameRecord,
    check_template,
    frame_index,
    probe_frame_folder,
)

CLIP = "h264_340x256.mp4"


@pytest.fixture(scope="module")
def clip_frames(request) -> list[np.ndarray]:
    from helpers import SHARED_VIDEOS

    if not (SHARED_VIDEOS / CLIP).is_file():
        pytest.skip(f"shared test videos not found at {SHARED_VIDEOS}")
    return read_frames(SHARED_VIDEOS / CLIP, 20)


def test_frames_match_pyav_decoding_of_the_same_clip(clip_frames, shared_videos, tmp_path):
    folder = write_jpeg_folder(tmp_path / "clip", clip_frames, quality=95)
    want = [0, 7, 7, 3, 19]  # repeats and any order, as the samplers may ask
    with FrameFolderReader(folder) as frames_reader:
        assert frames_reader.index.num_frames == 20
        got = frames_reader.decode(want, short_side=128)
    with VideoReader(shared_videos / CLIP) as video_reader:
        ref = video_reader.decode(want, short_side=128)
    assert got.dtype == np.uint8 and got.shape == ref.shape == (5, 128, 170, 3)
    np.testing.assert_array_equal(got[1], got[2])
    # JPEG loss and two resize implementations: close, not equal; another frame is much further.
    diff = np.abs(got.astype(np.int16) - ref.astype(np.int16)).mean(axis=(1, 2, 3))
    assert diff.max() < 6, diff
    assert np.abs(got[0].astype(np.int16) - ref[4].astype(np.int16)).mean() > 2 * diff.max()


def test_reduced_scale_decoding_gives_the_exact_size_and_the_full_decode_content(clip_frames, tmp_path):
    folder = write_jpeg_folder(tmp_path / "clip", clip_frames[:2], quality=95)
    reader = FrameFolderReader(folder)
    small = reader.decode([0], short_side=64)[0]  # 256 -> DCT scale 1/4 (64) -> no resize left
    assert small.shape == (64, 85, 3)
    with Image.open(folder / "img_00001.jpg") as im:
        full = np.asarray(im.convert("RGB").resize((85, 64), Image.Resampling.BILINEAR))
    assert np.abs(small.astype(np.int16) - full.astype(np.int16)).mean() < 4
    assert reader.decode([1], short_side=None).shape == (1, 256, 340, 3)
    assert reader.decode([1], short_side=200).shape == (1, 200, 266, 3)


def test_templates_zero_based_png_and_errors(clip_frames, tmp_path):
    small = [f[::4, ::4] for f in clip_frames[:5]]
    folder = write_jpeg_folder(tmp_path / "png", [], template="{:06d}.png")
    for i, f in enumerate(small):
        Image.fromarray(f).save(folder / f"{i:06d}.png")
    index = frame_index(folder, "{:06d}.png", start_index=0)
    assert index.num_frames == 5
    got = FrameFolderReader(folder, index=index).decode([4, 0])
    np.testing.assert_array_equal(got[0], small[4])  # PNG is lossless: exact frames, exact order
    assert frame_index(folder, "{:06d}.png", start_index=1).num_frames == 4  # 000001..000004
    (tmp_path / "only0").mkdir()
    Image.fromarray(small[0]).save(tmp_path / "only0" / "img_00000.jpg")
    with pytest.raises(VideoDecodeError, match="set start_index=0"):
        frame_index(tmp_path / "only0")
    for bad in ("img.jpg", "img_{:05d}_{:02d}.jpg", "{name}.jpg", "sub/{:05d}.jpg"):
        with pytest.raises(ValueError, match="template"):
            check_template(bad)
    with pytest.raises(ValueError, match="start_index"):
        check_template("{:05d}.jpg", start_index=2)
    with pytest.raises(ValueError, match="frame_indices"):
        FrameFolderReader(folder, index=index).decode([5])


def test_bad_frame_folders_raise_decode_errors_naming_the_folder(clip_frames, tmp_path):
    small = [f[::4, ::4] for f in clip_frames[:6]]
    with pytest.raises(VideoDecodeError, match="frame folder not found"):
        frame_index(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoDecodeError, match="no frame files"):
        frame_index(tmp_path / "empty")
    gap = write_jpeg_folder(tmp_path / "gap", small)
    (gap / "img_00003.jpg").unlink()
    assert frame_index(gap).num_frames == 6  # numbering defines the length; the gap is found on use
    FrameFolderReader(gap).decode([0, 1, 3])
    with pytest.raises(VideoDecodeError, match="frame file missing: img_00003.jpg") as exc:
        FrameFolderReader(gap).decode([0, 2])
    assert exc.value.path == str(gap)
    broken = write_jpeg_folder(tmp_path / "broken", small)
    (broken / "img_00002.jpg").write_bytes(b"not a jpeg at all")
    data = (broken / "img_00004.jpg").read_bytes()
    (broken / "img_00004.jpg").write_bytes(data[: len(data) // 2])  # a truncated file
    with pytest.raises(VideoDecodeError, match="unreadable frame img_00002.jpg"):
        FrameFolderReader(broken).decode([1])
    with pytest.raises(VideoDecodeError, match="unreadable frame img_00004.jpg"):
        FrameFolderReader(broken).decode([3], short_side=32)
    listed = frame_index(tmp_path / "absent", num_frames=8)  # a listed count is trusted, no scan
    with pytest.raises(VideoDecodeError, match="frame file missing"):
        FrameFolderReader(tmp_path / "absent", index=listed).decode([0])


def test_frames_given_as_bytes_decode_like_the_folder_files(clip_frames, tmp_path):
    folder = write_jpeg_folder(tmp_path / "clip", clip_frames[:6], quality=95)
    images = [(folder / f"img_{i:05d}.jpg").read_bytes() for i in range(1, 7)]
    want = [5, 0, 0, 3]
    for short_side in (None, 64, 200):  # full size, DCT scaling alone, DCT scaling and a resize
        from_bytes = FrameFolderReader("clip in memory", images=images).decode(want, short_side=short_side)
        np.testing.assert_array_equal(from_bytes, FrameFolderReader(folder).decode(want, short_side=short_side))
    ramp = (np.arange(16 * 24, dtype=np.uint32).reshape(16, 24) * 170).astype(np.uint16)
    png16 = io.BytesIO()
    Image.fromarray(ramp).save(png16, format="PNG")
    got = FrameFolderReader("grey", images=[png16.getvalue()]).decode([0])
    np.testing.assert_array_equal(got[0], np.repeat((ramp >> 8).astype(np.uint8)[..., None], 3, axis=-1))
    with pytest.raises(VideoDecodeError, match=r"^clip in memory: unreadable frame 1: "):
        FrameFolderReader("clip in memory", images=[images[0], b"not a jpeg"]).decode([1])
    with pytest.raises(VideoDecodeError, match="^empty: no frame images"):
        FrameFolderReader("empty", images=[])
    with pytest.raises(ValueError, match="index: counts 3 frames, but images holds 6"):
        FrameFolderReader("clip", images=images, index=FrameIndex("clip", 3))


def test_clip_dataset_reads_frame_records_and_counts_bad_folders(clip_frames, tmp_path):
    small = [f[::2, ::2] for f in clip_frames[:12]]  # 128x170
    good = [write_jpeg_folder(tmp_path / f"v{i}", small[i:]) for i in range(3)]
    (tmp_path / "empty").mkdir()
    records = [FrameRecord(str(p), i % 2) for i, p in enumerate(good)]
    records += [FrameRecord(str(tmp_path / "empty"), 0), FrameRecord(str(tmp_path / "absent"), 1)]
    clip = ClipSettings(num_frames=4, frame_interval=2)
    test = VideoClipDataset(
        records,
        mode="test",
        clip=clip,
        test_clips=2,
        transform=ClipTransform(train=False, short_side=(64, 64), crop_size=48, num_crops=3),
    )
    item = test[1]
    assert item["video"].shape == (6, 3, 4, 48, 48) and item["video"].dtype == torch.uint8
    assert item["label"].tolist() == [1] * 6 and item["bad_video_ids"].numel() == 0
    for bad_id in (3, 4):
        bad = test[bad_id]
        assert bad["video"].shape[0] == 0 and bad["bad_video_ids"].tolist() == [bad_id]
    train = VideoClipDataset(
        records,
        mode="train",
        clip=clip,
        max_retries=20,
        transform=ClipTransform(train=True, short_side=(56, 64), crop_size=48, flip=True),
    )
    seen_bad: set[int] = set()
    for idx in (3, 4, 3, 4):
        out = train[idx]
        assert out["video"].shape == (1, 3, 4, 48, 48)  # replaced by a readable folder
        assert out["video_id"].item() in (0, 1, 2)
        seen_bad |= set(out["bad_video_ids"].tolist())
    assert {3, 4} <= seen_bad


def test_check_data_reads_every_frame_and_reports_bad_folders(clip_frames, tmp_path):
    from datamodules import RawFrameListDataModule
    from datamodules.check import check_datamodule

    small = [f[::4, ::4] for f in clip_frames[:6]]  # 64x85
    write_jpeg_folder(tmp_path / "good", small)
    trunc = write_jpeg_folder(tmp_path / "trunc", small)
    data = (trunc / "img_00006.jpg").read_bytes()
    (trunc / "img_00006.jpg").write_bytes(data[: len(data) // 3])  # a frame no clip may ever sample
    (tmp_path / "empty").mkdir()
    (tmp_path / "list.txt").write_text("good 6 0\ntrunc 6 1\nempty 6 0\nabsent 6 1\n", encoding="utf-8")
    dm = RawFrameListDataModule(root=str(tmp_path), train_list="list.txt", trust_counts=False)
    report = check_datamodule(dm, splits=["train"], num_workers=0, print_table=False).splits["train"]
    assert report.videos == 4 and report.readable == 1 and report.frames == [6]
    reasons = dict(report.unreadable) | {p: r for p, r in getattr(report, "unusable", [])}
    assert "unreadable frame img_00006.jpg" in reasons[str(tmp_path / "trunc")]
    assert "no frame files" in reasons[str(tmp_path / "empty")]
    assert "not found" in reasons[str(tmp_path / "absent")]


def test_decode_benchmark_frames_cases_run(shared_videos, capsys):
    """benchmarks/bench_decode.py --frames stays runnable (figures come from full runs, not from here)."""
    import importlib.util

    from helpers import REPO_ROOT

    spec = importlib.util.spec_from_file_location("bench_decode", REPO_ROOT / "benchmarks" / "bench_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rates = bench.main(
        [
            "--video",
            str(shared_videos / "mpeg4_320x240.avi"),
            "--clips",
            "2",
            "--repeats",
            "1",
            "--frames",
            "--short-side",
            "120",
        ]
    )
    assert {"frames (JPEG, DCT-scaled)", "frames (JPEG, full scale)"} <= set(rates)
    assert all(r > 0 for r in rates.values())
    assert "frames vs video, first clip: mean |difference|" in capsys.readouterr().out


def test_guessed_templates_and_prediction_records(clip_frames, tmp_path):
    from datamodules import VideoFilesDataset
    from datamodules.frames import guess_template

    small = [f[::4, ::4] for f in clip_frames[:3]]
    v1 = write_jpeg_folder(tmp_path / "v1", small, template="{:05d}.jpg")
    mm = write_jpeg_folder(tmp_path / "mm", small, template="img_{:05d}.jpg", start_index=0)
    odd = write_jpeg_folder(tmp_path / "odd {x}", small, template="frame{:d}.png")
    assert guess_template(v1) == ("{:05d}.jpg", 1)
    assert guess_template(mm) == ("img_{:05d}.jpg", 0)
    assert guess_template(odd) == ("frame{:d}.png", 1)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no frames here", encoding="utf-8")
    ds = VideoFilesDataset(
        [str(v1), str(mm), str(tmp_path / "notes")], num_frames=2, frame_interval=1, short_side=32, crop_size=32
    )
    assert [type(r).__name__ for r in ds.records] == ["FrameRecord", "FrameRecord", "FrameRecord"]
    assert ds.records[2].problem == "no numbered JPEG/PNG frame files"
    torch.testing.assert_close(ds[0]["video"], ds[1]["video"])  # the same frames under two templates
    assert ds[2]["video"].shape[0] == 0 and ds[2]["bad_video_ids"].tolist() == [2]


def test_guessed_template_of_a_rawframes_folder_with_flow_images_is_the_rgb_frames(tmp_path):
    # MMAction2 / denseflow extraction writes the optical-flow images beside the RGB frames in one folder
    # (flow_x_00001.jpg, flow_y_00001.jpg, img_00001.jpg); the flow images sort first but are not the video.
    from datamodules.frames import guess_template, record_for_path

    rgb = [np.full((24, 32, 3), 40 * i, np.uint8) for i in range(3)]
    flow = [np.full((24, 32, 3), 128, np.uint8)] * 3
    folder = write_jpeg_folder(tmp_path / "rawframes", rgb, template="img_{:05d}.jpg")
    write_jpeg_folder(folder, flow, template="flow_x_{:05d}.jpg")
    write_jpeg_folder(folder, flow, template="flow_y_{:05d}.jpg")
    assert guess_template(folder) == ("img_{:05d}.jpg", 1)
    assert record_for_path(folder).template == "img_{:05d}.jpg"
    # a folder of flow images alone still gets a template (nothing else to read)
    only_flow = write_jpeg_folder(tmp_path / "flow", flow, template="flow_x_{:05d}.jpg")
    assert guess_template(only_flow) == ("flow_x_{:05d}.jpg", 1)


def test_frame_count_ignores_names_the_template_would_not_write(tmp_path):
    frames = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    write_jpeg_folder(tmp_path, frames)  # img_00001.jpg .. img_00003.jpg
    Image.new("RGB", (8, 8)).save(tmp_path / "img_9.jpg")  # not zero-padded: not a frame of img_{:05d}.jpg
    assert frame_index(tmp_path).num_frames == 3


def test_16_bit_frames_are_scaled_to_8_bit_and_float_frames_refused(tmp_path):
    ramp = (np.arange(16 * 24, dtype=np.uint32).reshape(16, 24) * 170).astype(np.uint16)  # 0..65110
    want = np.repeat((ramp >> 8).astype(np.uint8)[..., None], 3, axis=-1)
    png = tmp_path / "png16"
    png.mkdir()
    for i in range(2):
        Image.fromarray(ramp).save(png / f"img_{i + 1:05d}.png")
    with Image.open(png / "img_00001.png") as im:
        assert im.mode == "I;16"
    got = FrameFolderReader(png, index=frame_index(png, "img_{:05d}.png")).decode([1, 0])
    np.testing.assert_array_equal(got[0], want)
    tif = tmp_path / "tif32"  # 16-bit data in Pillow's 32-bit integer mode, as older Pillow opens 16-bit PNGs
    tif.mkdir()
    Image.fromarray(ramp.astype(np.int32)).save(tif / "img_00001.tif")
    with Image.open(tif / "img_00001.tif") as im:
        assert im.mode == "I"
    got = FrameFolderReader(tif, index=frame_index(tif, "img_{:05d}.tif")).decode([0])
    np.testing.assert_array_equal(got[0], want)
    Image.fromarray(np.full((16, 24), 70000, np.int32)).save(tif / "img_00001.tif")
    with pytest.raises(VideoDecodeError, match=r"unreadable frame img_00001.tif: .*mode I .*\[0, 65535\]"):
        FrameFolderReader(tif, index=frame_index(tif, "img_{:05d}.tif")).decode([0])
    Image.fromarray(ramp.astype(np.float32)).save(tif / "img_00001.tif")
    with pytest.raises(VideoDecodeError, match=r"unreadable frame img_00001.tif: .*mode F"):
        FrameFolderReader(tif, index=frame_index(tif, "img_{:05d}.tif")).decode([0])
    with pytest.raises(VideoDecodeError, match=r"unreadable frame img_00001.tif: .*mode F"):
        probe_frame_folder(FrameRecord(str(tif), 0, template="img_{:05d}.tif"))  # vmm check-data


def test_16_bit_video_decodes_to_scaled_8_bit(tmp_path):
    import av

    ramp = (np.arange(16 * 24, dtype=np.uint32).reshape(16, 24) * 170).astype(np.uint16)
    path = tmp_path / "gray16.mkv"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 24, 16, "gray16le"
        for _ in range(3):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(ramp, format="gray16le")))
        out.mux(stream.encode())
    with VideoReader(path) as reader:
        got = reader.decode([0, 2], short_side=None)
    assert np.abs(got[1].astype(np.int16) - (ramp >> 8)[..., None]).max() <= 1  # swscale rounds, no saturation
