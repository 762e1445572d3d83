"""The Prometheus exposition of a run: the metric names, as data, and the exporter that loops over
them (prometheus-client: a ``/metrics`` server, a textfile for node_exporter, a Pushgateway push).

prometheus-client is optional: it is imported only when a Prometheus setting is given."""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from time import time
from typing import Any

from .anomaly import rank_sample
from .._config import LogConfig, redacted_url, split_credentials
from .monitor import MB
from ..record.rank import ProcessRole

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
    Metric("seo_trainlog_data_time_seconds", "gauge", None,
           "This rank's own data time per optimizer step over the last logging interval: its TimedDataCollator "
           "time per step when it has one, else its data wait per step (the straggler detector's data time; "
           "its pace is this plus the shortest step time of the run's ranks)."),
    Metric("seo_trainlog_last_step_timestamp_seconds", "gauge", None,
           "Unix time of this rank's last logging step; before the first one, of the run's start."),
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

PUSH_JOB = "seo_trainlog"
PUSH_TIMEOUT_S = 5.0  # at the end of a completed run; 1 s after a failure, Ctrl-C or SIGTERM
_BY_NAME = {metric.name: metric for metric in METRICS}
# the scalar gauges a logging step sets from the values it has (logs, the interval's timing, resources)
_STEP_GAUGES = tuple(metric for metric in METRICS
                     if metric.key and not metric.labels and metric.key not in ("global_step", "loss", "eval_loss",
                                                                                  "epoch"))
_PER_DEVICE = tuple((re.compile("^" + re.escape(metric.key).replace(re.escape("{gpu}"), r"(\d+)") + "$"), metric)
                    for metric in METRICS if "{gpu}" in (metric.key or ""))
_LOCK = threading.Lock()
_ENDPOINTS: dict[tuple[str, int], _Endpoint] = {}


def configured(config: LogConfig) -> bool:
    """Whether any Prometheus output is asked for."""
    return config.prometheus_port is not None or config.prometheus_textfile is not None \
        or config.pushgateway_url is not None


def open_exporter(config: LogConfig, role: ProcessRole, run_id: str, trial: str | None,
                  warn: Callable[[str], None], anomaly_kinds: tuple[str, ...] = ()) -> PrometheusExporter | None:
    """The run's exporter, or None when no Prometheus output is configured or prometheus-client is
    missing (then one WARNING through ``warn``). Never raises: a server that cannot start is a
    WARNING, and the textfile and Pushgateway still work."""
    if not configured(config):
        return None
    try:
        import prometheus_client
    except ImportError as exc:
        warn(f"Prometheus export is off: prometheus-client is not installed ({exc}); install it with "
             "pip install 'seo_trainlog[prometheus]'. Training goes on without /metrics, textfile or push.")
        return None
    exporter = PrometheusExporter(prometheus_client, config, role, run_id, trial, warn, anomaly_kinds)
    if config.prometheus_port is not None:
        exporter.serve(config.prometheus_port, role.local_rank, config.prometheus_addr)
    return exporter


class PrometheusExporter:
    """One run's series in a registry of its own (a ``prometheus_client.CollectorRegistry``, never the
    global one), with the labels ``run_id``, ``rank``, ``local_rank``, ``node``, ``host`` (and
    ``trial`` in a hyperparameter search).

    The training thread only sets values (:meth:`observe_train`, :meth:`observe_eval`: a float
    multiplication and ``Gauge.set`` per metric); the exposition is formatted by the ``/metrics``
    server's thread when scraped, and by :meth:`write_textfile` and :meth:`finish` (push) outside
    the training step. Errors never propagate: each kind of failure is one WARNING through ``warn``.
    """

    def __init__(self, client: Any, config: LogConfig, role: ProcessRole, run_id: str, trial: str | None,
                 warn: Callable[[str], None], anomaly_kinds: tuple[str, ...] = ()) -> None:
        self._client = client
        self._warn = warn
        self._failed: set[str] = set()
        self.finished = False
        self.run_id = run_id
        self.rank = role.rank
        labels = {"run_id": run_id, "rank": str(role.rank), "local_rank": str(role.local_rank),
                  "node": str(role.node_rank), "host": role.host}
        if trial is not None:
            labels["trial"] = trial
        self.labels = labels
        self._values = values = tuple(labels.values())
        self.registry = client.CollectorRegistry()
        self._metrics = {}
        for metric in METRICS:
            kind = client.Counter if metric.kind == "counter" else client.Gauge
            self._metrics[metric.name] = kind(metric.name, metric.help, labelnames=(*labels, *metric.labels),
                                              registry=self.registry)
        child = self._child
        # a gauge's series is created by its first value (a scrape never shows a 0 nobody measured)
        self._global_step = _Lazy(child, "seo_trainlog_global_step")
        self._epoch = _Lazy(child, "seo_trainlog_epoch")
        self._train_loss = _Lazy(child, "seo_trainlog_train_loss")
        self._eval_loss = _Lazy(child, "seo_trainlog_eval_loss")
        self._data_time = _Lazy(child, "seo_trainlog_data_time_seconds")
        self._step_gauges = tuple((metric.key, _Lazy(child, metric.name), metric.scale) for metric in _STEP_GAUGES)
        # the run's start until the first logging step: a run that hangs before it still alerts
        self._last_step = child("seo_trainlog_last_step_timestamp_seconds")
        self._last_step.set(time())
        # the counters are exposed from the start, at 0: increase() sees their first increment
        self._errors = child("seo_trainlog_errors_total")
        self._anomalies = {kind: child("seo_trainlog_anomalies_total", kind) for kind in anomaly_kinds}
        self._devices: dict[str, tuple[Any, float] | None] = {}  # resource key -> (child, scale), or None
        self._status = "running"
        child("seo_trainlog_run_info", "running").set(1)
        self._rss_by_scrape = False
        self.textfile = textfile_path(config.prometheus_textfile, role) if config.prometheus_textfile else None
        self._textfile_queued = False
        self.pushgateway_url = config.pushgateway_url
        self._linger_s = config.prometheus_linger_s
        self._endpoint: _Endpoint | None = None

    def _child(self, name: str, *extra: str) -> Any:
        return self._metrics[name].labels(*self._values, *extra)

    # ------------------------------------------------------------------ outputs

    def serve(self, base_port: int, local_rank: int, addr: str) -> None:
        """Serve ``/metrics`` on ``base_port + local_rank``: through this process's server for that
        address and port if one is up (an earlier run's: this run's series replace those of the
        finished runs there), else a new one (``prometheus_client.start_http_server``, a daemon
        thread). A port that cannot be bound is one WARNING naming it."""
        port = base_port + local_rank
        where = f"{addr}:{port}" + (f" (prometheus_port {base_port} + local_rank {local_rank})" if local_rank else "")
        if port > 65535:
            self._warn(f"Prometheus: /metrics is not served: port {where} is above 65535. Training goes on.")
            return
        try:
            with _LOCK:
                endpoint = _ENDPOINTS.get((addr, port))
                if endpoint is None:
                    endpoint = _ENDPOINTS[(addr, port)] = _Endpoint(self._client, addr, port)
                endpoint.attach(self)
        except Exception as exc:
            self._warn(f"Prometheus: cannot serve /metrics on port {port} ({where}): {type(exc).__name__}: {exc}"
                       f"{'; the port is in use' if isinstance(exc, OSError) and exc.errno in (48, 98) else ''}. "
                       "Training goes on without it.")
            return
        self._endpoint = endpoint

    @property
    def url(self) -> str | None:
        """``http://addr:port/metrics`` of the server serving this run, None without one."""
        endpoint = self._endpoint
        return None if endpoint is None else f"http://{endpoint.addr}:{endpoint.port}/metrics"

    def scrape_rss(self, read_mb: Callable[[], float]) -> None:
        """On a process without a resource sampler: the resident memory is read when scraped (and
        when the textfile is written), in MiB from ``read_mb``, not on the training thread."""
        self._rss_by_scrape = True
        self._child("seo_trainlog_resident_memory_bytes").set_function(lambda: read_mb() * MB)

    def schedule_textfile(self, defer: Callable[[str, Callable[[], Any]], None]) -> None:
        """Queue one textfile write with ``defer`` (the logger's batch of deferred records), unless
        one is queued already: a batch writes the file once, with the latest values."""
        if self.textfile is not None and not self._textfile_queued:
            self._textfile_queued = True
            defer("prometheus_textfile", self._write_queued)

    def _write_queued(self) -> None:
        self._textfile_queued = False
        self.write_textfile()

    def write_textfile(self) -> None:
        """The exposition to :attr:`textfile`, atomically (``prometheus_client.write_to_textfile``:
        a temporary file in the same directory renamed over it). A failure is one WARNING."""
        path = self.textfile
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._client.write_to_textfile(str(path), self.registry)
        except Exception as exc:
            self._once("textfile", f"Prometheus: cannot write the textfile {path}: {type(exc).__name__}: {exc}; "
                                   "retried at the next logging step")

    def push(self, timeout_s: float = PUSH_TIMEOUT_S) -> None:
        """PUT the run's series to the Pushgateway (job ``seo_trainlog``, grouping key ``run_id``,
        ``rank``). A failure is one WARNING."""
        if self.pushgateway_url is None:
            return
        try:
            url, username, password = split_credentials(self.pushgateway_url)
            options: dict[str, Any] = {}
            if username is not None:  # user:password@ of the URL: HTTP basic auth, never in the URL sent
                from prometheus_client.exposition import basic_auth_handler

                options["handler"] = functools.partial(_basic_auth, basic_auth_handler, username, password or "")
            self._client.push_to_gateway(url, job=PUSH_JOB, registry=self.registry,
                                         grouping_key={"run_id": self.run_id, "rank": str(self.rank)},
                                         timeout=timeout_s, **options)
        except Exception as exc:
            self._once("push", f"Prometheus: pushing to the Pushgateway {redacted_url(self.pushgateway_url)} "
                               f"failed: {type(exc).__name__}: {redacted_url(str(exc))}; "
                               "the run's final values were not pushed")

    def finish(self, status: str) -> None:
        """The run ended with ``status``: ``run_info{status}`` says so, the textfile and the
        Pushgateway get the final values, and with ``prometheus_linger_s`` the server stops that
        many seconds later (unless a newer run of this process uses it). Never raises."""
        if self.finished:
            return
        try:
            info = self._metrics["seo_trainlog_run_info"]
            info.labels(*self._values, status).set(1)
            if status != self._status:
                info.remove(*self._values, self._status)
            self._status = status
            self.finished = True
            self.write_textfile()
            self.push(PUSH_TIMEOUT_S if status == "completed" else 1.0)
            if self._endpoint is not None and self._linger_s is not None:
                self._endpoint.linger(self, self._linger_s)
        except Exception as exc:
            self._once("finish", f"Prometheus: the end of the run was not exported: {type(exc).__name__}: {exc}")
        finally:
            self.finished = True

    def _once(self, what: str, message: str) -> None:
        if what not in self._failed:
            self._failed.add(what)
            try:
                self._warn(message)
            except Exception:
                pass

    # ------------------------------------------------------------------ values (the training thread)

    def observe_train(self, global_step: int, epoch: Any, logs: Mapping[str, Any], loss_key: str,
                      timing: Mapping[str, Any], resources: Mapping[str, Any],
                      collate: Mapping[str, Any] | None = None) -> None:
        """A training logging step: ``logs`` as the Trainer logged them (``loss_key`` names the
        loss), ``timing`` the interval's (``steps``, ``step_time_s``, ``data_wait_s``,
        ``data_wait_pct``, ``samples_per_second``), ``resources`` the readings (``rss_mb``,
        ``gpu<i>_*``, ``cuda<i>_*``), ``collate`` the interval's TimedDataCollator sums
        (``collate_time_s``...). The data time is :func:`seo_trainlog.watch.anomaly.rank_sample`'s
        ``own_data_s``, the straggler detector's. Only ``Gauge.set``."""
        self._global_step.set(global_step)
        _set(self._epoch, logs.get("epoch", epoch), 1.0)
        _set(self._train_loss, logs.get(loss_key), 1.0)
        for key, child, scale in self._step_gauges:
            value = logs.get(key)
            if value is None:
                value = timing.get(key)
                if value is None:
                    value = resources.get(key)
            if value is not None:
                _set(child, value, scale)
        sample = rank_sample({**timing, **collate} if collate else timing)
        if sample is not None:
            _set(self._data_time, sample["own_data_s"], 1.0)
        if resources:
            devices = self._devices
            for key, value in resources.items():
                target = devices.get(key, 0)
                if target == 0:
                    target = devices[key] = self._device_child(key)
                if target is not None:
                    _set(target[0], value, target[1])
        self._last_step.set(time())

    def _device_child(self, key: str) -> tuple[Any, float] | None:
        for pattern, metric in _PER_DEVICE:
            match = pattern.match(key)
            if match:
                return self._child(metric.name, match.group(1)), metric.scale
        return None

    def observe_eval(self, logs: Mapping[str, Any]) -> None:
        """An evaluation's logged values: ``eval_loss``."""
        _set(self._eval_loss, logs.get("eval_loss"), 1.0)

    def count_error(self) -> None:
        self._errors.inc()

    def count_anomaly(self, kind: str) -> None:
        child = self._anomalies.get(kind)
        if child is None:
            child = self._anomalies[kind] = self._child("seo_trainlog_anomalies_total", str(kind))
        child.inc()


class _Lazy:
    """A labelled series created on its first :meth:`set` (prometheus-client exposes a child at 0 from
    its creation on)."""

    __slots__ = ("_make", "_name", "_child")

    def __init__(self, make: Callable[[str], Any], name: str) -> None:
        self._make, self._name, self._child = make, name, None

    def set(self, value: float) -> None:
        child = self._child
        if child is None:
            child = self._child = self._make(self._name)
        child.set(value)


def _set(child: Any, value: Any, scale: float) -> None:
    if value is None or isinstance(value, bool):
        return
    try:
        child.set(float(value) * scale)
    except (TypeError, ValueError):
        pass


class _Endpoint:
    """One ``/metrics`` server of this process (per address and port): its registry holds one
    collector that gathers the series of the runs attached to it (still open ones, and the last
    finished one until the next run attaches)."""

    def __init__(self, client: Any, addr: str, port: int) -> None:
        from prometheus_client.metrics_core import Metric

        self._metric = Metric
        self.addr, self.port = addr, port
        self.exporters: list[PrometheusExporter] = []
        self.registry = client.CollectorRegistry()
        self.registry.register(self)
        self.server, self.thread = client.start_http_server(port, addr=addr, registry=self.registry)

    def attach(self, exporter: PrometheusExporter) -> None:
        """Serve ``exporter``'s series from now on, in place of those of finished runs (called under _LOCK)."""
        self.exporters = [other for other in self.exporters if not other.finished] + [exporter]

    def collect(self) -> list[Any]:
        families: dict[str, Any] = {}
        for exporter in self.exporters:
            for family in exporter.registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = self._metric(family.name, family.documentation, family.type,
                                                                  family.unit)
                merged.samples.extend(family.samples)
        return list(families.values())

    def linger(self, exporter: PrometheusExporter, seconds: float) -> None:
        timer = threading.Timer(seconds, self._stop_if_idle, args=(exporter,))
        timer.daemon = True
        timer.start()

    def _stop_if_idle(self, exporter: PrometheusExporter) -> None:
        with _LOCK:
            if self.exporters[-1:] != [exporter] or not exporter.finished \
                    or _ENDPOINTS.get((self.addr, self.port)) is not self:
                return  # a newer run serves here now
            del _ENDPOINTS[(self.addr, self.port)]
        self.server.shutdown()
        self.server.server_close()


def stop_servers() -> None:
    """Stop every ``/metrics`` server of this process (tests; servers otherwise live as long as the process)."""
    with _LOCK:
        endpoints = list(_ENDPOINTS.values())
        _ENDPOINTS.clear()
    for endpoint in endpoints:
        endpoint.server.shutdown()
        endpoint.server.server_close()


def textfile_path(path: Path, role: ProcessRole) -> Path:
    """``path`` itself in a single process; in a distributed run ``_rank<N>`` inserted before the
    suffix (``seo_trainlog.prom`` -> ``seo_trainlog_rank1.prom``), so that processes never share a file."""
    path = Path(path)
    if role.world_size < 2:
        return path
    return path.with_name(f"{path.stem}_rank{role.rank}{path.suffix}")


def _basic_auth(handler: Callable[..., Callable[[], None]], username: str, password: str, url: str, method: str,
                timeout: float | None, headers: list[tuple[str, str]], data: bytes) -> Callable[[], None]:
    """prometheus-client's push handler with HTTP basic auth (``basic_auth_handler``)."""
    return handler(url, method, timeout, headers, data, username, password)
