"""seo_trainlog: a complete, durable, categorised log for every Hugging Face ``Trainer`` run.

Public API:

- :class:`LogConfig` — every setting, ``LogConfig.from_env()`` for the ``SEO_TRAINLOG_*`` variables.
- :class:`TrainLogger` — one run's log files and the six logging methods.
- :class:`TrainLogCallback` — the ``TrainerCallback``; also ``report_to="seo_trainlog"`` after import.
- :class:`TimedDataCollator` — times any data collator into the data-loading log.
- ``logger`` — the independent loguru logger all records go through (add a sink to receive them;
  records carry ``extra["seo_run"]``, ``extra["seo_cat"]``, ``extra["seo_label"]``).
"""

from ._callback import TrainLogCallback
from ._collator import TimedDataCollator
from ._config import LogConfig
from ._integration import REPORT_TO_NAME, register_report_to
from ._logger import TrainLogger
from ._sinks import logger

__all__ = ["LogConfig", "TimedDataCollator", "TrainLogCallback", "TrainLogger", "logger", "REPORT_TO_NAME"]
__version__ = "0.1.0"

register_report_to(TrainLogCallback)
