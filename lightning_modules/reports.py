"""Report files of a run, written by Callbacks: test results, confusion matrix, per-video scores, predictions.

- `TestReportWriter` (installed by the `vmm` CLI): after `test`, writes into the log directory
  `test_results.json` (the metrics; undefined ones are null), `confusion_matrix_test.csv` / `.png`
  and `scores_test.json` (the view-averaged class probabilities of every test video, see
  `score_dump`), and adds the confusion figure to loggers that take figures (TensorBoard).
- `PredictionWriter`: merges `VideoClassifier.predict_step` outputs per video and writes the
  top-k classes as JSON.
- `fuse_scores`: the weighted mean of several models' score dumps (`vmm fuse-scores`).

Every file is written atomically (`lightning_modules.io`), by global rank 0 only. Nothing is written
when the Trainer has no logger (its log directory would be the working directory). The module
computes the results (`lightning_modules.evaluation`); this file only turns them into files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from .evaluation import EvalResult, average_views, gather_objects, video_metrics
from .io import atomic_write_json, atomic_write_text, atomic_writer, check_readable_file, check_writable_file

__all__ = [
    "MAX_SCORE_FILE_BYTES",
    "SCORE_FORMAT",
    "PredictionWriter",
    "TestReportWriter",
    "confusion_figure",
    "fuse_scores",
    "read_score_dump",
    "score_dump",
    "write_test_report",
]

SCORE_FORMAT = "vmm-scores/1"
# A dump holds ~20 bytes per class per video: 1 GiB is Kinetics-700's validation set several times
# over, and json.loads needs a few times the file's size in memory.
MAX_SCORE_FILE_BYTES = 2**30


def confusion_figure(confusion: Tensor, names: list[str]):
    """A matplotlib Figure of the confusion matrix [C, C] (rows = true class): each cell's count, coloured
    by its share of the true class's videos (row-normalised), or None without matplotlib.

    Built without pyplot, so it neither needs nor changes a global backend (notebooks keep theirs).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    c = confusion.float()
    norm = c / c.sum(1, keepdim=True).clamp_min(1)
    n = len(names)
    size = min(3 + 0.35 * n, 20)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 60:
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                color = "white" if norm[i, j] > 0.5 else "black"
                ax.text(j, i, int(c[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("test confusion, video level: counts (colour: share of the true class)")
    fig.tight_layout()
    return fig


def score_dump(res: EvalResult, class_names: list[str], video_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The per-video scores of an evaluation as plain data (the content of `scores_test.json`).

    `{"format": "vmm-scores/1", "split": "test", "class_names": [...], "num_classes": C,
    "videos": [{"video_id", "name", "label", "num_views", "probs": [C floats, 7 significant digits]}, ...]
    (sorted by id),
    "excluded_video_ids": [...]}`. `probs` are the view-averaged class probabilities; `name` is
    `video_names[video_id]` (e.g. the file path) or None. Two dumps of the same split fuse by
    `video_id` (`vmm fuse-scores`).
    """
    if len(class_names) != res.video_probs.shape[1]:
        raise ValueError(
            f"class_names must have {res.video_probs.shape[1]} entries (one per class), got {len(class_names)}"
        )

    def name(v: int) -> str | None:
        return str(video_names[v]) if video_names is not None and 0 <= v < len(video_names) else None

    # 7 significant digits: float32's precision, at about half the characters of a full repr.
    videos = [
        {"video_id": v, "name": name(v), "label": y, "num_views": n, "probs": [float(f"{x:.7g}") for x in p]}
        for v, y, n, p in zip(
            res.video_ids.tolist(),
            res.video_labels.tolist(),
            res.video_views.tolist(),
            res.video_probs.tolist(),
            strict=True,
        )
    ]
    return {
        "format": SCORE_FORMAT,
        "split": "test",
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "videos": videos,
        "excluded_video_ids": res.excluded_ids.tolist(),
    }


def read_score_dump(path: str | Path) -> dict[str, Any]:
    """A `scores_test.json` file, checked, with tensors: the file's keys plus `ids` int64 [V],
    `labels` int64 [V], `probs` float32 [V, C] (rows sorted by video id) and `names` (list, None
    where unknown). Raises ValueError naming the file and what is wrong; devices, FIFOs and files
    over `MAX_SCORE_FILE_BYTES` are refused unread."""
    import json

    path = check_readable_file(path, "vmm score dump", MAX_SCORE_FILE_BYTES)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON score dump ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != SCORE_FORMAT:
        raise ValueError(f'{path}: not a vmm score dump (expected "format": {SCORE_FORMAT!r})')
    names, videos = data.get("class_names"), data.get("videos")
    if not isinstance(names, list) or not isinstance(videos, list):
        raise ValueError(f'{path}: expected lists "class_names" and "videos"')
    videos = sorted(videos, key=lambda v: v["video_id"])
    bad = [v.get("video_id") for v in videos if not isinstance(v.get("probs"), list) or len(v["probs"]) != len(names)]
    if bad:
        raise ValueError(f"{path}: videos {bad[:5]} do not have {len(names)} probabilities (one per class)")
    # JSON null is how a strict writer stores NaN; Python's json reads bare NaN/Infinity as floats.
    nonfinite = [
        v.get("video_id")
        for v in videos
        if not all(isinstance(p, int | float) and not isinstance(p, bool) and math.isfinite(p) for p in v["probs"])
    ]
    if nonfinite:
        raise ValueError(
            f"{path}: {len(nonfinite)} videos have non-finite scores (NaN/Inf), e.g. video ids {nonfinite[:5]}; "
            "such scores cannot be fused or scored"
        )
    ids = torch.tensor([v["video_id"] for v in videos], dtype=torch.int64)
    if len(torch.unique(ids)) != len(ids):
        raise ValueError(f"{path}: a video_id appears more than once")
    return {
        **data,
        "ids": ids,
        "labels": torch.tensor([v["label"] for v in videos], dtype=torch.int64),
        "probs": torch.tensor([v["probs"] for v in videos], dtype=torch.float32).reshape(len(videos), len(names)),
        "names": [v.get("name") for v in videos],
    }


def fuse_scores(
    dumps: Sequence[str | Path], weights: Sequence[float] | None = None, output: str | Path | None = None
) -> dict[str, Any]:
    """Fuse per-video score dumps (`scores_test.json` of `vmm test`, `score_dump`)
    of two or more models on the same split: the fused probabilities of a video are the weighted
    mean of its probabilities in each dump (weights default to equal; they need not sum to 1).

    Videos are matched by `video_id`; their labels and (where both are known) names must agree, and
    so must the class names. A video missing from some dump (it failed to decode there) is left
    out and counted. Prints top-1 / top-5 / mean-class accuracy of each dump and of the fused
    scores over the common videos when every label is known (>= 0), and writes the fused dump
    (same format, plus `fused_from` and `metrics`) to `output` when given. Returns that dump.
    """
    if isinstance(dumps, str | Path) or len(dumps) < 2:
        raise ValueError(f"dumps: expected at least two score files, got {dumps!r}")
    weights = [1.0] * len(dumps) if weights is None else [float(w) for w in weights]
    if len(weights) != len(dumps) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"weights: expected {len(dumps)} non-negative numbers (one per dump) with a positive sum, got {weights}"
        )
    if output is not None:
        check_writable_file(output, "--output")
    read = [read_score_dump(d) for d in dumps]
    names = read[0]["class_names"]
    for d, r in zip(dumps[1:], read[1:], strict=True):
        if r["class_names"] != names:
            raise ValueError(f"{d}: class_names differ from {dumps[0]}'s (the dumps must come from the same classes)")
    common = sorted(set.intersection(*(set(r["ids"].tolist()) for r in read)))
    if not common:
        raise ValueError(f"the dumps {[str(d) for d in dumps]} have no video_id in common (not the same split?)")
    rows = [{v: i for i, v in enumerate(r["ids"].tolist())} for r in read]
    ids = torch.tensor(common, dtype=torch.int64)
    picked = [torch.tensor([row[v] for v in common], dtype=torch.int64) for row in rows]
    labels = read[0]["labels"][picked[0]]
    video_names = [read[0]["names"][i] for i in picked[0].tolist()]
    for d, r, p in zip(dumps[1:], read[1:], picked[1:], strict=True):
        if not torch.equal(r["labels"][p], labels):
            raise ValueError(f"{d}: the labels of the common videos differ from {dumps[0]}'s")
        other = [r["names"][i] for i in p.tolist()]
        clash = [v for v, a, b in zip(common, video_names, other, strict=True) if a and b and a != b]
        if clash:
            raise ValueError(f"{d}: video ids {clash[:5]} name other files than in {dumps[0]} (not the same split?)")
        video_names = [a or b for a, b in zip(video_names, other, strict=True)]
    total = sum(weights)
    fused = sum((w / total) * r["probs"][p] for w, r, p in zip(weights, read, picked, strict=True))
    left_out = sorted(set().union(*(set(r["ids"].tolist()) for r in read)) - set(common))
    excluded = sorted(set().union(*(set(r.get("excluded_video_ids") or []) for r in read)) | set(left_out))
    labelled = bool(len(labels)) and bool((labels >= 0).all())
    k = len(names)
    lines = []
    metrics = None
    if labelled:
        for d, r, p in zip(dumps, read, picked, strict=True):
            lines.append((str(d), video_metrics(r["probs"][p], labels, k)))
        metrics = video_metrics(fused, labels, k)
        lines.append((f"fused (weights {', '.join(f'{w:g}' for w in weights)})", metrics))
        width = max(len(n) for n, _ in lines)
        for name, m in lines:
            print(
                f"{name:<{width}}  top-1 {100 * m['top1']:5.1f}%  top-5 {100 * m['top5']:5.1f}%  "
                f"mean-class {100 * m['mean_class']:5.1f}%"
            )
    print(f"{len(common)} videos fused" + (f"; {len(left_out)} not in every dump, left out" if left_out else ""))
    result = {
        "format": SCORE_FORMAT,
        "split": read[0].get("split"),
        "class_names": list(names),
        "num_classes": k,
        "fused_from": [{"path": str(d), "weight": w} for d, w in zip(dumps, weights, strict=True)],
        "metrics": metrics,
        "videos": [
            {"video_id": v, "name": n, "label": y, "probs": p}
            for v, n, y, p in zip(ids.tolist(), video_names, labels.tolist(), fused.tolist(), strict=True)
        ],
        "excluded_video_ids": excluded,
    }
    if output is not None:
        atomic_write_json(output, result)
        print(f"fused scores written to {output}")
    return result


def write_test_report(
    res: EvalResult,
    log_dir: str | Path,
    class_names: list[str],
    video_names: Sequence[str] | None = None,
    figure: Any = None,
) -> list[Path]:
    """Write `test_results.json`, `confusion_matrix_test.csv` / `.png` and `scores_test.json` into
    `log_dir` (created if missing), each atomically: a failed write leaves an older file whole.
    `figure`: the confusion-matrix figure when the caller has drawn it already (else drawn here).
    Returns the files written (the PNG only where matplotlib drew it)."""
    out = Path(log_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, scores, matrix_csv, matrix_png = (
        out / name
        for name in ("test_results.json", "scores_test.json", "confusion_matrix_test.csv", "confusion_matrix_test.png")
    )
    written = [results, scores, matrix_csv]
    # Strict JSON: undefined metrics are null, never NaN.
    atomic_write_json(results, dict(res))
    rows = [",".join(["true\\pred", *class_names])]
    rows += [",".join([class_names[i], *map(str, r.tolist())]) for i, r in enumerate(res.confusion)]
    atomic_write_text(matrix_csv, "\n".join(rows) + "\n")
    fig = confusion_figure(res.confusion, class_names) if figure is None else figure
    if fig is not None:
        with atomic_writer(matrix_png, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        written.append(matrix_png)
    atomic_write_json(scores, score_dump(res, class_names, video_names))
    return written


def _test_video_names(trainer: Trainer) -> list[str] | None:
    """Paths of the datamodule's test videos indexed by video id, when it lists them (`records`)."""
    records = getattr(getattr(trainer, "datamodule", None), "records", None)
    if not callable(records):
        return None
    try:
        return [str(r.path) for r in records("test")]
    except ValueError:  # no test split (the test data came from elsewhere)
        return None


class TestReportWriter(Callback):
    """After `trainer.test`, writes the report files of `VideoClassifier.last_eval["test"]`.

    Files in `trainer.log_dir` (only with a logger): see `write_test_report`. Also prints how many
    test videos could not be used, and adds the confusion figure to every logger whose experiment
    has `add_figure` (TensorBoard). Runs at `on_test_end`, after the module has computed the
    result (`on_test_epoch_end`) and before it fails a test with no usable video, so that report
    (metrics null) is still written. `written` lists the files of the latest test (empty when it
    wrote none).
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self) -> None:
        self._before: Any = None
        self.written: list[Path] = []

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A result from an earlier run is never reported again (a failed epoch computes none).
        self._before = getattr(pl_module, "last_eval", {}).get("test")
        self.written = []

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        res = getattr(pl_module, "last_eval", {}).get("test")
        if not isinstance(res, EvalResult) or res is self._before:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero:
            return
        if res["excluded_videos"]:
            print(
                f"[vmm] {res['excluded_videos']} test video(s) could not be used (missing, not a regular file or "
                "failed to decode) and are excluded from the metrics; `vmm check-data` lists them"
            )
        num_classes = res.confusion.shape[0]
        names = getattr(pl_module, "class_names", None) or [str(i) for i in range(num_classes)]
        fig = confusion_figure(res.confusion, names)
        for logger in trainer.loggers:
            add_figure = getattr(getattr(logger, "experiment", None), "add_figure", None)
            if fig is not None and callable(add_figure):
                add_figure("test/confusion_matrix", fig, global_step=trainer.global_step)
        # Without a logger, log_dir is the working directory: report on stdout only, write no files.
        if trainer.loggers and log_dir:
            self.written = write_test_report(res, log_dir, names, _test_video_names(trainer), figure=fig)


class PredictionWriter(BasePredictionWriter):
    """Merges `VideoClassifier.predict_step` outputs per video (across batches and ranks), prints
    the top-k classes of every video and writes them as JSON.

    Args:
        output: JSON file to write (atomically); default `<trainer.log_dir>/predictions.json`.
        video_names: names (e.g. file paths) indexed by video id, shown instead of the ids.
    """

    def __init__(self, output: str | None = None, video_names: Sequence[str] | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = output
        self.video_names = list(video_names) if video_names is not None else None
        self.results: list[dict[str, Any]] = []

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        flat: list[dict[str, Any]] = []
        for p in predictions:  # one list per dataloader, or one list of batch outputs
            flat.extend(p if isinstance(p, list) else [p])
        parts = [(o["video_id"], o["num_views"], o["probs"], o["bad_video_ids"]) for o in flat]
        parts = [x for rank_parts in gather_objects(parts) for x in rank_parts]
        out = Path(self.output) if self.output else Path(trainer.log_dir or ".") / "predictions.json"  # collective
        # Every rank holds every part, so every rank reaches the same verdict and none waits on another.
        num_classes = pl_module.num_classes
        vids = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
        counts = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
        probs = torch.cat([p[2] for p in parts]) if parts else torch.zeros(0, num_classes)
        bad = torch.unique(torch.cat([p[3] for p in parts])) if parts else torch.zeros(0, dtype=torch.int64)
        # Every clip arrives once (the predict sampler never pads), so views are averaged as at test.
        uvid, mean, n = average_views(vids, probs, counts)
        finite = torch.isfinite(mean).all(1)
        undecoded = [v for v in bad.tolist() if v not in set(uvid.tolist())]
        nonfinite = uvid[~finite].tolist()
        uvid, mean, n = uvid[finite], mean[finite], n[finite]
        total = len(uvid) + len(undecoded) + len(nonfinite)
        problems = []
        if undecoded:
            problems.append(f"{len(undecoded)} of {total} could not be decoded")
        if nonfinite:
            problems.append(f"{len(nonfinite)} of {total} had non-finite scores (NaN/Inf)")
        if trainer.is_global_zero:
            self._report(pl_module, out, uvid, mean, n, undecoded, nonfinite)
        if not len(uvid):
            raise RuntimeError(
                f"predict: no video could be predicted: {', '.join(problems) or 'no input'}; {out} was not written"
            )
        if nonfinite:
            raise RuntimeError(
                f"predict: {len(nonfinite)} of {total} videos had non-finite scores (NaN/Inf; listed under "
                f'"nonfinite" in {out}): check the checkpoint\'s weights, or use precision 32 if half precision '
                "overflowed"
            )

    def _report(self, pl_module, out: Path, uvid: Tensor, mean: Tensor, n: Tensor, undecoded, nonfinite) -> None:
        """Print the top-k of each predicted video and every failure, and write `out` unless nothing
        was predicted (an earlier file is then left as it was)."""
        top = pl_module.topk(mean)
        self.results = []
        for i, v in enumerate(uvid.tolist()):
            self.results.append(
                {
                    "video_id": v,
                    "video": self._name(v),
                    "views": int(n[i]),
                    "top_k": [
                        {"class_id": c, "class_name": name, "prob": round(float(p), 6)}
                        for c, name, p in zip(
                            top["topk_ids"][i].tolist(),
                            top["topk_names"][i],
                            top["topk_probs"][i].tolist(),
                            strict=True,
                        )
                    ],
                }
            )
        failed = [{"video_id": v, "video": self._name(v)} for v in undecoded]
        bad_scores = [{"video_id": v, "video": self._name(v)} for v in nonfinite]
        for r in self.results:
            guesses = ", ".join(f"{t['class_name']} {100 * t['prob']:.1f}%" for t in r["top_k"])
            print(f"{r['video']}: {guesses}")
        for f in failed:
            print(f"{f['video']}: could not be decoded")
        for f in bad_scores:
            print(f"{f['video']}: non-finite scores (NaN/Inf), not ranked")
        if not self.results:
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {"predictions": self.results, "failed": failed}
        if bad_scores:
            doc["nonfinite"] = bad_scores
        atomic_write_json(out, doc)
        total = len(self.results) + len(failed) + len(bad_scores)
        if failed or bad_scores:
            print(
                f"{len(self.results)} of {total} videos predicted ({len(failed)} could not be decoded, "
                f"{len(bad_scores)} had non-finite scores)"
            )
        print(f"predictions written to {out}")

    def _name(self, video_id: int) -> str:
        if self.video_names is not None and 0 <= video_id < len(self.video_names):
            return self.video_names[video_id]
        return str(video_id)
