"""Run by test_robust.py in a subprocess: a tiny training that receives SIGTERM at step 3.

    python sigterm_child.py LOG_DIR default          # no handler of the user's: SIGTERM kills
    python sigterm_child.py LOG_DIR user FLAG_FILE   # the user's own handler writes FLAG_FILE, exits 3
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


class SendSigterm(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)


tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])})
data = Dataset.from_dict({**tokenizer([" ".join(WORDS[i:i + 3]) for i in range(32)]), "labels": [i % 4 for i in range(32)]})
trainer = Trainer(model=tiny_model(), train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer),
                  args=TrainingArguments(output_dir=os.path.join(log_dir, "out"), max_steps=8, logging_steps=1,
                                         per_device_train_batch_size=4, report_to="none", use_cpu=True,
                                         save_strategy="no", disable_tqdm=True),
                  callbacks=[SendSigterm()])
trainer.add_callback(TrainLogCallback(quiet(log_dir)))
trainer.train()
print("training finished without termination")
