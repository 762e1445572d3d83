#!/usr/bin/env python
"""A hand-written accelerate training loop logged by seo_trainlog (no Trainer).

    python scripts/accelerate_loop.py --log-dir logs/accelerate
    accelerate launch --num_processes 2 --cpu scripts/accelerate_loop.py --log-dir logs/accelerate
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/accelerate_loop.py  # 2 CPU processes

``Accelerator(log_with="seo_trainlog", project_dir=...)`` writes the same categorised files as the
Trainer callback, from the main process: hyperparameters from ``init_trackers(config=...)``, a progress
record per ``accelerator.log({"loss": ...}, step=...)``, evaluation records for ``eval_*`` values and
the training summary at ``end_training()``. By default a tiny randomly initialised BERT learns the
bundled SEO search-intent data with a toy whitespace vocabulary, so it runs in seconds, offline.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

import seo_trainlog  # noqa: E402,F401  (registers log_with="seo_trainlog")

DATA = Path(__file__).resolve().parent.parent / "data" / "seo_search_intent.csv"


def load(split: str, vocab: dict[str, int], labels: dict[str, int], length: int) -> list[dict[str, torch.Tensor]]:
    with DATA.open(encoding="utf-8", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == split]
    examples = []
    for row in rows:
        ids = [vocab.setdefault(word, len(vocab)) for word in row["query"].lower().split()][:length]
        ids += [0] * (length - len(ids))
        examples.append({"input_ids": torch.tensor(ids), "attention_mask": (torch.tensor(ids) != 0).long(),
                         "labels": torch.tensor(labels[row["intent"]])})
    return examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-dir", type=Path, default=Path("logs/accelerate"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=10)
    args = parser.parse_args()

    # BERT's position_ids buffer is an expanded (stride 0) view: DDP must not broadcast into it
    accelerator = Accelerator(log_with="seo_trainlog",
                              project_config=ProjectConfiguration(project_dir=str(args.log_dir)),
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    set_seed(0)
    labels = {"commercial": 0, "informational": 1, "navigational": 2, "transactional": 3}
    vocab = {"[PAD]": 0}
    train = load("train", vocab, labels, length=12)
    validation = load("validation", vocab, labels, length=12)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(vocab) + 1, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    eval_loader = DataLoader(validation, batch_size=64)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    accelerator.init_trackers("seo-search-intent", config={
        "learning_rate": args.learning_rate, "batch_size": args.batch_size, "max_steps": args.steps,
        "world_size": accelerator.num_processes, "model": "tiny-bert"})

    step = 0
    while step < args.steps:
        model.train()
        for batch in train_loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
            accelerator.log({"loss": mean_loss, "learning_rate": args.learning_rate,
                             "epoch": step / len(train_loader)}, step=step)
            if step % args.eval_every == 0:
                accelerator.log(evaluate(accelerator, model, eval_loader), step=step)
            if step >= args.steps:
                break

    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process:
        print(f"{step} steps on {accelerator.num_processes} process(es); logs in {args.log_dir}")


def evaluate(accelerator: Accelerator, model, loader) -> dict[str, float]:
    model.eval()
    correct = total = 0
    losses = []
    with torch.no_grad():
        for batch in loader:
            output = model(**batch)
            predictions, references = accelerator.gather_for_metrics((output.logits.argmax(-1), batch["labels"]))
            correct += (predictions == references).sum().item()
            total += len(references)
            losses.append(accelerator.reduce(output.loss, reduction="mean").item())
    model.train()
    return {"eval_loss": sum(losses) / len(losses), "eval_accuracy": correct / total}


if __name__ == "__main__":
    main()
