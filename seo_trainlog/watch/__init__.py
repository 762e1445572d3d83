"""Watching a run: what the records measure, and who is told.

- ``timing``: step time, data wait (``data_wait_pct``) and collate time per logging interval.
- ``collator``: :class:`TimedDataCollator`, which times any data collator and counts tokens.
- ``tokens``: tokens per second and ``mfu_pct``.
- ``monitor``: CPU, memory and GPU sampling (psutil, nvidia-ml-py) in a background thread.
- ``anomaly``: the anomaly detectors (NaN or spiking loss, plateau, data wait, stragglers).
- ``alerts``: alert hooks and commands, run off the training thread with a timeout.
- ``prometheus``: the Prometheus exporter, textfile and Pushgateway.

Nothing here is public API: import from :mod:`seo_trainlog`.
"""
