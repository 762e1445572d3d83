"""Cheap accumulators for the hot path: arithmetic and assignments only, read at logging steps."""

from __future__ import annotations

import threading
from collections import deque


class StepTimer:
    """Wall time of optimizer steps and of the waits between them.

    ``mark(now)`` notes the end of any Trainer event between two steps (step end, log, evaluation,
    save); ``step_begin(now)`` adds the time since the last mark to the data wait (the loop was
    fetching and collating the next batches), ``step_end(now)`` adds the time since ``step_begin`` to
    the step time (forward, backward, optimizer). ``new_epoch()``: the first step of an epoch has no
    step before it, so no wait is counted for it (the data loader's start-up is in the epoch's time).
    Times come from ``time.perf_counter`` (seconds).

    The hot path: instead of calling ``step_begin``/``step_end``, the callback appends
    ``perf_counter()`` at a step's begin and ``-perf_counter()`` at its end to :attr:`marks` (two C
    calls a step); every other method first folds them in (:meth:`fold`), in order. With
    :attr:`ended` a list, each folded step is also kept there, as its two marks (``begin, -end``:
    the per-step DEBUG lines, see :func:`step_times`).
    """

    __slots__ = ("_steps", "step_time_s", "data_wait_s", "total_step_time_s", "total_data_wait_s", "_last_mark",
                 "_step_started", "marks", "ended")

    def __init__(self) -> None:
        self._steps = 0
        self.step_time_s = 0.0
        self.data_wait_s = 0.0
        self.total_step_time_s = 0.0
        self.total_data_wait_s = 0.0
        self._last_mark: float | None = None
        self._step_started: float | None = None
        self.marks: list[float] = []  # perf_counter() at a step's begin, -perf_counter() at its end
        self.ended: list[tuple[float, float]] | None = None

    @property
    def steps(self) -> int:
        """Steps ended since the last :meth:`drain`."""
        self.fold()
        return self._steps

    def fold(self) -> None:
        """Add the steps of :attr:`marks` (begins positive, ends negative: ``perf_counter`` is never
        zero on Linux, macOS or Windows) to the interval, in order, and empty it."""
        marks = self.marks
        if not marks:
            return
        last, started, ended = self._last_mark, self._step_started, self.ended
        wait = busy = 0.0
        steps = 0
        for at in marks:
            if at > 0:  # a step begins
                if last is not None:
                    wait += at - last
                started = at
            else:  # a step ends
                at = -at
                elapsed = at - started if started is not None else 0.0
                busy += elapsed
                steps += 1
                if ended is not None:
                    ended += (started if started is not None else at, -at)
                started, last = None, at
        marks.clear()
        self._last_mark, self._step_started = last, started
        self.data_wait_s += wait
        self.step_time_s += busy
        self._steps += steps

    def mark(self, now: float) -> None:
        self.fold()
        self._last_mark = now

    def new_epoch(self) -> None:
        self.fold()
        self._last_mark = None

    def step_begin(self, now: float) -> None:
        self.marks.append(now)

    def step_end(self, now: float) -> float:
        """Note the step's end; returns its step time (seconds; 0.0 without a begin)."""
        self.fold()
        started = self._step_started
        self.marks.append(-now)
        return now - started if started is not None else 0.0

    def drain(self, samples_per_step: int) -> dict[str, float | int]:
        """The interval's aggregate, then reset: ``steps``, mean ``step_time_s`` and ``data_wait_s``,
        ``data_wait_pct`` (share of step + wait time), ``samples_per_second``. Empty if no step ran."""
        self.fold()
        steps, step_time, wait = self._steps, self.step_time_s, self.data_wait_s
        self._steps, self.step_time_s, self.data_wait_s = 0, 0.0, 0.0
        self.total_step_time_s += step_time
        self.total_data_wait_s += wait
        if steps == 0:
            return {}
        busy = step_time + wait
        return {
            "steps": steps,
            "step_time_s": step_time / steps,
            "data_wait_s": wait / steps,
            "data_wait_pct": 100.0 * wait / busy if busy > 0 else 0.0,
            "samples_per_second": steps * samples_per_step / busy if busy > 0 else 0.0,
            "interval_s": busy,
        }

    def take_ended(self) -> list[float]:
        """The marks of the steps kept in :attr:`ended` since the last call (``begin, -end`` each),
        and forget them."""
        self.fold()
        ended = self.ended
        if not ended:
            return []
        self.ended = []
        return ended

    def total_data_wait_pct(self) -> float | None:
        """Share (percent) of all drained step + wait time that was data wait; None before any step."""
        busy = self.total_step_time_s + self.total_data_wait_s
        return 100.0 * self.total_data_wait_s / busy if busy > 0 else None


class IntervalSums:
    """The step timing and collate sums of the logging intervals since the last text detail block,
    so that a block can cover several logging steps (``LogConfig.detail_interval_s``)."""

    __slots__ = ("first_step", "last_step", "steps", "step_time_s", "data_wait_s", "busy_s", "samples",
                 "collate_calls", "collate_time_s", "collate_max_ms", "collate_samples")

    def __init__(self) -> None:
        self.first_step: int | None = None
        self.last_step = 0
        self.steps = 0
        self.step_time_s = self.data_wait_s = self.busy_s = self.samples = 0.0
        self.collate_calls = self.collate_samples = 0
        self.collate_time_s = self.collate_max_ms = 0.0

    def add(self, first_step: int, last_step: int, timing: dict, collate: dict) -> None:
        if self.first_step is None:
            self.first_step = first_step
        self.last_step = last_step
        if timing:
            steps = timing["steps"]
            self.steps += steps
            self.step_time_s += timing["step_time_s"] * steps
            self.data_wait_s += timing["data_wait_s"] * steps
            self.busy_s += timing["interval_s"]
            self.samples += timing["samples_per_second"] * timing["interval_s"]
        if collate:
            self.collate_calls += collate["collate_calls"]
            self.collate_time_s += collate["collate_time_s"]
            self.collate_samples += collate["collate_samples"]
            self.collate_max_ms = max(self.collate_max_ms, collate["collate_max_ms"])

    @property
    def empty(self) -> bool:
        return self.first_step is None

    def take(self) -> tuple[int, int, dict, dict]:
        """``(first_step, last_step, timing, collate)`` in the shapes of :meth:`StepTimer.drain` and
        :meth:`CollateStats.drain` (empty dicts where nothing was added); then reset."""
        first, last = self.first_step or 0, self.last_step
        timing: dict = {}
        if self.steps:
            busy = self.busy_s
            timing = {"steps": self.steps, "step_time_s": self.step_time_s / self.steps,
                      "data_wait_s": self.data_wait_s / self.steps,
                      "data_wait_pct": 100.0 * self.data_wait_s / busy if busy > 0 else 0.0,
                      "samples_per_second": self.samples / busy if busy > 0 else 0.0, "interval_s": busy}
        collate: dict = {}
        if self.collate_calls:
            collate = {"collate_calls": self.collate_calls, "collate_time_s": self.collate_time_s,
                       "collate_mean_ms": 1000.0 * self.collate_time_s / self.collate_calls,
                       "collate_max_ms": self.collate_max_ms, "collate_samples": self.collate_samples}
        self.__init__()
        return first, last, timing, collate


class CollateStats:
    """Calls and seconds spent in :class:`~seo_trainlog.TimedDataCollator` since the last drain, and
    the token counts of the batches it returned.

    ``pending`` (the train phase only, else None): per collating process (``0``: the main process or
    DataLoader worker 0, ``w``: worker ``w``), ``(tokens, padded length)`` of each counted batch in
    the order it collated them, until :meth:`take` hands them to the step that used them; a batch with
    neither ``attention_mask`` nor ``input_ids`` adds to ``untokenised`` instead."""

    __slots__ = ("calls", "total_s", "max_s", "samples", "pending", "untokenised")

    def __init__(self, pending: dict[int, deque] | None = None) -> None:
        self.calls = 0
        self.total_s = 0.0
        self.max_s = 0.0
        self.samples = 0
        self.pending = pending
        self.untokenised = 0

    def add(self, elapsed_s: float, samples: int, tokens: int | None = None, length: int = 0, worker: int = 0) -> None:
        self.calls += 1
        self.total_s += elapsed_s
        self.samples += samples
        if elapsed_s > self.max_s:
            self.max_s = elapsed_s
        if tokens is None:
            self.untokenised += 1
        elif self.pending is not None:
            self._queue(worker).append((tokens, length))

    def _queue(self, worker: int) -> deque:
        queue = self.pending.get(worker)
        if queue is None:
            queue = self.pending[worker] = deque(maxlen=PENDING_BATCHES)
        return queue

    def merge(self, sums: tuple) -> None:
        """Add ``(calls, total_s, max_s, samples[, tokens, length, worker id])`` summed elsewhere (a
        DataLoader worker sends one call's: ``tokens`` None when the batch had no tokens to count)."""
        calls, total_s, max_s, samples = sums[:4]
        self.calls += calls
        self.total_s += total_s
        self.samples += samples
        if max_s > self.max_s:
            self.max_s = max_s
        if len(sums) > 4:
            if sums[4] is None:
                self.untokenised += calls
            elif self.pending is not None:
                self._queue(sums[6]).append((sums[4], sums[5]))

    def take(self, batches: int, first: int = 0, workers: int = 1) -> tuple[int, int, int]:
        """Pop the counts of the DataLoader's batches ``first`` to ``first + batches - 1`` (indices in
        the current epoch; batch ``i`` comes from worker ``i % workers``, the DataLoader's round
        robin), stopping at the first one not arrived yet: ``(batches taken, tokens, sum of their
        padded lengths)``."""
        taken = tokens = length = 0
        pending = self.pending or {}
        workers = max(1, workers)
        while taken < batches:
            queue = pending.get((first + taken) % workers)
            if not queue:
                break
            count, size = queue.popleft()
            taken += 1
            tokens += count
            length += size
        return taken, tokens, length

    def pending_batches(self) -> int:
        return sum(map(len, (self.pending or {}).values()))

    def drain(self) -> dict[str, float | int]:
        """``collate_calls``, ``collate_time_s`` (total), ``collate_mean_ms``, ``collate_max_ms``,
        ``collate_samples``; then reset (the pending token counts stay). Empty if there was no call."""
        calls, total, peak, samples = self.calls, self.total_s, self.max_s, self.samples
        self.calls, self.total_s, self.max_s, self.samples = 0, 0.0, 0.0, 0
        if calls == 0:
            return {}
        return {"collate_calls": calls, "collate_time_s": total, "collate_mean_ms": 1000.0 * total / calls,
                "collate_max_ms": 1000.0 * peak, "collate_samples": samples}


PENDING_BATCHES = 1 << 18


class CollateSums:
    """The collate timings of one :class:`~seo_trainlog.TrainLogCallback` (its Trainer's runs), kept
    apart by phase: batches collated while the Trainer evaluates (``phase == "eval"``, set around
    its evaluation loop) go to ``eval``, every other batch to ``train``. ``logger`` is the open run's
    :class:`~seo_trainlog.TrainLogger` (where a collator's error is written), None between runs."""

    __slots__ = ("train", "eval", "phase", "logger")

    def __init__(self) -> None:
        # bounded: between a run's logging steps only their batches wait here; outside a run (predict()
        # with the train phase) nobody takes them, and the oldest go
        self.train = CollateStats({})
        self.eval = CollateStats()
        self.phase = "train"
        self.logger = None

    def current(self) -> CollateStats:
        return self.eval if self.phase == "eval" else self.train

    def add_sums(self, phase: str, sums: tuple) -> None:
        (self.eval if phase == "eval" else self.train).merge(sums)

    def discard(self) -> None:
        """Forget every sum (the calls before a run are not the run's)."""
        for stats in (self.train, self.eval):
            stats.drain()
            stats.untokenised = 0
        self.train.pending.clear()

    def drain_all(self) -> dict[str, float | int]:
        """Both phases' sums as one :meth:`CollateStats.drain` result (outside a run), then reset."""
        evaluation = self.eval
        self.train.merge((evaluation.calls, evaluation.total_s, evaluation.max_s, evaluation.samples))
        evaluation.drain()
        self.train.pending.clear()
        return self.train.drain()


_THREAD = threading.local()


def bind_thread(sums: CollateSums | None) -> None:
    """Collations in this thread (the Trainer's training loop, ``dataloader_num_workers=0``) belong
    to ``sums`` from now on (None: to no run)."""
    _THREAD.sums = sums


def thread_sums() -> CollateSums | None:
    """The :class:`CollateSums` of the run training in this thread, if any."""
    return getattr(_THREAD, "sums", None)


def step_times(marks: list[float], last_global_step: int, wall_s: float, now_s: float
               ) -> list[tuple[int, float, float]]:
    """``(global_step, step_time_s, time.time() at the step's end)`` of each step of ``marks``
    (:meth:`StepTimer.take_ended`), the last one being ``last_global_step``; ``wall_s`` and ``now_s``:
    ``time.time()`` and ``time.perf_counter()`` read together (a step's end on the wall clock is
    ``wall_s`` minus its age)."""
    begins, ends = marks[0::2], marks[1::2]
    first = last_global_step - len(ends) + 1
    return [(first + index, -end - begin, wall_s - now_s - end)
            for index, (begin, end) in enumerate(zip(begins, ends))]
