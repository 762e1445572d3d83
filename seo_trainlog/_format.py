"""Pure formatting: values in, lines out. Nothing here writes or reads a file."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import traceback
from collections.abc import Mapping
from datetime import datetime
from pathlib import PurePath
from typing import Any

RULE = "=" * 80


def to_number(value: Any) -> Any:
    """A 0-d tensor or numpy scalar becomes its Python number; anything else is returned unchanged."""
    item = getattr(value, "item", None)
    if item is not None and getattr(value, "ndim", None) == 0:
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            return value
    return value


def is_finite_number(value: Any) -> bool:
    value = to_number(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt_epoch(epoch: Any) -> str:
    """``1`` for a whole epoch, else two decimals without trailing zeros (``0.52``, ``2.5``)."""
    epoch = to_number(epoch)
    if epoch is None:
        return "n/a"
    if isinstance(epoch, float) and not math.isfinite(epoch):
        return str(epoch)
    text = f"{float(epoch):.2f}".rstrip("0").rstrip(".")
    return text or "0"


def fmt_value(value: Any, float_format: str = ".6f") -> str:
    """One value of a ``k=v`` list: ints as ints, floats with ``float_format``, the rest as ``str``."""
    value = to_number(value)
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(value, float_format) if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def fmt_pairs(values: Mapping[str, Any], float_format: str = ".6f") -> str:
    """``{"accuracy": 0.85, "batch_size": 32}`` -> ``accuracy=0.850000, batch_size=32``."""
    return ", ".join(f"{key}={fmt_value(value, float_format)}" for key, value in values.items())


def fmt_seconds(value: Any) -> str:
    value = to_number(value)
    return f"{value:.4f}s" if is_finite_number(value) else f"{value}s"


def fmt_loss(value: Any) -> str:
    value = to_number(value)
    return f"{value:.6f}" if is_finite_number(value) else ("n/a" if value is None else str(value))


def progress_lines(epoch: Any, step: int, loss: Any, learning_rate: Any,
                   validation_loss: Any = None, metrics: Mapping[str, Any] | None = None) -> list[str]:
    """The spec's training-progress lines.

    ``Epoch 1, Step 100: Loss=0.456789, LR=1.00e-04``, then ``Validation Loss: 0.567890`` and
    ``Metrics: accuracy=0.850000, f1_score=0.820000`` when given.
    """
    learning_rate = to_number(learning_rate)
    lr_text = f"{learning_rate:.2e}" if is_finite_number(learning_rate) else str(learning_rate)
    lines = [f"Epoch {fmt_epoch(epoch)}, Step {step}: Loss={fmt_loss(loss)}, LR={lr_text}"]
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
    lines = [f"{operation} completed in {fmt_seconds(duration_s)}"]
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
    lines = [f"{operation}: Dataset size={fmt_value(dataset_size)}, Batch size={fmt_value(batch_size)}, "
             f"Duration={fmt_seconds(duration_s)}"]
    if memory_mb is not None:
        lines.append(f"Memory usage: {fmt_value(memory_mb, '.2f')}MB")
    return lines


def error_lines(error: BaseException, context: str = "", operation: str = "",
                additional_info: Mapping[str, Any] | None = None) -> list[str]:
    """``Error in forward_pass: ValueError: Invalid input format``, ``Context: ...``, ``Additional info: ...``."""
    where = f"Error in {operation}" if operation else "Error"
    lines = [f"{where}: {type(error).__name__}: {error}"]
    if context:
        lines.append(f"Context: {context}")
    if additional_info:
        lines.append(f"Additional info: {fmt_pairs(additional_info)}")
    return lines


def traceback_text(error: BaseException, hide_files: tuple[str, ...] = ()) -> str:
    """The standard traceback of ``error`` (no local variable values), without the trailing newline;
    frames from files in ``hide_files`` (our own wrappers) are left out."""
    report = traceback.TracebackException.from_exception(error)
    if hide_files:
        report.stack = traceback.StackSummary.from_list(
            [frame for frame in report.stack if frame.filename not in hide_files])
    return "".join(report.format()).rstrip("\n")


def summary_lines(total_epochs: Any, total_steps: Any, final_loss: Any, best_loss: Any,
                  training_duration_s: Any, early_stopping_triggered: bool,
                  extra: Mapping[str, Any] | None = None) -> list[str]:
    """The spec's ``TRAINING SUMMARY`` block framed by 80 ``=``; ``extra`` lines go before the closing rule."""
    lines = [
        RULE,
        "TRAINING SUMMARY",
        RULE,
        f"Total epochs: {fmt_epoch(total_epochs)}",
        f"Total steps: {fmt_value(total_steps)}",
        f"Final loss: {fmt_loss(final_loss)}",
        f"Best loss: {fmt_loss(best_loss)}",
        f"Training duration: {fmt_value(_as_float(training_duration_s), '.2f')}s",
        f"Early stopping triggered: {bool(early_stopping_triggered)}",
    ]
    for key, value in (extra or {}).items():
        lines.append(f"{key}: {fmt_value(value)}")
    lines.append(RULE)
    return lines


def _as_float(value: Any) -> Any:
    value = to_number(value)
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def hyperparameter_lines(config: Mapping[str, Any]) -> list[str]:
    """A ``HYPERPARAMETERS`` block framed like the summary, one ``key: value`` line per flattened key."""
    lines = [RULE, "HYPERPARAMETERS", RULE]
    lines += [f"{key}: {fmt_value(value, 'g')}" for key, value in flatten(config).items()]
    lines.append(RULE)
    return lines


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings become dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def to_jsonable(value: Any) -> Any:
    """A value ``json.dumps`` accepts under ``allow_nan=False``.

    Tensors and numpy values become numbers or lists, NaN and infinities become ``None``, mappings
    and sequences are converted recursively, dataclasses become dicts, enums their value, and
    anything else its ``str``.
    """
    value = to_number(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable({field.name: getattr(value, field.name) for field in dataclasses.fields(value)})
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        try:
            return to_jsonable(tolist())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def json_line(event: str, run_id: str, global_step: int | None, epoch: Any, values: Mapping[str, Any],
              time: datetime | None = None) -> str:
    """One strict JSON object (no NaN/Infinity tokens, no newline) for ``performance_metrics_*.log``.

    Keys: ``time`` (ISO 8601 with UTC offset), ``run_id``, ``event``, ``global_step``, ``epoch``,
    then ``values``; a value never overrides those five.
    """
    record: dict[str, Any] = {
        "time": (time or datetime.now().astimezone()).isoformat(timespec="milliseconds"),
        "run_id": run_id,
        "event": event,
        "global_step": to_jsonable(global_step),
        "epoch": to_jsonable(epoch),
    }
    for key, value in values.items():
        record.setdefault(str(key), to_jsonable(value))
    return json.dumps(record, allow_nan=False, ensure_ascii=False)
