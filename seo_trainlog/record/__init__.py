"""Recording a run while it trains: Trainer event -> run state -> records -> sinks.

- ``callback``: :class:`TrainLogCallback`, the ``TrainerCallback`` that turns Trainer events into records.
- ``logger``: :class:`TrainLogger`, one run's files and the six logging methods (the spec's API).
- ``format``: the text lines and JSON lines the files hold.
- ``sinks``: the loguru side: our own ``Logger``, one filtered file sink per category, console, stdlib bridge.
- ``manifest``: the run's manifest (segments, final values) next to its files.
- ``rank``: a process's place in a distributed run and the run id all ranks agree on.
- ``guard``, ``signals``: exceptions that escape ``trainer.train()`` and SIGTERM, recorded before the process ends.
- ``tracker``: the ``Accelerator(log_with="seo_trainlog")`` tracker for hand-written loops.

Nothing here is public API: import from :mod:`seo_trainlog`.
"""
