"""Recording a run while it trains: Trainer event -> run state -> records -> sinks.

Imports go one way: ``callback`` -> ``run``, ``facts`` -> ``logger`` -> ``recorder``, ``sinks``.

- ``callback``: :class:`TrainLogCallback`, the ``TrainerCallback``: Trainer events, and the run's lifecycle
  (begin, end, an exception, SIGTERM, the summary).
- ``run``: the run state (``Run``) and the per-step accounting that turns the events' numbers into records
  (interval timing, tokens and MFU, resources, the ranks' exchange and stragglers, anomalies).
- ``facts``: the hyperparameters record's facts (dataset sizes, ``TrainingArguments``, the model's).
- ``logger``: :class:`TrainLogger`, one run's files and the six logging methods (the spec's API).
- ``recorder``: the thread that runs a logger's deferred jobs (formats and writes records off the training loop).
- ``format``: the text lines and JSON lines the files hold.
- ``sinks``: the loguru side: our own ``Logger``, one filtered file sink per category, console, stdlib bridge.
- ``manifest``: the run's manifest (segments, final values) next to its files.
- ``rank``: a process's place in a distributed run and the run id all ranks agree on.
- ``guard``, ``signals``: exceptions that escape ``trainer.train()`` and SIGTERM, recorded before the process ends.
- ``tracker``: the ``Accelerator(log_with="seo_trainlog")`` tracker for hand-written loops.

Nothing here is public API: import from :mod:`seo_trainlog`.
"""
