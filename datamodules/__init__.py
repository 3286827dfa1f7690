"""LightningDataModules for video action recognition: PyAV decoding, clip sampling, uint8 transforms.

Batches: {"video": uint8 [N,3,T,H,W], "label": int64 [N], "video_id": int64 [N], "view": int64 [N],
"bad_video_ids": int64 [M]}; normalisation happens on the device, in the LightningModule.
"""

from .annotations import AnnotationError, VideoRecord
from .base import DatasetRootError, VideoDataModule
from .dataset import (
    ClipSettings,
    TooMuchBadData,
    UnpaddedDistributedSampler,
    VideoClipDataset,
    VideoFilesDataset,
    collate_clips,
)
from .decode import VideoDecodeError, VideoIndex, VideoReader, build_index, decode_frames
from .frames import FrameFolderReader, FrameIndex, FrameRecord, frame_index
from .layouts import (
    HMDB51DataModule,
    KineticsDataModule,
    UCF101DataModule,
    VideoFolderDataModule,
    VideoListDataModule,
)
from .prepare import PrepareError, check_meta, prepare_dataset, read_meta
from .rawframes import RawFrameListDataModule
from .sharded import ShardedVideoDataModule, ShardLoader, ShardStream
from .something import SomethingSomethingV1DataModule, SomethingSomethingV2DataModule
from .synthetic_datamodule import SyntheticMotionDataModule
from .transforms import ClipTransform

__all__ = [
    "AnnotationError",
    "DatasetRootError",
    "ClipSettings",
    "ClipTransform",
    "FrameFolderReader",
    "FrameIndex",
    "FrameRecord",
    "HMDB51DataModule",
    "KineticsDataModule",
    "PrepareError",
    "RawFrameListDataModule",
    "ShardLoader",
    "ShardStream",
    "ShardedVideoDataModule",
    "SomethingSomethingV1DataModule",
    "SomethingSomethingV2DataModule",
    "SyntheticMotionDataModule",
    "TooMuchBadData",
    "UCF101DataModule",
    "UnpaddedDistributedSampler",
    "VideoClipDataset",
    "VideoDataModule",
    "VideoDecodeError",
    "VideoFilesDataset",
    "VideoFolderDataModule",
    "VideoIndex",
    "VideoListDataModule",
    "VideoReader",
    "VideoRecord",
    "build_index",
    "check_meta",
    "collate_clips",
    "decode_frames",
    "frame_index",
    "prepare_dataset",
    "read_meta",
]
