"""``summarize`` reads train records on a fast path (values read once, keys classified once per key,
the kept plot rows counted down): metrics files whose train records change keys, lack keys or bring
new ones at every record, read back exactly as the record-by-record rules say."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from seo_trainlog.cli import main
from seo_trainlog.read import analysis as analysis_module
from seo_trainlog.read.analysis import RunAnalysis
from seo_trainlog.read.reader import LogReadError, find_runs, read_records
from seo_trainlog.record.format import json_line

RUN = "20261130_120000"
START = datetime(2026, 11, 30, 12, tzinfo=timezone.utc)


def write_run(log_dir, rows: list[tuple[str, int | None, dict]]) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"performance_metrics_{RUN}.log", "w", encoding="utf-8") as out:
        for index, (event, step, values) in enumerate(rows):
            out.write(json_line(event, RUN, step, None if step is None else step / 100, values,
                                time=START + timedelta(seconds=index)) + "\n")


def train(step: int, loss: float, **values) -> tuple[str, int, dict]:
    return ("train", step, {"loss": loss, "learning_rate": 1e-3, "grad_norm": 1.0, "interval_s": 2.0, "steps": 1,
                            "samples_per_second": 8.0, "data_wait_pct": 25.0, "rss_mb": 800.0, **values})


def summary_json(capsys, log_dir) -> dict:
    capsys.readouterr()
    assert main(["summarize", str(log_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


CHANGING_KEYS = [
    ("run_start", None, {"schema_version": 1}),
    train(1, 2.0, **{"rewards/margins": None, "mean_token_accuracy": None, "rss_mb_max": 810.0}),
    train(2, 1.5, **{"mean_token_accuracy": None, "rewards/margins": None}),  # no rss_mb_max
    # first numbers of both metrics, in the other order than the keys first came: listed in this order
    train(3, 1.0, mean_token_accuracy=0.5, gpu0_util_pct=40.0, gpu0_mem_used_mb_max=1000.0, rss_mb_max=805.0,
          **{"rewards/margins": 0.25}),
    ("eval", 3, {"eval_loss": 1.25}),
    train(4, 1.25, gpu0_util_pct=60.0, gpu1_util_pct=30.0, cuda0_max_allocated_mb=300.0, gpu1_mem_used_mb_max=500.0),
    train(5, 0.5, kl=0.125, mean_token_accuracy=0.75, rss_mb_max=830.0),
]


def test_train_records_whose_keys_change_are_read_whole(tmp_path, capsys):
    write_run(tmp_path / "logs", CHANGING_KEYS)
    summary = summary_json(capsys, tmp_path / "logs")
    metrics = summary["train_metrics"]
    assert list(metrics) == ["mean_token_accuracy", "rewards/margins", "kl"]
    assert {name: (entry["last"], entry["last_global_step"], entry["min"], entry["max"])
            for name, entry in metrics.items()} == {"mean_token_accuracy": (0.75, 5, 0.5, 0.75),
                                                    "rewards/margins": (0.25, 3, 0.25, 0.25),
                                                    "kl": (0.125, 5, 0.125, 0.125)}
    assert summary["peak_rss_mb"] == 830.0
    assert list(summary["peak_gpu_mem_mb"].items()) == [("gpu0_mem_used_mb", 1000.0), ("cuda0_max_allocated_mb", 300.0),
                                                        ("gpu1_mem_used_mb", 500.0)]
    assert summary["mean_gpu_util_pct"] == 42.5  # record 3: 40; record 4: (60 + 30) / 2
    assert (summary["final_loss"], summary["best_loss"], summary["best_loss_step"]) == (0.5, 0.5, 5)
    assert (summary["global_step"], summary["epoch"], summary["evaluations"]) == (5, 0.05, 1)
    assert summary["samples_per_second"] == 8.0 and summary["steps_per_second"] == 0.5
    assert summary["data_wait_pct"] == 25.0
    assert summary["records_cover"] == {"first_global_step": 1, "last_global_step": 5, "complete": True}
    assert (summary["started"], summary["last_record"]) == ("2026-11-30T12:00:00.000+00:00",
                                                            "2026-11-30T12:00:06.000+00:00")


def test_records_added_one_at_a_time_give_the_same_summary(tmp_path):
    write_run(tmp_path / "logs", CHANGING_KEYS)
    run = find_runs(tmp_path / "logs")[0]
    whole = RunAnalysis(RUN).add_all(read_records(run))
    single = RunAnalysis(RUN)
    for record in read_records(run):
        single.add(record)
    assert single.summary() == whole.summary()
    assert single.train.rows() == whole.train.rows()
    assert whole.records == single.records == len(CHANGING_KEYS)


def kept_steps(count: int, max_points: int) -> list[int]:
    """The steps of the rows Series keeps of ``count`` records 1..count: every ``stride``-th record
    offered, every other row dropped and the stride doubled when ``2 * max_points`` are kept, and the
    last record offered when it was not kept."""
    rows, stride, last = [], 1, None
    for index in range(count):
        if index % stride:
            last = index + 1
            continue
        last = None
        rows.append(index + 1)
        if len(rows) >= 2 * max_points:
            del rows[1::2]
            stride *= 2
    return rows + ([last] if last is not None else [])


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100])
def test_plot_rows_keep_every_stride_th_train_record(tmp_path, count):
    rows = [("run_start", None, {"schema_version": 1})] + [train(step, 1.0 / step) for step in range(1, count + 1)]
    rows[count // 2:count // 2] = [("eval", count // 2, {"eval_loss": 0.5})]  # the fast path stops and goes on
    write_run(tmp_path / "logs", rows)
    run = find_runs(tmp_path / "logs")[0]
    whole = RunAnalysis(RUN, max_points=2).add_all(read_records(run))
    assert [row[0] for row in whole.train.rows()] == kept_steps(count, 2)
    single = RunAnalysis(RUN, max_points=2)
    for record in read_records(run):
        single.add(record)
    assert single.train.rows() == whole.train.rows()


def test_a_new_metric_at_every_record_is_followed(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(analysis_module, "MAX_KEYS", 20)  # the key lists start again several times
    write_run(tmp_path / "logs", [train(step, 1.0, **{f"metric_{step}": step / 4, "shared": step * 2.0})
                                  for step in range(1, 41)])
    summary = summary_json(capsys, tmp_path / "logs")
    metrics = summary["train_metrics"]
    assert list(metrics) == ["metric_1", "shared"] + [f"metric_{step}" for step in range(2, 41)]
    assert metrics["shared"]["last"] == 80.0 and metrics["shared"]["min"] == 2.0
    assert all(metrics[f"metric_{step}"]["last"] == step / 4 for step in range(1, 41))


def test_what_was_read_before_a_bad_line_is_kept(tmp_path):
    write_run(tmp_path / "logs", [train(1, 2.0), train(2, 1.5), train(3, 1.75)])
    path = tmp_path / "logs" / f"performance_metrics_{RUN}.log"
    good = path.read_text().splitlines(keepends=True)
    path.write_text("".join(good[:2]) + "not json\n" + good[2])
    analysis = RunAnalysis(RUN)
    with pytest.raises(LogReadError, match="line 3 is not valid JSON"):
        analysis.add_all(read_records(find_runs(tmp_path / "logs")[0]))
    summary = analysis.summary()
    assert analysis.records == 2
    assert (summary["final_loss"], summary["best_loss"], summary["global_step"]) == (1.5, 1.5, 2)
    assert summary["records_cover"] == {"first_global_step": 1, "last_global_step": 2, "complete": True}
    assert [row[0] for row in analysis.train.rows()] == [1, 2]
