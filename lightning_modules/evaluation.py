"""Evaluation of a video classifier: view averaging, cross-rank gathering, metrics, confusion matrix.

Every place that turns clip scores into video scores uses `average_views`: the validation/test
accumulator (`EvalAccumulator`), `VideoClassifier.predict_step` and the prediction writer
(`lightning_modules.reports.PredictionWriter`), and fusing two score dumps. A video's score is the
mean over its views of the clip probabilities (each clip's probabilities being the mean over the
network's heads of softmax); see docs/architecture.md for where this sits in the layers.

Nothing here knows about files or Lightning; metrics are plain floats, so results are JSON-ready.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_confusion_matrix

__all__ = [
    "EvalAccumulator",
    "EvalResult",
    "average_views",
    "confusion_matrix",
    "gather_objects",
    "mean_class_recall",
    "video_metrics",
]


def gather_objects(obj: Any) -> list[Any]:
    """All ranks' `obj` in rank order (a one-element list outside torch.distributed).

    A collective under torch.distributed: every rank must call it, with picklable `obj`.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def average_views(video_ids: Tensor, probs: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per video, the (weighted) mean of its views' class probabilities.

    Args:
        video_ids: int64 [N], the video of each row.
        probs: float [N, C], class probabilities of each row (a clip, or an already averaged
            group of views).
        weights: int64 [N], the number of views each row stands for (default: 1 each), so partial
            averages (per batch, per rank) merge into the same mean as averaging all views at once.

    Returns:
        (ids [V] sorted ascending, mean probabilities float32 [V, C], views per video int64 [V]).
    """
    if video_ids.ndim != 1 or probs.ndim != 2 or len(probs) != len(video_ids):
        raise ValueError(
            f"video_ids [N] and probs [N, C] must agree, got shapes {list(video_ids.shape)} and {list(probs.shape)}"
        )
    ids, inv = torch.unique(video_ids.to(torch.int64), return_inverse=True)
    count = weights.to(torch.int64) if weights is not None else torch.ones_like(inv)
    total = torch.zeros(len(ids), dtype=torch.int64).index_add_(0, inv, count)
    psum = torch.zeros(len(ids), probs.shape[1]).index_add_(0, inv, probs.float() * count.unsqueeze(1))
    return ids, psum / total.clamp_min(1).unsqueeze(1), total


def mean_class_recall(pred: Tensor, target: Tensor, num_classes: int) -> tuple[float, int]:
    """Mean over classes with >= 1 sample of (correct / samples), and how many classes that is.

    pred, target: class ids int64 [N]. A class with predictions but no true sample has no recall and
    is not averaged (torchmetrics' macro average would count it as 0). No sample: (nan, 0).
    """
    support = torch.bincount(target, minlength=num_classes)
    correct = torch.bincount(target[pred == target], minlength=num_classes)
    present = support > 0
    if not bool(present.any()):
        return float("nan"), 0
    return float((correct[present].double() / support[present].double()).mean()), int(present.sum())


def video_metrics(probs: Tensor, labels: Tensor, num_classes: int, top_k: int = 5) -> dict[str, float | int]:
    """Accuracies of per-video scores: `top1`, `top5` (top-k, k = min(top_k, num_classes)),
    `mean_class` (`mean_class_recall`) and `mean_class_num_classes`.

    probs: float [V, num_classes] (view-averaged probabilities); labels: int64 [V]. With no video
    every accuracy is nan (null in JSON reports) and `mean_class_num_classes` is 0.
    """
    if len(labels) == 0:
        return {"top1": float("nan"), "top5": float("nan"), "mean_class": float("nan"), "mean_class_num_classes": 0}
    k = min(top_k, num_classes)
    mean_class, n_present = mean_class_recall(probs.argmax(1), labels, num_classes)
    top1 = multiclass_accuracy(probs, labels, num_classes=num_classes, average="micro", top_k=1)
    topk = multiclass_accuracy(probs, labels, num_classes=num_classes, average="micro", top_k=k)
    return {"top1": float(top1), "top5": float(topk), "mean_class": mean_class, "mean_class_num_classes": n_present}


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Counts int64 [num_classes, num_classes], rows = true class, columns = predicted class."""
    if len(target) == 0:
        return torch.zeros(num_classes, num_classes, dtype=torch.int64)
    return multiclass_confusion_matrix(pred, target, num_classes=num_classes)


class EvalResult(dict):
    """Metrics of one validation/test epoch (plain floats/ints, JSON-serialisable) plus tensors.

    Keys: `top1`, `top5`, `mean_class` (video level, views averaged; mean recall over the
    `mean_class_num_classes` classes with >= 1 video), `clip_top1`, `clip_top5`,
    `clip_mean_class`, `loss` (clip mean of the summed head losses), `num_videos`, `num_clips`,
    `excluded_videos` (videos that failed to decode and so are not in the metrics),
    `nonfinite_videos` (videos whose scores hold NaN/Inf; when > 0 every accuracy is nan and the
    confusion matrix is zero: such scores rank nothing).

    Attributes (gathered over ranks, identical on every rank):
        confusion: int64 [num_classes, num_classes], video level, rows = true class.
        video_ids: int64 [V] sorted; video_labels: int64 [V]; video_probs: float32 [V, num_classes]
            (view-averaged probabilities); video_views: int64 [V] (distinct views averaged).
        excluded_ids: int64 [M], ids of the videos that failed to decode and have no view.
    """

    confusion: Tensor
    video_ids: Tensor
    video_labels: Tensor
    video_probs: Tensor
    video_views: Tensor
    excluded_ids: Tensor


def _cat(parts: list[Tensor], empty_shape: tuple[int, ...] = (0,), dtype: torch.dtype = torch.int64) -> Tensor:
    return torch.cat(parts) if parts else torch.zeros(empty_shape, dtype=dtype)


def _first_occurrences(keys: Tensor) -> Tensor:
    """bool [N]: True where a (video_id, view) row of `keys` [N, 2] is the first of its value."""
    max_view = int(keys[:, 1].max()) + 1 if keys.numel() else 1
    flat = keys[:, 0] * max_view + keys[:, 1]
    order = torch.sort(flat, stable=True).indices
    sorted_flat = flat[order]
    first_sorted = torch.ones_like(sorted_flat, dtype=torch.bool)
    first_sorted[1:] = sorted_flat[1:] != sorted_flat[:-1]
    first = torch.ones_like(flat, dtype=torch.bool)
    first[order] = first_sorted
    return first


def _video_labels(video_ids: Tensor, labels: Tensor, ids: Tensor) -> Tensor:
    """int64 [len(ids)]: the label of each of the sorted unique `ids` (-1 where none is given)."""
    inv = torch.searchsorted(ids, video_ids)
    return torch.full((len(ids),), -1, dtype=torch.int64).scatter_(0, inv, labels)


class EvalAccumulator:
    """Per-rank store of one evaluation epoch's clips (CPU; float32 probabilities).

    `add` each batch's clips, `add_bad` the ids of videos that failed to decode, then `compute`
    (a collective under torch.distributed: every rank calls it and gets the same result).
    """

    def __init__(self) -> None:
        self.video_ids: list[Tensor] = []
        self.views: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.probs: list[Tensor] = []
        self.losses: list[Tensor] = []
        self.bad_ids: list[Tensor] = []

    def add(self, video_id: Tensor, view: Tensor, label: Tensor, probs: Tensor, loss: Tensor) -> None:
        """One batch: video ids, view indices, labels (int [N]), probabilities [N, C], losses [N]."""
        self.video_ids.append(video_id.detach().to("cpu", torch.int64))
        self.views.append(view.detach().to("cpu", torch.int64))
        self.labels.append(label.detach().to("cpu", torch.int64))
        self.probs.append(probs.detach().to("cpu", torch.float32))
        self.losses.append(loss.detach().to("cpu", torch.float32))

    def add_bad(self, bad_ids: Tensor) -> None:
        """Ids (int [M]) of videos of a batch that could not be decoded."""
        self.bad_ids.append(bad_ids.detach().to("cpu", torch.int64).reshape(-1))

    def compute(self, num_classes: int, top_k: int = 5) -> EvalResult:
        """Gather across ranks, de-duplicate clips by (video_id, view) and compute the metrics.

        A distributed sampler pads ranks with repeated clips; each clip counts once, on the lowest
        rank (and first position) that holds it, so results do not depend on the process count.
        Only small tensors travel: first the clip keys, then the owned clips' labels, top-k and
        losses, then per-video view averages.
        """
        vid, view, label = _cat(self.video_ids), _cat(self.views), _cat(self.labels)
        probs = _cat(self.probs, (0, num_classes), torch.float32)
        loss = _cat(self.losses, dtype=torch.float32)
        if vid.numel() and int(view.min()) < 0:
            raise ValueError(f"batch['view'] must be >= 0, got min {int(view.min())}")

        # 1. Ownership of each clip.
        all_keys = gather_objects(torch.stack([vid, view], 1))
        rank = dist.get_rank() if len(all_keys) > 1 else 0
        start = sum(len(k) for k in all_keys[:rank])
        own = _first_occurrences(torch.cat(all_keys))[start : start + len(vid)]
        vid, view, label, probs, loss = vid[own], view[own], label[own], probs[own], loss[own]

        # 2. Clip level: labels, top-k and losses of the owned clips (full probabilities never travel).
        k = min(top_k, num_classes)
        clip_topk = probs.topk(k, dim=1).indices if len(probs) else torch.zeros(0, k, dtype=torch.int64)
        clips = gather_objects((label, clip_topk, loss))
        c_label, c_topk, c_loss = (torch.cat([c[i] for c in clips]) for i in range(3))

        # 3. Video level: views averaged per rank, then the partial averages merged by view count.
        ids, mean, views = average_views(vid, probs)
        videos = gather_objects((ids, mean, views, _video_labels(vid, label, ids)))
        all_ids, all_mean, all_views, all_labels = (torch.cat([v[i] for v in videos]) for i in range(4))
        g_ids, g_prob, g_views = average_views(all_ids, all_mean, all_views)
        g_label = _video_labels(all_ids, all_labels, g_ids)

        bad = torch.unique(torch.cat(gather_objects(_cat(self.bad_ids))))
        excluded = bad[~torch.isin(bad, g_ids)]

        nonfinite = int((~torch.isfinite(g_prob).all(1)).sum())
        res = EvalResult(
            num_videos=len(g_ids),
            num_clips=len(c_label),
            excluded_videos=len(excluded),
            nonfinite_videos=nonfinite,
            loss=float(c_loss.mean()) if len(c_loss) else float("nan"),
        )
        if nonfinite:
            # topk/argmax of NaN still return class ids: such scores must never count as hits.
            none = torch.zeros(0, dtype=torch.int64)
            res.update(video_metrics(torch.zeros(0, num_classes), none, num_classes, top_k))
            res.update(_clip_metrics(torch.zeros(0, 1, dtype=torch.int64), none, num_classes))
            res.confusion = confusion_matrix(none, none, num_classes)
        else:
            res.update(video_metrics(g_prob, g_label, num_classes, top_k))
            res.update(_clip_metrics(c_topk, c_label, num_classes))
            res.confusion = confusion_matrix(g_prob.argmax(1), g_label, num_classes)
        res.video_ids, res.video_labels, res.video_probs, res.video_views = g_ids, g_label, g_prob, g_views
        res.excluded_ids = excluded
        return res


def _clip_metrics(topk: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """`clip_top1`, `clip_top5`, `clip_mean_class` from top-k class ids [N, k] and labels [N]."""
    if len(labels) == 0:
        return {"clip_top1": float("nan"), "clip_top5": float("nan"), "clip_mean_class": float("nan")}
    hit = topk == labels.unsqueeze(1)
    return {
        "clip_top1": float(hit[:, 0].float().mean()),
        "clip_top5": float(hit.any(1).float().mean()),
        "clip_mean_class": mean_class_recall(topk[:, 0], labels, num_classes)[0],
    }
