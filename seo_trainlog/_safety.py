"""Logging must never be the reason a training run dies."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def never_raises(method: F) -> F:
    """A failure inside ``method`` is handed to ``self._internal_error(name, exc)`` (which reports it
    once) and the call returns ``None`` instead of raising into the user's training."""

    @functools.wraps(method)
    def safe(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            self._internal_error(method.__name__, exc)
            return None

    return safe  # type: ignore[return-value]
