"""seo_trainlog: a complete, durable, categorised log for every Hugging Face ``Trainer`` run.

Public API:

- :class:`LogConfig` — every setting, ``LogConfig.from_env()`` for the ``SEO_TRAINLOG_*`` variables.
- :class:`TrainLogger` — one run's log files and the six logging methods.
- :class:`TrainLogCallback` — the ``TrainerCallback``; also ``report_to="seo_trainlog"`` after import.
- :class:`TimedDataCollator` — times any data collator into the data-loading log.
- :class:`SeoTrainlogTracker` — ``Accelerator(log_with="seo_trainlog")`` for hand-written loops.
- ``logger`` — the independent loguru logger all records go through (add a sink to receive them;
  records carry ``extra["seo_run"]`` (the stamp), ``extra["seo_key"]`` (unique to the open run),
  ``extra["seo_cat"]``, ``extra["seo_label"]``).

Importing the package does not import torch or transformers (the ``seo-trainlog`` command needs
neither): the classes that do are imported on first use, and ``report_to="seo_trainlog"`` and
``log_with="seo_trainlog"`` are registered as soon as transformers / accelerate are imported.
"""

from importlib import import_module
from typing import Any

from ._config import LogConfig
from ._integration import REPORT_TO_NAME, register_accelerate_tracker, register_report_to, when_imported

__all__ = ["LogConfig", "SeoTrainlogTracker", "TimedDataCollator", "TrainLogCallback", "TrainLogger", "logger",
           "REPORT_TO_NAME"]
__version__ = "0.1.0"

_LAZY = {"TrainLogCallback": ".record.callback", "TimedDataCollator": ".watch.collator",
         "TrainLogger": ".record.logger", "SeoTrainlogTracker": ".record.tracker", "logger": ".record.sinks"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


when_imported("transformers.integrations.integration_utils", register_report_to)
when_imported("accelerate.tracking", register_accelerate_tracker)
