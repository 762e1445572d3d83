"""Pure formatting: values in, lines out. Nothing here writes or reads a file, and nothing here
raises on a value: an unprintable value becomes ``<unprintable TypeName>``."""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import re
import traceback
from collections.abc import Mapping
from datetime import datetime
from pathlib import PurePath
from typing import Any

import orjson

from .._secrets import REDACTOR, mask_mapping

SCHEMA_VERSION = 1  # of the JSON metrics lines; readers refuse files of a newer schema

RULE = "=" * 80
_SCALARS = (str, int, float, bool, type(None))
MAX_DEPTH = 16
RESERVED_JSON_KEYS = ("time", "run_id", "event", "global_step", "epoch")
# Characters that str.splitlines() and some JSON-lines readers treat as line breaks.
_LINE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def safe_str(value: Any) -> str:
    """``str(value)``; an array or tensor that cannot become a list (a meta tensor) is described by
    shape, dtype and device instead; an object whose ``str()`` fails is ``<unprintable TypeName>``."""
    try:
        if _is_array(value):
            return _describe_array(value)
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _is_array(value: Any) -> bool:
    if isinstance(value, (str, bytes, type, BaseException)):
        return False
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _describe_array(value: Any) -> str:
    try:
        return safe_str(value.tolist())
    except Exception:
        device = getattr(value, "device", None)
        where = f" device={device}" if device is not None else ""
        try:
            return f"<{type(value).__name__} shape={tuple(value.shape)} dtype={value.dtype}{where}>"
        except Exception:
            return f"<unprintable {type(value).__name__}>"


# Characters that would hide or forge text in a log file or a terminal: C0/C1 controls (NUL, ESC of
# colour codes, carriage return, ...) and Unicode line breaks other than "\n". In messages a "\n"
# continues the record on the next line (a traceback) and a tab stays; in values nothing is kept.
_MESSAGE_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_VALUE_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED_CONTROLS = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED_CONTROLS.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_controls(text: str, in_value: bool = False) -> str:
    """``text`` with control characters written as escapes (``\\x1b``, ``\\x00``, ``\\r``...); in a
    value (``in_value``) also newlines and tabs (``\\n``, ``\\t``), so that a value stays on its line."""
    pattern = _VALUE_CONTROLS if in_value else _MESSAGE_CONTROLS
    return pattern.sub(_escaped, text) if pattern.search(text) else text


def text_block(label: str, level: str, lines: list[str], when: datetime | None = None) -> str:
    """The spec's text lines, ``[2024-01-15 14:30:25] TRAINING - INFO - <line>``, one per line of
    ``lines``, joined by newlines: written as one record, so that an event's lines stay together.
    (A line that itself holds newlines, a traceback, continues without the prefix; other control
    characters are escaped.)"""
    prefix = f"[{_stamp(when)}] {label} - {level} - "
    return escape_controls("\n".join(prefix + line for line in lines))


_STAMP_CACHE: list = [None, ""]  # (the second, its text): many records share one second


def _stamp(when: datetime | None) -> str:
    when = when or datetime.now()
    second = when.replace(microsecond=0)
    if _STAMP_CACHE[0] != second:
        _STAMP_CACHE[0], _STAMP_CACHE[1] = second, second.strftime("%Y-%m-%d %H:%M:%S")
    return _STAMP_CACHE[1]


def to_number(value: Any) -> Any:
    """A 0-d tensor or numpy scalar becomes its Python number; anything else is returned unchanged."""
    try:
        item = getattr(value, "item", None)
        if item is not None and getattr(value, "ndim", None) == 0:
            return item()
    except Exception:
        pass
    return value


def is_finite_number(value: Any) -> bool:
    value = to_number(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def is_non_finite_float(value: Any) -> bool:
    value = to_number(value)
    return isinstance(value, float) and not math.isfinite(value)


def fmt_epoch(epoch: Any) -> str:
    """``1`` for a whole epoch, else two decimals without trailing zeros (``0.52``, ``2.5``)."""
    epoch = to_number(epoch)
    if epoch is None:
        return "n/a"
    if not is_finite_number(epoch):
        return fmt_value(epoch)
    text = f"{float(epoch):.2f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def fmt_value(value: Any, float_format: str = ".6f") -> str:
    """One value of a ``k=v`` list: ints as ints, floats with ``float_format``, arrays and tensors as
    lists, enums as their value, anything else as its ``str`` (control characters and newlines
    escaped: a value stays on its line)."""
    value = to_number(value)
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        try:
            return str(value)
        except ValueError:  # more digits than Python converts
            return f"<int of {value.bit_length()} bits>"
    if isinstance(value, float):
        return format(value, float_format) if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return fmt_value(value.value, float_format)
    if isinstance(value, str):
        return escape_controls(value, in_value=True)
    if hasattr(value, "tolist") or isinstance(value, (list, tuple, set, frozenset)):
        return escape_controls(safe_str(to_jsonable(value)), in_value=True)
    return escape_controls(safe_str(value), in_value=True)


# A value named with one of these words counts things (num_tokens, num_input_tokens_seen, total_flos,
# train_samples, collate_calls, max_steps): a whole float there is a count and prints as an integer.
_COUNT_WORDS = frozenset({"num", "count", "counts", "tokens", "flos", "step", "steps", "samples", "examples", "seen",
                          "batches", "calls", "rows", "items", "size"})
# ...unless the name says it is a rate, a share, a mean, a loss or a time (tokens_per_second,
# mean_token_accuracy, total_loss, step_time_s).
_NOT_COUNT_WORDS = frozenset({"per", "rate", "ratio", "pct", "percent", "fraction", "share", "mean", "avg", "average",
                              "accuracy", "loss", "lr", "norm", "time", "runtime", "s", "ms", "sec", "seconds", "mb",
                              "gb", "mib", "gib"})


@functools.lru_cache(maxsize=4096)
def is_count_name(key: str) -> bool:
    """True for names of counts: ``num_tokens``, ``num_input_tokens_seen``, ``total_flos``,
    ``train_samples``, ``global_step``, ``eval/num_tokens``; false for ``tokens_per_second``,
    ``mean_token_accuracy``, ``train_loss``, ``step_time_s``, ``learning_rate``."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)
    words = {word for word in re.split(r"[^a-z0-9]+", spaced.lower()) if word}
    return bool(words & _COUNT_WORDS) and not words & _NOT_COUNT_WORDS


def fmt_count(value: Any, float_format: str = ".6f") -> str:
    """A count: a whole float (``582.0``, as Trainer sends ``num_input_tokens_seen``) as the integer
    ``582``; anything else as :func:`fmt_value` writes it (``582.5`` -> ``582.500000``)."""
    value = to_number(value)
    if type(value) is float and value.is_integer():
        return str(int(value))
    return fmt_value(value, float_format)


def fmt_named(key: str, value: Any, float_format: str = ".6f") -> str:
    """``value`` as :func:`fmt_value` writes it, except that under the name of a count
    (:func:`is_count_name`) a whole float is written as an integer: ``num_tokens=582``, not
    ``num_tokens=582.000000``. Losses, learning rates and other measures stay floats."""
    return fmt_count(value, float_format) if is_count_name(key) else fmt_value(value, float_format)


def plural(count: Any, word: str) -> str:
    """``1 error``, ``2 errors``, ``0 errors``, ``1.5 epochs`` (``count`` as :func:`fmt_count` writes it)."""
    text = fmt_count(count)
    return f"{text} {word}" if text in ("1", "-1") else f"{text} {word}s"


def flatten(values: Mapping[Any, Any], separator: str = ".", prefix: str = "", _depth: int = 0) -> dict[str, Any]:
    """Nested mappings become joined keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; keys become strings."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{safe_str(key)}"
        if isinstance(value, Mapping) and value:
            if _depth < MAX_DEPTH:
                flat.update(flatten(value, separator, f"{name}{separator}", _depth + 1))
            else:
                flat[name] = "<nested too deep>"
        else:
            flat[name] = value
    return flat


def metric_values(values: Mapping[Any, Any]) -> dict[str, Any]:
    """Logged values as the files keep them: string keys, nested mappings (per-class metrics from
    ``compute_metrics``) flattened with ``/``, 0-d tensors and numpy scalars as numbers, secrets masked."""
    masked = mask_mapping(values)
    if all(type(key) is str and type(value) in _SCALARS for key, value in masked.items()):
        return masked  # already flat and plain (the common case, and every second call)
    return {key: to_number(value) for key, value in flatten(masked, "/").items()}


def fmt_pairs(values: Mapping[Any, Any], float_format: str = ".6f") -> str:
    """``{"accuracy": 0.85, "batch_size": 32}`` -> ``accuracy=0.850000, batch_size=32`` (secrets masked,
    nested mappings flattened with ``/``; counts as integers, see :func:`fmt_named`)."""
    return ", ".join(f"{key}={fmt_named(key, value, float_format)}" for key, value in metric_values(values).items())


def fmt_seconds(value: Any) -> str:
    value = to_number(value)
    return f"{value:.4f}s" if is_finite_number(value) else f"{fmt_value(value)}s"


def fmt_loss(value: Any) -> str:
    value = to_number(value)
    if value is None:
        return "n/a"
    return f"{value:.6f}" if is_finite_number(value) else fmt_value(value)


def progress_lines(epoch: Any, step: Any, loss: Any, learning_rate: Any,
                   validation_loss: Any = None, metrics: Mapping[str, Any] | None = None) -> list[str]:
    """The spec's training-progress lines.

    ``Epoch 1, Step 100: Loss=0.456789, LR=1.00e-04``, then ``Validation Loss: 0.567890`` and
    ``Metrics: accuracy=0.850000, f1_score=0.820000`` when given.
    """
    learning_rate = to_number(learning_rate)
    lr_text = f"{learning_rate:.2e}" if is_finite_number(learning_rate) else fmt_value(learning_rate)
    lines = [f"Epoch {fmt_epoch(epoch)}, Step {fmt_count(step)}: Loss={fmt_loss(loss)}, LR={lr_text}"]
    lines += evaluation_lines(validation_loss, metrics)
    return lines


def evaluation_lines(validation_loss: Any = None, metrics: Mapping[str, Any] | None = None,
                     loss_label: str = "Validation Loss") -> list[str]:
    """``Validation Loss: 0.567890`` (``loss_label`` for other splits) and ``Metrics: k=v, ...``."""
    lines = []
    if validation_loss is not None:
        lines.append(f"{loss_label}: {fmt_loss(validation_loss)}")
    if metrics:
        lines.append(f"Metrics: {fmt_pairs(metrics)}")
    return lines


def performance_lines(operation: str, duration_s: Any, memory_mb: Any = None, gpu_util_pct: Any = None,
                      additional: Mapping[str, Any] | None = None) -> list[str]:
    """``forward_pass completed in 0.0500s``, ``Memory usage: 128.50MB``, ``GPU utilization: 45.20%``,
    ``Additional metrics: batch_size=32, sequence_length=512``."""
    lines = [f"{safe_str(operation)} completed in {fmt_seconds(duration_s)}"]
    if memory_mb is not None:
        lines.append(f"Memory usage: {fmt_value(memory_mb, '.2f')}MB")
    if gpu_util_pct is not None:
        lines.append(f"GPU utilization: {fmt_value(gpu_util_pct, '.2f')}%")
    if additional:
        lines.append(f"Additional metrics: {fmt_pairs(additional)}")
    return lines


def data_loading_lines(operation: str, dataset_size: Any, batch_size: Any, duration_s: Any,
                       memory_mb: Any = None) -> list[str]:
    """``dataset_creation: Dataset size=1000, Batch size=32, Duration=0.5000s``, ``Memory usage: 128.00MB``."""
    lines = [f"{safe_str(operation)}: Dataset size={fmt_value(dataset_size)}, Batch size={fmt_value(batch_size)}, "
             f"Duration={fmt_seconds(duration_s)}"]
    if memory_mb is not None:
        lines.append(f"Memory usage: {fmt_value(memory_mb, '.2f')}MB")
    return lines


def error_lines(error: Any, context: str = "", operation: str = "",
                additional_info: Mapping[str, Any] | None = None) -> list[str]:
    """``Error in forward_pass: ValueError: Invalid input format``, ``Context: ...``, ``Additional info: ...``."""
    where = f"Error in {safe_str(operation)}" if operation else "Error"
    # one line each (a message's newlines as \\n): the full message is in the traceback
    lines = [f"{where}: {type(error).__name__}: {escape_controls(safe_str(error), in_value=True)}"]
    if context:
        lines.append(f"Context: {escape_controls(safe_str(context), in_value=True)}")
    if additional_info:
        lines.append(f"Additional info: {fmt_pairs(additional_info)}")
    return lines


def traceback_text(error: Any, hide_files: tuple[str, ...] = ()) -> str | None:
    """The standard traceback of ``error`` (no local variable values), without the trailing newline;
    frames from files in ``hide_files`` (our own wrappers) are left out. ``None`` when ``error`` is
    not a raised exception."""
    if not isinstance(error, BaseException) or error.__traceback__ is None:
        return None
    try:
        report = traceback.TracebackException.from_exception(error)
        if hide_files:
            report.stack = traceback.StackSummary.from_list(
                [frame for frame in report.stack if frame.filename not in hide_files])
        return "".join(report.format()).rstrip("\n")
    except Exception:
        return f"<traceback of {type(error).__name__} could not be formatted>"


def summary_lines(total_epochs: Any, total_steps: Any, final_loss: Any, best_loss: Any,
                  training_duration_s: Any, early_stopping_triggered: bool,
                  extra: Mapping[str, Any] | None = None) -> list[str]:
    """The spec's ``TRAINING SUMMARY`` block framed by 80 ``=``; ``extra`` lines go before the closing rule."""
    lines = [
        RULE,
        "TRAINING SUMMARY",
        RULE,
        f"Total epochs: {fmt_epoch(total_epochs)}",
        f"Total steps: {fmt_count(total_steps)}",
        f"Final loss: {fmt_loss(final_loss)}",
        f"Best loss: {fmt_loss(best_loss)}",
        f"Training duration: {fmt_value(_as_float(training_duration_s), '.2f')}s",
        f"Early stopping triggered: {bool(early_stopping_triggered)}",
    ]
    for key, value in metric_values(extra or {}).items():
        lines.append(f"{key}: {fmt_named(key, value)}")
    lines.append(RULE)
    return lines


def _as_float(value: Any) -> Any:
    value = to_number(value)
    return float(value) if is_finite_number(value) else value


def hyperparameter_lines(config: Mapping[str, Any]) -> list[str]:
    """A ``HYPERPARAMETERS`` block framed like the summary, one ``key: value`` line per flattened key."""
    lines = [RULE, "HYPERPARAMETERS", RULE]
    lines += [f"{key}: {fmt_value(value, 'g')}" for key, value in flatten(config).items()]
    lines.append(RULE)
    return lines


def _huge_int_text(value: int) -> str:
    """The decimal text of an int too large for a float (or a description, past Python's digit limit)."""
    try:
        return str(value)
    except ValueError:
        return f"<int of {value.bit_length()} bits>"


def to_jsonable(value: Any, _depth: int = 0) -> Any:
    """A value ``json.dumps`` accepts under ``allow_nan=False``.

    Tensors and numpy values become numbers or lists, NaN and infinities become ``None``, ints
    beyond 64 bits become floats (beyond a float's range: their decimal text), mappings and sequences are converted recursively (keys become
    strings), dataclasses and objects with ``to_dict()`` (quantization configs) become dicts, enums
    their value, and anything else its ``str``.
    """
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is float:
        return value if math.isfinite(value) else None
    value = to_number(value)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if -(2**63) <= value < 2**63:
            return value
        if value.bit_length() < 1024:
            return float(value)
        return _huge_int_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if _depth > MAX_DEPTH:
        return "<nested too deep>"
    if isinstance(value, Mapping):
        return {safe_str(key): to_jsonable(item, _depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(item, _depth + 1) for item in value]
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, _depth + 1)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    try:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
            return to_jsonable(fields, _depth + 1)
        for method in ("tolist", "to_dict"):
            convert = getattr(value, method, None)
            if callable(convert) and not isinstance(value, type):
                return to_jsonable(convert(), _depth + 1)
    except Exception:
        pass
    return safe_str(value)  # a meta tensor is described, not printed


def iso_time(at: datetime | None = None) -> str:
    """``at`` (default now, local time with its UTC offset) as the JSON records write it: ISO 8601, ms."""
    return (at or datetime.now().astimezone()).isoformat(timespec="milliseconds")


def json_line(event: str, run_id: str, global_step: Any, epoch: Any, values: Mapping[Any, Any],
              time: datetime | None = None) -> str:
    """One strict JSON object (no NaN/Infinity tokens, no line break of any kind) for
    ``performance_metrics_*.log``.

    Keys: ``time`` (ISO 8601 with UTC offset), ``run_id``, ``event``, ``global_step``, ``epoch``,
    then ``values`` (secrets masked: by key, and in every string value by known value and shape); a value named like one of those five is kept as ``user_<key>``,
    unless it equals the record's own.
    """
    record: dict[str, Any] = {
        "time": iso_time(time),
        "run_id": run_id,
        "event": event,
        "global_step": to_jsonable(global_step),
        "epoch": to_jsonable(epoch),
    }
    for key, value in mask_mapping(values).items():
        key = key if type(key) is str else safe_str(key)
        kind = type(value)  # orjson writes these as they are (NaN and infinities as null)
        plain = kind is float or kind is str or kind is bool or value is None or (kind is int and -(2**63) <= value < 2**63)
        value = value if plain else to_jsonable(value)
        if type(value) is str:  # masked as decoded text: a quote inside is not yet JSON-escaped
            value = REDACTOR(value)
        if key in RESERVED_JSON_KEYS:
            if record[key] == value:
                continue  # the record says it already
            key = f"user_{key}"
        record[key] = value
    try:
        text = orjson.dumps(record).decode()  # compact, UTF-8
    except TypeError:  # an int beyond 64 bits
        text = orjson.dumps(to_jsonable(record)).decode()
    for raw, escaped in _LINE_BREAKS.items():
        if raw in text:
            text = text.replace(raw, escaped)
    return text
