from __future__ import annotations

import json
import os
import re
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

WORDS = ("best cheap price buy order coupon how what why guide login account site near me review vs "
         "download hotel flight shoes laptop phone recipe weather bank map news").split()
LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\] (\S+) - (\w+) - (.*)$")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SEO_TRAINLOG_"):
            monkeypatch.delenv(name)
    # A tiny CPU model waits on data for a noticeable share of its few milliseconds per step; the
    # bottleneck warning is tested on its own (test_monitor.py) and kept out of the other files.
    monkeypatch.setenv("SEO_TRAINLOG_DATA_WAIT_WARN_PCT", "100")
    monkeypatch.setenv("SEO_TRAINLOG_DETAIL_INTERVAL", "0")  # a detail block per logging step, as tests expect


def quiet(log_dir, **changes):
    """The test configuration: no console, no bottleneck warning (unless asked for)."""
    from seo_trainlog import LogConfig

    values = {"console": False, "data_wait_warn_pct": 100.0, "detail_interval_s": 0.0, **changes}
    return LogConfig(log_dir=log_dir, **values)


def build_tokenizer() -> BertTokenizer:
    """A word-level BertTokenizer over the special tokens and WORDS (no file, no hub)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizer(vocab={word: index for index, word in enumerate(vocab)})


def build_dataset(tokenizer) -> Dataset:
    """64 short 'queries' with 4 labels, tokenised (no padding: the collator pads)."""
    generator = torch.Generator().manual_seed(0)
    texts, labels = [], []
    for index in range(64):
        length = 2 + index % 5
        picks = torch.randint(0, len(WORDS), (length,), generator=generator).tolist()
        texts.append(" ".join(WORDS[p] for p in picks))
        labels.append(index % 4)
    encoded = tokenizer(texts, truncation=True, max_length=16)
    return Dataset.from_dict({**encoded, "labels": labels})


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_dataset(tokenizer):
    return build_dataset(tokenizer)


def tiny_model():
    set_seed(0)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=4)
    return BertForSequenceClassification(config)


@pytest.fixture
def make_trainer(tmp_path, tokenizer, tiny_dataset):
    """Build a tiny CPU Trainer; keyword arguments go to TrainingArguments (or Trainer for
    ``callbacks``, ``data_collator``, ``eval_dataset``, ``model``, ``compute_metrics``)."""

    def build(**overrides):
        trainer_keys = {"callbacks", "data_collator", "eval_dataset", "model", "compute_metrics", "train_dataset",
                        "model_init"}
        trainer_kwargs = {key: overrides.pop(key) for key in list(overrides) if key in trainer_keys}
        values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=6,
                      logging_steps=1, learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no",
                      disable_tqdm=True, seed=0, dataloader_num_workers=0)
        values.update(overrides)
        if "model_init" not in trainer_kwargs:
            trainer_kwargs.setdefault("model", None)
            trainer_kwargs["model"] = trainer_kwargs["model"] or tiny_model()
        return Trainer(
            args=TrainingArguments(**values),
            train_dataset=trainer_kwargs.pop("train_dataset", tiny_dataset),
            data_collator=trainer_kwargs.pop("data_collator", DataCollatorWithPadding(tokenizer)),
            processing_class=tokenizer,
            **trainer_kwargs,
        )

    return build


class RunFiles:
    """The files of one run in a log directory, read as a user would."""

    def __init__(self, log_dir: Path, run_id: str | None = None):
        self.log_dir = Path(log_dir)
        stamps = sorted({p.name[len("seo_engine_"):-len(".log")] for p in self.log_dir.glob("seo_engine_*.log")})
        assert stamps, f"no run in {self.log_dir}: {sorted(os.listdir(self.log_dir))}"
        self.run_id = run_id or stamps[-1]

    def path(self, prefix: str) -> Path:
        return self.log_dir / f"{prefix}_{self.run_id}.log"

    def lines(self, prefix: str) -> list[str]:
        return self.path(prefix).read_text(encoding="utf-8").splitlines()

    def messages(self, prefix: str) -> list[str]:
        """The message part of every line that starts a record (continuation lines skipped)."""
        return [m.group(4) for m in map(LINE.match, self.lines(prefix)) if m]

    def records(self, event: str | None = None) -> list[dict]:
        rows = [json.loads(line) for line in self.lines("performance_metrics")]
        return [row for row in rows if event is None or row["event"] == event]


@pytest.fixture
def log_dir(tmp_path) -> Path:
    return tmp_path / "logs"


def all_text(log_dir: Path) -> str:
    """Everything under the log directory, as one string (for 'never appears anywhere' checks)."""
    return "".join(path.read_text(encoding="utf-8") for path in sorted(Path(log_dir).rglob("*")) if path.is_file())


def json_rows(log_dir: Path) -> list[dict]:
    """Every line of every metrics file, parsed strictly (lines split on '\\n' only)."""
    rows = []
    for path in sorted(Path(log_dir).glob("performance_metrics_*")):
        for line in path.read_text(encoding="utf-8").split("\n"):
            if line:
                rows.append(json.loads(line))
    return rows


class StepHook:
    """A callback that runs ``action(trainer, state)`` at the end of step ``at_step``."""

    def __init__(self, at_step: int, action):
        from transformers import TrainerCallback

        hook = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == hook.at_step:
                    hook.action(hook.trainer, state)

        self.at_step, self.action, self.trainer = at_step, action, None
        self.callback = _Callback()
