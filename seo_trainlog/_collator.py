from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import Any

from ._timing import COLLATE_STATS


class TimedDataCollator:
    """Wraps any data collator and times every call.

    Works with a ``DataCollatorWithPadding``, ``default_data_collator`` or any plain function that
    takes a list of features. It returns exactly what the wrapped collator returns (the same
    object). Each call's wall time (``time.perf_counter``, seconds) and batch size are added to a
    process-wide accumulator that :class:`~seo_trainlog.TrainLogCallback` writes to
    ``data_loading_<stamp>.log`` and the JSON metrics at every logging step (``collate_calls``,
    ``collate_time_s``, ``collate_mean_ms``, ``collate_max_ms``).

    The wrapper holds only the wrapped collator, so it pickles whenever that one does (DataLoader
    workers started with ``spawn``). Attributes not defined here are read from the wrapped collator.

    Args:
        collator: the callable to wrap.

    Raises:
        TypeError: if ``collator`` is not callable.
    """

    def __init__(self, collator: Callable[[list[Any]], Any]) -> None:
        if not callable(collator):
            raise TypeError(f"TimedDataCollator needs a callable collator, got {type(collator).__name__}")
        self.collator = collator

    def __call__(self, features: list[Any]) -> Any:
        start = perf_counter()
        batch = self.collator(features)
        COLLATE_STATS.add(perf_counter() - start, len(features) if isinstance(features, list) else 1)
        return batch

    def __getattr__(self, name: str) -> Any:
        if name == "collator":  # not yet set (during unpickling)
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __repr__(self) -> str:
        return f"TimedDataCollator({self.collator!r})"
