"""Logging must never be the reason a training run dies."""

from __future__ import annotations

import collections
import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def never_raises(method: F) -> F:
    """A failure inside ``method`` is handed to ``self._internal_error(name, exc)`` (which reports it
    once) and the call returns ``None`` instead of raising into the user's training. A call that
    does not fit the signature (missing or unknown arguments) still raises its ``TypeError``."""

    @functools.wraps(method)
    def safe(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            if isinstance(exc, TypeError) and exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
                raise  # the call itself does not fit the signature: the caller's mistake, said at once
            self._internal_error(method.__name__, exc)
            return None

    return safe  # type: ignore[return-value]


def safe_warn(message: str, stacklevel: int = 3) -> None:
    """``warnings.warn(message, RuntimeWarning)``, except that a warnings filter turning warnings into
    errors (``-W error``) cannot turn it into an exception inside the user's training."""
    try:
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
    except Exception:
        pass


_LOGGED_MARK = "_seo_trainlog_logged"
# exceptions that refuse a new attribute (slots, frozen dataclasses) are remembered here instead
_LOGGED_WITHOUT_MARK: collections.deque[tuple[int, int]] = collections.deque(maxlen=64)


def _identity(error: BaseException) -> tuple[int, int]:
    return id(error), id(error.__traceback__)


def was_logged(error: BaseException) -> bool:
    """Whether ``error`` was already written (so that it is written once, however many guards see it)."""
    try:
        if vars(error).get(_LOGGED_MARK):
            return True
    except TypeError:  # no __dict__
        pass
    return _identity(error) in _LOGGED_WITHOUT_MARK


def mark_logged(error: BaseException) -> None:
    try:
        vars(error)[_LOGGED_MARK] = True  # not setattr: a custom __setattr__ may refuse or misbehave
    except TypeError:
        _LOGGED_WITHOUT_MARK.append(_identity(error))
