"""The synthetic motion dataset (docs/synthetic_motion.md): real H.264 files in which only the
direction of motion carries the label.

Split by job:

- `datamodules.synthetic.render`: the generation spec (`SyntheticSpec`, its digest names the cache
  folder), the classes and tasks, and `render_video` (uint8 frames, numpy only);
- `datamodules.encode`: `write_video` and `pick_encoder` (the first H.264 encoder that works);
- `datamodules.synthetic.cache`: `generate_dataset` (the Kinetics-layout folder written once, in a
  flock-ed `.tmp-*` folder renamed into place), stale-temporary cleanup, the default cache root.

`datamodules.SyntheticMotionDataModule` generates the set on first use, then reads it as Kinetics.
"""

from ..encode import H264_ENCODERS, pick_encoder, write_video
from .cache import CacheNotWritableError, clean_stale_temporaries, default_cache_root, generate_dataset
from .render import (
    APPEARANCE_CLASSES,
    CLASS_PAIRS,
    COHERENCE_CLASSES,
    ORDER_BLIND_CEILING,
    SPLIT_CODES,
    TASKS,
    SyntheticSpec,
    class_names_for,
    render_video,
    reverse_class,
)

__all__ = [
    "APPEARANCE_CLASSES",
    "CLASS_PAIRS",
    "COHERENCE_CLASSES",
    "CacheNotWritableError",
    "H264_ENCODERS",
    "ORDER_BLIND_CEILING",
    "SPLIT_CODES",
    "TASKS",
    "SyntheticSpec",
    "class_names_for",
    "clean_stale_temporaries",
    "default_cache_root",
    "generate_dataset",
    "pick_encoder",
    "render_video",
    "reverse_class",
    "write_video",
]
