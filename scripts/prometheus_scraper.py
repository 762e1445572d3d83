"""The benchmarks' stand-in for Prometheus (stdlib only, so that importing it costs a run nothing)."""

from __future__ import annotations

import threading
import urllib.request


class Scraper:
    """Stands for Prometheus: GET /metrics every ``interval_s`` in a thread, while the run trains."""

    def __init__(self, port: int, interval_s: float = 1.0) -> None:
        self.url, self.interval_s, self.scrapes = f"http://127.0.0.1:{port}/metrics", interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    response.read()
                self.scrapes += 1
            except OSError:
                pass  # before train begin: nothing serves yet

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
