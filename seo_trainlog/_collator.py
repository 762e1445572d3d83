from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
from collections.abc import Callable
from multiprocessing.context import get_spawning_popen
from queue import Empty
from time import perf_counter
from typing import Any

from torch.utils.data import get_worker_info

from ._timing import COLLATE_STATS, CollateStats

_WORKER_BATCH_CALLS = 32
_WORKER_BATCH_S = 0.5


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
    workers started with ``spawn``). With ``dataloader_num_workers > 0`` the callback gives it a
    queue (:meth:`enable_worker_timings`): each worker sums its calls and sends the sums every 32
    calls, every 0.5 s and when it exits, so that every batch is counted exactly once in the main
    process (fork and spawn alike).

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
        queue = self.__dict__.get("_worker_queue")
        if queue is not None and get_worker_info() is not None:
            _worker_stats(queue).add(elapsed, samples)
        else:
            COLLATE_STATS.add(elapsed, samples)
        return batch

    def enable_worker_timings(self, context: str | None = None) -> None:
        """Let DataLoader worker processes send their timings back (see the class docstring).

        Args:
            context: the DataLoader's multiprocessing context name (``fork``, ``spawn``...), None
                for the default.
        """
        if self.__dict__.get("_worker_queue") is None:
            object.__setattr__(self, "_worker_queue", multiprocessing.get_context(context).Queue())

    def drain_worker_timings(self) -> None:
        """Add the sums the workers sent so far to the process-wide accumulator."""
        queue = self.__dict__.get("_worker_queue")
        while queue is not None:
            try:
                COLLATE_STATS.merge(queue.get_nowait())
            except Empty:
                return

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
        state = {"collator": self.collator}
        if get_spawning_popen() is not None:  # pickled to start a worker process: the queue goes along
            state["_worker_queue"] = self.__dict__.get("_worker_queue")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)

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


class _WorkerStats(CollateStats):
    """A worker's sums, sent to the main process every 32 calls, every 0.5 s and at exit."""

    __slots__ = ("_queue", "_last_sent")

    def __init__(self, queue) -> None:
        super().__init__()
        self._queue = queue
        self._last_sent = perf_counter()
        # runs when the worker process exits normally, before the queue's own finaliser (priority 10)
        multiprocessing.util.Finalize(None, self.send, exitpriority=20)

    def add(self, elapsed_s: float, samples: int) -> None:
        super().add(elapsed_s, samples)
        if self.calls >= _WORKER_BATCH_CALLS or perf_counter() - self._last_sent >= _WORKER_BATCH_S:
            self.send()

    def send(self) -> None:
        if self.calls:
            self._queue.put((self.calls, self.total_s, self.max_s, self.samples))
            self.calls, self.total_s, self.max_s, self.samples = 0, 0.0, 0.0, 0
        self._last_sent = perf_counter()


_WORKER_STATS: dict[int, _WorkerStats] = {}


def _worker_stats(queue) -> _WorkerStats:
    stats = _WORKER_STATS.get(os.getpid())
    if stats is None:
        stats = _WORKER_STATS[os.getpid()] = _WorkerStats(queue)
    return stats

