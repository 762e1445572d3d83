"""The anomaly detectors on synthetic series: each anomaly found once, at its exact step; clean noisy
series raise nothing."""

from __future__ import annotations

import math
import random

import pytest

from seo_trainlog import LogConfig
from seo_trainlog.watch.anomaly import Anomaly, AnomalyDetector

STEPS = 600


def clean_train(step: int, rng: random.Random) -> dict:
    """One ``train`` record of a healthy run: decaying noisy loss, noisy grad_norm and throughput,
    a little data wait, flat noisy memory."""
    return {"loss": 0.1 + 2.0 * math.exp(-step / 150) * (1 + rng.gauss(0, 0.05)) + abs(rng.gauss(0, 0.01)),
            "learning_rate": 1e-4 * (1 - step / STEPS), "grad_norm": abs(rng.gauss(1.2, 0.25)),
            "samples_per_second": rng.gauss(110, 8), "data_wait_pct": abs(rng.gauss(2, 1)),
            "rss_mb": 850 + rng.gauss(0, 3), "gpu0_mem_used_mb": 6000 + rng.gauss(0, 20),
            "cuda0_allocated_mb": 4200.0 + (1800.0 if step > 3 else 0.0)}  # optimizer state once: no creep


def found(records: list[tuple[str, dict, int]], config: LogConfig | None = None) -> list[tuple[str, int]]:
    detector = AnomalyDetector(config or LogConfig())
    return [(a.kind, a.global_step) for event, values, step in records for a in detector.update(event, values, step)]


def train_run(seed: int = 0, change=None) -> list[tuple[str, dict, int]]:
    """``STEPS`` train records; ``change(step, values)`` edits a record in place."""
    rng = random.Random(seed)
    records = []
    for step in range(1, STEPS + 1):
        values = clean_train(step, rng)
        if change is not None:
            change(step, values)
        records.append(("train", values, step))
    return records


@pytest.mark.parametrize("seed", range(5))
def test_clean_noisy_series_raise_nothing(seed):
    rng = random.Random(100 + seed)
    evals = [("eval", {"metric_prefix": "eval", "eval_loss": 0.5 * math.exp(-i / 4) + rng.gauss(0, 0.002)}, 50 * i)
             for i in range(1, 12)]
    assert found(train_run(seed) + evals) == []
    # the noise is real: much tighter thresholds do fire on the same series
    tight = LogConfig(loss_spike_z=1.5, throughput_drop_pct=5, grad_norm_jump=1.2, plateau_evals=1)
    assert {kind for kind, _ in found(train_run(seed) + evals, tight)} >= {"loss_spike", "throughput_drop",
                                                                          "grad_explosion"}


def test_loss_spike_found_once_at_its_step():
    def spike(step, values):
        if step in (300, 301, 302):  # one incident over three logged steps
            values["loss"] *= 4

    assert found(train_run(change=spike)) == [("loss_spike", 300)]


def test_loss_spike_threshold_comes_from_the_config():
    def spike(step, values):
        if step == 300:
            values["loss"] *= 4

    assert found(train_run(change=spike), LogConfig(loss_spike_z=1e5)) == []


def test_grad_explosion():
    def explode(step, values):
        if 200 <= step < 205:
            values["grad_norm"] = 40.0 + step

    assert found(train_run(change=explode)) == [("grad_explosion", 200)]


def test_non_finite_loss_and_grad_norm_once_per_incident_and_key():
    def break_values(step, values):
        if 150 <= step < 155:
            values["loss"] = None  # NaN as the JSON metrics write it
        if step == 160:
            values["grad_norm"] = math.inf  # as the callback sees it
        if step == 170:
            values["loss"] = math.nan

    assert found(train_run(change=break_values)) == [("non_finite", 150), ("non_finite", 160), ("non_finite", 170)]


def test_throughput_drop():
    def slow_down(step, values):
        if 400 <= step < 460:
            values["samples_per_second"] = 30.0 + step % 3

    assert found(train_run(change=slow_down)) == [("throughput_drop", 400)]


def test_data_wait_rearms_after_it_falls_to_half_the_threshold():
    def starve(step, values):
        if 250 <= step < 260 or step == 300:
            values["data_wait_pct"] = 35.0

    assert found(train_run(change=starve)) == [("data_wait", 250), ("data_wait", 300)]
    assert found(train_run(change=starve), LogConfig(data_wait_warn_pct=50)) == []


def test_memory_creep_fires_after_a_full_window_of_growth_and_again_after_the_next():
    def leak(step, values):
        values["rss_mb"] = 800.0 + 30.0 * max(0, step - 500)  # no noise: each leak step rises by 30 MiB

    # the window (20 records) needs >= 80% increases: 16 of its 19 changes, so the 16th leaking step
    # (516); then the window starts afresh and holds 20 rising values again at step 536
    assert found(train_run(change=leak)[:545]) == [("memory_creep", 516), ("memory_creep", 536)]
    # 500 MiB needs 17 rises of 30 MiB (517); the next full window of 20 holds 19 rises (537)
    assert found(train_run(change=leak)[:545], LogConfig(memory_creep_mb=500)) == [("memory_creep", 517),
                                                                                  ("memory_creep", 537)]
    assert found(train_run(change=leak)[:545], LogConfig(memory_creep_mb=1000)) == []  # 19 x 30 < 1000


def test_gpu_memory_creep_is_found_per_key():
    def leak(step, values):
        values["gpu0_mem_used_mb"] = 6000.0 + 50.0 * max(0, step - 100)

    assert found(train_run(change=leak)[:130]) == [("memory_creep", 116)]


def test_plateau_fires_once_and_rearms_at_a_new_best():
    losses = [1.0, 0.8, 0.7, 0.71, 0.72, 0.70, 0.75, 0.73, 0.74, 0.76, 0.6, 0.61, 0.62, 0.63, 0.64, 0.65]
    evals = [("eval", {"metric_prefix": "eval", "eval_loss": loss}, 100 * (i + 1)) for i, loss in enumerate(losses)]
    assert found(evals) == [("plateau", 800), ("plateau", 1600)]
    assert found(evals, LogConfig(plateau_evals=3)) == [("plateau", 600), ("plateau", 1400)]
    # only 0.8 (< 1.0 - 0.15) and 0.6 (< 0.8 - 0.15) count as improvements
    assert found(evals, LogConfig(plateau_min_delta=0.15)) == [("plateau", 700), ("plateau", 1600)]


def test_plateau_counts_only_validation_evaluations():
    evals = [("eval", {"metric_prefix": "test", "test_loss": 0.9}, 100 * i) for i in range(10)]
    evals.insert(0, ("eval", {"metric_prefix": "eval", "eval_loss": 0.5}, 0))
    assert found(evals) == []


def test_anomaly_fields_and_dict():
    detector = AnomalyDetector(LogConfig())
    for step in range(1, 21):
        assert detector.update("train", {"grad_norm": 1.0 + 0.01 * (step % 3)}, step) == []
    (anomaly,) = detector.update("train", {"grad_norm": 25.0}, 21)
    assert isinstance(anomaly, Anomaly)
    assert anomaly.to_dict() == {"kind": "grad_explosion", "global_step": 21, "message": anomaly.message,
                                 "value": 25.0, "threshold": pytest.approx(10.1)}
    assert "grad_norm 25" in anomaly.message and "\n" not in anomaly.message
    assert detector.update("log", {"grad_norm": 1000.0}, 22) == []  # other events are not examined


def test_settings_from_environment():
    config = LogConfig.from_env({"SEO_TRAINLOG_ANOMALY_WINDOW": "30", "SEO_TRAINLOG_LOSS_SPIKE_Z": "4.5",
                                 "SEO_TRAINLOG_PLATEAU_EVALS": "3", "SEO_TRAINLOG_DETECT_ANOMALIES": "off",
                                 "SEO_TRAINLOG_ALERT_CMD": "cat >> alerts.jsonl"})
    assert (config.anomaly_window, config.loss_spike_z, config.plateau_evals, config.detect_anomalies,
            config.alert_cmd) == (30, 4.5, 3, False, "cat >> alerts.jsonl")
    with pytest.raises(ValueError, match="SEO_TRAINLOG_ANOMALY_WINDOW='2.5'.*an integer from 5 to 10000"):
        LogConfig.from_env({"SEO_TRAINLOG_ANOMALY_WINDOW": "2.5"})
    with pytest.raises(ValueError, match="throughput_drop_pct=100"):
        LogConfig(throughput_drop_pct=100)
