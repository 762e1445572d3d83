"""Run by test_prometheus.py in a subprocess: a tiny training with Prometheus outputs.

    python prometheus_child.py LOG_DIR no_client PORT TEXTFILE
        # every Prometheus output set while prometheus-client cannot be imported
        # (sys.modules['prometheus_client'] = None, as when it is not installed)
    torchrun --nproc_per_node 2 prometheus_child.py LOG_DIR ddp PORT TEXTFILE
        # DDP (gloo, CPU): each rank serves /metrics on PORT + local_rank and writes its textfile;
        # after training each rank saves what its own server answers to LOG_DIR/scraped_rank<N>.prom;
        # rank 1's collator (a TimedDataCollator) sleeps SLOW_COLLATE_S a batch: the straggler
"""

import os
import sys
import time
import urllib.request

log_dir, mode, port, textfile = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if mode == "no_client":
    sys.modules["prometheus_client"] = None  # `import prometheus_client` raises ImportError from here on
sys.path.insert(0, os.path.dirname(__file__))

from conftest import build_dataset, build_tokenizer, quiet, tiny_model  # noqa: E402
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments  # noqa: E402

from seo_trainlog import TimedDataCollator, TrainLogCallback  # noqa: E402

SLOW_COLLATE_S = 0.15


def slow_collator(collator):
    def collate(features):
        time.sleep(SLOW_COLLATE_S)
        return collator(features)

    return collate

tokenizer = build_tokenizer()
data = build_dataset(tokenizer)
ddp = {"ddp_backend": "gloo", "ddp_broadcast_buffers": False, "ddp_timeout": 60} if mode == "ddp" else {}
collator = DataCollatorWithPadding(tokenizer)
if mode == "ddp":
    collator = TimedDataCollator(slow_collator(collator) if os.environ["RANK"] == "1" else collator)
trainer = Trainer(model=tiny_model(), train_dataset=data, data_collator=collator,
                  args=TrainingArguments(output_dir=os.path.join(log_dir, "out"), max_steps=4, logging_steps=2,
                                         per_device_train_batch_size=8, learning_rate=1e-3, report_to="none",
                                         use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, **ddp))
config = quiet(log_dir, prometheus_port=port, prometheus_addr="127.0.0.1", prometheus_textfile=textfile,
               **({"pushgateway_url": f"http://127.0.0.1:{port}"} if mode == "no_client" else {}))
trainer.add_callback(TrainLogCallback(config))
trainer.train()
if mode == "ddp":
    local_rank = int(os.environ["LOCAL_RANK"])
    with urllib.request.urlopen(f"http://127.0.0.1:{port + local_rank}/metrics", timeout=10) as response:
        scraped = response.read()
    with open(os.path.join(log_dir, f"scraped_rank{os.environ['RANK']}.prom"), "wb") as handle:
        handle.write(scraped)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
print("training finished", flush=True)
