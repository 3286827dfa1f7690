"""lightning_modules.evaluation and the score dump of lightning_modules.reports: view averaging,
metrics, the epoch accumulator (alone and gathered over two real gloo processes), and the
per-video score file written at test."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_modules.evaluation import (
    EvalAccumulator,
    average_views,
    confusion_matrix,
    mean_class_recall,
    video_metrics,
)
from lightning_modules.io import atomic_write_json
from lightning_modules.reports import read_score_dump, score_dump

p = torch.tensor


# ---------------------------------------------------------------------------- average_views


def test_average_views_is_the_mean_over_views_and_merges_partial_means():
    ids = p([4, 1, 4, 4, 1])
    probs = torch.softmax(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), 1)
    uid, mean, views = average_views(ids, probs)
    assert uid.tolist() == [1, 4] and views.tolist() == [2, 3]
    torch.testing.assert_close(mean[0], probs[[1, 4]].mean(0))
    torch.testing.assert_close(mean[1], probs[[0, 2, 3]].mean(0))
    # Partial averages (two batches / ranks) weighted by their view counts give the same mean.
    a = average_views(ids[:2], probs[:2])
    b = average_views(ids[2:], probs[2:])
    merged = average_views(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]), torch.cat([a[2], b[2]]))
    assert merged[0].tolist() == [1, 4] and merged[2].tolist() == [2, 3]
    torch.testing.assert_close(merged[1], mean)


def test_average_views_rejects_mismatched_shapes_and_handles_no_rows():
    with pytest.raises(ValueError, match=r"video_ids \[N\] and probs \[N, C\].*\[3\].*\[2, 4\]"):
        average_views(p([0, 1, 2]), torch.zeros(2, 4))
    uid, mean, views = average_views(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 5))
    assert uid.shape == (0,) and mean.shape == (0, 5) and views.shape == (0,)


# ---------------------------------------------------------------------------- metrics


def test_video_metrics_and_mean_class_over_present_classes():
    probs = p([[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    labels = p([0, 1, 1, 1])  # class 2 has no video; video 2 is predicted as class 2
    m = video_metrics(probs, labels, num_classes=3, top_k=2)
    assert m["top1"] == 0.5 and m["top5"] == 1.0  # top-2 here
    assert m["mean_class"] == pytest.approx((1.0 + 1 / 3) / 2) and m["mean_class_num_classes"] == 2
    assert mean_class_recall(probs.argmax(1), labels, 3) == (pytest.approx(2 / 3), 2)
    empty = video_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), 3)
    assert math.isnan(empty["top1"]) and math.isnan(empty["mean_class"]) and empty["mean_class_num_classes"] == 0
    torch.testing.assert_close(confusion_matrix(probs.argmax(1), labels, 3), p([[1, 0, 0], [1, 1, 1], [0, 0, 0]]))
    assert confusion_matrix(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 2).sum() == 0


# ---------------------------------------------------------------------------- the accumulator


def test_eval_accumulator_averages_views_dedupes_and_counts_excluded():
    acc = EvalAccumulator()
    # video 0 (label 1): two views whose mean favours class 1; view 1 seen twice (sampler padding).
    acc.add(p([0, 0]), p([0, 1]), p([1, 1]), p([[0.6, 0.4, 0.0], [0.0, 0.9, 0.1]]), p([1.0, 2.0]))
    acc.add(p([0, 2]), p([1, 0]), p([1, 2]), p([[0.0, 0.9, 0.1], [0.2, 0.5, 0.3]]), p([2.0, 3.0]))
    acc.add_bad(p([5, 2]))  # 2 failed in one view only: still evaluated; 5 is excluded
    res = acc.compute(num_classes=3, top_k=2)
    assert res["num_videos"] == 2 and res["num_clips"] == 3 and res["excluded_videos"] == 1
    assert res["top1"] == 0.5  # video 0 right (mean [.3,.65,.05]), video 2 wrong (argmax 1, label 2)
    assert res["top5"] == 1.0  # top-2: class 2 is second for video 2
    assert res["clip_top1"] == pytest.approx(1 / 3)
    assert res["mean_class"] == 0.5
    assert res["loss"] == pytest.approx(2.0)
    torch.testing.assert_close(res.confusion, p([[0, 0, 0], [0, 1, 0], [0, 1, 0]]))
    # The per-video scores behind the metrics (what the score dump holds).
    assert res.video_ids.tolist() == [0, 2] and res.video_labels.tolist() == [1, 2]
    assert res.video_views.tolist() == [2, 1] and res.excluded_ids.tolist() == [5]
    torch.testing.assert_close(res.video_probs, p([[0.3, 0.65, 0.05], [0.2, 0.5, 0.3]]))


def test_eval_accumulator_rejects_negative_views():
    acc = EvalAccumulator()
    acc.add(p([0]), p([-1]), p([0]), p([[1.0, 0.0]]), p([0.0]))
    with pytest.raises(ValueError, match=r"batch\['view'\] must be >= 0, got min -1"):
        acc.compute(num_classes=2)


# Six videos of 3 classes, 2 views each; rank r of 2 gets every other clip, and rank 1 repeats
# rank 0's first clip (a DistributedSampler's padding).
_CLIPS = [(v, w) for v in range(6) for w in range(2)]
_LABELS = [v % 3 for v in range(6)]


def _clip_probs() -> torch.Tensor:
    return torch.softmax(torch.randn(len(_CLIPS), 3, generator=torch.Generator().manual_seed(7)) * 2, 1)


def _fill(acc: EvalAccumulator, rows: list[int]) -> None:
    probs = _clip_probs()
    acc.add(
        p([_CLIPS[i][0] for i in rows]),
        p([_CLIPS[i][1] for i in rows]),
        p([_LABELS[_CLIPS[i][0]] for i in rows]),
        probs[rows],
        torch.arange(len(rows), dtype=torch.float32) * 0,
    )
    acc.add_bad(p([9]))


def _gloo_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rows = list(range(rank, len(_CLIPS), 2)) + ([0] if rank == 1 else [])
        acc = EvalAccumulator()
        _fill(acc, rows)
        res = acc.compute(num_classes=3, top_k=2)
        torch.save(
            {"metrics": dict(res), "probs": res.video_probs, "ids": res.video_ids, "confusion": res.confusion},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_eval_accumulator_gathers_two_gloo_ranks_like_one_process(tmp_path):
    single = EvalAccumulator()
    _fill(single, list(range(len(_CLIPS))))
    expect = single.compute(num_classes=3, top_k=2)
    mp.spawn(_gloo_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["metrics"] == pytest.approx(dict(expect), nan_ok=True), rank  # the padded clip counts once
        assert got["metrics"]["num_clips"] == 12 and got["metrics"]["excluded_videos"] == 1
        torch.testing.assert_close(got["probs"], expect.video_probs)
        assert got["ids"].tolist() == list(range(6))
        torch.testing.assert_close(got["confusion"], expect.confusion)


# ---------------------------------------------------------------------------- the score dump


def _result():
    acc = EvalAccumulator()
    _fill(acc, list(range(len(_CLIPS))))
    return acc.compute(num_classes=3, top_k=2)


def test_score_dump_round_trip_reproduces_the_metrics(tmp_path):
    res = _result()
    names = [f"clip_{v}.mp4" for v in range(6)]
    atomic_write_json(tmp_path / "scores_test.json", score_dump(res, ["a", "b", "c"], names))
    raw = json.loads((tmp_path / "scores_test.json").read_text(encoding="utf-8"))
    assert raw["format"] == "vmm-scores/1" and raw["class_names"] == ["a", "b", "c"]
    assert raw["videos"][2] == {
        "video_id": 2,
        "name": "clip_2.mp4",
        "label": 2,
        "num_views": 2,
        "probs": pytest.approx(res.video_probs[2].tolist()),
    }
    assert raw["excluded_video_ids"] == [9]
    dump = read_score_dump(tmp_path / "scores_test.json")
    assert dump["ids"].tolist() == list(range(6)) and dump["names"] == names
    m = video_metrics(dump["probs"], dump["labels"], 3, top_k=2)
    assert m == pytest.approx({k: res[k] for k in m})


def test_score_dump_refuses_wrong_input(tmp_path):
    res = _result()
    with pytest.raises(ValueError, match="class_names must have 3 entries"):
        score_dump(res, ["a", "b"])
    bad = score_dump(res, ["a", "b", "c"])
    bad["videos"][1]["probs"] = [1.0]
    atomic_write_json(tmp_path / "bad.json", bad)
    with pytest.raises(ValueError, match=r"bad.json: videos \[1\] do not have 3 probabilities"):
        read_score_dump(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"predictions": []}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"other.json: not a vmm score dump"):
        read_score_dump(tmp_path / "other.json")
    assert score_dump(res, ["a", "b", "c"])["videos"][0]["name"] is None  # names unknown


def test_confusion_figure_shows_counts_coloured_by_row_share_and_says_so():
    pytest.importorskip("matplotlib")
    from lightning_modules.reports import confusion_figure

    fig = confusion_figure(p([[3, 1], [0, 4]]), ["right", "left"])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["3", "1", "0", "4"]  # counts, not fractions
    colours = ax.images[0].get_array()
    assert colours[0, 0] == pytest.approx(0.75) and colours[1, 1] == pytest.approx(1.0)  # share of the row
    assert "counts" in ax.get_title() and "share of the true class" in ax.get_title()


# ---------------------------------------------------------------------------- the report callback


def test_report_writer_writes_each_result_once_and_only_with_a_logger(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    from lightning_modules.reports import TestReportWriter

    acc = EvalAccumulator()
    _fill(acc, list(range(len(_CLIPS))))  # video 9 failed to decode
    module = SimpleNamespace(last_eval={}, class_names=["a", "b", "c"])
    kw = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False}
    trainer = Trainer(logger=CSVLogger(tmp_path / "logs"), **kw)
    writer = TestReportWriter()
    writer.on_test_start(trainer, module)
    module.last_eval["test"] = acc.compute(num_classes=3)
    writer.on_test_end(trainer, module)
    log_dir = tmp_path / "logs" / "lightning_logs" / "version_0"
    written = sorted(p.name for p in log_dir.iterdir())
    assert written == [
        "confusion_matrix_test.csv",
        "confusion_matrix_test.png",
        "scores_test.json",
        "test_results.json",
    ]
    assert "1 test video(s) could not be used" in capsys.readouterr().out
    assert sorted(p.name for p in writer.written) == written  # what it wrote, handed to the summary
    assert json.loads((log_dir / "scores_test.json").read_text(encoding="utf-8"))["class_names"] == ["a", "b", "c"]
    # A later test run that computed no result (it failed) does not report the old one again.
    for p in log_dir.iterdir():
        p.unlink()
    writer.on_test_start(trainer, module)
    writer.on_test_end(trainer, module)
    assert list(log_dir.iterdir()) == [] and writer.written == []
    # Without a logger the log directory is the working directory: no file at all.
    monkeypatch.chdir(tmp_path / "logs")
    bare = Trainer(logger=False, default_root_dir=tmp_path / "logs", **kw)
    writer.on_test_start(bare, module)
    module.last_eval["test"] = acc.compute(num_classes=3)
    writer.on_test_end(bare, module)
    assert not list((tmp_path / "logs").glob("*.json")) and list(log_dir.iterdir()) == []


def test_run_summary_names_the_files_the_report_writer_wrote(tmp_path, capsys):
    from types import SimpleNamespace

    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    from lightning_modules.callbacks import TestRunSummary
    from lightning_modules.reports import TestReportWriter

    acc = EvalAccumulator()
    _fill(acc, list(range(len(_CLIPS))))
    module = SimpleNamespace(last_eval={}, class_names=["a", "b", "c"])
    writer, summary = TestReportWriter(), TestRunSummary()
    kw = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False}
    trainer = Trainer(logger=CSVLogger(tmp_path / "logs"), callbacks=[writer, summary], **kw)
    # A stale report file of an earlier run in the same folder is not named.
    log_dir = tmp_path / "logs" / "lightning_logs" / "version_0"
    log_dir.mkdir(parents=True)
    (log_dir / "stale_report.json").write_text("{}", encoding="utf-8")
    writer.on_test_start(trainer, module)
    module.last_eval["test"] = acc.compute(num_classes=3)
    writer.on_test_end(trainer, module)
    summary.on_test_end(trainer, module)
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[vmm] test report written: ")]
    assert line.split(": ", 1)[1].split(", ") == [str(p) for p in writer.written]
    assert "stale_report.json" not in line
    writer.on_test_start(trainer, module)  # a failed test run writes nothing, and nothing is named
    writer.on_test_end(trainer, module)
    summary.on_test_end(trainer, module)
    assert "test report written" not in capsys.readouterr().out
