from __future__ import annotations

import copy
import multiprocessing
from collections.abc import Callable, Mapping
from multiprocessing.context import get_spawning_popen
from queue import Empty
from time import perf_counter
from typing import Any

from torch.utils.data import get_worker_info

from .timing import CollateSums, thread_sums


class TimedDataCollator:
    """Wraps any data collator and times every call.

    Works with a ``DataCollatorWithPadding``, ``default_data_collator`` or any plain function that
    takes a list of features. It returns exactly what the wrapped collator returns (the same
    object), passes extra arguments through (``return_tensors=...``), and reads and sets other
    attributes on the wrapped collator. Each call's wall time (``time.perf_counter``, seconds) and
    batch size belong to the run of the Trainer that uses it: :class:`~seo_trainlog.TrainLogCallback`
    attaches the Trainer's ``data_collator`` to its run at train begin, and a call made in a thread
    where a run is training belongs to that run. The sums are written to ``data_loading_<stamp>.log``
    and the JSON metrics at every logging step (``collate_calls``, ``collate_time_s``,
    ``collate_mean_ms``, ``collate_max_ms``, ``collate_samples``); batches collated while the Trainer
    evaluates are counted in the evaluation's record, never in a training interval.

    Tokens: each returned batch's tokens are counted with one tensor sum per array: the non-padding
    tokens (``.sum()``) of every 2-D array whose key ends in ``attention_mask`` (``attention_mask``,
    sentence-transformers' ``anchor_attention_mask`` and ``positive_attention_mask``...), else every
    element (``numel()``) of each array whose key ends in ``input_ids``; its padded length is the last
    dimension (:func:`count_tokens`). A batch with no such array (not a mapping, plain lists) is not
    counted (said once in ``data_loading_<stamp>.log``). The callback
    hands the counts to the optimizer step that trained on those batches (in the order the batches
    were collated; see the README's "Tokens and MFU" for the train records' ``num_input_tokens_seen``,
    ``tokens_per_second`` and ``mfu_pct``).

    When the wrapped collator raises, the error is written to the error logs of the run the call
    belongs to, with its context (batch size and feature keys, never feature values), and re-raised
    unchanged.

    The wrapper holds only the wrapped collator, so it pickles whenever that one does (DataLoader
    workers started with ``spawn``); ``copy.copy``/``copy.deepcopy`` give a wrapper attached to no run.
    With ``dataloader_num_workers > 0`` the callback gives it a queue (:meth:`enable_worker_timings`):
    each worker sends every call's timing as it returns the batch, so that every batch is counted
    exactly once in the main process (fork and spawn, persistent workers and repeated ``train()``
    calls alike).

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
            if get_worker_info() is not None:  # a DataLoader worker never writes the run's files itself
                queue = self.__dict__.get("_worker_queue")
                if queue is not None:
                    queue.put(("error", _error_info(error, features)))
            else:
                _report_collate_error(error, features, self._owner())
            raise
        elapsed = perf_counter() - start
        try:
            samples = len(features)
        except TypeError:
            samples = 0
        tokens, length = count_tokens(batch)
        attributes = self.__dict__
        queue = attributes.get("_worker_queue")
        worker = get_worker_info() if queue is not None else None
        if worker is not None:
            phase = attributes.get("_worker_phase") or self._phase()
            # before the batch leaves this worker
            queue.put((phase, (1, elapsed, elapsed, samples, tokens, length, worker.id)))
            return batch
        sums = self._owner()
        if sums is not None:
            sums.current().add(elapsed, samples, tokens, length)
        return batch

    def _owner(self) -> CollateSums | None:
        """The sums a call belongs to: the run training in this thread's, else the attached run's."""
        return thread_sums() or self.__dict__.get("_sums")

    def _phase(self) -> str:
        sums = self._owner()
        return sums.phase if sums is not None else "train"

    def attach(self, sums: CollateSums | None) -> None:
        """Count this collator's calls in ``sums`` (a run's :class:`~seo_trainlog.watch.timing.CollateSums`;
        None: in no run's). Called by :class:`~seo_trainlog.TrainLogCallback` at train begin."""
        object.__setattr__(self, "_sums", sums)

    def enable_worker_timings(self, context: str | None = None) -> None:
        """Let DataLoader worker processes send their timings back (see the class docstring).

        Args:
            context: the DataLoader's multiprocessing context name (``fork``, ``spawn``...), None
                for the default.
        """
        if self.__dict__.get("_worker_queue") is None:
            object.__setattr__(self, "_worker_queue", multiprocessing.get_context(context).Queue())

    def drain_worker_timings(self, settle_s: float = 0.0) -> None:
        """Add the timings the workers sent so far to the attached run's sums.

        Args:
            settle_s: after the queue is empty, wait up to this long (seconds) for timings still on
                their way (a worker sends a batch's timing just before the batch itself).
        """
        queue = self.__dict__.get("_worker_queue")
        sums = self.__dict__.get("_sums")
        if queue is None:
            return
        errors: dict[tuple[str, str], dict[str, Any]] = {}
        try:
            self._drain(queue, sums, settle_s, errors)
        finally:
            for info in errors.values():  # each distinct failure once, with how many batches it hit
                _report_worker_error(info, sums)

    @staticmethod
    def _drain(queue, sums: CollateSums | None, settle_s: float, errors: dict[tuple[str, str], dict[str, Any]]) -> None:
        while True:
            try:
                phase, values = queue.get_nowait()
            except Empty:
                if settle_s <= 0:
                    return
                try:
                    phase, values = queue.get(timeout=settle_s)
                except Empty:
                    return
            except (OSError, ValueError, EOFError):  # a queue closed under us
                return
            if phase == "error":
                key = (values["error_type"], values["message"])
                if key in errors:
                    errors[key]["batches_failed"] += 1
                else:
                    errors[key] = {**values, "batches_failed": 1}
            elif sums is not None:
                sums.add_sums(phase, values)

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
            state["_worker_phase"] = self._phase()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)

    def __copy__(self) -> TimedDataCollator:
        return TimedDataCollator(self.collator)

    def __deepcopy__(self, memo: dict[int, Any]) -> TimedDataCollator:
        return TimedDataCollator(copy.deepcopy(self.collator, memo))

    def __repr__(self) -> str:
        return f"TimedDataCollator({self.collator!r})"


def count_tokens(batch: Any) -> tuple[int | None, int]:
    """``(tokens, padded length)`` of a collated batch (a mapping): the non-padding tokens of every 2-D
    array whose key ends in ``attention_mask`` (``attention_mask``; sentence-transformers'
    ``anchor_attention_mask``, ``positive_attention_mask``...), one tensor sum each; when there is none,
    every element of each array whose key ends in ``input_ids`` (``numel()``). The padded length is
    the arrays' last dimension, weighted by their tokens when there are several. ``(None, 0)`` when
    the batch has no such array (not a mapping, plain lists, ``inputs_embeds`` only) or one cannot be
    counted. Raises nothing."""
    if not isinstance(batch, Mapping):
        return None, 0
    try:  # never the user's training stopped by a count: an odd array is not counted
        arrays = [value for key, value in batch.items()
                  if isinstance(key, str) and key.endswith("attention_mask") and getattr(value, "ndim", None) == 2]
        if arrays:
            counts = [(int(mask.sum()), int(mask.shape[-1])) for mask in arrays]
        else:
            arrays = [value for key, value in batch.items() if isinstance(key, str) and key.endswith("input_ids")
                      and len(getattr(value, "shape", None) or ()) > 0]
            counts = [(int(ids.numel() if callable(getattr(ids, "numel", None)) else ids.size), int(ids.shape[-1]))
                      for ids in arrays]
        if counts:
            tokens = sum(count for count, _ in counts)
            if len(counts) == 1:
                return tokens, counts[0][1]
            length = round(sum(count * width for count, width in counts) / tokens) if tokens else \
                max(width for _, width in counts)
            return tokens, length
    except Exception:
        pass
    return None, 0


def _batch_facts(features: Any) -> dict[str, Any]:
    """The batch size and the feature keys of a batch (never feature values)."""
    try:
        batch_size = len(features)
    except TypeError:
        batch_size = "n/a"
    try:
        first = next(iter(features))
        keys = sorted(map(str, first.keys())) if hasattr(first, "keys") else type(first).__name__
    except Exception:
        keys = "n/a"
    return {"batch_size": batch_size, "feature_keys": keys}


def _run_logger(sums: CollateSums | None):
    from ..record.logger import innermost_open_logger

    tlog = sums.logger if sums is not None and sums.logger is not None else innermost_open_logger(
        joinable_only=False, this_thread=True)
    return None if tlog is None or tlog.closed else tlog


def _report_collate_error(error: Exception, features: Any, sums: CollateSums | None) -> None:
    tlog = _run_logger(sums)
    if tlog is not None:
        tlog.log_error(error, operation="collate", context="the data collator failed on a batch",
                       additional_info=_batch_facts(features))


def _error_info(error: Exception, features: Any) -> dict[str, Any]:
    """What a worker sends of a collator's failure (picklable, no feature values)."""
    from ..record.format import safe_str

    info = get_worker_info()
    return {"error_type": type(error).__name__, "message": safe_str(error),
            "worker_id": info.id if info is not None else None, **_batch_facts(features)}


def _report_worker_error(info: dict[str, Any], sums: CollateSums | None) -> None:
    """A failure a DataLoader worker sent: an error of the run, written by the main process (the
    DataLoader re-raises it in the training loop, where it is logged again with its traceback)."""
    tlog = _run_logger(sums)
    if tlog is None:
        return
    error = type(str(info["error_type"]), (Exception,), {})(info["message"])  # named as the worker's
    details = {key: info[key] for key in ("batch_size", "feature_keys", "worker_id", "batches_failed")}
    tlog.log_error(error, operation="collate", context="the data collator failed on a batch in a DataLoader worker",
                   additional_info=details)
