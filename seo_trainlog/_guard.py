"""Seeing an exception escape ``Trainer.train()``, which calls no callback event when it raises."""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any

# Methods the training loop looks up on the trainer after ``on_train_begin``: an instance attribute
# set during ``on_train_begin`` therefore already wraps this very ``train()`` call. ``training_step``
# (public API) is the fallback for Trainer versions without the private loop methods.
GUARDED_METHODS = ("_run_epoch", "_finalize_training")
FALLBACK_METHODS = ("training_step",)
_MISSING = object()


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
    """Wraps the trainer's loop methods on this one instance so that an exception escaping them
    (``KeyboardInterrupt`` and ``SystemExit`` included) is reported to ``on_exception`` and then
    re-raised unchanged. :meth:`remove` restores the instance exactly as it was."""

    def __init__(self, trainer: Any, on_exception: Callable[[BaseException], None]) -> None:
        self._trainer = trainer
        self._saved: dict[str, Any] = {}
        names = [name for name in GUARDED_METHODS if callable(getattr(type(trainer), name, None))]
        if not names:
            names = [name for name in FALLBACK_METHODS if callable(getattr(trainer, name, None))]
        for name in names:
            self._saved[name] = trainer.__dict__.get(name, _MISSING)
            setattr(trainer, name, _reporting(getattr(trainer, name), on_exception))

    def remove(self) -> None:
        for name, previous in self._saved.items():
            if previous is _MISSING:
                self._trainer.__dict__.pop(name, None)
            else:
                setattr(self._trainer, name, previous)
        self._saved.clear()


def _reporting(method: Callable[..., Any], on_exception: Callable[[BaseException], None]) -> Callable[..., Any]:
    @functools.wraps(method)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except BaseException as exc:
            try:
                on_exception(exc)
            except Exception as report_failure:  # never replace the user's exception with ours
                warnings.warn(f"seo_trainlog could not record {type(exc).__name__}: {report_failure!r}",
                              RuntimeWarning, stacklevel=2)
            raise

    return guarded
