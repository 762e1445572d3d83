"""Run by test_alerts.py in a subprocess: a tiny training whose loss spikes at step 16 (two anomalies,
two alerts), stopped at step 20 while its alerts are still pending.

    python alerts_child.py LOG_DIR sigterm WORK_DIR       # alert command `sleep 1000` (and one in the
                                                           # background), running; SIGTERM at step 20
    python alerts_child.py LOG_DIR interrupt_twice WORK_DIR
        # Ctrl-C (SIGINT) at step 20; the alert command, running by then, waits until the run's
        # summary is on disk and then presses Ctrl-C again (records are flushed every 60 s otherwise)
    python alerts_child.py LOG_DIR blocking_hook WORK_DIR  # a Python hook that never returns; training completes

WORK_DIR receives `pids` (the alert commands' processes), `signalled` (time.time() when the signal
was sent) and, for interrupt_twice, `second` when the second Ctrl-C was sent.
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from conftest import build_dataset, build_tokenizer, quiet, tiny_model  # noqa: E402
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from seo_trainlog import TrainLogCallback  # noqa: E402

log_dir, mode, work_dir = sys.argv[1:4]
# Ctrl-C as a terminal delivers it, even when this process was started with SIGINT ignored (a shell
# runs background jobs so without job control, and children inherit that)
signal.signal(signal.SIGINT, signal.default_int_handler)
pids, signalled = os.path.join(work_dir, "pids"), os.path.join(work_dir, "signalled")


class StopAtStep20(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != 20 or mode == "blocking_hook":
            return
        if mode == "interrupt_twice":
            trainer.log({"marker": 1.0})  # records deferred for 60 s are written now: the alerts are sent
        deadline, started = time.monotonic() + 30, 2 if mode == "sigterm" else 1
        while (not os.path.exists(pids) or len(open(pids).read().split()) < started) and time.monotonic() < deadline:
            time.sleep(0.01)  # the first alert's command is running
        with open(signalled, "w") as handle:
            handle.write(repr(time.time()))
        os.kill(os.getpid(), signal.SIGTERM if mode == "sigterm" else signal.SIGINT)


calls = []


def spike_at_16(module, args, output):
    calls.append(1)
    if len(calls) == 16:
        output.loss = output.loss * 100.0
    return output


if mode == "sigterm":
    command, hooks, flush_interval_s = f"echo $$ >> {pids}; sleep 1000 & echo $! >> {pids}; exec sleep 1000", [], 0.0
elif mode == "interrupt_twice":
    summary = os.path.join(log_dir, "performance_metrics_*.log")
    command = (f"echo $$ >> {pids}; until grep -qs '\"event\":\"summary\"' {summary}; do sleep 0.01; done; "
               f"echo sent > {os.path.join(work_dir, 'second')}; kill -INT {os.getpid()}; exec sleep 1000")
    hooks, flush_interval_s = [], 60.0
else:
    command, hooks, flush_interval_s = None, [lambda anomaly: time.sleep(1000)], 0.0
timeout_s = 1.0 if mode == "blocking_hook" else 30.0  # the wait for a stuck hook at a completed run's end: 2 s

tokenizer = build_tokenizer()
data = build_dataset(tokenizer)
model = tiny_model()
model.register_forward_hook(spike_at_16)
trainer = Trainer(model=model, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer),
                  args=TrainingArguments(output_dir=os.path.join(log_dir, "out"), max_steps=24, logging_steps=1,
                                         per_device_train_batch_size=8, learning_rate=1e-3, report_to="none",
                                         use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0),
                  callbacks=[StopAtStep20()])
config = quiet(log_dir, alert_cmd=command, alert_timeout_s=timeout_s, throughput_drop_pct=99,
               flush_interval_s=flush_interval_s)
trainer.add_callback(TrainLogCallback(config, alert_hooks=hooks))
trainer.train()
print("training finished", flush=True)
