"""Tokens seen, tokens per second and MFU: counted by TimedDataCollator, checked against what the
model received (a forward pre-hook on the tiny model), against the Trainer's own count, and through
summarize/plot; one real TRL SFTTrainer run."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
from conftest import RunFiles, quiet, tiny_model

from seo_trainlog import LogConfig, TimedDataCollator, TrainLogCallback
from seo_trainlog.read.analysis import RunAnalysis
from seo_trainlog.watch.collator import count_tokens
from seo_trainlog.read.plots import build_figure
from seo_trainlog.watch.tokens import flops_per_token, peak_tflops_for
from seo_trainlog.cli import main as cli_main


class ModelInputs:
    """A forward pre-hook that keeps, for every training forward, the non-padding tokens
    (``attention_mask.sum()``) and the padded length the model received."""

    def __init__(self, model):
        self.tokens: list[int] = []
        self.lengths: list[int] = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if module.training:
            mask = kwargs["attention_mask"]
            self.tokens.append(int(mask.sum()))
            self.lengths.append(int(mask.shape[-1]))

    def seen_after(self, batches: int) -> int:
        return sum(self.tokens[:batches])


def train_records(log_dir) -> list[dict]:
    return RunFiles(log_dir).records("train")


def run(make_trainer, log_dir, *, timed=True, config=None, **args):
    """Train the tiny model (DataCollatorWithPadding, wrapped in TimedDataCollator when ``timed``)."""
    model = tiny_model()
    inputs = ModelInputs(model)
    trainer = make_trainer(model=model, callbacks=[TrainLogCallback(config or quiet(log_dir))], **args)
    if timed:
        trainer.data_collator = TimedDataCollator(trainer.data_collator)
    trainer.train()
    return inputs, trainer


@pytest.mark.parametrize("workers, accumulation, max_steps", [(0, 1, 11), (2, 2, 6)],
                         ids=["main_process", "two_persistent_workers_accumulating"])
def test_tokens_seen_are_the_attention_masks_the_model_received(make_trainer, log_dir, workers, accumulation,
                                                                max_steps):
    # 64 examples, batches of 8: 8 batches an epoch, so both runs cross an epoch (11 and 12 batches)
    inputs, _ = run(make_trainer, log_dir, max_steps=max_steps, logging_steps=3,
                    gradient_accumulation_steps=accumulation, dataloader_num_workers=workers,
                    dataloader_persistent_workers=workers > 0)
    assert len(inputs.tokens) == max_steps * accumulation
    assert sum(inputs.tokens) < sum(8 * length for length in inputs.lengths)  # padding there, not counted
    records = train_records(log_dir)
    steps = [row["global_step"] for row in records]
    assert steps == list(range(3, max_steps + 1, 3))
    assert [row["num_input_tokens_seen"] for row in records] == [inputs.seen_after(step * accumulation)
                                                                 for step in steps]
    previous = 0
    for row in records:  # tokens of the interval over the interval's step + wait time, as recorded
        assert row["tokens_per_second"] == pytest.approx((row["num_input_tokens_seen"] - previous) / row["interval_s"],
                                                         rel=1e-12)
        previous = row["num_input_tokens_seen"]
        assert row["mfu_pct"] is None  # CPU, no SEO_TRAINLOG_PEAK_TFLOPS: peak unknown
        assert "rank_num_input_tokens_seen" not in row  # one process: no per-rank field
    # the steps after the last logging step are in the summary's count
    assert RunFiles(log_dir).records("summary")[0]["num_input_tokens_seen"] == sum(inputs.tokens)


def test_the_trainers_own_count_agrees_and_is_used(make_trainer, tmp_path):
    dirs = {name: tmp_path / name for name in ("ours", "both", "trainer_only", "neither")}
    hooks = {
        "ours": run(make_trainer, dirs["ours"], max_steps=5, logging_steps=2)[0],
        "both": run(make_trainer, dirs["both"], max_steps=5, logging_steps=2,
                    include_num_input_tokens_seen="non_padding")[0],
        "trainer_only": run(make_trainer, dirs["trainer_only"], timed=False, max_steps=5, logging_steps=2,
                            include_num_input_tokens_seen="non_padding")[0],
        "neither": run(make_trainer, dirs["neither"], timed=False, max_steps=5, logging_steps=2)[0],
    }
    assert hooks["ours"].tokens == hooks["both"].tokens == hooks["trainer_only"].tokens  # same seed, same batches
    expected = [hooks["ours"].seen_after(step) for step in (2, 4)]
    for name in ("ours", "both", "trainer_only"):
        records = train_records(dirs[name])
        assert [row["num_input_tokens_seen"] for row in records] == expected, name
        assert RunFiles(dirs[name]).records("summary")[0]["num_input_tokens_seen"] == sum(hooks["ours"].tokens)
        previous = 0
        for row in records:
            assert row["tokens_per_second"] == pytest.approx(
                (row["num_input_tokens_seen"] - previous) / row["interval_s"], rel=1e-12)
            previous = row["num_input_tokens_seen"]
    # without TimedDataCollator and without the Trainer's count: no token field at all
    for row in train_records(dirs["neither"]):
        assert not {"num_input_tokens_seen", "tokens_per_second", "mfu_pct"} & row.keys()


def test_mfu_with_peak_tflops_is_the_palm_formula(make_trainer, log_dir, monkeypatch, capsys):
    monkeypatch.setenv("SEO_TRAINLOG_DIR", str(log_dir))
    monkeypatch.setenv("SEO_TRAINLOG_CONSOLE", "0")
    monkeypatch.setenv("SEO_TRAINLOG_PEAK_TFLOPS", "0.002")
    model = tiny_model()
    inputs = ModelInputs(model)
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer = make_trainer(model=model, callbacks=[TrainLogCallback()], max_steps=6, logging_steps=2)
    trainer.data_collator = TimedDataCollator(trainer.data_collator)
    trainer.train()
    records = train_records(log_dir)
    assert [row["global_step"] for row in records] == [2, 4, 6]
    for row in records:
        step = row["global_step"]
        lengths = inputs.lengths[step - 2:step]  # the interval's two batches, as the model got them
        per_token = 6 * parameters + 12 * 1 * 16 * (sum(lengths) / 2)  # 1 layer, hidden size 16
        assert per_token == flops_per_token(parameters, 1, 16, sum(lengths) / 2)
        assert row["mfu_pct"] == pytest.approx(100 * row["tokens_per_second"] * per_token / 0.002e12, rel=1e-12)

    # summarize: text and --json
    capsys.readouterr()  # the Trainer printed its logs
    assert cli_main(["summarize", str(log_dir), "--json"]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    busy = sum(row["interval_s"] for row in records)
    assert tokens["num_input_tokens_seen"] == records[-1]["num_input_tokens_seen"] == sum(inputs.tokens)
    assert tokens["tokens_per_second"] == pytest.approx(records[-1]["num_input_tokens_seen"] / busy, rel=1e-9)
    assert tokens["last_tokens_per_second"] == records[-1]["tokens_per_second"]
    assert tokens["mfu_pct"] == pytest.approx(sum(r["mfu_pct"] * r["interval_s"] for r in records) / busy, rel=1e-9)
    assert tokens["last_mfu_pct"] == records[-1]["mfu_pct"]
    assert cli_main(["summarize", str(log_dir)]) == 0
    text = capsys.readouterr().out
    assert f"{sum(inputs.tokens)} tokens seen" in text and "tokens/s" in text and "MFU" in text

    # plot: a tokens/s panel and an MFU panel, with the records' values
    analysis = RunAnalysis(RunFiles(log_dir).run_id).add_all(RunFiles(log_dir).records())
    figure = build_figure(analysis)
    titles = [axes.get_title(loc="left") for axes in figure.axes]
    assert titles[4:6] == ["Tokens per second", "Model FLOPs utilisation"]
    raw = figure.axes[4].lines[0]
    assert list(raw.get_xdata()) == [2, 4, 6]
    assert list(raw.get_ydata()) == [row["tokens_per_second"] for row in records]
    assert cli_main(["plot", str(log_dir), "-o", str(log_dir / "run.png")]) == 0
    assert (log_dir / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # compare: the run's tokens/s and MFU beside a run without token counts
    plain = log_dir.parent / "plain"
    trainer = make_trainer(callbacks=[TrainLogCallback(quiet(plain))], max_steps=2, logging_steps=2)
    trainer.train()
    capsys.readouterr()
    assert cli_main(["compare", str(log_dir), str(plain), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [(r["tokens_per_second"], r["mfu_pct"]) for r in runs] == [(tokens["tokens_per_second"],
                                                                      tokens["mfu_pct"]), (None, None)]
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: every cell whole
    assert cli_main(["compare", str(log_dir), str(plain)]) == 0
    header, first, second = [line for line in capsys.readouterr().out.splitlines() if "┃" in line or "│" in line][:3]
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == [
        "run", "status", "steps", "duration", "samples/s", "tokens/s", "MFU %", "errors", "anomalies"]
    assert [cell.strip() for cell in first.split("│")[6:8]] == [f"{tokens['tokens_per_second']:.4g}",
                                                              f"{tokens['mfu_pct']:.3g}"]
    assert [cell.strip() for cell in second.split("│")[6:8]] == ["n/a", "n/a"]


def test_a_run_without_tokens_plots_and_summarizes_as_before(make_trainer, log_dir, capsys):
    run(make_trainer, log_dir, timed=False, max_steps=2)
    capsys.readouterr()
    analysis = RunAnalysis(RunFiles(log_dir).run_id).add_all(RunFiles(log_dir).records())
    assert analysis.summary()["tokens"] is None
    assert len(build_figure(analysis).axes) == 4
    assert cli_main(["summarize", str(log_dir)]) == 0
    assert "tokens/s" not in capsys.readouterr().out


def test_a_batch_without_tokens_is_said_once(make_trainer, log_dir):
    def embeddings(features):  # the model gets inputs_embeds: neither attention_mask nor input_ids
        return {"inputs_embeds": torch.randn(len(features), 4, 16),
                "labels": torch.tensor([feature["labels"] for feature in features])}

    assert count_tokens(embeddings([{"labels": 0}])) == (None, 0)
    trainer = make_trainer(callbacks=[TrainLogCallback(quiet(log_dir))], data_collator=TimedDataCollator(embeddings),
                           max_steps=3)
    trainer.train()
    notes = [m for m in RunFiles(log_dir).messages("data_loading") if "tokens are not counted" in m]
    assert len(notes) == 1
    records = train_records(log_dir)
    assert len(records) == 3 and all(row["collate_calls"] >= 1 for row in records)
    assert not any({"num_input_tokens_seen", "tokens_per_second", "mfu_pct"} & row.keys() for row in records)


@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.5),
    ("NVIDIA H100 80GB HBM3", "tf32", 494.5),
    ("NVIDIA H100 PCIe", "bf16", 756.5),
    ("NVIDIA H100 NVL", "fp16", 835.5),
    ("NVIDIA H200", "bf16", 989.5),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100-PCIE-40GB", "tf32", 156.0),
    ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA L40S", "bf16", 362.0),
    ("NVIDIA L40", "fp16", 181.0),
    ("NVIDIA A10", "bf16", 125.0),
    ("Tesla V100-SXM2-16GB", "fp16", 125.0),
    ("Tesla V100-PCIE-32GB", "fp16", 112.0),
    ("Tesla V100-SXM2-16GB", "bf16", None),  # no bf16 tensor cores
    ("Tesla T4", "fp16", 65.0),
    ("Tesla T4", "fp32", 8.1),
    ("NVIDIA A10G", "bf16", None),  # no NVIDIA datasheet: SEO_TRAINLOG_PEAK_TFLOPS
    ("NVIDIA GeForce RTX 4090", "bf16", None),
])
def test_peak_tflops_by_the_name_nvml_gives(name, dtype, expected):
    assert peak_tflops_for(name, dtype) == expected


def test_peak_tflops_setting():
    assert LogConfig.from_env({"SEO_TRAINLOG_PEAK_TFLOPS": "989.5"}).peak_tflops == 989.5
    assert LogConfig().peak_tflops is None
    with pytest.raises(ValueError, match="SEO_TRAINLOG_PEAK_TFLOPS='fast' is not valid; accepted values: a number"):
        LogConfig.from_env({"SEO_TRAINLOG_PEAK_TFLOPS": "fast"})
    with pytest.raises(ValueError, match="dtype='int8' is not valid"):
        peak_tflops_for("NVIDIA H100 80GB HBM3", "int8")


def test_trl_sft_trainer_with_a_wrapped_collator(tmp_path, tokenizer):
    tokenizer = copy.deepcopy(tokenizer)  # the session's tokenizer stays as it was
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, set_seed

    from conftest import WORDS

    set_seed(0)
    tokenizer.eos_token = "[SEP]"
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                       bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                                       pad_token_id=tokenizer.pad_token_id))
    inputs = ModelInputs(model)
    texts = [" ".join(WORDS[(i * 7) % 20:(i * 7) % 20 + 2 + i % 6]) for i in range(32)]
    log_dir = tmp_path / "logs"
    trainer = trl.SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=Dataset.from_dict({"text": texts}),
        args=trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=4, logging_steps=2,
                           per_device_train_batch_size=4, max_length=32, report_to="none", use_cpu=True,
                           save_strategy="no", disable_tqdm=True, learning_rate=1e-3, dataloader_num_workers=0),
        callbacks=[TrainLogCallback(quiet(log_dir, peak_tflops=0.001))])
    trainer.data_collator = TimedDataCollator(trainer.data_collator)  # SFTTrainer builds its own collator
    trainer.train()
    records = train_records(log_dir)
    assert [row["global_step"] for row in records] == [2, 4]
    assert [row["num_input_tokens_seen"] for row in records] == [inputs.seen_after(2), inputs.seen_after(4)]
    assert sum(inputs.tokens) < sum(4 * length for length in inputs.lengths)  # padded batches
    for row, previous in zip(records, [0, records[0]["num_input_tokens_seen"]]):
        assert row["tokens_per_second"] == pytest.approx((row["num_input_tokens_seen"] - previous) / row["interval_s"])
        assert math.isfinite(row["mfu_pct"]) and row["mfu_pct"] > 0
    assert list(itertools.accumulate(inputs.tokens))[-1] == records[-1]["num_input_tokens_seen"]


def test_count_tokens_of_a_batch():
    import numpy as np

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ids = torch.ones(2, 4, dtype=torch.long)
    assert count_tokens({"input_ids": ids, "attention_mask": mask}) == (5, 4)  # non-padding
    assert count_tokens({"input_ids": ids}) == (8, 4)  # no mask: every element
    assert count_tokens({"input_ids": np.ones((3, 5))}) == (15, 5)
    assert count_tokens({"input_ids": ids, "attention_mask": torch.ones(2, 1, 4, 4)}) == (8, 4)  # 4-D: not a count
    # prefixed keys (sentence-transformers' anchor_*/positive_*): every mask, else every input_ids array
    other = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    assert count_tokens({"anchor_input_ids": ids, "anchor_attention_mask": mask,
                         "positive_input_ids": torch.ones(2, 6), "positive_attention_mask": other}) == (14, 5)
    assert count_tokens({"anchor_input_ids": ids, "positive_input_ids": torch.ones(2, 6)}) == (20, 5)
    assert count_tokens({"input_ids": [[1, 2], [3, 4]]}) == (None, 0)
    assert count_tokens([ids]) == (None, 0)

    class Odd:
        ndim = 2

        def sum(self):
            raise RuntimeError("no sum here")

    assert count_tokens({"attention_mask": Odd()}) == (None, 0)


def test_a_resumed_run_goes_on_counting_or_says_where_its_count_began(make_trainer, log_dir, capsys, monkeypatch):
    # checkpoints at steps 2, 4, 6, 8; logging steps 3, 6, 9: checkpoint-6 holds the exact count (a
    # logging step), checkpoint-4 does not (the tokens of steps 4-5 are not known at a logging step)
    settings = dict(max_steps=9, logging_steps=3, save_strategy="steps", save_steps=2)
    first, trainer = run(make_trainer, log_dir, **settings)
    assert len(first.tokens) == 9
    output = trainer.args.output_dir
    for checkpoint in (6, 4):
        model = tiny_model()
        inputs = ModelInputs(model)
        resumed = make_trainer(model=model, callbacks=[TrainLogCallback(quiet(log_dir))], **settings)
        resumed.data_collator = TimedDataCollator(resumed.data_collator)
        resumed.train(resume_from_checkpoint=f"{output}/checkpoint-{checkpoint}")
        assert inputs.tokens == first.tokens[checkpoint:]  # the same batches as the first run's
    records = train_records(log_dir)
    assert len({row["run_id"] for row in records}) == 1  # one run, three segments
    assert [row["global_step"] for row in records] == [3, 6, 9, 9, 6, 9]
    assert [row["num_input_tokens_seen"] for row in records] == [
        sum(first.tokens[:3]), sum(first.tokens[:6]), sum(first.tokens),  # the first segment
        sum(first.tokens),  # from checkpoint-6: goes on from the count saved with it
        sum(first.tokens[4:6]), sum(first.tokens[4:])]  # from checkpoint-4: counted from step 4, and says so
    assert [row.get("tokens_counted_from_global_step") for row in records] == [None] * 4 + [4, 4]
    summaries = RunFiles(log_dir).records("summary")
    assert [(s["num_input_tokens_seen"], s.get("tokens_counted_from_global_step")) for s in summaries] == [
        (sum(first.tokens), None), (sum(first.tokens), None), (sum(first.tokens[4:]), 4)]
    capsys.readouterr()
    assert cli_main(["summarize", str(log_dir), "--json"]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    assert (tokens["num_input_tokens_seen"], tokens["tokens_counted_from_global_step"]) == (sum(first.tokens[4:]), 4)
    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal: every cell whole
    assert cli_main(["summarize", str(log_dir)]) == 0
    assert (f"{sum(first.tokens[4:])} tokens seen since global_step 4 (resumed run: the steps before were not "
            "counted)") in capsys.readouterr().out


def test_mfu_unknown_says_where_the_peak_is_set(make_trainer, log_dir, monkeypatch, capsys):
    # the variable configures only a callback without a config: this one has a LogConfig
    monkeypatch.setenv("SEO_TRAINLOG_PEAK_TFLOPS", "0.001")
    run(make_trainer, log_dir, max_steps=2, logging_steps=1)
    assert [row["mfu_pct"] for row in train_records(log_dir)] == [None, None]
    monkeypatch.setenv("COLUMNS", "250")
    capsys.readouterr()
    assert cli_main(["summarize", str(log_dir)]) == 0
    assert ("n/a (peak FLOPs unknown: set LogConfig.peak_tflops or SEO_TRAINLOG_PEAK_TFLOPS (the variable is read "
            "only by a callback without a config))") in capsys.readouterr().out


# what seo_trainlog itself adds to a train record in a distributed run, after a resume, or on a GPU
OWN_FIELDS_NOT_IN_ONE_CPU_PROCESS = ("rank_input_tokens", "rank_num_input_tokens_seen",
                                     "tokens_counted_from_global_step", "gpu0_util_pct", "gpu0_mem_used_mb",
                                     "gpu0_power_w", "gpu0_temp_c", "cuda0_allocated_mb", "cuda0_max_allocated_mb")


def test_seo_trainlogs_own_fields_are_never_shown_as_trainer_metrics(make_trainer, log_dir, capsys):
    run(make_trainer, log_dir, max_steps=3, logging_steps=1, config=quiet(log_dir, sample_interval_s=0.01))
    records = RunFiles(log_dir).records()
    train = [row for row in records if row["event"] == "train"]
    ours = set().union(*(row.keys() for row in train)) - {"loss", "grad_norm", "learning_rate"}  # the Trainer's
    assert {"num_input_tokens_seen", "tokens_per_second", "mfu_pct", "collate_time_s", "rss_mb", "interval_s",
            "data_wait_pct", "cpu_pct"} <= ours
    for row in train:  # as a distributed, resumed run on a GPU writes them
        row.update({key: 7 for key in OWN_FIELDS_NOT_IN_ONE_CPU_PROCESS})
    analysis = RunAnalysis(RunFiles(log_dir).run_id).add_all(records)
    assert analysis.summary()["train_metrics"] == {}
    assert analysis.train_metrics.names() == []
