"""The synthetic motion dataset (docs/synthetic_motion.md): real h264 files in which only the
direction of motion carries the label.

Classes come in time-reversal pairs (2i, 2i+1): translate right/left, down/up, rotate cw/ccw,
zoom in/out, and the two diagonals. Every clip is parameterised by its *middle* frame: an object's
centre, angle and scale at t_mid = (T-1)/2 are drawn from distributions that do not depend on the
class, and the class sets only the sign/direction of the velocity. Reversing a class-2i clip in
time therefore gives a clip with exactly the distribution of class 2i+1, so any order-blind model
(one that sees the clip's frames as an unordered set) is capped at 1/2: at best it tells the pair,
never the member (`ORDER_BLIND_CEILING`; docs/synthetic_motion.md §3: an earlier note said 2/K, the
same only for K = 4 — for K = 8, chance is 12.5% and the ceiling 50%). Translation wraps around the frame
(torus), so the region an object visits does not depend on the direction either. Appearance
(background texture, object shape, size, colour and texture) is drawn independently of the class.

Three tasks share the renderer (`SyntheticSpec.task`, docs/synthetic_motion.md): "direction" (the
above, the default), "coherence" (two classes: the frames of a translating clip in order, or the
same frames permuted — every order-blind model is at exactly 1/2, the frame sets being identical)
and "appearance" (four classes: object shape family × texture family, every object of a clip alike,
its motion drawn independently of the label: a per-frame task to pretrain a backbone on).

Files are written once into a cache directory in the Kinetics layout (class folders + CSVs) by
`generate_dataset`, atomically (a temporary directory renamed into place).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

log = logging.getLogger(__name__)

# Best accuracy of any model blind to frame order: P(pair | frames) <= 1, P(member | pair, frames) = 1/2.
ORDER_BLIND_CEILING = 0.5

CLASS_PAIRS: tuple[tuple[str, str], ...] = (
    ("translate_right", "translate_left"),
    ("translate_down", "translate_up"),
    ("rotate_cw", "rotate_ccw"),
    ("zoom_in", "zoom_out"),
    ("translate_down_right", "translate_up_left"),
    ("translate_down_left", "translate_up_right"),
)
# Unit direction (x right, y down) of each translation class.
_DIRECTIONS = {
    "translate_right": (1.0, 0.0),
    "translate_left": (-1.0, 0.0),
    "translate_down": (0.0, 1.0),
    "translate_up": (0.0, -1.0),
    "translate_down_right": (math.sqrt(0.5), math.sqrt(0.5)),
    "translate_up_left": (-math.sqrt(0.5), -math.sqrt(0.5)),
    "translate_down_left": (-math.sqrt(0.5), math.sqrt(0.5)),
    "translate_up_right": (math.sqrt(0.5), -math.sqrt(0.5)),
}
_TRANSLATIONS = tuple(_DIRECTIONS)
TASKS = ("direction", "coherence", "appearance")
COHERENCE_CLASSES = ("ordered", "shuffled")
# label = 2 * shape family + texture family (the object's `kind` and `tex_kind`).
APPEARANCE_CLASSES = ("ellipse_stripes", "ellipse_checker", "polygon_stripes", "polygon_checker")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_FORMAT_VERSION = 1
H264_ENCODERS = ("libx264", "libopenh264", "h264")

__all__ = [
    "APPEARANCE_CLASSES",
    "CLASS_PAIRS",
    "CacheNotWritableError",
    "COHERENCE_CLASSES",
    "TASKS",
    "SyntheticSpec",
    "class_names_for",
    "clean_stale_temporaries",
    "generate_dataset",
    "pick_encoder",
    "render_video",
    "reverse_class",
    "write_video",
]


def class_names_for(num_classes: int, task: str = "direction") -> list[str]:
    """Class names of `task`. "direction": the first num_classes/2 pairs, partners adjacent (class 2i
    reversed in time is class 2i+1); "coherence": ordered, shuffled (K = 2); "appearance": shape ×
    texture family (K = 4)."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    fixed = {"coherence": COHERENCE_CLASSES, "appearance": APPEARANCE_CLASSES}.get(task)
    if fixed is not None:
        if num_classes != len(fixed):
            raise ValueError(f"num_classes: the {task} task has {len(fixed)} classes, got {num_classes}")
        return list(fixed)
    if num_classes < 2 or num_classes % 2 or num_classes > 2 * len(CLASS_PAIRS):
        raise ValueError(f"num_classes: expected an even number in [2, {2 * len(CLASS_PAIRS)}], got {num_classes}")
    return [name for pair in CLASS_PAIRS[: num_classes // 2] for name in pair]


def reverse_class(label: int, task: str = "direction") -> int:
    """The class whose clips are this class's clips played backwards (itself, except for direction:
    a reversed ordered clip is still ordered, a reversed shuffled one still shuffled)."""
    return label ^ 1 if task == "direction" else label


@dataclass(frozen=True)
class SyntheticSpec:
    """Generation parameters (everything that changes the files; hashed into the cache path).

    speed_range: pixels per frame at the stored resolution (translation speed; the same speed at
    the object's rim for rotation; a quarter of it, capped at a 3x total zoom, for zoom).
    task: "direction", "coherence" or "appearance" (module docstring); the default keeps the
    digest of earlier versions, so their caches stay valid.
    """

    num_classes: int = 8
    train_per_class: int = 40
    val_per_class: int = 8
    test_per_class: int = 16
    video_frames: int = 20
    frame_size: int = 80
    fps: int = 10
    speed_range: tuple[float, float] = (2.0, 6.0)
    max_objects: int = 2
    crf: int = 12
    seed: int = 0
    encoder: str = "libx264"
    task: str = "direction"

    def __post_init__(self):
        class_names_for(self.num_classes, self.task)
        if self.task == "coherence" and self.video_frames < 3:
            raise ValueError(
                f"video_frames: the coherence task needs >= 3 (2 frames have no non-reversing "
                f"permutation), got {self.video_frames}"
            )
        if self.frame_size < 16 or self.frame_size % 2:
            raise ValueError(f"frame_size: expected an even int >= 16, got {self.frame_size}")
        if self.video_frames < 2:
            raise ValueError(f"video_frames: expected >= 2, got {self.video_frames}")
        lo, hi = self.speed_range
        if not 0 <= lo <= hi:
            raise ValueError(f"speed_range: expected 0 <= min <= max, got {self.speed_range}")
        if self.fps < 1:
            raise ValueError(f"fps: expected >= 1, got {self.fps}")
        for name in ("train_per_class", "val_per_class", "test_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.max_objects < 1:
            raise ValueError(f"max_objects: expected >= 1, got {self.max_objects}")

    @property
    def class_names(self) -> list[str]:
        return class_names_for(self.num_classes, self.task)

    def per_class(self, split: str) -> int:
        return {"train": self.train_per_class, "val": self.val_per_class, "test": self.test_per_class}[split]

    def digest(self) -> str:
        fields = asdict(self)
        if fields["task"] == "direction":  # added later: the default leaves earlier digests unchanged
            del fields["task"]
        blob = json.dumps({"version": _FORMAT_VERSION, **fields}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def duration_s(self) -> int:
        """Whole seconds used as the Kinetics time_end (file names need integers)."""
        return max(1, math.ceil(self.video_frames / self.fps))


# -- rendering -------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a random `cells` x `cells` grid, bilinearly upsampled to size x size."""
    grid = rng.random((cells + 1, cells + 1))
    pos = np.linspace(0, cells, size, endpoint=False)
    i = pos.astype(int)
    f = pos - i
    a = grid[i][:, i] * (1 - f)[None, :] + grid[i][:, i + 1] * f[None, :]
    b = grid[i + 1][:, i] * (1 - f)[None, :] + grid[i + 1][:, i + 1] * f[None, :]
    return a * (1 - f)[:, None] + b * f[:, None]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [H,W,3] in [0,1]: a mix of noise, a gradient and stripes with random colours."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    noise = _smooth_noise(rng, size, int(rng.integers(3, 9)))
    ang = rng.uniform(0, 2 * np.pi)
    grad = (xx * np.cos(ang) + yy * np.sin(ang)) * 0.7
    s_ang = rng.uniform(0, np.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 8) * (xx * np.cos(s_ang) + yy * np.sin(s_ang)))
    w = rng.dirichlet(np.ones(3))
    pattern = w[0] * noise + w[1] * (grad - grad.min()) / max(np.ptp(grad), 1e-6) + w[2] * stripes
    c0, c1 = rng.random(3), rng.random(3)
    return (c0[None, None] * (1 - pattern[..., None]) + c1[None, None] * pattern[..., None]).astype(np.float32)


def _object_params(rng: np.random.Generator, size: int) -> dict:
    return {
        "kind": int(rng.integers(0, 2)),  # 0 superellipse, 1 regular polygon
        "p": rng.uniform(1.2, 4.0),
        "aspect": rng.uniform(0.55, 1.0),
        "sides": int(rng.integers(3, 7)),
        "radius": rng.uniform(0.11, 0.2) * size,
        "tex_freq": rng.uniform(1.0, 2.5),
        "tex_angle": rng.uniform(0, np.pi),
        "tex_kind": int(rng.integers(0, 2)),  # 0 stripes, 1 checker
        "col0": rng.random(3),
        "col1": rng.random(3),
        "center": rng.uniform(0, size, 2),  # (x, y) at the middle frame
        "angle": rng.uniform(0, 2 * np.pi),  # at the middle frame
        "log_scale": rng.uniform(-0.25, 0.25),  # at the middle frame
    }


def _trajectory(name: str, speed: float, obj: dict, spec: SyntheticSpec) -> tuple[np.ndarray, ...]:
    """Per-frame centre (x, y), angle and scale: middle-frame values plus class velocity * (t - t_mid)."""
    t = np.arange(spec.video_frames) - (spec.video_frames - 1) / 2
    cx = np.full(t.shape, obj["center"][0])
    cy = np.full(t.shape, obj["center"][1])
    angle = np.full(t.shape, obj["angle"])
    log_scale = np.full(t.shape, obj["log_scale"])
    if name in _DIRECTIONS:
        dx, dy = _DIRECTIONS[name]
        cx = (cx + speed * dx * t) % spec.frame_size
        cy = (cy + speed * dy * t) % spec.frame_size
    elif name.startswith("rotate"):
        omega = speed / obj["radius"]  # rim speed = speed px/frame
        angle = angle + (omega if name == "rotate_cw" else -omega) * t
    elif name.startswith("zoom"):
        rate = min(0.25 * speed / obj["radius"], math.log(3.0) / (spec.video_frames - 1))
        log_scale = log_scale + (rate if name == "zoom_in" else -rate) * t
    else:
        raise ValueError(f"unknown class {name!r}")
    return cx, cy, angle, np.exp(log_scale)


def _draw_object(frames: np.ndarray, obj: dict, cx, cy, angle, scale, size: int) -> None:
    """Alpha-blend the object into frames [T,H,W,3] (float32, in place)."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    for k in range(frames.shape[0]):
        r = obj["radius"] * scale[k]
        # Wrapped offsets: the frame is a torus, so translation never changes what is visible.
        dx = (coords[None, :] - cx[k] + size / 2) % size - size / 2
        dy = (coords[:, None] - cy[k] + size / 2) % size - size / 2
        ca, sa = math.cos(angle[k]), math.sin(angle[k])
        u = (ca * dx + sa * dy) / r
        v = (-sa * dx + ca * dy) / r
        if obj["kind"] == 0:
            rho = (np.abs(u) ** obj["p"] + np.abs(v / obj["aspect"]) ** obj["p"]) ** (1 / obj["p"])
        else:
            n = obj["sides"]
            phi = np.arctan2(v, u)
            seg = 2 * np.pi / n
            rho = np.hypot(u, v) * np.cos(np.mod(phi, seg) - seg / 2) / math.cos(math.pi / n)
        alpha = np.clip((1.0 - rho) * r + 0.5, 0.0, 1.0)[..., None]  # ~1 px anti-aliased rim
        ta = obj["tex_angle"]
        w = u * math.cos(ta) + v * math.sin(ta)
        if obj["tex_kind"] == 0:
            pat = 0.5 + 0.5 * np.sin(2 * np.pi * obj["tex_freq"] * w)
        else:
            w2 = -u * math.sin(ta) + v * math.cos(ta)
            pat = 0.5 + 0.5 * np.tanh(4 * np.sin(np.pi * obj["tex_freq"] * w) * np.sin(np.pi * obj["tex_freq"] * w2))
        colour = obj["col0"] * (1 - pat[..., None]) + obj["col1"] * pat[..., None]
        frames[k] = frames[k] * (1 - alpha) + colour * alpha


def render_video(spec: SyntheticSpec, split: str, index: int, label: int | None = None) -> tuple[np.ndarray, int]:
    """Frames uint8 [T,H,W,3] of video `index` of `split`, and its label (index mod num_classes).

    `label` overrides the class while keeping every other random draw (appearance, positions,
    speed): for the direction task, rendering class 2i+1 gives exactly the class-2i video played
    backwards; for coherence, "shuffled" gives the "ordered" video's frames permuted (never the
    identity or the reversal); for appearance, only the shape and texture families change.
    """
    if label is None:
        label = index % spec.num_classes
    if not 0 <= label < spec.num_classes:
        raise ValueError(f"label: expected a class id in [0, {spec.num_classes}), got {label}")
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, SPLIT_CODES[split], index]))
    if spec.task == "direction":
        name = spec.class_names[label]
    else:  # the motion is drawn like any other nuisance, independently of the label
        name = _TRANSLATIONS[int(rng.integers(len(_TRANSLATIONS)))]
    size = spec.frame_size
    bg = _background(rng, size)
    frames = np.repeat(bg[None], spec.video_frames, axis=0)
    for _ in range(int(rng.integers(1, spec.max_objects + 1))):
        obj = _object_params(rng, size)
        if spec.task == "appearance":
            obj["kind"], obj["tex_kind"] = divmod(label, 2)
        speed = rng.uniform(*spec.speed_range)
        _draw_object(frames, obj, *_trajectory(name, speed, obj, spec), size)
    if spec.task == "coherence":
        order = _shuffled_order(rng, spec.video_frames)  # drawn for both classes: same stream after it
        if label == 1:
            frames = frames[order]
    return (frames * 255.0 + 0.5).clip(0, 255).astype(np.uint8), label


def _shuffled_order(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random permutation of range(n) that is neither the identity nor the reversal (both are coherent
    motion); n >= 3."""
    ordered = np.arange(n)
    while True:
        order = rng.permutation(n)
        if not (np.array_equal(order, ordered) or np.array_equal(order, ordered[::-1])):
            return order


# -- encoding -------------------------------------------------------------------------------------
def pick_encoder(preferred: tuple[str, ...] = H264_ENCODERS) -> str:
    """The first H.264 encoder of this PyAV build that encodes a test frame; else "mpeg4" (with a
    warning); RuntimeError if neither works."""
    tried = []
    for name in (*preferred, "mpeg4"):
        try:
            with tempfile.TemporaryDirectory() as tmp:
                _encode(Path(tmp) / "probe.mp4", np.zeros((2, 16, 16, 3), np.uint8), 10, name, 23)
        except Exception as exc:  # an encoder listed by FFmpeg may still fail to open (hardware, licence)
            tried.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if name == "mpeg4":
            log.warning("no working H.264 encoder in this PyAV build (%s); using mpeg4", "; ".join(tried))
        return name
    raise RuntimeError(
        "cannot write the synthetic dataset: no H.264 (libx264, libopenh264) or mpeg4 encoder works in "
        f"this PyAV build ({'; '.join(tried)}). Install the PyAV wheel from PyPI (it bundles libx264)."
    )


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    *,
    fps: int = 25,
    pts_ms: np.ndarray | None = None,
    encoder: str = "libx264",
    crf: int = 12,
    lossless: bool = False,
    gop: int | None = None,
    b_frames: int | None = None,
) -> None:
    """Encode uint8 RGB frames [T,H,W,3] (H, W even) to `path` with PyAV.

    `pts_ms`: presentation times in milliseconds for a variable frame rate file (default: 1/fps
    steps). `lossless`: libx264rgb with qp 0, so decoded frames equal `frames` exactly. `gop` /
    `b_frames`: keyframe interval and B-frame count (encoder defaults when None).
    """
    frames = np.asarray(frames)
    _check_video_input(frames, pts_ms)
    name = "libx264rgb" if lossless else encoder
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(name, rate=Fraction(fps, 1))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb24" if lossless else "yuv420p"
        cc = stream.codec_context
        cc.thread_count = 1
        if pts_ms is not None:
            cc.time_base = Fraction(1, 1000)
        if gop is not None:
            cc.gop_size = gop
        if b_frames is not None:
            cc.max_b_frames = b_frames
        options = _encoder_options(name, lossless, crf)
        if options is not None:
            stream.options = options
        for k, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = int(pts_ms[k]) if pts_ms is not None else k
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def _check_video_input(frames: np.ndarray, pts_ms: np.ndarray | None) -> None:
    """ValueError unless `frames` is uint8 [T,H,W,3] with even H, W and `pts_ms` (if given) is one
    strictly increasing time per frame."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected uint8 [T,H,W,3], got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frames: expected even height and width, got {frames.shape[1]}x{frames.shape[2]}")
    if pts_ms is not None and (len(pts_ms) != len(frames) or np.any(np.diff(pts_ms) <= 0)):
        raise ValueError("pts_ms: expected one strictly increasing time (ms) per frame")


def _encoder_options(name: str, lossless: bool, crf: int) -> dict[str, str] | None:
    """FFmpeg options for encoder `name` (None: the encoder's defaults)."""
    if lossless:
        return {"qp": "0", "preset": "veryfast"}
    if name == "libx264":
        return {"crf": str(crf), "preset": "veryfast"}
    if name == "mpeg4":
        return {"qscale": "2"}
    return None


def _encode(path: Path, frames: np.ndarray, fps: int, encoder: str, crf: int) -> None:
    write_video(path, frames, fps=fps, encoder=encoder, crf=crf)


def _file_name(spec: SyntheticSpec, split: str, index: int) -> str:
    return f"{split}{index:05d}_{0:06d}_{spec.duration_s():06d}.mp4"


def _write_chunk(args: tuple[SyntheticSpec, str, str, list[int]]) -> None:
    spec, tmp_root, split, indices = args
    for i in indices:
        frames, label = render_video(spec, split, i)
        path = Path(tmp_root) / split / spec.class_names[label] / _file_name(spec, split, i)
        _encode(path, frames, spec.fps, spec.encoder, spec.crf)


# -- the cache directory ---------------------------------------------------------------------------
# A `.tmp-*` directory is owned by the run writing it, which holds an flock on it until it is done;
# one that is unlocked and older than this belongs to a run that was killed.
_STALE_AFTER_S = 60.0
# Where flock is unavailable (some network file systems), only this age tells a dead run.
_STALE_UNLOCKABLE_AFTER_S = 24 * 3600.0


class CacheNotWritableError(PermissionError):
    """The synthetic dataset cannot be written where it was asked to go; says where and why."""


def _not_writable(path: Path, exc: OSError) -> CacheNotWritableError:
    return CacheNotWritableError(
        f"cannot write the synthetic motion dataset: {path}: {exc.strerror or exc}. Point the cache at a "
        "writable directory: set the environment variable VMM_CACHE=/some/dir, or the datamodule's "
        "root (data.init_args.root / SyntheticMotionDataModule(root=...))"
    )


def _lock_dir(path: Path, blocking: bool) -> int | None:
    """An fd holding an exclusive flock on directory `path`; None if another process holds it.

    Raises OSError where flock is unsupported (the caller decides what that means)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        raise OSError("flock is not available on this system") from None

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def clean_stale_temporaries(base: Path, now: float | None = None) -> list[Path]:
    """Remove the `.tmp-*` directories under `base` left by killed runs; return what was removed.

    A directory is stale when nobody holds its flock and it is older than `_STALE_AFTER_S` (the
    age covers the instant between a run's mkdir and its flock); without flock support, when it
    is older than `_STALE_UNLOCKABLE_AFTER_S`. Safe to run while other runs generate.
    """
    import time

    now = time.time() if now is None else now
    removed = []
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return removed
    for entry in entries:
        try:
            if not entry.name.startswith(".tmp-") or entry.is_symlink() or not entry.is_dir():
                continue
            age = now - entry.stat().st_mtime
            if age < _STALE_AFTER_S:
                continue
            try:
                fd = _lock_dir(entry, blocking=False)
            except OSError:  # no flock here: only a very old directory is surely dead
                if age > _STALE_UNLOCKABLE_AFTER_S:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
                continue
            if fd is None:
                continue  # a live run holds it
            try:
                shutil.rmtree(entry, ignore_errors=True)
            finally:
                os.close(fd)
            removed.append(entry)
        except OSError:  # it vanished meanwhile (another cleaner), or a read-only cache
            continue
    if removed:
        log.info("removed %d stale temporary dataset folder(s) under %s", len(removed), base)
    return removed


def _write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file in `path`'s directory, fsync it, then rename it over `path`:
    a reader sees the old file or the whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def generate_dataset(spec: SyntheticSpec, cache_root: str | os.PathLike, workers: int = 1) -> Path:
    """Write the dataset to `cache_root/synthetic_motion/<digest>` unless it is there; return the path.

    `meta.json`, written last (atomically), marks a complete dataset. Files are written into a
    temporary sibling `.tmp-*` directory, flock-ed by this run, and renamed into place, so
    concurrent callers (DDP ranks) and interrupted runs never expose a partial dataset; temporary
    directories of killed runs are removed (`clean_stale_temporaries`). A dataset directory
    without `meta.json` (incomplete) is replaced. An unwritable cache raises
    CacheNotWritableError naming the directory.
    """
    base = Path(cache_root).expanduser() / "synthetic_motion"
    final = base / spec.digest()
    if (final / "meta.json").is_file():
        return final
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _not_writable(Path(exc.filename or base), exc) from None
    clean_stale_temporaries(base)
    token = f"{spec.digest()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = base / f".tmp-{token}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise _not_writable(base, exc) from None
    try:
        own = _lock_dir(tmp, blocking=True)  # held until the end: tells cleaners this run is alive
    except OSError:
        own = None
    aside = None
    try:
        _write_videos(spec, tmp, workers)
        _write_annotations(spec, tmp)
        aside = _place(tmp, final, token)
    finally:
        if own is not None:
            os.close(own)
        for leftover in (tmp, aside):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return final


def _write_videos(spec: SyntheticSpec, root: Path, workers: int) -> None:
    """Render and encode every video of every split into `root/<split>/<class>/`, on `workers` processes."""
    for split in SPLIT_CODES:
        for name in spec.class_names:
            (root / split / name).mkdir(parents=True)
    jobs = []
    for split in SPLIT_CODES:
        n = spec.per_class(split) * spec.num_classes
        # About four chunks per worker: small enough to balance the load, large enough to amortise dispatch.
        chunk = max(1, math.ceil(n / max(1, workers) / 4))
        jobs += [(spec, str(root), split, list(range(s, min(n, s + chunk)))) for s in range(0, n, chunk)]
    if workers > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            pool.map(_write_chunk, jobs)
    else:
        for job in jobs:
            _write_chunk(job)


def _write_annotations(spec: SyntheticSpec, root: Path) -> None:
    """Write the Kinetics-style split CSVs to `root/annotations/`, then `root/meta.json` (last: it marks completion)."""
    (root / "annotations").mkdir()
    csv_names = {"train": "train.csv", "val": "validate.csv", "test": "test.csv"}
    for split, csv_name in csv_names.items():
        lines = ["label,youtube_id,time_start,time_end,split"]
        for i in range(spec.per_class(split) * spec.num_classes):
            name = spec.class_names[i % spec.num_classes]
            lines.append(f"{name},{split}{i:05d},0,{spec.duration_s()},{split}")
        _write_text_atomic(root / "annotations" / csv_name, "\n".join(lines) + "\n")
    meta = {
        "spec": asdict(spec),
        "class_names": spec.class_names,
        "reverse_of": [reverse_class(i, spec.task) for i in range(spec.num_classes)],
    }
    _write_text_atomic(root / "meta.json", json.dumps(meta, indent=1))


def _place(tmp: Path, final: Path, token: str) -> Path | None:
    """Rename the finished `tmp` to `final`, serialised between processes by an flock on the cache
    folder. A complete `final` (another run won) is kept; an incomplete one (no meta.json) is moved
    aside, and that path returned for removal."""
    try:
        lock = _lock_dir(final.parent, blocking=True)
    except OSError:
        lock = None  # no flock: the renames below are still atomic, only the swap is unguarded
    aside = None
    try:
        if (final / "meta.json").is_file():
            return None  # another process finished first; its files are the same
        if final.exists():
            aside = final.parent / f".tmp-{token}-incomplete"
            log.warning("%s has no meta.json (an incomplete dataset): replacing it", final)
            os.rename(final, aside)
        os.rename(tmp, final)
    finally:
        if lock is not None:
            os.close(lock)
    return aside


def default_cache_root() -> Path:
    """`$VMM_CACHE`, else `~/.cache/vmm`."""
    return Path(os.environ.get("VMM_CACHE") or Path.home() / ".cache" / "vmm").expanduser()
