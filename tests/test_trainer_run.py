from __future__ import annotations

import json
import math

import pytest
from conftest import RunFiles
from transformers import DataCollatorWithPadding, EarlyStoppingCallback

from seo_trainlog import LogConfig, TimedDataCollator, TrainLogCallback

SPEC_FILES = ("seo_engine", "training_progress", "training_detailed", "model_performance", "data_loading",
              "errors", "error_tracking", "performance_metrics")


def test_add_callback_run_writes_every_file(make_trainer, log_dir, tokenizer):
    trainer = make_trainer(max_steps=6, data_collator=TimedDataCollator(DataCollatorWithPadding(tokenizer)))
    trainer.add_callback(TrainLogCallback(LogConfig(log_dir=log_dir, console=False)))
    trainer.train()

    run = RunFiles(log_dir)
    for prefix in SPEC_FILES:
        assert run.path(prefix).exists(), prefix
    assert not run.path("debug").exists()

    progress = [m for m in run.messages("training_progress") if m.startswith("Epoch ")]
    assert len(progress) == 6
    train_losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    for step, (message, loss) in enumerate(zip(progress, train_losses), start=1):
        assert f", Step {step}: Loss={loss:.6f}, LR=" in message

    records = run.records("train")
    assert [row["global_step"] for row in records] == [1, 2, 3, 4, 5, 6]
    assert all(row["run_id"] == run.run_id for row in run.records())
    # accelerate's data loader fetches one batch ahead, so 6 steps collate 6 or 7 batches of 8.
    calls = sum(row.get("collate_calls", 0) for row in records)
    assert calls in (6, 7)
    assert sum(row.get("collate_samples", 0) for row in records) == 8 * calls
    assert records[-1]["samples_per_second"] > 0

    summary = run.messages("training_progress")
    start = summary.index("TRAINING SUMMARY")
    assert summary[start - 1] == summary[start + 1] == "=" * 80
    assert summary[start + 2:start + 6] == [
        f"Total epochs: {trainer.state.epoch:.2f}".rstrip("0").rstrip("."),
        f"Total steps: {trainer.state.global_step}",
        f"Final loss: {train_losses[-1]:.6f}",
        f"Best loss: {min(train_losses):.6f}",
    ]
    assert summary[start + 7:start + 10] == ["Early stopping triggered: False", "Status: completed", "=" * 80]
    duration = float(summary[start + 6].removeprefix("Training duration: ").removesuffix("s"))
    assert 0 < duration < 60
    assert [m for m in run.messages("data_loading") if m.startswith("Collate: ")]
    print("\n".join(run.lines("seo_engine")[:5]))
