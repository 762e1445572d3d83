"""The pure formatting functions against the spec's example lines."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from seo_trainlog.record import format as _format


def test_progress_lines_match_the_spec():
    assert _format.progress_lines(1, 100, 0.456789, 1e-4, 0.567890, {"accuracy": 0.85, "f1_score": 0.82}) == [
        "Epoch 1, Step 100: Loss=0.456789, LR=1.00e-04",
        "Validation Loss: 0.567890",
        "Metrics: accuracy=0.850000, f1_score=0.820000",
    ]
    assert _format.progress_lines(0.5234375, 7, torch.tensor(1.25), torch.tensor(3e-5)) == [
        "Epoch 0.52, Step 7: Loss=1.250000, LR=3.00e-05"]


def test_performance_and_data_lines_match_the_spec():
    assert _format.performance_lines("forward_pass", 0.05, 128.5, 45.2, {"batch_size": 32, "sequence_length": 512}) == [
        "forward_pass completed in 0.0500s",
        "Memory usage: 128.50MB",
        "GPU utilization: 45.20%",
        "Additional metrics: batch_size=32, sequence_length=512",
    ]
    assert _format.data_loading_lines("dataset_creation", 1000, 32, 0.5, 128.0) == [
        "dataset_creation: Dataset size=1000, Batch size=32, Duration=0.5000s",
        "Memory usage: 128.00MB",
    ]


def test_error_lines_match_the_spec():
    lines = _format.error_lines(ValueError("Invalid input format"), context="Data validation",
                                operation="forward_pass",
                                additional_info={"input_type": "text", "expected_format": "json"})
    assert lines == [
        "Error in forward_pass: ValueError: Invalid input format",
        "Context: Data validation",
        "Additional info: input_type=text, expected_format=json",
    ]
    assert _format.error_lines(KeyError("x")) == ["Error: KeyError: 'x'"]


def test_summary_block_matches_the_spec():
    lines = _format.summary_lines(10, 1000, 0.123456, 0.098765, 3600.0, False)
    assert lines == [
        "=" * 80,
        "TRAINING SUMMARY",
        "=" * 80,
        "Total epochs: 10",
        "Total steps: 1000",
        "Final loss: 0.123456",
        "Best loss: 0.098765",
        "Training duration: 3600.00s",
        "Early stopping triggered: False",
        "=" * 80,
    ]
    assert _format.summary_lines(1.5, 3, None, None, 2, True, {"Status": "failed"})[5:10] == [
        "Final loss: n/a", "Best loss: n/a", "Training duration: 2.00s", "Early stopping triggered: True",
        "Status: failed"]


@pytest.mark.parametrize(("epoch", "text"), [(1, "1"), (1.0, "1"), (0.5234375, "0.52"), (2.5, "2.5"),
                                             (0, "0"), (None, "n/a"), (np.float32(3.0), "3")])
def test_fmt_epoch(epoch, text):
    assert _format.fmt_epoch(epoch) == text


def test_json_line_is_strict_json():
    line = _format.json_line("train", "20240115_143025", 3, 0.25, {
        "loss": float("nan"), "grad_norm": torch.tensor(float("inf")), "learning_rate": torch.tensor(1e-4),
        "hist": np.array([1, 2]), "nested": {"f1": np.float64(0.5)}, "name": "héllo ✓", "run_id": "override"})
    assert "\n" not in line and "NaN" not in line and "Infinity" not in line and "tensor(" not in line
    row = json.loads(line)
    assert row["run_id"] == "20240115_143025" and row["event"] == "train"
    assert row["global_step"] == 3 and row["epoch"] == 0.25
    assert row["loss"] is None and row["grad_norm"] is None
    assert math.isclose(row["learning_rate"], 1e-4, rel_tol=1e-6)
    assert row["hist"] == [1, 2] and row["nested"] == {"f1": 0.5} and row["name"] == "héllo ✓"
