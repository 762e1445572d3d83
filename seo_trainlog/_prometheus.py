"""The Prometheus exposition of a run: the metric names, as data (the exporter loops over them)."""

from __future__ import annotations

from dataclasses import dataclass

LABELS = ("run_id", "rank", "local_rank", "node", "host")  # plus "trial" in a hyperparameter search


@dataclass(frozen=True)
class Metric:
    """One exposed metric: Prometheus ``name`` (base units, ``_total`` for counters), ``kind``
    (``gauge`` or ``counter``), the record ``key`` it is read from (``None``: set by the exporter
    itself), the ``scale`` applied to that value (e.g. MiB to bytes, percent to ratio), the extra
    label names beyond :data:`LABELS`, and the help text."""

    name: str
    kind: str
    key: str | None
    help: str
    scale: float = 1.0
    labels: tuple[str, ...] = ()


MB = 1024.0 * 1024.0

METRICS = (
    Metric("seo_trainlog_global_step", "gauge", "global_step", "Optimizer steps done (Trainer global_step)."),
    Metric("seo_trainlog_epoch", "gauge", "epoch", "Epoch as a float (Trainer state.epoch)."),
    Metric("seo_trainlog_train_loss", "gauge", "loss", "Training loss averaged since the last logging step."),
    Metric("seo_trainlog_eval_loss", "gauge", "eval_loss", "Loss of the last evaluation."),
    Metric("seo_trainlog_learning_rate", "gauge", "learning_rate", "Learning rate in effect."),
    Metric("seo_trainlog_grad_norm", "gauge", "grad_norm", "Gradient norm before clipping."),
    Metric("seo_trainlog_samples_per_second", "gauge", "samples_per_second",
           "Training samples per second over the last logging interval (all ranks)."),
    Metric("seo_trainlog_step_time_seconds", "gauge", "step_time_s",
           "Mean wall time of this rank's optimizer steps over the last logging interval."),
    Metric("seo_trainlog_data_wait_ratio", "gauge", "data_wait_pct",
           "Share (0-1) of this rank's step and wait time spent waiting for data.", scale=0.01),
    Metric("seo_trainlog_last_step_timestamp_seconds", "gauge", None,
           "Unix time of this rank's last logging step."),
    Metric("seo_trainlog_resident_memory_bytes", "gauge", "rss_mb", "Resident memory of the process.", scale=MB),
    Metric("seo_trainlog_gpu_memory_used_bytes", "gauge", "gpu{gpu}_mem_used_mb",
           "GPU memory in use (NVML), per visible GPU.", scale=MB, labels=("gpu",)),
    Metric("seo_trainlog_gpu_utilization_ratio", "gauge", "gpu{gpu}_util_pct",
           "GPU utilisation (NVML), 0-1, per visible GPU.", scale=0.01, labels=("gpu",)),
    Metric("seo_trainlog_cuda_memory_allocated_bytes", "gauge", "cuda{gpu}_allocated_mb",
           "Memory allocated by torch.cuda on the device.", scale=MB, labels=("gpu",)),
    Metric("seo_trainlog_anomalies_total", "counter", None, "Anomalies detected, by kind.", labels=("kind",)),
    Metric("seo_trainlog_errors_total", "counter", None, "Errors logged by the run."),
    Metric("seo_trainlog_run_info", "gauge", None, "1, with the run's status as a label.", labels=("status",)),
)
NAMES = tuple(metric.name for metric in METRICS)
