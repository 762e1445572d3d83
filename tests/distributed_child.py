"""Run by test_scale.py and test_cluster.py under torchrun: a tiny DDP (gloo, CPU) training with TrainLogCallback.

    torchrun --nproc_per_node 2 distributed_child.py LOG_DIR ok
    torchrun --nproc_per_node 2 distributed_child.py LOG_DIR fail_rank1   # rank 1 raises at its 3rd forward
    torchrun --nproc_per_node 2 distributed_child.py LOG_DIR slow_rank1   # rank 1's collator sleeps 0.15 s a batch
    torchrun --nnodes 2 --node_rank N ... distributed_child.py LOG_DIR_OF_NODE_N ok
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from conftest import WORDS, quiet, tiny_model  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import BertTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments  # noqa: E402

from seo_trainlog import TimedDataCollator, TrainLogCallback  # noqa: E402

SLOW_COLLATE_S = 0.15


class SleepingCollator:
    """Pads, after sleeping ``delay_s`` (a rank slowed in its data pipeline)."""

    def __init__(self, inner, delay_s: float):
        self.inner, self.delay_s = inner, delay_s

    def __call__(self, features):
        time.sleep(self.delay_s)
        return self.inner(features)


log_dir, mode = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])})
data = Dataset.from_dict({**tokenizer([" ".join(WORDS[i % 20:i % 20 + 3]) for i in range(64)]),
                          "labels": [i % 4 for i in range(64)]})
model = tiny_model()
if mode == "fail_rank1" and rank == 1:
    calls = []

    def fail_third(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("rank 1 failed in forward")

    model.register_forward_pre_hook(fail_third)
collator = DataCollatorWithPadding(tokenizer)
if mode == "slow_rank1":
    collator = TimedDataCollator(SleepingCollator(collator, SLOW_COLLATE_S if rank == 1 else 0.0))
trainer = Trainer(model=model, train_dataset=data, data_collator=collator,
                  args=TrainingArguments(output_dir=os.path.join(log_dir, "out"),
                                         max_steps=15 if mode == "slow_rank1" else 10, logging_steps=1,
                                         per_device_train_batch_size=4, report_to="none", use_cpu=True,
                                         save_strategy="no", disable_tqdm=True, ddp_backend="gloo",
                                         ddp_broadcast_buffers=False, ddp_timeout=60))
trainer.add_callback(TrainLogCallback(quiet(log_dir, straggler_window=3 if mode == "slow_rank1" else 5)))
trainer.train()

import torch.distributed as dist  # noqa: E402

if dist.is_initialized():  # as a well-behaved script does: gloo's teardown at exit can abort otherwise
    dist.destroy_process_group()
