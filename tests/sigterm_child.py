"""Run by test_robust.py in a subprocess: a tiny training that receives SIGTERM at step 3.

    python sigterm_child.py LOG_DIR default          # no handler of the user's: SIGTERM kills
    python sigterm_child.py LOG_DIR user FLAG_FILE   # the user's own handler writes FLAG_FILE, exits 3
    python sigterm_child.py LOG_DIR ignore           # SIGTERM was set to SIG_IGN: training goes on
    python sigterm_child.py LOG_DIR busy             # SIGTERM from a timer while records are being written
    python sigterm_child.py LOG_DIR fork             # a callback forks a child that exits normally
    python sigterm_child.py LOG_DIR preempt          # checkpoints every 3 steps, SIGTERM right after checkpoint-3
    python sigterm_child.py LOG_DIR resume           # resumes from checkpoint-3 and finishes (max_steps 8)
    python sigterm_child.py LOG_DIR resume_restore   # the same with restore_callback_states_from_checkpoint=True
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(__file__))

from conftest import WORDS, quiet, tiny_model  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import BertTokenizer, DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from seo_trainlog import TrainLogCallback  # noqa: E402

log_dir, mode = sys.argv[1], sys.argv[2]
if mode == "user":
    flag = sys.argv[3]

    def users_handler(signum, frame):
        with open(flag, "w") as handle:
            handle.write("user handler ran")
        sys.exit(3)

    signal.signal(signal.SIGTERM, users_handler)
elif mode == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class SendSigterm(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3 and mode in ("default", "user", "ignore"):
            os.kill(os.getpid(), signal.SIGTERM)


class Preempt(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)


class Busy(TrainerCallback):
    """Thousands of records per step, and SIGTERM from a timer: it lands inside a write sooner or later."""

    def on_train_begin(self, args, state, control, **kwargs):
        import threading

        threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()

    def on_step_end(self, args, state, control, **kwargs):
        for index in range(3000):
            trainer.log({"custom": float(index)})


class Fork(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            child = os.fork()
            if child == 0:
                sys.exit(0)  # a child that ends normally: its exit must not touch the parent's run
            os.waitpid(child, 0)


tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])})
data = Dataset.from_dict({**tokenizer([" ".join(WORDS[i:i + 3]) for i in range(32)]), "labels": [i % 4 for i in range(32)]})
resuming = mode in ("resume", "resume_restore")
extra = {"busy": [Busy()], "fork": [Fork()], "preempt": [Preempt()]}.get(mode, [] if resuming else [SendSigterm()])
saving = {"save_strategy": "steps", "save_steps": 3} if mode == "preempt" or resuming else {"save_strategy": "no"}
if mode == "resume_restore":
    saving["restore_callback_states_from_checkpoint"] = True
trainer = Trainer(model=tiny_model(), train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer),
                  args=TrainingArguments(output_dir=os.path.join(log_dir, "out"), max_steps=8 if mode != "busy" else 10_000,
                                         logging_steps=1, per_device_train_batch_size=4, report_to="none",
                                         use_cpu=True, disable_tqdm=True, **saving),
                  callbacks=extra)
trainer.add_callback(TrainLogCallback(quiet(log_dir)))
trainer.train(resume_from_checkpoint=os.path.join(log_dir, "out", "checkpoint-3") if resuming else None)
print("training finished without termination")
