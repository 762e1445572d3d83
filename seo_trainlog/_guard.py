"""Seeing an exception escape ``Trainer.train()``, which calls no callback event when it raises.

Callbacks are given neither the trainer nor any exception, so the callback finds its trainer on the
call stack and wraps a few bound methods *of that one instance*: exceptions pass through the
wrappers unchanged, after being reported. Nothing is patched on any class.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any

# Looked up on the trainer by the training loop after ``on_train_begin``, so wrapping them then
# already covers this very ``train()`` call: evaluation on start, every epoch (steps, logging,
# evaluation, checkpoints), the end of training. ``training_step`` (public API) is the fallback for
# Trainer versions without these private methods.
LOOP_METHODS = ("_evaluate", "_run_epoch", "_finalize_training")
FALLBACK_METHODS = ("training_step",)
_MISSING = object()
_TRAIN_WRAPPER = "_seo_trainlog_train_guard"

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
    """For one run: wraps the trainer's loop methods and its callback handler's ``call_event`` (so
    an exception raised by any callback is seen too). :meth:`remove` restores both objects exactly."""

    def __init__(self, trainer: Any, report: Reporter) -> None:
        self._saved: list[tuple[Any, str, Any]] = []
        names = [name for name in LOOP_METHODS if callable(getattr(type(trainer), name, None))]
        if not names:
            names = [name for name in FALLBACK_METHODS if callable(getattr(trainer, name, None))]
        targets = [(trainer, name) for name in names]
        handler = getattr(trainer, "callback_handler", None)
        if callable(getattr(handler, "call_event", None)):
            targets.append((handler, "call_event"))
        for owner, name in targets:
            self._saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
            setattr(owner, name, _reporting(getattr(owner, name), report))

    def remove(self) -> None:
        for owner, name, previous in reversed(self._saved):
            if previous is _MISSING:
                owner.__dict__.pop(name, None)
            else:
                setattr(owner, name, previous)
        self._saved.clear()


def guard_train(trainer: Any, report: Reporter) -> None:
    """Wrap ``trainer.train`` on this instance for every later call (idempotent): an exception
    escaping any part of ``train()`` is reported. The wrapper stays for the trainer's lifetime and
    does nothing but pass the call through when no run is open."""
    current = trainer.__dict__.get("train")
    if current is not None and getattr(current, _TRAIN_WRAPPER, False):
        return
    wrapper = _reporting(trainer.train, report)
    setattr(wrapper, _TRAIN_WRAPPER, True)
    trainer.train = wrapper


def _reporting(method: Callable[..., Any], report: Reporter) -> Callable[..., Any]:
    @functools.wraps(method)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except BaseException as exc:
            try:
                report(exc)
            except Exception as report_failure:  # never replace the user's exception with ours
                try:
                    warnings.warn(f"seo_trainlog could not record {type(exc).__name__}: {report_failure!r}",
                                  RuntimeWarning, stacklevel=2)
                except Exception:
                    pass
            raise

    return guarded
