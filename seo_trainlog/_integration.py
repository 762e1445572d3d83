"""Plugging into transformers' and accelerate's registries, without importing them before they are.

``import seo_trainlog`` stays light (no torch, no transformers): each registration runs at once when
its library is already imported, else right after that library's registry module is first imported
(a one-shot import hook that removes itself when it fires).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

REPORT_TO_NAME = "seo_trainlog"


def register_report_to() -> None:
    """Add ``seo_trainlog`` to ``transformers.integrations.integration_utils.INTEGRATION_TO_CALLBACK``
    (the table ``Trainer`` reads ``report_to`` names from). Idempotent; an entry someone else put
    under that name is left alone."""
    from transformers.integrations import integration_utils

    from .record.callback import TrainLogCallback

    integration_utils.INTEGRATION_TO_CALLBACK.setdefault(REPORT_TO_NAME, TrainLogCallback)


def register_accelerate_tracker() -> None:
    """Make ``Accelerator(log_with="seo_trainlog")`` known to accelerate (idempotent)."""
    from .record.tracker import register_accelerate_tracker as register

    register()


def when_imported(module_name: str, register: Callable[[], None]) -> None:
    """Run ``register()`` now if ``module_name`` is imported, else just after its first import."""
    if module_name in sys.modules:
        register()
    else:
        sys.meta_path.insert(0, _AfterImport(module_name, register))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for one module name it asks the other finders, then wraps the loader
    so that ``register`` runs once the module is executed; it leaves ``sys.meta_path`` on first use."""

    def __init__(self, module_name: str, register: Callable[[], None]) -> None:
        self.module_name = module_name
        self.register = register

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.module_name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader, self.register)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, register: Callable[[], None]) -> None:
        self._loader = loader
        self._register = register

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        self._register()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
