"""Rendering the synthetic motion clips: pure numpy frames in which only the direction of motion
carries the label (docs/synthetic_motion.md).

Classes come in time-reversal pairs (2i, 2i+1): translate right/left, down/up, rotate cw/ccw,
zoom in/out, and the two diagonals. Every clip is parameterised by its *middle* frame: an object's
centre, angle and scale at t_mid = (T-1)/2 are drawn from distributions that do not depend on the
class, and the class sets only the sign/direction of the velocity. Reversing a class-2i clip in
time therefore gives a clip with exactly the distribution of class 2i+1, so any order-blind model
(one that sees the clip's frames as an unordered set) is capped at 1/2: at best it tells the pair,
never the member (`ORDER_BLIND_CEILING`; docs/synthetic_motion.md §3; for K = 8, chance is 12.5% and the
ceiling 50%). Translation wraps around the frame
(torus), so the region an object visits does not depend on the direction either. Appearance
(background texture, object shape, size, colour and texture) is drawn independently of the class.

Three tasks share the renderer (`SyntheticSpec.task`, docs/synthetic_motion.md): "direction" (the
above, the default), "coherence" (two classes: the frames of a translating clip in order, or the
same frames permuted — every order-blind model is at exactly 1/2, the frame sets being identical)
and "appearance" (four classes: object shape family × texture family, every object of a clip alike,
its motion drawn independently of the label: a per-frame task to pretrain a backbone on).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np

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

__all__ = [
    "APPEARANCE_CLASSES",
    "CLASS_PAIRS",
    "COHERENCE_CLASSES",
    "ORDER_BLIND_CEILING",
    "SPLIT_CODES",
    "TASKS",
    "SyntheticSpec",
    "class_names_for",
    "render_video",
    "reverse_class",
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
    task: "direction", "coherence" or "appearance" (module docstring); the default task is left out of
    the digest, so caches written before the field existed stay valid.
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
        if fields["task"] == "direction":  # left out for the default, so existing caches keep their key
            del fields["task"]
        blob = json.dumps({"version": _FORMAT_VERSION, **fields}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def duration_s(self) -> int:
        """Whole seconds used as the Kinetics time_end (file names need integers)."""
        return max(1, math.ceil(self.video_frames / self.fps))


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
