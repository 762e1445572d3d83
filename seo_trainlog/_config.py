from __future__ import annotations

import codecs
import dataclasses
import datetime
import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit


from ._secrets import REDACTOR

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class LogConfig:
    """Every setting of seo_trainlog, in one place.

    Attributes:
        log_dir: Directory that receives the log files (created if missing). Default ``logs``.
        level: Lowest level written to the text logs: one of ``DEBUG``, ``INFO``, ``WARNING``,
            ``ERROR``, ``CRITICAL`` (case-insensitive). At ``DEBUG`` the per-step detail is written on
            every optimizer step instead of once per logging step. Default ``INFO``.
        console: Print one concise line per logging event to stderr. Default ``True``.
        debug: Also write ``debug_<stamp>.log`` holding every record at DEBUG and above, with a DEBUG
            line per optimizer step (``Step N: step time ...``). Default ``False``.
        rotation: When a log file is rotated, in loguru's syntax: a size such as ``"10 MB"`` or
            ``"500 KB"``, or a duration such as ``"1 day"``. Default ``"10 MB"``.
        retention: How many rotated files each log file keeps (an ``int`` >= 1), or a loguru duration
            such as ``"7 days"``. Retention only ever matches the files of the same category and run,
            and only rotated files: with ``rotation=None`` nothing is ever deleted. Default ``5``.
        encoding: Encoding of every file: only UTF-8 (``"utf-8"``, ``"UTF-8"``, ``"utf8"``) is accepted. Default ``"utf-8"``.
        sample_interval_s: Seconds between two resource readings (memory, CPU, GPU) of the background
            sampler; ``0`` turns the thread off (one reading is then taken at each logging step).
            Default ``2.0``.
        detail_interval_s: The per-interval text lines (``Steps A-B`` in ``training_detailed``, the
            ``dataloader``/``Collate`` lines, the ``steps_A-B`` block in ``model_performance``) cover at
            least this many seconds: with very frequent logging steps one block sums several of them
            (every logging step still has its own JSON line). ``0``: a block at every logging step.
            Default ``1.0``.
        flush_interval_s: The error files are line-buffered (an error is on disk when it is logged);
            the other files are written in blocks and flushed every this many seconds (and at the end
            of the run, on an error, on SIGTERM): far fewer system calls during training. The records
            of training logging steps are also formatted in batches about this often (stamped with
            the time of their step; anything else written first settles the batch, so the order
            holds), so a file or ``seo-trainlog watch`` may trail training by up to about twice this.
            ``0``: every record written at once and every file line-buffered. Default ``1.0``.
        data_wait_warn_pct: A logging interval in which more than this share (percent) of the step
            wall time was spent waiting for data gets one data-loading bottleneck WARNING.
            Default ``20.0``; also the threshold of the ``data_wait`` anomaly.
        detect_anomalies: Run the anomaly detectors (:class:`~seo_trainlog.watch.anomaly.AnomalyDetector`)
            on every logged value during training. Default ``True``.
        anomaly_window: Length of the rolling windows of the anomaly detectors, in logged ``train``
            records (one per ``logging_steps``), from 5 to 10000. Default ``20``.
        loss_spike_z: A training loss whose robust z-score (distance above the window's median in
            units of 1.4826 x its median absolute deviation) exceeds this is a ``loss_spike``.
            Default ``6.0``.
        grad_norm_jump: A ``grad_norm`` above this many times the window's median is a
            ``grad_explosion``. Default ``10.0``.
        throughput_drop_pct: ``samples_per_second`` more than this many percent below the window's
            median is a ``throughput_drop``. Default ``50.0``.
        memory_creep_mb: Steady growth (MiB) of ``rss_mb``, ``gpu<i>_mem_used_mb`` or
            ``cuda<i>_allocated_mb`` across one full window that makes a ``memory_creep``.
            Default ``256.0``.
        plateau_evals: A ``plateau`` is this many evaluations in a row without a new best
            ``eval_loss``. Default ``5``.
        plateau_min_delta: How much (in ``eval_loss`` units) an evaluation must beat the best so far
            to count as an improvement. Default ``0.0``.
        straggler_pct: In a distributed run, a rank whose pace (its own data time per step plus the
            shortest step time of all ranks, see :class:`~seo_trainlog.watch.anomaly.StragglerDetector`) is
            more than this many percent above the median of the ranks' is slow. Default ``20.0``.
        straggler_window: A slow rank becomes a ``straggler`` anomaly after this many compared logging
            steps in a row. Default ``5``.
        alert_cmd: Shell command run for each anomaly during training, with the anomaly as one JSON
            object on its stdin; ``None``: no command. Default ``None``.
        alert_timeout_s: Seconds an alert command may run, with everything it started (its whole
            process group is killed then), and a Python hook may take before the run stops waiting
            for it at the end. Default ``10.0``.
        metric_directions: Which way is better for metrics the built-in table
            (:data:`seo_trainlog._directions.RULES`) does not know or gets wrong: a mapping of metric
            name or :mod:`fnmatch` glob (matched with and without its ``eval_``/``test_``... prefix)
            to ``"min"`` (lower is better), ``"max"`` (higher is better) or ``None`` (no "best" at
            all: a counter, a timing). Used wherever a best value is picked (``seo-trainlog``
            summaries, ``compare``, the run manifest). Default ``None`` (the table alone).
        peak_tflops: Peak TFLOPS of one device, for ``mfu_pct`` (model FLOPs utilisation): overrides
            the table of GPUs by name (:data:`seo_trainlog.watch.tokens.PEAK_TFLOPS`); the run's peak is
            this times the world size. ``None``: from the table (no ``mfu_pct`` on a device not in it,
            ``null`` on CPU). Default ``None``.

    Raises:
        ValueError: at construction, for an unknown level, an invalid rotation or retention, or an
            empty log directory. The message names the setting and the accepted values.
    """

    log_dir: Path = Path("logs")
    level: str = "INFO"
    console: bool = True
    debug: bool = False
    rotation: str | int = "10 MB"
    retention: int | str = 5
    encoding: str = "utf-8"
    sample_interval_s: float = 2.0
    detail_interval_s: float = 1.0
    flush_interval_s: float = 1.0
    data_wait_warn_pct: float = 20.0
    detect_anomalies: bool = True
    anomaly_window: int = 20
    loss_spike_z: float = 6.0
    grad_norm_jump: float = 10.0
    throughput_drop_pct: float = 50.0
    memory_creep_mb: float = 256.0
    plateau_evals: int = 5
    plateau_min_delta: float = 0.0
    straggler_pct: float = 20.0
    straggler_window: int = 5
    alert_cmd: str | None = None
    alert_timeout_s: float = 10.0
    prometheus_port: int | None = None
    prometheus_addr: str = "0.0.0.0"
    prometheus_linger_s: float | None = None
    prometheus_textfile: Path | None = None
    pushgateway_url: str | None = None
    metric_directions: Mapping[str, str | None] | None = dataclasses.field(default=None, hash=False)
    peak_tflops: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "log_dir", _check_log_dir("log_dir", self.log_dir))
        object.__setattr__(self, "level", _check_level("level", self.level))
        object.__setattr__(self, "console", _check_bool("console", self.console))
        object.__setattr__(self, "debug", _check_bool("debug", self.debug))
        object.__setattr__(self, "encoding", _check_encoding("encoding", self.encoding))
        object.__setattr__(self, "rotation", _check_rotation("rotation", self.rotation))
        object.__setattr__(self, "retention", _check_retention("retention", self.retention))
        object.__setattr__(self, "sample_interval_s", _check_number("sample_interval_s", self.sample_interval_s,
                                                                    0.0, 3600.0))
        object.__setattr__(self, "detail_interval_s", _check_number("detail_interval_s", self.detail_interval_s,
                                                                    0.0, 3600.0))
        object.__setattr__(self, "flush_interval_s", _check_number("flush_interval_s", self.flush_interval_s,
                                                                   0.0, 3600.0))
        object.__setattr__(self, "data_wait_warn_pct", _check_number("data_wait_warn_pct", self.data_wait_warn_pct,
                                                                     0.0, 100.0))
        for name in _ANOMALY_FIELDS + _PROMETHEUS_FIELDS + ("peak_tflops",):
            object.__setattr__(self, name, _PARSERS[name](name, getattr(self, name)))
        if self.metric_directions is not None:
            object.__setattr__(self, "metric_directions", _check_directions("metric_directions",
                                                                            self.metric_directions))

    def __repr__(self) -> str:
        """The dataclass repr, with the ``user:password@`` of ``pushgateway_url`` redacted."""
        shown = (f"{field.name}={redacted_url(value) if field.name == 'pushgateway_url' and value else value!r}"
                 for field in dataclasses.fields(self) if field.repr for value in (getattr(self, field.name),))
        return f"{type(self).__qualname__}({', '.join(shown)})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LogConfig:
        """Build a config from environment variables; unset or empty ones keep the defaults.

        ============================  ==========================================================
        ``SEO_TRAINLOG_DIR``          log directory (default ``logs``)
        ``SEO_TRAINLOG_LEVEL``        ``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``, ``CRITICAL``
        ``SEO_TRAINLOG_DEBUG``        ``1``/``0`` (also true/false, yes/no, on/off): debug file
        ``SEO_TRAINLOG_CONSOLE``      ``1``/``0``: concise console lines
        ``SEO_TRAINLOG_ROTATION``     loguru size or duration, e.g. ``10 MB``, ``1 day``
        ``SEO_TRAINLOG_RETENTION``    rotated files kept (integer >= 1) or a duration ``7 days``
        ``SEO_TRAINLOG_SAMPLE_INTERVAL``       seconds between resource readings, ``0``: no thread
        ``SEO_TRAINLOG_DETAIL_INTERVAL``       seconds the per-interval text lines cover at least
        ``SEO_TRAINLOG_FLUSH_INTERVAL``        seconds between flushes of the non-error files
        ``SEO_TRAINLOG_DATA_WAIT_WARN_PCT``    data-wait share (percent) that warns of a bottleneck
        ``SEO_TRAINLOG_DETECT_ANOMALIES``      ``1``/``0``: anomaly detection during training
        ``SEO_TRAINLOG_ANOMALY_WINDOW``        rolling window of the detectors, in logged records
        ``SEO_TRAINLOG_LOSS_SPIKE_Z``          robust z-score of a loss spike
        ``SEO_TRAINLOG_GRAD_NORM_JUMP``        grad_norm over this many times its median
        ``SEO_TRAINLOG_THROUGHPUT_DROP_PCT``   samples/s this many percent below its median
        ``SEO_TRAINLOG_MEMORY_CREEP_MB``       steady memory growth (MiB) over one window
        ``SEO_TRAINLOG_PLATEAU_EVALS``         evaluations without a new best eval_loss
        ``SEO_TRAINLOG_PLATEAU_MIN_DELTA``     improvement of eval_loss that counts
        ``SEO_TRAINLOG_STRAGGLER_PCT``         a rank's pace this many percent above the ranks' median
        ``SEO_TRAINLOG_STRAGGLER_WINDOW``      logging steps in a row that make a straggler
        ``SEO_TRAINLOG_ALERT_CMD``             shell command receiving each anomaly as JSON on stdin
        ``SEO_TRAINLOG_ALERT_TIMEOUT``         seconds the alert command may run
        ``SEO_TRAINLOG_PROMETHEUS_PORT``       serve ``/metrics`` on this port + local_rank
        ``SEO_TRAINLOG_PROMETHEUS_ADDR``       address the ``/metrics`` server binds (``0.0.0.0``)
        ``SEO_TRAINLOG_PROMETHEUS_LINGER``     seconds ``/metrics`` is served after the run's end
        ``SEO_TRAINLOG_PROMETHEUS_TEXTFILE``   exposition file for node_exporter's textfile collector
        ``SEO_TRAINLOG_PUSHGATEWAY``           Pushgateway URL, pushed to at the end of the run
        ``SEO_TRAINLOG_METRIC_DIRECTIONS``     JSON object, e.g. ``{"eval_my_score": "max", "*_count": null}``
        ``SEO_TRAINLOG_PEAK_TFLOPS``           peak TFLOPS of one device, for ``mfu_pct``
        ============================  ==========================================================

        Args:
            environ: mapping to read instead of ``os.environ`` (for tests).

        Raises:
            ValueError: naming the variable, its value and the accepted values.
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for variable, field in _ENV_FIELDS:
            raw = env.get(variable, "").strip()
            if raw:
                values[field] = _PARSERS[field](variable, raw)
        return cls(**values)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> LogConfig:
        """A copy with some settings changed (validated like the original)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _check_log_dir(name: str, value: object) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ValueError(f"{name}={value!r} is not valid; accepted values: a directory path")
    return Path(value)


def _check_level(name: str, value: object) -> str:
    level = str(value).strip().upper()
    if level not in LEVELS:
        raise ValueError(f"{name}={value!r} is not valid; accepted values: {', '.join(LEVELS)}")
    return level


def _check_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower() if isinstance(value, str) else None
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not valid; accepted values: {', '.join(_TRUE + _FALSE)}")


def _check_number(name: str, value: object, low: float, high: float) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not low <= number <= high:
        raise ValueError(f"{name}={value!r} is not valid; accepted values: a number from {low:g} to {high:g}")
    return number


def _check_int(name: str, value: object, low: int, high: int) -> int:
    number = int(value) if isinstance(value, str) and value.strip().lstrip("+-").isdecimal() else value
    if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
        raise ValueError(f"{name}={value!r} is not valid; accepted values: an integer from {low} to {high}")
    return number


def _check_command(name: str, value: object) -> str | None:
    if value is None or (isinstance(value, str) and value.strip()):
        return value
    raise ValueError(f"{name}={value!r} is not valid; accepted values: a shell command, or None")


def _optional(check):
    """``check``, letting ``None`` through (the setting is off)."""
    return lambda name, value: None if value is None else check(name, value)


def _check_address(name: str, value: object) -> str:
    if isinstance(value, str) and value.strip() and not any(char.isspace() for char in value.strip()):
        return value.strip()
    raise ValueError(f"{name}={value!r} is not valid; accepted values: an address to bind, such as "
                     "'0.0.0.0', '127.0.0.1' or '::'")


def _check_file(name: str, value: object) -> Path:
    if isinstance(value, (str, os.PathLike)) and str(value).strip() and not str(value).endswith(("/", os.sep)):
        return Path(value)
    raise ValueError(f"{name}={value!r} is not valid; accepted values: a file path, e.g. "
                     "/var/lib/node_exporter/textfile/seo_trainlog.prom")


def _check_url(name: str, value: object) -> str:
    """A Pushgateway URL, ``http://`` put in front when it names no scheme (``host:port``,
    ``user:password@host:port``: nothing before ``://`` is taken for a scheme). A password in it is
    remembered by the secret redactor, and never shown in an error message."""
    text = value.strip() if isinstance(value, str) else ""
    if text and "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        valid = bool(parts.hostname) and (parts.port is None or parts.port > 0)  # .port: ValueError if not a port
    except ValueError:
        valid = False
    if valid and not any(char.isspace() for char in text) and parts.scheme in ("http", "https"):
        if parts.password:
            REDACTOR.add(unquote(parts.password))  # masked wherever it would be logged (6 characters or more)
        return text
    shown = redacted_url(value) if isinstance(value, str) else value
    raise ValueError(f"{name}={shown!r} is not valid; accepted values: a Pushgateway URL such as "
                     "'http://pushgateway:9091' (http or https; host:port alone means http; "
                     "user:password@ for HTTP basic auth)")


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``url`` without its ``user:password@`` part, and the user name and password (percent-decoded),
    None where absent. Raises ValueError for a URL :func:`urllib.parse.urlsplit` rejects."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None, None
    host = parts.netloc.rpartition("@")[2]
    return (urlunsplit(parts._replace(netloc=host)), unquote(parts.username or ""),
            None if parts.password is None else unquote(parts.password))


def redacted_url(text: str) -> str:
    """``text`` (a URL, or a message quoting URLs) with every ``user:password@`` or ``user@`` part of a
    URL replaced by ``<redacted>@``; a text holding no URL with ``://`` is treated as one without scheme
    (``user:password@host:port``)."""
    if "://" not in text and "@" in text and not any(char.isspace() for char in text):
        return "<redacted>@" + text.rpartition("@")[2]
    return _USERINFO.sub(r"\1<redacted>@", text)


_USERINFO = re.compile(r"(://)[^/\s'\"]*@")  # up to the last "@" before the path: a password may hold "@"


def _check_directions(name: str, value: object) -> dict[str, str | None]:
    from ._directions import check_overrides

    return check_overrides(value, name)


def _check_encoding(name: str, value: object) -> str:
    # the logs hold any text (metric names, messages) and seo-trainlog reads the JSON as UTF-8
    try:
        if codecs.lookup(str(value)).name == "utf-8":
            return "utf-8"
    except LookupError:
        pass
    raise ValueError(f"{name}={value!r} is not valid; accepted values: 'utf-8' (also spelled 'UTF-8', 'utf8')")


# rotation texts loguru accepted in this process, and the default, so that a run's config is checked
# without loguru's parser (its first call compiles regular expressions: 0.3 ms of every train begin)
_ACCEPTED_ROTATIONS = {"10 MB"}


def _check_rotation(name: str, value: object) -> str | int:
    if type(value) is str and value in _ACCEPTED_ROTATIONS:
        return value
    accepted = "accepted values: a positive size such as '10 MB' or '500 KB', or a duration such as '1 day'"
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value <= 0) or _non_positive_duration(value):
        raise ValueError(f"{name}={value!r} is not valid; {accepted}")
    try:
        from .record.sinks import probe_file_options  # (loguru: imported where a value is checked, not by the CLI)

        probe_file_options(rotation=value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name}={value!r} is not valid ({exc}); {accepted}") from None
    if isinstance(value, str) and not _positive_size_or_duration(value):
        raise ValueError(f"{name}={value!r} is not valid; {accepted}")
    if type(value) is str:
        _ACCEPTED_ROTATIONS.add(value)
    return value  # type: ignore[return-value]


def _non_positive_duration(value: object) -> bool:
    return isinstance(value, datetime.timedelta) and value.total_seconds() <= 0


def _positive_size_or_duration(text: str) -> bool:
    """False for ``"0 B"``, ``"-5 MB"``, ``"0 days"``; true for other sizes, durations and times of day."""
    from loguru._string_parsers import parse_duration, parse_size  # (not imported by the CLI)

    try:
        size = parse_size(text)
    except ValueError:
        size = None
    if size is not None:
        return size > 0
    try:
        duration = parse_duration(text)
    except ValueError:
        duration = None
    return duration is None or duration.total_seconds() > 0


def _check_retention(name: str, value: object) -> int | str:
    if type(value) is int and value >= 1:  # a count of files: loguru takes every one (no probe needed)
        return value
    accepted = "accepted values: an integer >= 1 or a duration such as '7 days'"
    parsed = int(value) if isinstance(value, str) and value.strip().lstrip("+-").isdecimal() else value
    if isinstance(parsed, bool) or (isinstance(parsed, int) and parsed < 1) or _non_positive_duration(parsed):
        raise ValueError(f"{name}={value!r} is not valid; {accepted}")
    try:
        from .record.sinks import probe_file_options

        probe_file_options(retention=parsed)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name}={value!r} is not valid ({exc}); {accepted}") from None
    if isinstance(parsed, str) and not _positive_size_or_duration(parsed):
        raise ValueError(f"{name}={value!r} is not valid; {accepted}")
    return parsed  # type: ignore[return-value]


_ENV_FIELDS = (
    ("SEO_TRAINLOG_DIR", "log_dir"),
    ("SEO_TRAINLOG_LEVEL", "level"),
    ("SEO_TRAINLOG_CONSOLE", "console"),
    ("SEO_TRAINLOG_DEBUG", "debug"),
    ("SEO_TRAINLOG_ROTATION", "rotation"),
    ("SEO_TRAINLOG_RETENTION", "retention"),
    ("SEO_TRAINLOG_SAMPLE_INTERVAL", "sample_interval_s"),
    ("SEO_TRAINLOG_DETAIL_INTERVAL", "detail_interval_s"),
    ("SEO_TRAINLOG_FLUSH_INTERVAL", "flush_interval_s"),
    ("SEO_TRAINLOG_DATA_WAIT_WARN_PCT", "data_wait_warn_pct"),
    ("SEO_TRAINLOG_DETECT_ANOMALIES", "detect_anomalies"),
    ("SEO_TRAINLOG_ANOMALY_WINDOW", "anomaly_window"),
    ("SEO_TRAINLOG_LOSS_SPIKE_Z", "loss_spike_z"),
    ("SEO_TRAINLOG_GRAD_NORM_JUMP", "grad_norm_jump"),
    ("SEO_TRAINLOG_THROUGHPUT_DROP_PCT", "throughput_drop_pct"),
    ("SEO_TRAINLOG_MEMORY_CREEP_MB", "memory_creep_mb"),
    ("SEO_TRAINLOG_PLATEAU_EVALS", "plateau_evals"),
    ("SEO_TRAINLOG_PLATEAU_MIN_DELTA", "plateau_min_delta"),
    ("SEO_TRAINLOG_STRAGGLER_PCT", "straggler_pct"),
    ("SEO_TRAINLOG_STRAGGLER_WINDOW", "straggler_window"),
    ("SEO_TRAINLOG_ALERT_CMD", "alert_cmd"),
    ("SEO_TRAINLOG_ALERT_TIMEOUT", "alert_timeout_s"),
    ("SEO_TRAINLOG_PROMETHEUS_PORT", "prometheus_port"),
    ("SEO_TRAINLOG_PROMETHEUS_ADDR", "prometheus_addr"),
    ("SEO_TRAINLOG_PROMETHEUS_LINGER", "prometheus_linger_s"),
    ("SEO_TRAINLOG_PROMETHEUS_TEXTFILE", "prometheus_textfile"),
    ("SEO_TRAINLOG_PUSHGATEWAY", "pushgateway_url"),
    ("SEO_TRAINLOG_METRIC_DIRECTIONS", "metric_directions"),
    ("SEO_TRAINLOG_PEAK_TFLOPS", "peak_tflops"),
)
_PARSERS = {
    "log_dir": _check_log_dir,
    "level": _check_level,
    "console": _check_bool,
    "debug": _check_bool,
    "rotation": _check_rotation,
    "retention": _check_retention,
    "sample_interval_s": functools.partial(_check_number, low=0.0, high=3600.0),
    "detail_interval_s": functools.partial(_check_number, low=0.0, high=3600.0),
    "flush_interval_s": functools.partial(_check_number, low=0.0, high=3600.0),
    "data_wait_warn_pct": functools.partial(_check_number, low=0.0, high=100.0),
    "detect_anomalies": _check_bool,
    "anomaly_window": functools.partial(_check_int, low=5, high=10_000),
    "loss_spike_z": functools.partial(_check_number, low=1.0, high=1e6),
    "grad_norm_jump": functools.partial(_check_number, low=1.0, high=1e6),
    "throughput_drop_pct": functools.partial(_check_number, low=1.0, high=99.0),
    "memory_creep_mb": functools.partial(_check_number, low=1.0, high=1e9),
    "plateau_evals": functools.partial(_check_int, low=1, high=10_000),
    "plateau_min_delta": functools.partial(_check_number, low=0.0, high=1e9),
    "straggler_pct": functools.partial(_check_number, low=1.0, high=10_000.0),
    "straggler_window": functools.partial(_check_int, low=1, high=10_000),
    "alert_cmd": _check_command,
    "alert_timeout_s": functools.partial(_check_number, low=0.1, high=3600.0),
    "prometheus_port": _optional(functools.partial(_check_int, low=1, high=65535)),
    "prometheus_addr": _check_address,
    "prometheus_linger_s": _optional(functools.partial(_check_number, low=0.0, high=86400.0)),
    "prometheus_textfile": _optional(_check_file),
    "pushgateway_url": _optional(_check_url),
    "metric_directions": _check_directions,
    "peak_tflops": _optional(functools.partial(_check_number, low=0.001, high=1e6)),
}
_ANOMALY_FIELDS = ("detect_anomalies", "anomaly_window", "loss_spike_z", "grad_norm_jump", "throughput_drop_pct",
                   "memory_creep_mb", "plateau_evals", "plateau_min_delta", "straggler_pct", "straggler_window",
                   "alert_cmd", "alert_timeout_s")
_PROMETHEUS_FIELDS = ("prometheus_port", "prometheus_addr", "prometheus_linger_s", "prometheus_textfile",
                      "pushgateway_url")
