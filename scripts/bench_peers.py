#!/usr/bin/env python
"""What seo_trainlog costs a training run next to the loggers people use instead (issue 14).

Each run is one ``Trainer`` (CPU, batch 16, seed 0, ``dataloader_num_workers=0``, no ``PrinterCallback``)
in a FRESH Python process, one configuration per run:

- ``none``: no reporting callback;
- ``seo_trainlog``: ``report_to="seo_trainlog"``, every file on (``SEO_TRAINLOG_DEBUG=1``), everything
  else at its default (the console lines included, sent to a file here);
- ``seo_trainlog+prometheus``: the same with the Prometheus exporter on (``/metrics`` on a loopback
  port, scraped every second by a thread standing for Prometheus, and the textfile);
- ``tensorboard``, ``trackio`` (local), ``wandb`` (``WANDB_MODE=offline``), ``mlflow`` (a sqlite store: MLflow 3 refuses its file store by default),
  ``dvclive``: each through transformers' own ``report_to=<name>`` integration, as users run them;
  every one of them writes under the run's temporary directory.

Two models: ``tiny`` (BERT, hidden 128, 2 layers, sequence 32, ``--steps`` steps) and ``large``
(BERT, hidden 256, 4 layers, sequence 128, ``--large-steps`` steps: a step of roughly 50-150 ms on a
small CPU machine); ``logging_steps`` 1 and 50. The configurations alternate, in reverse order every
other round, ``--repeats`` rounds. Per configuration, min/median/max over the rounds of:

- ``callback_cpu_share``: CPU time of the thread calling the reporting callback's ``on_*`` events
  (``time.thread_time`` around each call; the loggers' own background threads and helper processes,
  such as wandb's service, are outside it) over the process CPU time of ``trainer.train()``
  (``time.process_time``, all threads); ``callback_cpu_ms_per_log`` the same numerator per ``on_log``
  event, which does not move with the denominator (torch's OpenMP threads spin, and their CPU time
  swells, when other processes share the cores);
- ``background_cpu_s``: CPU time of the Python threads started after the ``Trainer`` was built (the
  loggers' writer, sampler and upload threads; each read as it ends, or at the end of training), and
  ``logger_cpu_share``: the callback's events, those threads and the helper processes together over
  the process CPU time of ``trainer.train()``: everything a logger costs, measured alike for each;
  ``recorder_cpu_s``: of ours, the CPU our recorder thread spent on deferred records;
- ``wall_ratio``: wall time of ``trainer.train()`` over the ``none`` run of the same round;
- ``start_ms``: wall time of the integration's import plus the callback's ``on_train_begin``;
- ``exit_ms``: the callback's ``on_train_end`` plus the interpreter's exit after training (seen from
  the parent: from the child's last statement to its end), and ``exit_added_ms`` over ``none``'s;
- ``peak_rss_added_mb``: ``ru_maxrss`` of the run over the ``none`` run of the same round;
- ``threads_started``: OS threads of the process (``psutil``) at most at train begin or at the last
  step, minus before the ``Trainer`` was built; ``python_threads_started`` the same for
  ``threading.active_count()``;
- ``bytes_per_logged_step``: size of every file under the run's directory (all the loggers write
  there; ``none`` writes nothing) over the number of ``on_log`` events (``logged_steps``: one per
  logging step and the run's closing summary, e.g. 3 for 100 steps at ``logging_steps=50``).

    python scripts/bench_peers.py                                   # what `make bench` runs
    python scripts/bench_peers.py --repeats 3 --steps 100 --large-steps 30   # a quick run
    python scripts/bench_peers.py --markdown benchmarks/peers.json   # the README's table of a results file
    python scripts/bench_peers.py --configs none seo_trainlog --models tiny --logging-steps 1 \\
        --repeats 1 --steps 5 --no-warm-up --output /tmp/peers.json  # seconds: what the test runs

Prints one table per model and ``logging_steps`` and writes the numbers as JSON (default
``benchmarks/peers.json``). Configurations whose package is missing fail their run: leave them out
with ``--configs``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS = "seo_trainlog"
PROMETHEUS = "seo_trainlog+prometheus"
PEERS = ("tensorboard", "trackio", "wandb", "mlflow", "dvclive")
CONFIGS = ("none", OURS, PROMETHEUS, *PEERS)
# what `import` brings in the integration (the start cost's first half)
IMPORTS = {OURS: "seo_trainlog", PROMETHEUS: "seo_trainlog", "tensorboard": "torch.utils.tensorboard",
           "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow", "dvclive": "dvclive"}
MODELS = {
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256,
             "sequence_length": 32},
    "large": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024,
              "sequence_length": 128},
}
METRICS = ("callback_cpu_share", "wall_ratio", "start_ms", "exit_ms", "exit_added_ms", "peak_rss_added_mb",
           "threads_started", "python_threads_started", "bytes_per_logged_step", "on_train_begin_ms",
           "import_ms", "train_s", "train_cpu_s", "callback_cpu_s", "callback_cpu_ms_per_log",
           "helper_processes_cpu_s", "background_cpu_s", "background_cpu_ms_per_log", "recorder_cpu_s",
           "logger_cpu_share")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------------- child


class EventClock:
    """Wraps every ``on_*`` method of one callback instance: thread CPU and wall time of each call,
    per event name."""

    def __init__(self, callback) -> None:
        self.cpu_s = 0.0
        self.wall_s: dict[str, float] = {}
        for name in dir(callback):
            if name.startswith("on_") and callable(getattr(callback, name)):
                setattr(callback, name, self._timed(name, getattr(callback, name)))

    def _timed(self, name, method):
        def timed(*args, **kwargs):
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.cpu_s += time.thread_time() - cpu
                self.wall_s[name] = self.wall_s.get(name, 0.0) + time.perf_counter() - wall
        return timed


class ThreadClock:
    """CPU time of the Python threads started after it was made (the loggers' writer, sampler and
    upload threads): each ended thread's ``time.thread_time`` read in the thread as it ends, and a
    running one's CPU clock (``time.pthread_getcpuclockid``)."""

    def __init__(self) -> None:
        self.skipped = {thread.ident for thread in threading.enumerate()}
        self.ended: dict[int, float] = {}
        original, ended = threading.Thread._bootstrap_inner, self.ended

        def bootstrap(thread):  # (the benchmark's own hook: the loggers' code is left as it is)
            try:
                original(thread)
            finally:
                ended[thread.ident] = time.thread_time()

        threading.Thread._bootstrap_inner = bootstrap

    def skip(self, thread: threading.Thread) -> None:
        """Leave out one of the benchmark's own threads (the scraper standing for Prometheus)."""
        self.skipped.add(thread.ident)

    def cpu_s(self) -> float:
        total = sum(cpu for ident, cpu in self.ended.items() if ident not in self.skipped)
        for thread in threading.enumerate():
            if thread.ident in self.skipped or thread.ident in self.ended or thread.ident is None:
                continue
            try:
                total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            except (OSError, AttributeError):
                pass
        return total


def child(spec: dict) -> None:
    """One run, in this (fresh) process; writes its measurements to ``spec["result"]``."""
    import psutil
    import torch
    from transformers import (BertConfig, BertForSequenceClassification, PrinterCallback, Trainer,
                              TrainerCallback, TrainingArguments, default_data_collator, set_seed)
    from transformers.utils import logging as hf_logging

    from synthetic_tokens import RandomTokens

    hf_logging.set_verbosity_error()
    config, run_dir = spec["config"], Path(spec["run_dir"])
    process = psutil.Process()

    import_ms = 0.0
    if config in IMPORTS:
        started = time.perf_counter()
        __import__(IMPORTS[config])
        import_ms = (time.perf_counter() - started) * 1e3

    class Probe(TrainerCallback):
        """Last callback of every configuration: threads after train begin and at the last step,
        logged steps, helper processes' CPU at the last step."""

        def __init__(self) -> None:
            self.threads, self.python_threads, self.logged, self.helpers_cpu_s = 0, 0, 0, 0.0
            self.loggers = []  # our TrainLoggers: the CPU their recorder threads used


        def _threads(self) -> None:
            self.threads = max(self.threads, process.num_threads())
            self.python_threads = max(self.python_threads, threading.active_count())

        def on_train_begin(self, args, state, control, **kwargs):
            self._threads()

        def on_log(self, args, state, control, **kwargs):
            self.logged += 1
            for reporter in reporters:
                run = getattr(reporter, "_run", None)
                if run is not None and hasattr(run.logger, "recorder_cpu_s") and run.logger not in self.loggers:
                    self.loggers.append(run.logger)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == state.max_steps:
                self._threads()
                for helper in process.children(recursive=True):
                    try:
                        times = helper.cpu_times()
                        self.helpers_cpu_s += times.user + times.system
                    except psutil.Error:
                        pass

    shape = dict(MODELS[spec["model"]])
    length = shape.pop("sequence_length")
    set_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=1000, max_position_embeddings=max(64, length),
                                                     num_labels=4, **shape))
    report_to = "none" if config == "none" else OURS if config == PROMETHEUS else config
    threads_before, python_threads_before = process.num_threads(), threading.active_count()
    thread_clock = ThreadClock()
    args = TrainingArguments(output_dir=str(run_dir / "out"), max_steps=spec["steps"], per_device_train_batch_size=16,
                             logging_steps=spec["logging_steps"], learning_rate=1e-4, seed=0, use_cpu=True,
                             save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, report_to=report_to)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(16 * 64, length, 1000),
                      data_collator=default_data_collator)
    trainer.remove_callback(PrinterCallback)  # the same for every configuration
    reporters = [cb for cb in trainer.callback_handler.callbacks
                 if type(cb).__module__.startswith("seo_trainlog") or type(cb).__name__ in
                 ("TensorBoardCallback", "TrackioCallback", "WandbCallback", "MLflowCallback", "DVCLiveCallback")]
    if (config == "none") != (not reporters):
        raise SystemExit(f"{config}: expected {'no' if config == 'none' else 'one'} reporting callback, "
                         f"found {[type(cb).__name__ for cb in reporters]}")
    clocks = [EventClock(cb) for cb in reporters]
    probe = Probe()
    trainer.add_callback(probe)
    from prometheus_scraper import Scraper

    scraper = Scraper(spec["port"]) if spec.get("port") else None
    if scraper is not None:
        thread_clock.skip(scraper._thread)

    cpu, wall = time.process_time(), time.perf_counter()
    trainer.train()
    train_s, train_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    if scraper is not None:
        scraper.stop()
    written = sum(path.stat().st_size for path in run_dir.rglob("*") if path.is_file() and not path.is_symlink())
    event_wall = {name: sum(clock.wall_s.get(name, 0.0) for clock in clocks) for name in ("on_train_begin",
                                                                                          "on_train_end")}
    result = {
        "train_s": train_s, "train_cpu_s": train_cpu_s, "callback_cpu_s": sum(clock.cpu_s for clock in clocks),
        "import_ms": import_ms, "on_train_begin_ms": event_wall["on_train_begin"] * 1e3,
        "on_train_end_ms": event_wall["on_train_end"] * 1e3,
        "threads_started": probe.threads - threads_before,
        "python_threads_started": probe.python_threads - python_threads_before,
        "logged_steps": probe.logged, "bytes_written": written,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "helper_processes_cpu_s": probe.helpers_cpu_s, "torch_threads": torch.get_num_threads(),
        # the CPU of the threads the logger started (its writer, sampler, upload threads): what a cheap
        # on_log hands over, measured the same way for every configuration
        "background_cpu_s": thread_clock.cpu_s(),
        "recorder_cpu_s": sum(tlog.recorder_cpu_s for tlog in probe.loggers),
    }
    result["done_at"] = time.time()
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")
    # from here on: interpreter exit (atexit handlers, the loggers' threads, module teardown)


# --------------------------------------------------------------------------------------------- parent


def child_env(run_dir: Path, port: int | None) -> dict[str, str]:
    """Every logger local, offline and inside ``run_dir`` (the same variables for every configuration)."""
    env = dict(os.environ)
    env.update({
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "scripts"), str(REPO), env.get("PYTHONPATH")])),
        "SEO_TRAINLOG_DIR": str(run_dir / "logs"), "SEO_TRAINLOG_DEBUG": "1",
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(run_dir),
        "WANDB_CONFIG_DIR": str(run_dir / "wandb-config"), "WANDB_CACHE_DIR": str(run_dir / "wandb-cache"),
        "WANDB_DATA_DIR": str(run_dir / "wandb-data"), "WANDB_PROJECT": "bench",
        "MLFLOW_TRACKING_URI": f"sqlite:///{run_dir / 'mlflow.db'}", "MLFLOW_EXPERIMENT_NAME": "bench",
        "TRACKIO_DIR": str(run_dir / "trackio"), "GRADIO_ANALYTICS_ENABLED": "False",
        "DVC_NO_ANALYTICS": "1", "DVCLIVE_OPEN": "false", "DO_NOT_TRACK": "1",
    })
    if port is not None:
        env.update({"SEO_TRAINLOG_PROMETHEUS_PORT": str(port), "SEO_TRAINLOG_PROMETHEUS_ADDR": "127.0.0.1",
                    "SEO_TRAINLOG_PROMETHEUS_TEXTFILE": str(run_dir / "seo_trainlog.prom")})
    return env


def run_once(config: str, model: str, logging_steps: int, steps: int, scratch: Path) -> dict:
    """One configuration in a fresh interpreter; its measurements, the exit seen from here included."""
    base = Path(tempfile.mkdtemp(dir=scratch))
    run_dir = base / "run"
    run_dir.mkdir()
    port = free_port() if config == PROMETHEUS else None
    spec = {"config": config, "model": model, "logging_steps": logging_steps, "steps": steps,
            "run_dir": str(run_dir), "result": str(base / "result.json"), "port": port}
    with open(base / "output.txt", "wb") as output:  # console lines and warnings, outside run_dir
        completed = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                   cwd=run_dir, env=child_env(run_dir, port), stdout=output,
                                   stderr=subprocess.STDOUT, check=False)
    exited_at = time.time()
    if completed.returncode != 0 or not (base / "result.json").exists():
        tail = (base / "output.txt").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{config} ({model}, logging_steps={logging_steps}) failed "
                           f"(exit {completed.returncode}):\n{tail}")
    result = json.loads((base / "result.json").read_text(encoding="utf-8"))
    shutil.rmtree(base, ignore_errors=True)
    result["exit_ms"] = result["on_train_end_ms"] + (exited_at - result.pop("done_at")) * 1e3
    result["start_ms"] = result["import_ms"] + result["on_train_begin_ms"]
    result["callback_cpu_share"] = result["callback_cpu_s"] / result["train_cpu_s"]
    result["bytes_per_logged_step"] = result["bytes_written"] / max(1, result["logged_steps"])
    result["callback_cpu_ms_per_log"] = result["callback_cpu_s"] * 1e3 / max(1, result["logged_steps"])
    result["background_cpu_ms_per_log"] = result["background_cpu_s"] * 1e3 / max(1, result["logged_steps"])
    # everything the logger costs the process: its events, its threads, its helper processes
    result["logger_cpu_share"] = (result["callback_cpu_s"] + result["background_cpu_s"]
                                  + result["helper_processes_cpu_s"]) / result["train_cpu_s"]
    return result


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def measure(configs: list[str], model: str, logging_steps: int, steps: int, rounds: int, scratch: Path,
            log=print) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {config: [] for config in configs}
    for round_index in range(rounds):
        order = configs if round_index % 2 == 0 else configs[::-1]
        for config in order:
            started = time.perf_counter()
            runs[config].append(run_once(config, model, logging_steps, steps, scratch))
            log(f"  round {round_index + 1}/{rounds} {model} logging_steps={logging_steps} {config}: "
                f"{time.perf_counter() - started:.1f} s")
    for config in configs:
        for index, run in enumerate(runs[config]):
            base = runs["none"][index] if "none" in runs else None
            run["wall_ratio"] = run["train_s"] / base["train_s"] if base else float("nan")
            run["exit_added_ms"] = run["exit_ms"] - base["exit_ms"] if base else float("nan")
            run["peak_rss_added_mb"] = run["peak_rss_mb"] - base["peak_rss_mb"] if base else float("nan")
    return {config: {**{metric: spread([run[metric] for run in runs[config]]) for metric in METRICS},
                     "runs": runs[config]} for config in configs}


def print_table(results: dict) -> None:
    print(f"\n{results['machine']}\n{results['repeats']} alternating rounds, each run a fresh process\n")
    header = (f"{'configuration':<26}{'CPU in callback':>22}{'ms/log':>8}{'bg ms/log':>10}{'all CPU':>9}"
              f"{'wall vs none':>22}"
              f"{'start ms':>10}{'begin ms':>10}{'exit+ ms':>10}{'RSS+ MB':>9}{'threads':>9}{'B/log':>9}")
    for setting, table in results["runs"].items():
        print(f"{setting} ({results['steps'][setting.split(',')[0]]} steps)")
        print(header)
        for config, row in table.items():
            share, wall = row["callback_cpu_share"], row["wall_ratio"]
            share_text = f"{100 * share['median']:.2f}% ({100 * share['min']:.2f}-{100 * share['max']:.2f})"
            wall_text = f"{wall['median']:.3f} ({wall['min']:.3f}-{wall['max']:.3f})"
            print(f"{config:<26}{share_text:>22}{row['callback_cpu_ms_per_log']['median']:>8.3f}"
                  f"{row['background_cpu_ms_per_log']['median']:>10.3f}"
                  f"{100 * row['logger_cpu_share']['median']:>8.2f}%{wall_text:>22}{row['start_ms']['median']:>10.1f}"
                  f"{row['on_train_begin_ms']['median']:>10.1f}{row['exit_added_ms']['median']:>10.0f}"
                  f"{row['peak_rss_added_mb']['median']:>9.1f}{row['threads_started']['median']:>9.0f}"
                  f"{row['bytes_per_logged_step']['median']:>9.0f}")
        print()


def markdown(results: dict) -> str:
    """The README's table of one results file (``--markdown FILE``)."""
    lines = ["| run | configuration | CPU in callback, median (min-max) | callback CPU ms per log | "
             "logger's threads CPU ms per log | all the logger's CPU, share | wall vs none, median (min-max) | "
             "start ms | begin ms | exit+ ms | RSS+ MB | threads | B/log |", "|" + "---|" * 13]
    for setting, table in results["runs"].items():
        for config, row in table.items():
            share, wall = row["callback_cpu_share"], row["wall_ratio"]
            per_log = statistics.median(run["callback_cpu_s"] * 1e3 / max(1, run["logged_steps"]) for run in row["runs"])
            background = statistics.median(run.get("background_cpu_s", 0.0) * 1e3 / max(1, run["logged_steps"])
                                           for run in row["runs"])
            total = row.get("logger_cpu_share", {"median": float("nan")})["median"]
            lines.append(
                f"| {setting} | {config} | {100 * share['median']:.2f} % ({100 * share['min']:.2f}-"
                f"{100 * share['max']:.2f}) | {per_log:.2f} | {background:.2f} | {100 * total:.2f} % | {wall['median']:.3f} ({wall['min']:.3f}-{wall['max']:.3f}) | "
                f"{row['start_ms']['median']:.0f} | {row['on_train_begin_ms']['median']:.1f} | "
                f"{row['exit_added_ms']['median']:.0f} | {row['peak_rss_added_mb']['median']:.1f} | "
                f"{row['threads_started']['median']:.0f} | {row['bytes_per_logged_step']['median']:.0f} |")
    return "\n".join(lines)


def write(results: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "--markdown":
        print(markdown(json.loads(Path(sys.argv[2]).read_text(encoding="utf-8"))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="alternating rounds (default 7)")
    parser.add_argument("--steps", type=int, default=300, help="steps of the tiny model's runs")
    parser.add_argument("--large-steps", type=int, default=100, help="steps of the large model's runs")
    parser.add_argument("--logging-steps", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="configurations to run (none is always run: the ratios need it)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "peers.json")
    parser.add_argument("--no-warm-up", action="store_true", help="skip the first, unmeasured 5-step run")
    args = parser.parse_args()
    if args.repeats < 1 or args.steps < 1 or args.large_steps < 1:
        parser.error("--repeats, --steps and --large-steps must be at least 1")
    configs = ["none", *[config for config in args.configs if config != "none"]]
    import torch

    steps = {"tiny": args.steps, "large": args.large_steps}
    results = {"machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, "
                          f"{os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}",
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "repeats": args.repeats,
               "steps": {model: steps[model] for model in args.models}, "models": {m: MODELS[m] for m in args.models},
               "batch_size": 16, "configs": configs, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as scratch:
        if not args.no_warm_up:  # disk caches warm for every measured run
            run_once("none", args.models[0], args.logging_steps[0], 5, Path(scratch))
        for model in args.models:
            for logging_steps in args.logging_steps:
                results["runs"][f"{model}, logging_steps={logging_steps}"] = measure(
                    configs, model, logging_steps, steps[model], args.repeats, Path(scratch))
                write(results, args.output)  # each finished setting at once: a long run stopped early keeps it
    print_table(results)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
