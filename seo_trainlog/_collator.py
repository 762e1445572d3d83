from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import Any

from ._timing import COLLATE_STATS


class TimedDataCollator:
    """Wraps any data collator and times every call.

    Works with a ``DataCollatorWithPadding``, ``default_data_collator`` or any plain function that
    takes a list of features. It returns exactly what the wrapped collator returns (the same
    object), passes extra arguments through (``return_tensors=...``), and reads and sets other
    attributes on the wrapped collator. Each call's wall time (``time.perf_counter``, seconds) and
    batch size are added to a process-wide accumulator that :class:`~seo_trainlog.TrainLogCallback`
    writes to ``data_loading_<stamp>.log`` and the JSON metrics at every logging step
    (``collate_calls``, ``collate_time_s``, ``collate_mean_ms``, ``collate_max_ms``).

    When the wrapped collator raises, the error is written to the open run's error logs with its
    context (batch size and feature keys, never feature values) and re-raised unchanged.

    The wrapper holds only the wrapped collator, so it pickles whenever that one does (DataLoader
    workers started with ``spawn``). Timings of calls inside DataLoader worker processes stay in
    those processes.

    Args:
        collator: the callable to wrap.

    Raises:
        TypeError: if ``collator`` is not callable.
    """

    def __init__(self, collator: Callable[..., Any]) -> None:
        if not callable(collator):
            raise TypeError(f"TimedDataCollator needs a callable collator, got {type(collator).__name__}")
        object.__setattr__(self, "collator", collator)

    def __call__(self, features: Any, *args: Any, **kwargs: Any) -> Any:
        start = perf_counter()
        try:
            batch = self.collator(features, *args, **kwargs)
        except Exception as error:
            _report_collate_error(error, features)
            raise
        elapsed = perf_counter() - start
        try:
            samples = len(features)
        except TypeError:
            samples = 0
        COLLATE_STATS.add(elapsed, samples)
        return batch

    def __getattr__(self, name: str) -> Any:
        if name == "collator":  # not yet set (during unpickling)
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "collator":
            object.__setattr__(self, name, value)
        else:
            setattr(self.collator, name, value)

    def __getstate__(self) -> dict[str, Any]:
        return {"collator": self.collator}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "collator", state["collator"])

    def __repr__(self) -> str:
        return f"TimedDataCollator({self.collator!r})"


def _report_collate_error(error: Exception, features: Any) -> None:
    from ._logger import innermost_open_logger

    tlog = innermost_open_logger(joinable_only=False)
    if tlog is None:
        return
    try:
        batch_size = len(features)
    except TypeError:
        batch_size = "n/a"
    try:
        first = next(iter(features))
        keys = sorted(map(str, first.keys())) if hasattr(first, "keys") else type(first).__name__
    except Exception:
        keys = "n/a"
    tlog.log_error(error, operation="collate", context="the data collator failed on a batch",
                   additional_info={"batch_size": batch_size, "feature_keys": keys})
