from __future__ import annotations

from dataclasses import dataclass

ALL_TEXT = ("*",)


@dataclass(frozen=True)
class Category:
    """One log file of a run: which records it takes and how it writes them.

    ``name`` is also the category a record is emitted under; a file takes the records of its own
    category plus those named in ``includes`` (``ALL_TEXT``: every text category). ``per_rank``
    files are also written by the other processes of a distributed run, each to its own
    ``<prefix>_rank<N>_<stamp>.log``; every other file is written by the world-process-zero only.
    A ``durable`` file is line-buffered (a record is on disk when its write returns); the others are
    written in blocks and flushed every ``LogConfig.flush_interval_s``.
    """

    name: str
    prefix: str
    label: str
    level: str
    includes: tuple[str, ...] = ()
    json: bool = False
    debug_only: bool = False
    follows_config_level: bool = True
    per_rank: bool = False
    durable: bool = False


# The spec's file tree, one row per file. Adding a category is adding a row.
CATEGORIES: tuple[Category, ...] = (
    Category("general", "seo_engine", "GENERAL", "INFO", includes=ALL_TEXT),
    Category("training", "training_progress", "TRAINING", "INFO"),
    Category("training_detailed", "training_detailed", "TRAINING", "DEBUG", includes=("training",)),
    Category("model", "model_performance", "MODEL", "INFO"),
    Category("data", "data_loading", "DATA", "INFO"),
    Category("errors", "errors", "ERROR", "WARNING", per_rank=True, durable=True),
    Category("error_tracking", "error_tracking", "ERROR", "DEBUG", includes=("errors",), per_rank=True,
             durable=True),
    Category("metrics", "performance_metrics", "METRICS", "DEBUG", json=True, follows_config_level=False,
             per_rank=True),
    Category("debug", "debug", "DEBUG", "DEBUG", includes=ALL_TEXT, debug_only=True,
             follows_config_level=False),
)

BY_NAME = {category.name: category for category in CATEGORIES}
TEXT_NAMES = frozenset(category.name for category in CATEGORIES if not category.json)


def accepted_names(category: Category) -> frozenset[str]:
    """The record categories that ``category``'s file writes."""
    if category.includes == ALL_TEXT:
        return TEXT_NAMES
    return frozenset((category.name, *category.includes))
