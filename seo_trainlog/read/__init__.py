"""Reading runs back: the ``seo-trainlog`` command's ``summarize``, ``plot``, ``report``, ``compare`` and ``watch``.

- ``reader``: finding runs in a directory and reading their JSON lines.
- ``analysis``: one pass over a run's records into :class:`RunAnalysis` (the numbers every view shows).
- ``present``: the terminal tables (rich); ``plots``, ``metric_plots``: matplotlib figures;
  ``report``: the single-file HTML report; ``compare``: runs side by side and ``--fail-if``;
  ``live``: ``watch``, the live view of a run being written; ``metric_stats``: per-metric statistics.

Nothing here is public API: import from :mod:`seo_trainlog` or run ``seo-trainlog``.
"""
