"""The bundled fine-tune script end to end with a tiny model, and the dataset it ships."""

from __future__ import annotations

import csv
import importlib.util
from collections import Counter
from pathlib import Path

import pytest
from conftest import RunFiles, tiny_model

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "seo_search_intent.csv"
INTENTS = {"informational", "navigational", "commercial", "transactional"}


def load_script():
    spec = importlib.util.spec_from_file_location("finetune", REPO / "scripts" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dataset_is_balanced_split_and_unique():
    with DATA.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) >= 800
    assert set(rows[0]) == {"query", "intent", "split"}
    assert {row["intent"] for row in rows} == INTENTS
    assert len(set(Counter(row["intent"] for row in rows).values())) == 1  # balanced
    per_split = Counter((row["split"], row["intent"]) for row in rows)
    for split in ("train", "validation", "test"):
        assert len({per_split[(split, intent)] for intent in INTENTS}) == 1, split
    queries = [row["query"].strip().lower() for row in rows]
    assert len(set(queries)) == len(queries) and all(queries)


def test_finetune_script_runs_and_logs_everything(tmp_path, tokenizer):
    model_dir = tmp_path / "tiny-model"
    tiny_model().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    script = load_script()
    log_dir = tmp_path / "logs"
    result = script.main(["--model", str(model_dir), "--max-steps", "3", "--logging-steps", "1",
                          "--output-dir", str(tmp_path / "out"), "--log-dir", str(log_dir)])
    assert set(result) == {"test_accuracy", "test_macro_f1", "majority_baseline_accuracy", "majority_class",
                           "global_step", "train_runtime_s"}
    assert result["global_step"] == 3 and result["majority_baseline_accuracy"] == pytest.approx(0.25)

    run = RunFiles(log_dir)
    data_lines = run.messages("data_loading")
    assert data_lines[0] == f"dataset_creation: Dataset size=960, Batch size=16, Duration={data_lines[0][-7:]}"
    assert any(line.startswith("tokenization: Dataset size=960, Batch size=16, Duration=") for line in data_lines)
    assert any(line.startswith("Collate: ") for line in data_lines)
    assert [m for m in run.messages("training_progress") if m.startswith("Epoch ")][-1].startswith(
        "Epoch 0.07, Step 3: Loss=")
    assert run.messages("model_performance")[0].startswith("model_load completed in ")
    test_result = run.records("test_result")[0]
    assert test_result["test_accuracy"] == result["test_accuracy"]
    test_eval = [row for row in run.records("eval") if "test_loss" in row]
    assert len(test_eval) == 1 and test_eval[0]["test_macro_f1"] == result["test_macro_f1"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--data", "missing.csv"], "no such file"),
    (["--text-column", "nope"], "missing column(s) ['nope']"),
])
def test_finetune_script_rejects_bad_data_clearly(tmp_path, argv, message, capsys):
    script = load_script()
    with pytest.raises(SystemExit) as info:
        script.main(["--model", "unused", "--log-dir", str(tmp_path / "logs"), *argv])
    assert message in str(info.value)
