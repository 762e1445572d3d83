#!/usr/bin/env python
"""Time ``seo-trainlog summarize`` on large generated metrics files, and its peak memory.

For each ``--lines`` count (default 100,000 and 1,000,000), and once more for the largest with no
record of online detection (so that ``summarize`` runs the detector itself), this writes one run's
``performance_metrics_<stamp>.log`` as the callback would (``train`` records with the resource and
timing values of a logging step every step, an ``eval`` every 1,000 steps, epoch ``model`` records,
a ``summary`` at the end), then runs ``seo-trainlog summarize DIR --json`` in a child process and
prints its wall time and peak RSS (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a child
that only runs that command), next to those of a child that only imports ``seo_trainlog.cli``
(Python start-up plus the package's imports, the same at any file size) and of orjson's parse-only
floor: a child that reads the same file line by line and ``orjson.loads`` each line, nothing more
(``summarize`` cannot read a record for less). The ratio ``summarize / floor`` is printed for wall
and CPU seconds; CPU seconds are the steadier on a shared machine.

    .venv/bin/python scripts/bench_analysis.py [--lines 100000 1000000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from seo_trainlog import LogConfig
from seo_trainlog.watch.anomaly import settings_of


RUN_ID = "20261130_120000"
EVAL_EVERY = 1000
STEPS_PER_EPOCH = 5000


def write_metrics(path: Path, lines: int, seed: int = 0, online_detection: bool = True) -> None:
    """``lines`` JSON records of one run, as TrainLogCallback writes them with ``logging_steps=1``.

    With ``online_detection`` the run records that it ran the anomaly detector with the default
    settings (the callback's default), so ``summarize`` uses those findings; without it ``summarize``
    runs the detector over every record itself."""
    rng = random.Random(seed)
    start = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
    train_lines = lines - 3 - (lines // EVAL_EVERY) - lines // STEPS_PER_EPOCH
    max_steps = train_lines
    with open(path, "wb") as out:
        def emit(event: str, step: int | None, values: dict) -> int:
            time_s = (step or 0) * 0.15
            record = {"time": (start + timedelta(seconds=time_s)).isoformat(timespec="milliseconds"),
                      "run_id": RUN_ID, "event": event, "global_step": step,
                      "epoch": None if step is None else round(step / STEPS_PER_EPOCH, 4),
                      "rank": 0, "local_rank": 0, "world_size": 1, "host": "bench", **values}
            out.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")  # as _format.json_line
            return 1

        written = emit("run_start", None, {"log_dir": str(path.parent), "schema_version": 1,
                                           "seo_trainlog_version": "0.1.0"})
        written += emit("hyperparameters", 0, {"hyperparameters": {"training_args": {"learning_rate": 1e-4},
                                                                   "run": {"max_steps": max_steps}}})
        if online_detection:
            written += emit("detector", 0, {"settings": settings_of(LogConfig())})
        step = 0
        while written < lines - 1:
            step += 1
            progress = step / max_steps
            rss = 840.0 + rng.gauss(0, 2.0)
            written += emit("train", step, {
                "loss": 2.0 * math.exp(-4 * progress) + 0.05 + abs(rng.gauss(0, 0.02)),
                "learning_rate": 1e-4 * (1 - progress), "grad_norm": abs(rng.gauss(1.5, 0.3)), "steps": 1,
                "step_time_s": 0.149 + rng.gauss(0, 0.005), "data_wait_s": 0.0012, "data_wait_pct": 0.8,
                "samples_per_second": 106.5 + rng.gauss(0, 3), "interval_s": 0.150,
                "rss_mb": rss, "rss_mb_min": rss - 1, "rss_mb_max": rss + 1,
                "sys_mem_used_mb": 1135.6, "sys_mem_used_mb_min": 1124.5, "sys_mem_used_mb_max": 1139.9,
                "sys_mem_available_mb": 22969.9, "sys_mem_available_mb_min": 22965.5,
                "sys_mem_available_mb_max": 22981.0, "cpu_pct": 75.3, "cpu_pct_min": 56.8, "cpu_pct_max": 85.3})
            if step % EVAL_EVERY == 0 and written < lines - 1:
                written += emit("eval", step, {"metric_prefix": "eval", "eval_loss": 0.3 + 0.5 * math.exp(-3 * progress),
                                               "eval_accuracy": 0.9 * (1 - math.exp(-3 * progress)),
                                               "eval_runtime": 0.31, "eval_samples_per_second": 454.1,
                                               "eval_steps_per_second": 9.4})
            if step % STEPS_PER_EPOCH == 0 and written < lines - 1:
                written += emit("model", step, {"operation": f"epoch_{step // STEPS_PER_EPOCH}",
                                                "duration_s": 750.0, "memory_mb": rss})
        emit("summary", step, {"status": "completed", "total_epochs": step / STEPS_PER_EPOCH, "total_steps": step,
                               "final_loss": 0.06, "best_loss": 0.05, "training_duration_s": step * 0.15,
                               "early_stopping_triggered": False, "peak_rss_mb": 850.0, "data_wait_pct": 0.8})


# the parse-only floor: every line of the file given parsed by orjson, in a fresh Python process
FLOOR = ("import orjson, sys\n"
         "with open(sys.argv[1], 'rb') as lines:\n"
         "    for line in lines:\n"
         "        orjson.loads(line)\n")


def timed_child(command: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of ``command`` run in a fresh child
    (via a tiny wrapper, so that RUSAGE_CHILDREN holds that command alone). CPU seconds hardly move
    when other processes share the machine; wall seconds do."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); u = resource.getrusage(resource.RUSAGE_CHILDREN); "
               "print(time.perf_counter() - t, u.ru_utime + u.ru_stime, u.ru_maxrss, r.returncode)")
    out = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, check=True)
    wall, cpu, maxrss_kb, returncode = out.stdout.split()
    if returncode != "0":
        raise SystemExit(f"{' '.join(command)} exited with {returncode}")
    return float(wall), float(cpu), int(maxrss_kb) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dir", type=Path, help="where to write the files (default: a temporary directory)")
    args = parser.parse_args()
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss >= 0
    startup_s, startup_cpu_s, startup_mb = timed_child([sys.executable, "-c", "import seo_trainlog.cli"])
    print(f"start-up only (python -c 'import seo_trainlog.cli'): {startup_s:.2f} s wall, {startup_cpu_s:.2f} s CPU, "
          f"peak RSS {startup_mb:.0f} MiB")
    cases = [(lines, True) for lines in args.lines] + [(max(args.lines), False)]
    with tempfile.TemporaryDirectory() as scratch:
        for lines, online in cases:
            log_dir = (args.dir or Path(scratch)) / f"bench_{lines}_{'online' if online else 'offline'}"
            log_dir.mkdir(parents=True, exist_ok=True)
            path = log_dir / f"performance_metrics_{RUN_ID}.log"
            started = time.perf_counter()
            write_metrics(path, lines, online_detection=online)
            written_s = time.perf_counter() - started
            size_mb = path.stat().st_size / 2**20
            floor_s, floor_cpu_s, floor_mb = timed_child([sys.executable, "-c", FLOOR, str(path)])
            wall_s, cpu_s, peak_mb = timed_child([sys.executable, "-m", "seo_trainlog.cli", "summarize", str(log_dir),
                                                  "--json"])
            reading_cpu_s = cpu_s - startup_cpu_s
            detection = "anomalies detected online" if online else "detector run by summarize"
            print(f"{lines:>9,} lines, {detection} ({size_mb:,.0f} MiB, written in {written_s:.1f} s): "
                  f"summarize {wall_s:.2f} s wall, "
                  f"{cpu_s:.2f} s CPU ({reading_cpu_s:.2f} s CPU after start-up: {lines / reading_cpu_s:,.0f} lines/s), "
                  f"peak RSS {peak_mb:.0f} MiB ({peak_mb - startup_mb:+.0f} MiB over start-up)")
            print(f"{'':>9}  orjson parse-only floor {floor_s:.2f} s wall, {floor_cpu_s:.2f} s CPU, peak RSS "
                  f"{floor_mb:.0f} MiB: summarize / floor = {wall_s / floor_s:.2f}x wall, {cpu_s / floor_cpu_s:.2f}x CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
