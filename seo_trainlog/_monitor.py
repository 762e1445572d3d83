"""Resource readings taken at logging events (never on every step)."""

from __future__ import annotations

import functools
import os

import psutil


@functools.lru_cache(maxsize=4)
def _process(pid: int) -> psutil.Process:
    return psutil.Process(pid)


def rss_mb() -> float:
    """Resident set size of this process in MiB (2**20 bytes), from ``psutil.Process().memory_info()``."""
    return _process(os.getpid()).memory_info().rss / 2**20
