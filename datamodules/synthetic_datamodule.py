"""SyntheticMotionDataModule: generates the synthetic motion dataset once, then reads it as Kinetics."""

from __future__ import annotations

import math
import os
from pathlib import Path

from .encode import pick_encoder
from .layouts import KineticsDataModule
from .sampling import Sampling, ShortVideo
from .synthetic.cache import default_cache_root, generate_dataset
from .synthetic.render import ORDER_BLIND_CEILING, SyntheticSpec, reverse_class
from .transforms import TrainCrop

__all__ = ["SyntheticMotionDataModule"]


class SyntheticMotionDataModule(KineticsDataModule):
    """Motion-only videos (see `datamodules.synthetic`), `num_classes` classes in time-reversal pairs.

    Written on first use (`prepare_data`, or `setup` when used without a Trainer) to
    `root/synthetic_motion/<hash of the generation parameters>` (root: `$VMM_CACHE` or
    `~/.cache/vmm`), then read through the Kinetics code path. Splits: train / val / test drawn
    from different seeds. `speed_range` is in pixels per frame at `frame_size`. Horizontal flips
    would turn right into left, so `flip` must stay False. `generate_workers`: processes used to
    write the files (None: min(4, CPU count)). `task`: "direction" (default; K even, time-reversal
    pairs), "coherence" (K = 2: frames in order vs the same frames permuted; sample every frame —
    `num_frames = video_frames`, `frame_interval = 1` — so both classes show the same frame set) or
    "appearance" (K = 4: shape × texture family, motion independent of the label); each task has
    its own cache directory. `result_note`: a line printed under the test results by `vmm demo`
    (a config says there what its run shows; not part of the data or its cache key).
    """

    def __init__(
        self,
        root: str | None = None,
        num_classes: int = 8,
        train_per_class: int = 40,
        val_per_class: int = 8,
        test_per_class: int = 16,
        video_frames: int = 20,
        frame_size: int = 80,
        fps: int = 10,
        speed_range: tuple[float, float] = (2.0, 6.0),
        max_objects: int = 2,
        seed: int = 0,
        task: str = "direction",
        result_note: str | None = None,
        generate_workers: int | None = None,
        batch_size: int = 16,
        num_workers: int = 2,
        num_frames: int = 16,
        frame_interval: int = 1,
        sampling: Sampling = "dense",
        short_video: ShortVideo = "loop",
        train_short_side: tuple[int, int] = (80, 88),
        eval_short_side: int = 80,
        crop_size: int | None = 64,
        train_crop: TrainCrop = "random",
        flip: bool = False,
        test_clips: int = 1,
        test_crops: int = 1,
        test_batch_size: int | None = None,
        decoder_threads: int = 1,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        max_retries: int = 10,
        max_bad_fraction: float = 0.5,
    ):
        if flip:
            raise ValueError("flip: must be False for SyntheticMotionDataModule (a flip swaps left and right)")
        self.spec = SyntheticSpec(
            num_classes=num_classes,
            train_per_class=train_per_class,
            val_per_class=val_per_class,
            test_per_class=test_per_class,
            video_frames=video_frames,
            frame_size=frame_size,
            fps=fps,
            speed_range=(float(speed_range[0]), float(speed_range[1])),
            max_objects=max_objects,
            seed=seed,
            encoder=pick_encoder(),
            task=task,
        )
        self.result_note = result_note
        self.cache_root = Path(root).expanduser() if root else default_cache_root()
        self.generate_workers = generate_workers if generate_workers is not None else min(4, os.cpu_count() or 1)
        super().__init__(
            root=str(self.cache_root / "synthetic_motion" / self.spec.digest()),
            batch_size=batch_size,
            num_workers=num_workers,
            num_frames=num_frames,
            frame_interval=frame_interval,
            sampling=sampling,
            short_video=short_video,
            train_short_side=train_short_side,
            eval_short_side=eval_short_side,
            crop_size=crop_size,
            train_crop=train_crop,
            flip=False,
            test_clips=test_clips,
            test_crops=test_crops,
            test_batch_size=test_batch_size,
            decoder_threads=decoder_threads,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            max_retries=max_retries,
            max_bad_fraction=max_bad_fraction,
        )

    @property
    def reverse_of(self) -> list[int]:
        """reverse_of[c]: the class whose clips are class c's clips played backwards."""
        return [reverse_class(c, self.spec.task) for c in range(self.spec.num_classes)]

    def reverse_class(self, label: int) -> int:
        if not 0 <= label < self.spec.num_classes:
            raise ValueError(f"label: expected a class id in [0, {self.spec.num_classes}), got {label}")
        return reverse_class(label, self.spec.task)

    def _root_needed(self) -> bool:
        return False  # generated there by prepare_data

    def _class_names(self) -> list[str]:
        return self.spec.class_names  # pair order, not the alphabetical order of Kinetics

    def result_notes(self, results: dict) -> list[str]:
        """The chance level and, where frame order decides the class (direction, coherence), the
        ceiling of a model blind to frame order (docs/synthetic_motion.md §3)."""
        k = self.spec.num_classes
        extra = [self.result_note] if self.result_note else []
        if self.spec.task == "appearance":
            return [f"K = {k} classes: chance {100 / k:.1f}%", *extra]
        if self.spec.task == "coherence":
            return [
                f"K = {k} classes (ordered / shuffled frames): chance {100 / k:.1f}%, and every model blind "
                "to frame order is at exactly that (both classes show the same frames)",
                *self._beyond_ceiling(results),
                *extra,
            ]
        return [
            f"K = {k} classes: chance {100 / k:.1f}%; on the synthetic motion set a model blind to frame order "
            f"is capped at {100 * ORDER_BLIND_CEILING:.0f}% (the pair, never the member)",
            *self._beyond_ceiling(results),
            *extra,
        ]

    @staticmethod
    def _beyond_ceiling(results: dict) -> list[str]:
        """How far top-1 is above the order-blind ceiling, in standard deviations of an accuracy at the
        ceiling on this many test videos: 3 or more says the model uses frame order beyond doubt."""
        n, top1 = int(results.get("num_videos") or 0), results.get("top1")
        if n <= 0 or top1 is None or not math.isfinite(float(top1)):
            return []
        sd = math.sqrt(ORDER_BLIND_CEILING * (1 - ORDER_BLIND_CEILING) / n)
        z = (float(top1) - ORDER_BLIND_CEILING) / sd
        verdict = "frame order learned beyond doubt" if z >= 3 else "not beyond doubt (needs 3 s.d.)"
        return [
            f"top-1 {100 * float(top1):.1f}% is {z:+.1f} s.d. from the ceiling (s.d. {100 * sd:.1f} points on "
            f"{n} test videos; ceiling + 3 s.d. = {100 * (ORDER_BLIND_CEILING + 3 * sd):.1f}%): {verdict}"
        ]

    def prepare_data(self) -> None:
        generate_dataset(self.spec, self.cache_root, workers=self.generate_workers)

    def _load_split(self, split: str):
        self.prepare_data()  # a no-op once the files exist
        return super()._load_split(split)
