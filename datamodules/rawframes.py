"""Frame-folder datasets listed in MMAction2 / TSN "rawframes" files (docs/data.md).

Each line of a list is `frame_dir num_frames label`: a folder of extracted frames (relative to
`root`), its frame count and a 0-based label; the released SIFA and TSM lists use this form.
MMAction2's with-offset form `frame_dir offset num_frames label` is read too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .annotations import AnnotationError, list_lines, numeric_tail
from .frames import DEFAULT_TEMPLATE, FrameRecord, check_template
from .layouts import VideoListDataModule

__all__ = ["RawFrameListDataModule", "parse_rawframe_list"]


def parse_rawframe_list(
    file: Path,
    root: Path,
    num_classes: int | None = None,
    template: str = DEFAULT_TEMPLATE,
    start_index: int = 1,
    trust_counts: bool = True,
) -> list[FrameRecord]:
    """`frame_dir num_frames label` lines (the folder may contain spaces) -> FrameRecords; also
    MMAction2's with-offset form `frame_dir offset num_frames label` (frame i is the file numbered
    start_index + offset + i). More number columns (multi-label lists) are refused.

    With `trust_counts` the listed count is the clip's length (no folder scan); otherwise each
    folder is scanned when first read. Raises AnnotationError naming the file and line.
    """
    records = []
    for n, line in list_lines(Path(file), "frame_dir num_frames label"):
        parts = line.rsplit(maxsplit=2)
        if len(parts) != 3:
            raise AnnotationError(file, n, f"expected 'frame_dir num_frames label', got {line!r}")
        try:
            count, label = int(parts[1]), int(parts[2])
        except ValueError:
            raise AnnotationError(file, n, f"num_frames and label must be integers, got {line!r}") from None
        folder, extra = numeric_tail(parts[0])
        offset = 0
        if not extra or os.path.isdir(Path(root) / parts[0].strip()):
            folder = parts[0]  # no extra column, or a folder whose name ends in a number
        elif len(extra) == 1 and re.fullmatch(r"[+-]?\d+", extra[0]):
            offset = int(extra[0])
            if offset < 0:
                raise AnnotationError(file, n, f"offset: expected >= 0, got {offset}")
        else:
            raise AnnotationError(
                file,
                n,
                "expected 'frame_dir total_frames label' or 'frame_dir offset total_frames label', got "
                f"{len(extra) + 2} number columns after the folder in {line!r} (multi-label and other extra "
                "columns are not supported)",
            )
        if count < 1:
            raise AnnotationError(file, n, f"num_frames: expected >= 1, got {count}")
        if label < 0 or (num_classes is not None and label >= num_classes):
            bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            raise AnnotationError(file, n, f"unknown class {label}: expected a label in {bound}")
        records.append(
            FrameRecord(
                str(Path(root) / folder.strip()),
                label,
                num_frames=count if trust_counts else None,
                template=template,
                start_index=start_index,
                offset=offset,
            )
        )
    return records


class RawFrameListDataModule(VideoListDataModule):
    """MMAction2 / TSN rawframe lists: `frame_dir num_frames label` per line, folders relative to
    `root`, frames named `frame_template` (default "img_{:05d}.jpg") from `frame_start_index`
    (MMAction2: 1). `trust_counts=False` scans each folder instead of using the listed count.
    Lists, class names and the val -> test fallback: as `VideoListDataModule`.
    """

    def __init__(
        self,
        root: str,
        train_list: str | None = None,
        test_list: str | None = None,
        val_list: str | None = None,
        class_names: list[str] | str | None = None,
        num_classes: int | None = None,
        frame_template: str = DEFAULT_TEMPLATE,
        frame_start_index: int = 1,
        trust_counts: bool = True,
        **kwargs,
    ):
        super().__init__(
            root,
            train_list=train_list,
            test_list=test_list,
            val_list=val_list,
            class_names=class_names,
            num_classes=num_classes,
            **kwargs,
        )
        self.frame_template = check_template(frame_template, frame_start_index)
        self.frame_start_index = frame_start_index
        self.trust_counts = trust_counts

    def _parse(self, file: Path, num_classes: int | None) -> list[FrameRecord]:
        return parse_rawframe_list(
            file, self.root, num_classes, self.frame_template, self.frame_start_index, self.trust_counts
        )
