#!/usr/bin/env python
"""GPU check for seo_trainlog: a short real fine-tune on CUDA with the callback, then assertions that
the GPU readings in the logs are real, non-zero values (NVML utilisation, memory, power, temperature;
torch.cuda memory). Run through ``scripts/gpu_check.sh`` on a machine with an NVIDIA GPU.

    python scripts/gpu_check.py                 # needs CUDA; exit 0 when every check passes
    python scripts/gpu_check.py --cpu-dry-run   # the same flow on CPU, GPU checks skipped (for CI)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from time import perf_counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments, set_seed  # noqa: E402

from synthetic_tokens import RandomTokens  # noqa: E402

from seo_trainlog import LogConfig, TrainLogCallback  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--cpu-dry-run", action="store_true", help="run on CPU and skip the GPU checks")
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args()
    on_gpu = not args.cpu_dry_run
    if on_gpu and not torch.cuda.is_available():
        print("No CUDA device: this check needs an NVIDIA GPU (use --cpu-dry-run to exercise the flow on CPU).")
        return 2
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="seo_trainlog_gpu_check_"))
    set_seed(0)
    size = "large" if on_gpu else "tiny"
    config = BertConfig(vocab_size=8000, hidden_size=768 if on_gpu else 32, num_hidden_layers=6 if on_gpu else 1,
                        num_attention_heads=12 if on_gpu else 2, intermediate_size=3072 if on_gpu else 64,
                        num_labels=4)
    model = BertForSequenceClassification(config)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(log_dir / "out"), max_steps=args.steps, logging_steps=20,
                               per_device_train_batch_size=64 if on_gpu else 8, learning_rate=1e-4,
                               report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=not on_gpu,
                               bf16=on_gpu and torch.cuda.is_bf16_supported(), dataloader_num_workers=0),
        train_dataset=RandomTokens(64 * 40, 256 if on_gpu else 16, config.vocab_size),
    )
    trainer.add_callback(TrainLogCallback(LogConfig(log_dir=log_dir, console=False, sample_interval_s=0.5)))
    started = perf_counter()
    trainer.train()
    seconds = perf_counter() - started

    metrics = next(log_dir.glob("performance_metrics_*.log"))
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    train = [row for row in rows if row["event"] == "train"]
    performance = next(log_dir.glob("model_performance_*.log")).read_text(encoding="utf-8")
    checks: list[tuple[str, bool, str]] = [
        ("progress records", len(train) == args.steps // 20, f"{len(train)} of {args.steps // 20}"),
        ("rss_mb > 0", all(row.get("rss_mb", 0) > 0 for row in train), f"{train[-1].get('rss_mb'):.1f} MiB"),
    ]
    if on_gpu:
        def peak(key: str) -> float:
            return max((row.get(key) or 0.0) for row in train)

        index = torch.cuda.current_device()
        for key in ("gpu0_util_pct_max", "gpu0_mem_used_mb", "gpu0_power_w", "gpu0_temp_c",
                    f"cuda{index}_allocated_mb", f"cuda{index}_max_allocated_mb"):
            checks.append((f"{key} > 0", peak(key) > 0, f"{peak(key):.1f}"))
        checks.append(("'GPU utilization' line in model_performance", "GPU utilization: " in performance,
                       next((line.split(" - ")[-1] for line in performance.splitlines()
                             if "GPU utilization" in line), "missing")))
        summary = next(row for row in rows if row["event"] == "summary")
        checks.append(("summary mean_gpu_util_pct > 0", (summary.get("mean_gpu_util_pct") or 0) > 0,
                       f"{summary.get('mean_gpu_util_pct')}"))
    print(f"device: {torch.cuda.get_device_name() if on_gpu else 'cpu'} ({size} model), "
          f"{args.steps} steps in {seconds:.1f}s, logs in {log_dir}")
    for name, ok, detail in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
