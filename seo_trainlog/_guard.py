"""Seeing an exception escape ``Trainer.train()``, which calls no callback event when it raises.

Callbacks are given neither the trainer nor any exception, so the callback finds its trainer on the
call stack and, for the duration of one run, wraps a few bound methods *of that one instance* (and of
its callback handler): exceptions pass through the wrappers unchanged, after being reported. Nothing
is patched on any class, and :meth:`TrainerGuard.remove` restores every object exactly.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from typing import Any

from ._safety import safe_warn

# Looked up on the trainer by the training loop after ``on_train_begin``, so wrapping them then
# already covers this very ``train()`` call: evaluation on start, every epoch (steps, logging,
# evaluation, checkpoints), the end of training. ``training_step`` (public API) is the fallback for
# Trainer versions without these private methods.
LOOP_METHODS = ("_evaluate", "_run_epoch", "_finalize_training")
FINAL_METHOD = "_finalize_training"
FALLBACK_METHODS = ("training_step",)
_MISSING = object()

Reporter = Callable[[BaseException], None]


def find_trainer(max_depth: int = 16) -> Any | None:
    """The ``transformers.Trainer`` whose method is on the call stack (callbacks are not given it)."""
    from transformers import Trainer

    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


class TrainerGuard:
    """For one run, reports every exception escaping:

    - the trainer's loop methods (``_evaluate``, ``_run_epoch``, ``_finalize_training``);
    - its callback handler's ``call_event`` (an exception from any callback at any event);
    - the ``on_train_begin`` of each callback in ``later_callbacks`` (those that run after ours in the
      very call that opened the run: wrapped once, each wrapper restores the original when called).

    ``on_finalized`` is called when ``_finalize_training`` returns normally (the run may still be
    open then if our callback was removed from the trainer mid-run).
    """

    def __init__(self, trainer: Any, report: Reporter, later_callbacks: Iterable[Any] = (),
                 on_finalized: Callable[[], None] | None = None) -> None:
        self._saved: list[tuple[Any, str, Any]] = []
        names = [name for name in LOOP_METHODS if callable(getattr(type(trainer), name, None))]
        if not names:
            names = [name for name in FALLBACK_METHODS if callable(getattr(trainer, name, None))]
        for name in names:
            self._wrap(trainer, name, report, on_finalized if name == FINAL_METHOD else None)
        handler = getattr(trainer, "callback_handler", None)
        if callable(getattr(handler, "call_event", None)):
            self._wrap(handler, "call_event", report)
        for callback in later_callbacks:
            self._wrap(callback, "on_train_begin", report, once=True)

    def _wrap(self, owner: Any, name: str, report: Reporter, on_return: Callable[[], None] | None = None,
              once: bool = False) -> None:
        try:
            previous = vars(owner).get(name, _MISSING)
        except TypeError:  # no __dict__ (slots): cannot be wrapped on the instance
            return
        method = getattr(owner, name)
        restore = functools.partial(_restore, owner, name, previous)

        @functools.wraps(method)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if once:
                restore()
            try:
                result = method(*args, **kwargs)
            except BaseException as exc:
                _report(report, exc)
                raise
            if on_return is not None:
                on_return()
            return result

        guarded._seo_trainlog_guard = True  # type: ignore[attr-defined]
        vars(owner)[name] = guarded
        self._saved.append((owner, name, previous))

    def remove(self) -> None:
        for owner, name, previous in reversed(self._saved):
            if getattr(vars(owner).get(name), "_seo_trainlog_guard", False):
                _restore(owner, name, previous)
        self._saved.clear()


def _restore(owner: Any, name: str, previous: Any) -> None:
    if previous is _MISSING:
        vars(owner).pop(name, None)
    else:
        vars(owner)[name] = previous


def _report(report: Reporter, exc: BaseException) -> None:
    try:
        report(exc)
    except Exception as report_failure:  # never replace the user's exception with ours
        safe_warn(f"seo_trainlog could not record {type(exc).__name__}: {report_failure!r}")
