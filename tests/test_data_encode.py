"""datamodules.encode: the same frames and settings encode to the same bytes, in any process.

Real parts only: PyAV's libx264 in separate Python processes, the bytes compared.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO_ROOT

from datamodules.encode import pick_encoder, x264_asm_option, x264_cpu_flags


def _has_avx512() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(line.startswith("flags") and "avx512f" in line.split() for line in text.splitlines())


# Each child encodes the frames several times, filling freed heap memory with random bytes before
# each encode: with such leftovers, x264's AVX-512 code gave a different stream on most encodes of
# these frames, where a quiet process hid the difference on most runs.
_ENCODE_CHILD = """
import hashlib, os, sys
import numpy as np
from datamodules.encode import write_video
frames = np.load(sys.argv[1])
for k in range(int(sys.argv[3])):
    leftovers = [os.urandom(size) for size in (2048, 4096, 5376, 8192, 16384, 32768, 65536) for _ in range(20)]
    del leftovers
    out = f"{sys.argv[2]}-{k}.mp4"
    write_video(out, frames, fps=25, crf=23, gop=16)
    with open(out, "rb") as fh:
        print(hashlib.sha256(fh.read()).hexdigest())
"""


def _textured_motion(num_frames: int, width: int, height: int, seed: int) -> np.ndarray:
    """A camera wandering over a smooth random texture (1/f spectrum), like real footage."""
    rng = np.random.default_rng(seed)
    h, w = height + 64, width + 64
    spectrum = np.fft.fft2(rng.normal(size=(h, w, 3)), axes=(0, 1))
    radius = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    radius[0, 0] = 1.0
    texture = np.real(np.fft.ifft2(spectrum / radius[..., None], axes=(0, 1)))
    texture = 128 + 50 * (texture - texture.mean()) / texture.std()
    path = np.clip(np.cumsum(rng.normal(0, 2.0, (num_frames, 2)), axis=0) + 32, 0, 63).astype(int)
    return np.stack([np.clip(texture[y : y + height, x : x + width], 0, 255) for y, x in path]).astype(np.uint8)


@pytest.mark.slow  # two fresh interpreters and six encodes
@pytest.mark.skipif(
    not _has_avx512(),
    reason="x264's run-to-run differences came from its AVX-512 code; this CPU has no AVX-512",
)
def test_same_frames_give_the_same_bytes_in_separate_processes(tmp_path):
    if pick_encoder() != "libx264":
        pytest.skip("this PyAV build has no libx264")
    assert "AVX512" not in (x264_cpu_flags() or "") and "AVX2" in x264_asm_option()["x264-params"]
    frames = tmp_path / "frames.npy"
    np.save(frames, _textured_motion(48, 84, 64, seed=0))  # 84 wide: not a whole number of macroblocks
    digests = []
    for run in range(2):
        done = subprocess.run(
            [sys.executable, "-c", _ENCODE_CHILD, str(frames), str(tmp_path / f"run{run}"), "3"],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=300,
            check=True,
        )
        digests += done.stdout.split()
    assert len(digests) == 6
    assert len(set(digests)) == 1, f"the same frames gave {len(set(digests))} different streams: {digests}"
