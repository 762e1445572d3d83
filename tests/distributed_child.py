"""Run by test_scale.py under torchrun: a tiny DDP (gloo, CPU) training with TrainLogCallback.

    torchrun --nproc_per_node 2 distributed_child.py LOG_DIR ok
    torchrun --nproc_per_node 2 distributed_child.py LOG_DIR fail_rank1   # rank 1 raises at its 3rd forward
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from conftest import WORDS, quiet, tiny_model  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import BertTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments  # noqa: E402

from seo_trainlog import TrainLogCallback  # noqa: E402

log_dir, mode = sys.argv[1], sys.argv[2]
tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])})
data = Dataset.from_dict({**tokenizer([" ".join(WORDS[i % 20:i % 20 + 3]) for i in range(64)]),
                          "labels": [i % 4 for i in range(64)]})
model = tiny_model()
if mode == "fail_rank1" and int(os.environ["RANK"]) == 1:
    calls = []

    def fail_third(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("rank 1 failed in forward")

    model.register_forward_pre_hook(fail_third)
trainer = Trainer(model=model, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer),
                  args=TrainingArguments(output_dir=os.path.join(log_dir, "out"), max_steps=10, logging_steps=1,
                                         per_device_train_batch_size=4, report_to="none", use_cpu=True,
                                         save_strategy="no", disable_tqdm=True, ddp_backend="gloo",
                                         ddp_broadcast_buffers=False, ddp_timeout=60))
trainer.add_callback(TrainLogCallback(quiet(log_dir)))
trainer.train()

import torch.distributed as dist  # noqa: E402

if dist.is_initialized():  # as a well-behaved script does: gloo's teardown at exit can abort otherwise
    dist.destroy_process_group()
