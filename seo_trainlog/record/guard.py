"""Seeing an exception escape ``Trainer.train()``, which calls no callback event when it raises.

Callbacks are given neither the trainer nor any exception, so the callback finds its trainer on the
call stack and, for the duration of one run, wraps a few bound methods *of that one instance* (and of
its callback handler): exceptions pass through the wrappers unchanged, after being reported. Nothing
is patched on any class, and :meth:`TrainerGuard.remove` restores every object exactly.
"""

from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Callable, Iterable
from typing import Any

from .._safety import safe_warn

# Looked up on the trainer by the training loop after ``on_train_begin``, so wrapping them then
# already covers this very ``train()`` call: evaluation on start, every epoch (steps, logging,
# evaluation, checkpoints), the end of training. ``training_step`` (public API) is the fallback for
# Trainer versions without these private methods.
LOOP_METHODS = ("_evaluate", "_run_epoch", "_finalize_training")
FINAL_METHOD = "_finalize_training"
EVALUATION_METHOD = "_evaluate"  # the training loop's evaluation (``eval_strategy``)
FALLBACK_METHODS = ("training_step",)
_MISSING = object()

Reporter = Callable[[BaseException], None]


def caller_local(name: str, accept: Callable[[Any], bool], functions: Iterable[str] | None = None,
                 max_depth: int = 16) -> Any | None:
    """The first local variable ``name`` that ``accept`` takes, in the frames above the caller (only
    in functions named in ``functions``, if given): how a callback, given neither the trainer nor
    the call's arguments, finds them. None when no frame within ``max_depth`` has one."""
    frame = sys._getframe(2)
    for _ in range(max_depth):
        if frame is None:
            return None
        if functions is None or frame.f_code.co_name in functions:
            value = frame.f_locals.get(name)
            if accept(value):
                return value
        frame = frame.f_back
    return None


def find_trainer(max_depth: int = 16) -> Any | None:
    """The ``transformers.Trainer`` whose method is on the call stack (callbacks are not given it)."""
    from transformers import Trainer

    return caller_local("self", lambda value: isinstance(value, Trainer), max_depth=max_depth)


class TrainerGuard:
    """For one run, reports every exception escaping:

    - the trainer's loop methods (``_evaluate``, ``_run_epoch``, ``_finalize_training``);
    - its callback handler's ``call_event`` (an exception from any callback at any event);
    - the ``on_train_begin`` of each callback in ``later_callbacks`` (those that run after ours in the
      very call that opened the run: wrapped once, each wrapper restores the original when called).

    ``on_finalized`` is called when ``_finalize_training`` returns normally (the run may still be
    open then if our callback was removed from the trainer mid-run); ``on_evaluation(True)`` when the
    training loop's evaluation starts and ``on_evaluation(False)`` when it ends, however it ends.

    A ``copy.deepcopy`` of the trainer (or of its callback handler) gets the plain methods, not the
    wrappers; a ``copy.copy`` shares them, and a wrapper called from the copy's own loop runs the
    copy's plain method: either copy behaves as it would without seo_trainlog.
    """

    def __init__(self, trainer: Any, report: Reporter, later_callbacks: Iterable[Any] = (),
                 on_finalized: Callable[[], None] | None = None,
                 on_evaluation: Callable[[bool], None] | None = None) -> None:
        self._saved: list[tuple[Any, str, Any]] = []
        names = [name for name in LOOP_METHODS if callable(getattr(type(trainer), name, None))]
        if not names:
            names = [name for name in FALLBACK_METHODS if callable(getattr(trainer, name, None))]
        for name in names:
            self._wrap(trainer, name, report, on_finalized if name == FINAL_METHOD else None,
                       around=on_evaluation if name == EVALUATION_METHOD else None)
        handler = getattr(trainer, "callback_handler", None)
        if callable(getattr(handler, "call_event", None)):
            self._wrap(handler, "call_event", report)
        for callback in later_callbacks:
            self._wrap(callback, "on_train_begin", report, once=True)

    def _wrap(self, owner: Any, name: str, report: Reporter, on_return: Callable[[], None] | None = None,
              once: bool = False, around: Callable[[bool], None] | None = None) -> None:
        try:
            previous = vars(owner).get(name, _MISSING)
        except TypeError:  # no __dict__ (slots): cannot be wrapped on the instance
            return
        vars(owner)[name] = _Guarded(owner, name, previous, getattr(owner, name), report, on_return, once, around)
        self._saved.append((owner, name, previous))

    def remove(self) -> None:
        for owner, name, previous in reversed(self._saved):
            if getattr(vars(owner).get(name), "_seo_trainlog_guard", False):
                _restore(owner, name, previous)
        self._saved.clear()


class _Guarded:
    """The wrapper put on one instance for one method (see :class:`TrainerGuard`)."""

    _seo_trainlog_guard = True

    def __init__(self, owner: Any, name: str, previous: Any, method: Callable[..., Any], report: Reporter,
                 on_return: Callable[[], None] | None, once: bool, around: Callable[[bool], None] | None) -> None:
        self._owner, self._name, self._previous, self._method = owner, name, previous, method
        self._report, self._on_return, self._once, self._around = report, on_return, once, around
        self._owner_is_trainer = name in LOOP_METHODS or name in FALLBACK_METHODS  # called a few times a run
        functools.update_wrapper(self, method)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._owner_is_trainer:
            # a shallow copy of the trainer (copy.copy) shares its attributes, ours included: called by
            # the copy's own loop, behave as the copy's plain method would
            caller = sys._getframe(1).f_locals.get("self")
            if caller is not None and caller is not self._owner and isinstance(caller, type(self._owner)):
                return getattr(type(caller), self._name)(caller, *args, **kwargs)
        if self._once:
            _restore(self._owner, self._name, self._previous)
        if self._around is not None:
            _call_quietly(self._around, True)
        try:
            result = self._method(*args, **kwargs)
        except BaseException as exc:
            _report(self._report, exc)
            raise
        finally:
            if self._around is not None:
                _call_quietly(self._around, False)
        if self._on_return is not None:
            self._on_return()
        return result

    def __copy__(self) -> Any:
        return self  # a shallow copy of the owner shares its attributes, as it would ours

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        """In a deep copy of the owner: the method as it was before us, bound to the copy."""
        if self._previous is not _MISSING:
            return copy.deepcopy(self._previous, memo)
        new_owner = memo.get(id(self._owner))
        if new_owner is None:
            return copy.deepcopy(self._method, memo)
        return getattr(type(new_owner), self._name).__get__(new_owner, type(new_owner))


def _call_quietly(hook: Callable[[bool], None], value: bool) -> None:
    try:
        hook(value)
    except Exception as exc:
        safe_warn(f"seo_trainlog evaluation hook failed: {type(exc).__name__}: {exc}")


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
