#!/usr/bin/env python
"""What TrainLogCallback costs a training run, next to no logging and to TensorBoardCallback.

One tiny-BERT ``Trainer`` run (CPU, 300 steps, batch 16, fixed seed, ``dataloader_num_workers=0``) in
three configurations: no reporting callback (``none``), TrainLogCallback with every file on (debug
file, resource sampler, anomaly detection; ``seo_trainlog``) and transformers' TensorBoardCallback
(``tensorboard``), at ``logging_steps=1`` and ``logging_steps=50``; at ``logging_steps=1`` also
TrainLogCallback with the Prometheus exporter on (``seo_trainlog+prometheus``: ``/metrics`` served
on a loopback port and scraped every second by a thread standing for Prometheus, plus the textfile). The configurations alternate
(none, seo_trainlog, tensorboard, none, ...) ``--repeats`` times so that machine noise hits all alike;
each repeat's overhead is its run time over the same repeat's ``none`` run. As that ratio is only as
steady as the machine, each run also reports the share of its wall time spent inside the reporting
callback's events (``perf_counter`` around each ``on_*`` call; TensorBoard's writer thread and our
resource-sampler thread are outside it). Then micro-benchmarks of
the pieces, each the median over 100 batches of 100 calls (10,000 calls): ``on_step_end`` on a
non-logging step, ``on_log`` with a typical logs dict (as the training loop sees it, the formatting
and writing deferred to a batch; and with each batch's formatting and writing included),
``TimedDataCollator`` over a trivial collator (minus the bare collator), one JSON metrics line, and
``on_log`` again with the Prometheus exporter on.

    python scripts/bench_overhead.py                       # what `make bench` runs
    python scripts/bench_overhead.py --repeats 3 --steps 100 --output /tmp/overhead.json
    python scripts/bench_overhead.py --logging-steps 1 --skip tensorboard   # without tensorboard installed

Prints one table and writes the same numbers as JSON (default ``benchmarks/overhead.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from prometheus_scraper import Scraper  # noqa: E402
from synthetic_tokens import RandomTokens  # noqa: E402

from seo_trainlog import LogConfig, TimedDataCollator, TrainLogCallback  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ("none", "seo_trainlog", "tensorboard")
PROMETHEUS = "seo_trainlog+prometheus"  # measured at logging_steps=1, where its cost shows


SKIPPED: set[str] = set()  # --skip


def configs(logging_steps: int) -> tuple[str, ...]:
    chosen = (*CONFIGS, PROMETHEUS) if logging_steps == 1 else CONFIGS
    return tuple(config for config in chosen if config not in SKIPPED)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prometheus_config(scratch: Path, port: int, **values) -> LogConfig:
    return LogConfig(log_dir=scratch / "logs", console=False, prometheus_port=port, prometheus_addr="127.0.0.1",
                     prometheus_textfile=scratch / "seo_trainlog.prom", **values)


TYPICAL_LOGS = {"loss": 0.4567, "grad_norm": 1.2345, "learning_rate": 1.0e-4, "epoch": 0.52}


def tiny_bert() -> BertForSequenceClassification:
    set_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=256,
                                                    max_position_embeddings=64, num_labels=4))


def make_trainer(config: str, logging_steps: int, steps: int, scratch: Path, callbacks=(),
                 port: int | None = None) -> Trainer:
    args = TrainingArguments(output_dir=str(scratch / "out"), max_steps=steps, per_device_train_batch_size=16,
                             logging_steps=logging_steps, learning_rate=1e-4, seed=0, use_cpu=True,
                             save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                             report_to="tensorboard" if config == "tensorboard" else "none")
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=RandomTokens(16 * 64, 32, 1000),
                      data_collator=TimedDataCollator(default_data_collator)
                      if config in ("seo_trainlog", PROMETHEUS) else default_data_collator, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # the same for every configuration: no stdout noise
    if config == "seo_trainlog":
        trainer.add_callback(TrainLogCallback(LogConfig(log_dir=scratch / "logs", console=False, debug=True)))
    elif config == PROMETHEUS:
        trainer.add_callback(TrainLogCallback(prometheus_config(scratch, port, debug=True)))
    return trainer


class EventClock:
    """Time spent inside one callback's Trainer events: each ``on_*`` method of that instance is
    wrapped (on the instance) with a ``perf_counter`` around the call."""

    def __init__(self, callback: TrainerCallback) -> None:
        self.seconds = 0.0
        for name in dir(callback):
            if name.startswith("on_") and callable(getattr(callback, name)):
                setattr(callback, name, self._timed(getattr(callback, name)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
        return timed


def timed_run(config: str, logging_steps: int, steps: int) -> tuple[float, float]:
    """Wall seconds of ``trainer.train()``, and the seconds spent inside the reporting callback's events."""
    with tempfile.TemporaryDirectory() as scratch:
        port = free_port() if config == PROMETHEUS else None
        trainer = make_trainer(config, logging_steps, steps, Path(scratch), port=port)
        reporters = [cb for cb in trainer.callback_handler.callbacks
                     if type(cb).__name__ in ("TrainLogCallback", "TensorBoardCallback")]
        clocks = [EventClock(cb) for cb in reporters]
        scraper = Scraper(port) if port is not None else None
        started = time.perf_counter()
        trainer.train()
        wall_s = time.perf_counter() - started
        if scraper is not None:
            scraper.stop()
            from seo_trainlog.watch.prometheus import stop_servers

            stop_servers()
        return wall_s, sum(clock.seconds for clock in clocks)


def overhead(logging_steps: int, steps: int, repeats: int) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {config: [] for config in configs(logging_steps)}
    inside: dict[str, list[float]] = {config: [] for config in configs(logging_steps)}
    timed_run("none", logging_steps, 20)  # warm-up: first-call costs belong to nobody
    for _ in range(repeats):
        for config in configs(logging_steps):
            wall_s, callback_s = timed_run(config, logging_steps, steps)
            times[config].append(wall_s)
            inside[config].append(callback_s / wall_s)
    result = {}
    for config in configs(logging_steps):
        ratios = [t / base for t, base in zip(times[config], times["none"])]
        result[config] = {"median_s": statistics.median(times[config]), "median_ratio": statistics.median(ratios),
                          "min_ratio": min(ratios), "max_ratio": max(ratios), "runs_s": times[config],
                          "in_callback_share": statistics.median(inside[config])}
    return result


def median_us(call, batches: int = 100, per_batch: int = 100, settle=None) -> float:
    """Median over ``batches`` of the mean µs per call in a batch of ``per_batch`` calls (``settle``,
    when given, runs at the end of each batch, inside the timing: work the calls left for later)."""
    means = []
    for _ in range(batches):
        started = time.perf_counter()
        for _ in range(per_batch):
            call()
        if settle is not None:
            settle()
        means.append((time.perf_counter() - started) / per_batch * 1e6)
    return statistics.median(means)


class MeasurePieces(TrainerCallback):
    """At step 1 (the run open), time our callback's pieces as the Trainer would call them."""

    def __init__(self, ours: TrainLogCallback, on_log_only: str | None = None) -> None:
        self.ours = ours
        self.on_log_only = on_log_only  # time on_log only, its names ending with this
        self.results: dict[str, float] = {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != 1 or self.results:
            return
        ours, logger = self.ours, self.ours._run.logger

        def step() -> None:
            ours.on_step_begin(args, state, control)
            ours.on_step_end(args, state, control)

        def on_log() -> None:
            ours.on_log(args, state, control, logs=dict(TYPICAL_LOGS))

        suffix = self.on_log_only or ""
        if self.on_log_only is None:
            self.results["on_step_begin + on_step_end (non-logging step)"] = median_us(step)
        logger.flush()
        # in the training loop: the numbers are taken, the formatting and writing wait for a batch
        self.results["on_log (typical logs dict), in the loop" + suffix] = median_us(on_log)
        logger._settle()
        # everything included: each batch of 100 calls is formatted and written inside the timing
        self.results["on_log (typical logs dict), formatting and writing included" + suffix] = \
            median_us(on_log, settle=logger._settle)
        if self.on_log_only is not None:
            return
        self.results["one JSON metrics line (log_metrics)"] = median_us(lambda: logger.log_metrics("train",
                                                                                                  TYPICAL_LOGS))
        features = [{"input_ids": [1, 2, 3]}] * 16

        def trivial(batch):
            return batch

        wrapped = TimedDataCollator(trivial)
        bare = median_us(lambda: trivial(features), batches=200, per_batch=500)
        self.results["TimedDataCollator over a trivial collator (minus the bare call)"] = \
            median_us(lambda: wrapped(features), batches=200, per_batch=500) - bare


def loguru_sinks(scratch: Path) -> dict[str, float]:
    """One record into one loguru file sink, synchronous or ``enqueue=True`` (caller's side)."""
    from loguru._logger import Core, Logger

    results = {}
    for enqueue in (False, True):
        log = Logger(core=Core(), exception=None, depth=0, record=False, lazy=False, colors=False, raw=False,
                     capture=True, patchers=[], extra={})
        handler = log.add(scratch / f"enqueue_{enqueue}.log", format="[{time}] {message}", enqueue=enqueue)
        label = "enqueue=True (caller side)" if enqueue else "synchronous, line-buffered"
        results[f"loguru file sink, {label}, per record"] = median_us(lambda: log.info("Epoch 1, Step 100: "
                                                                                       "Loss=0.456789, LR=1.00e-04"))
        log.remove(handler)
    return results


def pieces(scratch: Path) -> dict[str, float]:
    ours = TrainLogCallback(LogConfig(log_dir=scratch / "pieces", console=False))
    trainer = make_trainer("none", 50, 2, scratch)
    measure = MeasurePieces(ours)
    trainer.add_callback(ours)
    trainer.add_callback(measure)  # after ours: the run is open when it measures
    trainer.train()
    # the same on_log with the Prometheus exporter on (gauges set in the loop; the textfile with the batch)
    exporting = TrainLogCallback(prometheus_config(scratch / "prometheus", free_port()))
    trainer = make_trainer("none", 50, 2, scratch / "prometheus")
    measure_exporting = MeasurePieces(exporting, on_log_only=", Prometheus exporter on")
    trainer.add_callback(exporting)
    trainer.add_callback(measure_exporting)
    trainer.train()
    from seo_trainlog.watch.prometheus import stop_servers

    stop_servers()
    return {**measure.results, **measure_exporting.results, **loguru_sinks(scratch)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--logging-steps", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "overhead.json")
    parser.add_argument("--skip", nargs="*", default=[], choices=[c for c in (*CONFIGS, PROMETHEUS) if c != "none"],
                        help="configurations left out (e.g. tensorboard where it is not installed)")
    args = parser.parse_args()
    SKIPPED.update(args.skip)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
                          f"torch {torch.__version__}", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "steps": args.steps, "repeats": args.repeats, "overhead": {}, "pieces_us": {}}
    for logging_steps in args.logging_steps:
        results["overhead"][f"logging_steps={logging_steps}"] = overhead(logging_steps, args.steps, args.repeats)
    with tempfile.TemporaryDirectory() as scratch:
        results["pieces_us"] = pieces(Path(scratch))

    print(f"\n{results['machine']}; {args.steps} steps, batch 16, {args.repeats} alternating repeats\n")
    print(f"{'run':<47}{'median s':>10}{'overhead (median)':>20}{'min':>9}{'max':>9}{'in callback':>13}")
    for setting, table in results["overhead"].items():
        for config, row in table.items():
            print(f"{setting + ', ' + config:<47}{row['median_s']:>10.2f}{100 * (row['median_ratio'] - 1):>19.2f}%"
                  f"{100 * (row['min_ratio'] - 1):>8.2f}%{100 * (row['max_ratio'] - 1):>8.2f}%"
                  f"{100 * row['in_callback_share']:>12.2f}%")
    print(f"\n{'piece':<96}{'median µs/call':>16}")
    for name, value in results["pieces_us"].items():
        print(f"{name:<96}{value:>16.2f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
