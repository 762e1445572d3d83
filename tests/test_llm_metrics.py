"""The metrics LLM and embedding trainers log, read back right: real TRL ``SFTTrainer`` and
``DPOTrainer`` and sentence-transformers' ``SentenceTransformerTrainer`` on tiny random models
(offline, a few CPU steps each), then ``seo-trainlog summarize/plot/compare`` on their files.
Which metrics have a "best", and which way, comes from one table (``_directions``); the
``compare --fail-if`` gate is checked on hand-written metrics files of known values."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import WORDS, RunFiles, quiet

from seo_trainlog import LogConfig, TimedDataCollator, TrainLogCallback
from seo_trainlog.read.analysis import RunAnalysis
from seo_trainlog._directions import Directions, directions
from seo_trainlog.record.format import json_line
from seo_trainlog.read.metric_plots import build_metrics_figure
from seo_trainlog.read.reader import find_runs, read_records
from seo_trainlog.cli import main

TEXTS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 4)) for i in range(32)]
TRAIN_ARGS = dict(per_device_train_batch_size=4, max_steps=6, logging_steps=1, report_to="none", use_cpu=True,
                  save_strategy="no", disable_tqdm=True, seed=0, eval_strategy="steps", eval_steps=2,
                  per_device_eval_batch_size=4, dataloader_num_workers=0)


# ------------------------------------------------------------------ tiny models and trainers

def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    set_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(WORDS) + 4, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.5, pad_token_id=0, bos_token_id=2,
        eos_token_id=3))


def run_sft(log_dir: Path, output_dir: Path, learning_rate: float, **config) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict({"text": TEXTS})
    SFTTrainer(model=tiny_llama(), processing_class=word_tokenizer(), train_dataset=data,
               eval_dataset=data.select(range(8)), callbacks=[TrainLogCallback(quiet(log_dir, **config))],
               args=SFTConfig(output_dir=str(output_dir), learning_rate=learning_rate, max_length=16,
                              **TRAIN_ARGS)).train()


def run_dpo(log_dir: Path, output_dir: Path) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_dict({"prompt": TEXTS[:16], "chosen": [" " + text.split()[0] for text in TEXTS[:16]],
                              "rejected": [" " + WORDS[(i * 5 + 1) % len(WORDS)] for i in range(16)]})
    DPOTrainer(model=tiny_llama(), ref_model=tiny_llama(), processing_class=word_tokenizer(), train_dataset=data,
               eval_dataset=data.select(range(8)), callbacks=[TrainLogCallback(quiet(log_dir))],
               args=DPOConfig(output_dir=str(output_dir), learning_rate=5e-2, max_length=16, **TRAIN_ARGS)).train()


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory) -> Path:
    """Two SFT runs in one log directory, alike but for the learning rate (1e-3, then 2e-3)."""
    root = tmp_path_factory.mktemp("sft")
    for learning_rate in (1e-3, 2e-3):
        run_sft(root / "logs", root / "out", learning_rate)
    return root / "logs"


@pytest.fixture(scope="module")
def dpo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dpo")
    run_dpo(root / "logs", root / "out")
    return root / "logs"


def cli_json(capsys, *argv: str, status: int = 0) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == status
    return json.loads(capsys.readouterr().out)


def column(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """``(global_step, value)`` of every row holding ``key``."""
    return [(row["global_step"], row[key]) for row in rows if key in row]


def best_of(pairs: list[tuple[int, float]], direction: str) -> dict:
    """The best value and the step it was first reached at."""
    value = (min if direction == "min" else max)(value for _, value in pairs)
    return {"value": value, "global_step": next(step for step, v in pairs if v == value)}


# ------------------------------------------------------------------ the table of directions

def test_the_table_of_directions():
    table = directions()
    expected = {
        "eval_loss": "min", "eval_wer": "min", "eval_cer": "min", "eval_perplexity": "min", "test_rmse": "min",
        "eval_logps/rejected": "min", "logps/rejected": "min", "embedding_loss": "min", "aux_loss": "min",
        "error_rate": "min",
        "eval_accuracy": "max", "eval_f1": "max", "eval_rougeL": "max", "eval_bleu": "max", "recall": "max",
        "eval_rewards/margins": "max", "rewards/accuracies": "max", "mean_token_accuracy": "max",
        "eval_sts-dev_spearman_cosine": "max", "eval_nq_cosine_ndcg@10": "max", "eval_nq_cosine_map@100": "max",
        "eval_nq_cosine_mrr@10": "max",
        "eval_num_tokens": None, "num_tokens": None, "entropy": None, "logits/chosen": None,
        "eval_logits/rejected": None,
        "rewards/chosen": None, "eval_rewards/rejected": None, "logps/chosen": None, "train_runtime": None,
        "eval_samples_per_second": None, "steps_per_second": None, "epoch": None, "learning_rate": None,
        "grad_norm": None, "num_input_tokens_seen": None, "my_custom_value": None,
    }
    assert {name: table.of(name) for name in expected} == expected
    assert (table.of("dev_accuracy", "dev"), table.of("holdout_loss", "holdout")) == ("max", "min")


def test_a_spread_has_no_direction_and_acc_norm_is_higher_is_better():
    # a name ending in std/stderr is a spread of a metric, whatever the words before it; lm-eval-harness's
    # acc_norm is an accuracy (its norm is the length normalisation, not a gradient norm)
    table = directions()
    expected = {
        "rewards/margins_std": None, "rewards/accuracies_std": None, "eval_rewards/margins_std": None,
        "acc_stderr": None, "eval_acc_norm_stderr": None, "loss_std": None, "mean_token_accuracy_std": None,
        "eval_acc_norm": "max", "acc_norm": "max", "eval_acc": "max",
        "rewards/margins": "max", "grad_norm": None, "eval_loss": "min",
    }
    assert {name: table.of(name) for name in expected} == expected
    assert Directions({"*_std": "min"}).of("rewards/margins_std") == "min"  # the user's entry still wins


def test_users_extend_the_table_in_logconfig_and_the_environment():
    config = LogConfig(metric_directions={"eval_my_score": "MAX", "*_count": "min", "rewards/*": None})
    assert config.metric_directions == {"eval_my_score": "max", "*_count": "min", "rewards/*": None}
    table = directions(config.metric_directions)
    assert [table.of(name) for name in ("eval_my_score", "my_score", "eval_clip_count", "eval_rewards/margins",
                                        "eval_loss")] == ["max", None, "min", None, "min"]
    from_env = LogConfig.from_env({"SEO_TRAINLOG_METRIC_DIRECTIONS": '{"eval_my_score": "max", "x*": null}'})
    assert from_env.metric_directions == {"eval_my_score": "max", "x*": None}
    with pytest.raises(ValueError, match=r"^metric_directions: 'eval_x': 'up' is not valid; accepted values: a "
                                         r"mapping of metric name or glob to \"min\", \"max\" or null/None$"):
        LogConfig(metric_directions={"eval_x": "up"})
    with pytest.raises(ValueError, match=r"^SEO_TRAINLOG_METRIC_DIRECTIONS='\[1\]' is not valid; "):
        LogConfig.from_env({"SEO_TRAINLOG_METRIC_DIRECTIONS": "[1]"})
    with pytest.raises(ValueError, match=r"^SEO_TRAINLOG_METRIC_DIRECTIONS='max' is not valid JSON"):
        LogConfig.from_env({"SEO_TRAINLOG_METRIC_DIRECTIONS": "max"})
    assert Directions({"eval_loss": None}).of("eval_loss") is None  # the user's word wins over the table


# ------------------------------------------------------------------ real TRL and sentence-transformers runs

def test_dpo_summary_picks_best_by_direction_and_none_without(dpo_dir, capsys):
    run = RunFiles(dpo_dir)
    evals, train = run.records("eval"), run.records("train")
    assert len(evals) == 3 and [row["global_step"] for row in train] == [1, 2, 3, 4, 5, 6]
    out = cli_json(capsys, "summarize", str(dpo_dir))

    assert set(out["best_eval"]) == {"eval_loss", "eval_mean_token_accuracy", "eval_rewards/accuracies",
                                     "eval_rewards/margins", "eval_logps/rejected"}
    assert out["best_eval"]["eval_rewards/margins"] == best_of(column(evals, "eval_rewards/margins"), "max")
    assert out["best_eval"]["eval_logps/rejected"] == best_of(column(evals, "eval_logps/rejected"), "min")
    assert out["best_eval"]["eval_loss"] == best_of(column(evals, "eval_loss"), "min")
    for name in ("eval_num_tokens", "eval_rewards/chosen", "eval_rewards/rejected", "eval_entropy",
                 "eval_logits/chosen", "eval_logps/chosen"):
        values = [value for _, value in column(evals, name)]
        assert out["eval_metrics"][name] == {"last": values[-1], "last_global_step": 6, "min": min(values),
                                             "max": max(values), "direction": None}

    assert set(out["train_metrics"]) == {"entropy", "num_tokens", "mean_token_accuracy", "logits/chosen",
                                         "logits/rejected", "rewards/chosen", "rewards/rejected",
                                         "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"}
    for name, direction in (("rewards/margins", "max"), ("logps/rejected", "min"), ("rewards/chosen", None),
                            ("rewards/rejected", None), ("num_tokens", None)):
        pairs = column(train, name)
        values = [value for _, value in pairs]
        expected = {"last": values[-1], "last_global_step": 6, "min": min(values), "max": max(values),
                    "direction": direction}
        if direction is not None:
            expected["best"] = best_of(pairs, direction)
        assert out["train_metrics"][name] == expected

    # the run manifest keeps a best only for the metrics with a direction, the right way
    manifest = json.loads(next(dpo_dir.glob("run_manifest_*.json")).read_text())
    assert manifest["eval"]["best"] == {name: out["best_eval"][name] for name in out["best_eval"]}

    capsys.readouterr()
    assert main(["summarize", str(dpo_dir)]) == 0
    text = capsys.readouterr().out
    assert "best eval_rewards/margins" in text and "best eval_num_tokens" not in text
    assert "train rewards/chosen" in text and "best eval_rewards/rejected" not in text


def test_the_environment_changes_directions_for_summarize(dpo_dir, capsys, monkeypatch):
    monkeypatch.setenv("SEO_TRAINLOG_METRIC_DIRECTIONS", '{"eval_entropy": "min", "rewards/*": null}')
    out = cli_json(capsys, "summarize", str(dpo_dir))
    evals = RunFiles(dpo_dir).records("eval")
    assert set(out["best_eval"]) == {"eval_loss", "eval_mean_token_accuracy", "eval_logps/rejected", "eval_entropy"}
    assert out["best_eval"]["eval_entropy"] == best_of(column(evals, "eval_entropy"), "min")
    assert "best" not in out["train_metrics"]["rewards/margins"]
    monkeypatch.setenv("SEO_TRAINLOG_METRIC_DIRECTIONS", '{"eval_entropy": "lowest"}')
    capsys.readouterr()
    assert main(["summarize", str(dpo_dir)]) == 2
    assert capsys.readouterr().err == ("seo-trainlog: error: SEO_TRAINLOG_METRIC_DIRECTIONS: 'eval_entropy': "
                                       "'lowest' is not valid; accepted values: a mapping of metric name or glob "
                                       "to \"min\", \"max\" or null/None\n")


def test_sft_train_metrics_are_summarised_and_plotted(sft_dir, capsys, tmp_path):
    run = RunFiles(sft_dir)
    train = run.records("train")
    out = cli_json(capsys, "summarize", str(sft_dir))
    accuracy = [value for _, value in column(train, "mean_token_accuracy")]
    assert len(accuracy) == 6
    assert out["train_metrics"]["mean_token_accuracy"] == {
        "last": accuracy[-1], "last_global_step": 6, "min": min(accuracy), "max": max(accuracy), "direction": "max",
        "best": best_of(column(train, "mean_token_accuracy"), "max")}
    tokens = [value for _, value in column(train, "num_tokens")]
    assert out["train_metrics"]["num_tokens"] == {"last": tokens[-1], "last_global_step": 6, "min": tokens[0],
                                                  "max": tokens[-1], "direction": None}
    assert "eval_num_tokens" not in out["best_eval"] and out["eval_metrics"]["eval_num_tokens"]["direction"] is None
    assert set(out["train_metrics"]) == {"entropy", "mean_token_accuracy", "num_tokens"}

    figure_path = tmp_path / "metrics.png"
    capsys.readouterr()
    assert main(["plot", str(sft_dir), "-o", str(figure_path), "--metrics", "mean_token_accuracy, num_*"]) == 0
    assert capsys.readouterr().out == f"wrote {figure_path} (mean_token_accuracy, num_tokens)\n"
    assert figure_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    analysis = RunAnalysis(run.run_id, LogConfig()).add_all(read_records(find_runs(sft_dir)[-1]))
    figure = build_metrics_figure(analysis, ["mean_token_accuracy", "eval_num_*"])
    visible = [axes for axes in figure.axes if axes.get_visible()]
    assert [axes.get_title(loc="left") for axes in visible] == ["mean_token_accuracy", "eval_num_tokens"]
    # the train values, then the eval_ counterpart on the same panel (anomalies are vertical lines)
    train_line, eval_line = [line for line in visible[0].get_lines() if line.get_label() in ("train", "eval")]
    assert (list(train_line.get_xdata()), list(train_line.get_ydata())) == ([1, 2, 3, 4, 5, 6], accuracy)
    assert list(eval_line.get_ydata()) == [value for _, value in column(run.records("eval"),
                                                                         "eval_mean_token_accuracy")]

    capsys.readouterr()
    assert main(["plot", str(sft_dir), "-o", str(tmp_path / "none.png"), "--metrics", "rewards/*,num_tokens"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"seo-trainlog: error: --metrics: 'rewards/*' matched no metric of run {run.run_id} "
                          "(its metrics: entropy, mean_token_accuracy, num_tokens, eval_loss, ")
    assert not (tmp_path / "none.png").exists()


def test_compare_two_real_runs_shows_only_what_differs(sft_dir, capsys, tmp_path):
    first, second = (run.run_id for run in find_runs(sft_dir))
    out = cli_json(capsys, "compare", str(sft_dir))
    assert out["differences"] == {"training_args.learning_rate": [0.001, 0.002]}
    assert [run["run_id"] for run in out["runs"]] == [first, second]
    assert [run["status"] for run in out["runs"]] == ["completed", "completed"]
    for index, run_id in enumerate((first, second)):
        files = RunFiles(sft_dir, run_id)
        evals, train = files.records("eval"), files.records("train")
        [summary] = files.records("summary")
        assert out["runs"][index]["duration_s"] == summary["training_duration_s"]
        assert out["runs"][index]["anomaly_count"] == len(files.records("anomaly"))
        assert out["metrics"]["eval_loss"]["final"][index] == evals[-1]["eval_loss"]
        assert out["metrics"]["eval_loss"]["best"][index] == min(row["eval_loss"] for row in evals)
        assert out["metrics"]["loss"]["final"][index] == train[-1]["loss"]
        assert out["metrics"]["mean_token_accuracy"]["best"][index] == max(r["mean_token_accuracy"] for r in train)
        assert out["metrics"]["eval_num_tokens"]["final"][index] == evals[-1]["eval_num_tokens"]
    assert (out["metrics"]["eval_loss"]["direction"], out["metrics"]["mean_token_accuracy"]["direction"]) == ("min",
                                                                                                              "max")
    assert out["metrics"]["eval_num_tokens"].keys() == {"direction", "final"}  # a counter has no best

    swapped = cli_json(capsys, "compare", str(sft_dir), second, first)
    assert swapped["differences"] == {"training_args.learning_rate": [0.002, 0.001]}
    capsys.readouterr()
    assert main(["compare", str(sft_dir)]) == 0
    text = capsys.readouterr().out
    assert "training_args.learning_rate" in text and "training_args.output_dir" not in text

    report = tmp_path / "report.html"
    assert main(["report", str(sft_dir), "-o", str(report)]) == 0
    html = report.read_text(encoding="utf-8")
    assert "<h3>Hyperparameters that differ</h3>" in html
    assert "<tr><td>training_args.learning_rate</td><td>0.001</td><td>0.002</td></tr>" in html


def test_sentence_transformers_tokens_and_evaluator_metrics(tmp_path, capsys):
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator
    from transformers import BertConfig, BertModel, BertTokenizer, set_seed

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    set_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(tmp_path / "bert")
    BertTokenizer(vocab={word: index for index, word in enumerate(vocab)}).save_pretrained(tmp_path / "bert")
    model = SentenceTransformer(str(tmp_path / "bert"), device="cpu")
    pairs = Dataset.from_dict({"anchor": TEXTS[:16], "positive": [" ".join(t.split()[::-1]) for t in TEXTS[:16]]})
    evaluator = EmbeddingSimilarityEvaluator(TEXTS[:8], TEXTS[8:16], [i / 8 for i in range(8)], name="sts-dev")
    log_dir = tmp_path / "logs"
    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path / "out"), learning_rate=1e-2,
                                                **{**TRAIN_ARGS, "max_steps": 4})
    # attention_mask.sum() of the features of every training forward of the model's Transformer module (anchor,
    # then positive; it calls the BERT's forward method directly, so the hook is on the module that gets them)
    received: list[int] = []

    def keep_mask(module, args):
        if module.training:
            received.append(int(args[0]["attention_mask"].sum()))

    model[0].register_forward_pre_hook(keep_mask)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=pairs,
                                         eval_dataset=pairs.select(range(8)),
                                         loss=losses.MultipleNegativesRankingLoss(model), evaluator=evaluator,
                                         callbacks=[TrainLogCallback(quiet(log_dir))])
    trainer.data_collator = TimedDataCollator(trainer.data_collator)
    trainer.train()
    # its collator's keys are prefixed (anchor_input_ids, anchor_attention_mask, positive_*): both masks counted,
    # equal to what the model received (two forwards a step)
    assert len(received) == 8
    assert [row["num_input_tokens_seen"] for row in RunFiles(log_dir).records("train")] == [
        sum(received[:2 * step]) for step in (1, 2, 3, 4)]
    assert not [m for m in RunFiles(log_dir).messages("data_loading") if "tokens are not counted" in m]
    evals = RunFiles(log_dir).records("eval")
    assert len(evals) == 2
    out = cli_json(capsys, "summarize", str(log_dir))
    assert set(out["best_eval"]) == {"eval_loss", "eval_sts-dev_pearson_cosine", "eval_sts-dev_spearman_cosine"}
    for name in ("eval_sts-dev_pearson_cosine", "eval_sts-dev_spearman_cosine"):
        assert out["best_eval"][name] == best_of(column(evals, name), "max")
    assert [row["global_step"] for row in RunFiles(log_dir).records("train")] == [1, 2, 3, 4]


# ------------------------------------------------------------------ every *loss key is training progress

def test_a_training_log_with_several_losses_is_training_progress(make_trainer, log_dir, capsys):
    from transformers import Trainer

    class TwoLossTrainer(Trainer):
        def log(self, logs, *args, **kwargs):
            if "loss" in logs:  # step 1-3: loss + aux_loss; step 4-6: lm_loss + aux_loss (no "loss")
                aux = {"aux_loss": round(logs["loss"] / 10, 6)}
                logs = {**logs, **aux} if self.state.global_step <= 3 else \
                    {("lm_loss" if key == "loss" else key): value for key, value in {**logs, **aux}.items()}
            return super().log(logs, *args, **kwargs)

    trainer = make_trainer(max_steps=6)
    trainer.__class__ = TwoLossTrainer
    trainer.add_callback(TrainLogCallback(quiet(log_dir)))
    trainer.train()
    run = RunFiles(log_dir)
    train = run.records("train")
    assert [row["global_step"] for row in train] == [1, 2, 3, 4, 5, 6] and not run.records("log")
    history = [entry for entry in trainer.state.log_history if "aux_loss" in entry]
    assert [row["loss"] for row in train] == [entry.get("loss", entry.get("lm_loss")) for entry in history]
    assert [row["aux_loss"] for row in train] == [entry["aux_loss"] for entry in history]
    assert [row.get("loss_name") for row in train] == [None] * 3 + ["lm_loss"] * 3
    out = cli_json(capsys, "summarize", str(log_dir))
    aux = [entry["aux_loss"] for entry in history]
    assert out["train_metrics"] == {"aux_loss": {"last": aux[-1], "last_global_step": 6, "min": min(aux),
                                                 "max": max(aux), "direction": "min",
                                                 "best": best_of(column(train, "aux_loss"), "min")}}
    assert out["final_loss"] == history[-1]["lm_loss"]


# ------------------------------------------------------------------ the --fail-if regression gate

START = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)


def write_run(log_dir: Path, run_id: str, learning_rate: float, evals: list[dict], losses: list[float]) -> None:
    """A completed run's metrics file, as the library writes it: hyperparameters, train and eval records."""
    rows = [("run_start", 0, {}), ("hyperparameters", 0, {"hyperparameters": {
        "training_args": {"learning_rate": learning_rate, "seed": 0}, "run": {"max_steps": len(losses)}}})]
    rows += [("train", step, {"loss": loss, "learning_rate": learning_rate, "interval_s": 1.0, "steps": 1,
                              "samples_per_second": 8.0}) for step, loss in enumerate(losses, 1)]
    rows += [("eval", 2 * (index + 1), {"metric_prefix": "eval", **values}) for index, values in enumerate(evals)]
    rows.append(("summary", len(losses), {"status": "completed", "training_duration_s": 12.5}))
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"performance_metrics_{run_id}.log", "w", encoding="utf-8") as out:
        for index, (event, step, values) in enumerate(rows):
            out.write(json_line(event, run_id, step, step / 10, values, time=START + timedelta(seconds=index)) + "\n")


@pytest.fixture
def gate_dir(tmp_path) -> Path:
    """Baseline: final eval_loss 0.50, eval_accuracy 0.80; candidate: 0.52 (+4%), 0.79 (-1.25%)."""
    log_dir = tmp_path / "logs"
    write_run(log_dir, "20261201_120000", 1e-3, [{"eval_loss": 0.6, "eval_accuracy": 0.7},
                                                 {"eval_loss": 0.5, "eval_accuracy": 0.8}], [1.0, 0.9, 0.8, 0.7])
    write_run(log_dir, "20261202_120000", 2e-3, [{"eval_loss": 0.48, "eval_accuracy": 0.82},
                                                 {"eval_loss": 0.52, "eval_accuracy": 0.79}], [1.0, 0.8, 0.7, 0.6])
    return log_dir


@pytest.mark.parametrize(("conditions", "status", "failed"), [
    ("eval_loss>+2%", 1, ["eval_loss>+2%"]),
    ("eval_loss>+5%", 0, []),
    ("eval_accuracy<-1%", 1, ["eval_accuracy<-1%"]),
    ("eval_accuracy<-2%", 0, []),
    ("eval_loss>+0.05", 0, []),
    ("eval_loss>+0.01", 1, ["eval_loss>+0.01"]),
    ("eval_loss>+5%, eval_accuracy<-1%,loss>+0%", 1, ["eval_accuracy<-1%"]),
])
def test_fail_if_exits_1_when_the_last_run_regresses(gate_dir, capsys, conditions, status, failed):
    capsys.readouterr()
    assert main(["compare", str(gate_dir), "--fail-if", conditions]) == status
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": FAILS ")[1].strip("'") for line in err if ": FAILS " in line] == failed
    assert len(err) == len([part for part in conditions.split(",") if part.strip()])


def test_fail_if_says_what_it_measured(gate_dir, capsys):
    out = cli_json(capsys, "compare", str(gate_dir), "--fail-if", "eval_loss>+2%", status=1)
    assert out["differences"] == {"training_args.learning_rate": [0.001, 0.002]}
    assert out["metrics"]["eval_loss"] == {"direction": "min", "final": [0.5, 0.52], "best": [0.5, 0.48]}
    assert out["metrics"]["eval_accuracy"] == {"direction": "max", "final": [0.8, 0.79], "best": [0.8, 0.82]}
    [outcome] = out["fail_if"]
    assert outcome["failed"] is True and (outcome["first"], outcome["last"]) == (0.5, 0.52)
    assert outcome["change_pct"] == pytest.approx(4.0)
    assert capsys.readouterr().err == ""  # (read by cli_json) the line is on stderr:
    assert main(["compare", str(gate_dir), "--fail-if", "eval_loss>+2%"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "seo-trainlog: eval_loss: 0.5 (20261201_120000) -> 0.52 (20261202_120000), +0.02 (+4%): FAILS 'eval_loss>+2%'")


def test_fail_if_on_a_metric_a_run_lacks_or_a_bad_condition_exits_2(gate_dir, capsys):
    capsys.readouterr()
    assert main(["compare", str(gate_dir), "--fail-if", "eval_f1<-1%"]) == 2
    assert capsys.readouterr().err == ("seo-trainlog: error: --fail-if 'eval_f1<-1%': run 20261201_120000 has no "
                                       "eval_f1 (its metrics: eval_accuracy, eval_loss, loss)\n")
    assert main(["compare", str(gate_dir), "--fail-if", "eval_loss rises"]) == 2
    assert "'eval_loss rises': not a condition; accepted: METRIC>+N (fails when" in capsys.readouterr().err
    assert main(["compare", str(gate_dir), "20261201_120000", "--fail-if", "eval_loss>+2%"]) == 2
    assert capsys.readouterr().err == "seo-trainlog: error: --fail-if needs two runs or more to compare, got 1\n"
    assert main(["compare", str(gate_dir), "20991231_000000"]) == 2
    assert capsys.readouterr().err == f"seo-trainlog: error: no run '20991231_000000' in {gate_dir}\n"
    assert main(["compare", str(gate_dir), "not-a-run"]) == 2
    assert capsys.readouterr().err == ("seo-trainlog: error: 'not-a-run' is neither a log directory nor a run id "
                                       "(YYYYMMDD_HHMMSS[_n])\n")


def test_compare_across_directories_in_the_order_given(gate_dir, tmp_path, capsys):
    other = tmp_path / "other"
    write_run(other, "20261203_120000", 1e-3, [{"eval_loss": 0.4, "eval_accuracy": 0.9}], [1.0, 0.5])
    out = cli_json(capsys, "compare", str(gate_dir), str(other), "--run", "20261203_120000", "--run",
                   "20261201_120000", "--fail-if", "eval_loss>+0%", status=1)
    assert [(run["run_id"], run["log_dir"]) for run in out["runs"]] == [("20261203_120000", str(other)),
                                                                         ("20261201_120000", str(gate_dir))]
    assert out["differences"] == {"run.max_steps": [2, 4]}
    assert out["metrics"]["eval_loss"]["final"] == [0.4, 0.5]
    assert out["fail_if"][0]["failed"] is True  # 0.4 -> 0.5 rose; exit 1 without --json too
    assert main(["compare", str(gate_dir), str(other), "--run", "20261203_120000", "--run", "20261201_120000",
                 "--fail-if", "eval_loss>+0%"]) == 1


def test_the_manifest_and_summarize_follow_the_users_directions(make_trainer, tiny_dataset, log_dir, capsys,
                                                                monkeypatch):
    def compute_metrics(prediction):
        return {"my_score": float(prediction.predictions.mean()), "num_items": len(prediction.label_ids)}

    trainer = make_trainer(max_steps=6, eval_strategy="steps", eval_steps=2,
                           eval_dataset=tiny_dataset.select(range(16)), compute_metrics=compute_metrics)
    trainer.add_callback(TrainLogCallback(quiet(log_dir, metric_directions={"eval_my_score": "min"})))
    trainer.train()
    evals = RunFiles(log_dir).records("eval")
    assert len(evals) == 3 and len({row["eval_my_score"] for row in evals}) == 3
    lowest = best_of(column(evals, "eval_my_score"), "min")
    manifest = json.loads(next(log_dir.glob("run_manifest_*.json")).read_text())
    assert manifest["eval"]["best"] == {"eval_loss": best_of(column(evals, "eval_loss"), "min"),
                                        "eval_my_score": lowest}  # no best for eval_num_items (a count)
    # the run recorded its directions: summarize picks the manifest's best without being told again
    assert RunFiles(log_dir).records("run_start")[0]["metric_directions"] == {"eval_my_score": "min"}
    out = cli_json(capsys, "summarize", str(log_dir))
    assert out["best_eval"] == manifest["eval"]["best"]
    # the reader's own setting wins over the run's
    monkeypatch.setenv("SEO_TRAINLOG_METRIC_DIRECTIONS", '{"eval_my_score": "max"}')
    out = cli_json(capsys, "summarize", str(log_dir))
    assert out["best_eval"]["eval_my_score"] == best_of(column(evals, "eval_my_score"), "max")


def test_summarize_and_compare_use_the_directions_the_sft_run_was_configured_with(tmp_path, capsys):
    log_dir = tmp_path / "logs"
    run_sft(log_dir, tmp_path / "out", 5e-2, metric_directions={"eval_mean_token_accuracy": "min"})
    evals = RunFiles(log_dir).records("eval")
    lowest = best_of(column(evals, "eval_mean_token_accuracy"), "min")
    assert lowest != best_of(column(evals, "eval_mean_token_accuracy"), "max")
    manifest = json.loads(next(log_dir.glob("run_manifest_*.json")).read_text())
    assert manifest["eval"]["best"]["eval_mean_token_accuracy"] == lowest
    out = cli_json(capsys, "summarize", str(log_dir))
    assert out["best_eval"] == manifest["eval"]["best"]
    assert out["eval_metrics"]["eval_mean_token_accuracy"]["direction"] == "min"
    metrics = cli_json(capsys, "compare", str(log_dir))["metrics"]
    assert metrics["eval_mean_token_accuracy"]["direction"] == "min"


def test_compare_skips_a_run_it_cannot_read_and_says_so(gate_dir, capsys):
    (gate_dir / "performance_metrics_20261203_120000.log").write_text("not json\n", encoding="utf-8")
    out = cli_json(capsys, "compare", str(gate_dir))
    assert [run["run_id"] for run in out["runs"]] == ["20261201_120000", "20261202_120000"]
    assert main(["compare", str(gate_dir)]) == 0
    assert capsys.readouterr().err.startswith("seo-trainlog: warning: run 20261203_120000 skipped: ")
    assert main(["compare", str(gate_dir), "20261203_120000", "20261201_120000"]) == 2


def test_a_train_metric_first_logged_as_nan_is_still_summarised(tmp_path, capsys):
    log_dir = tmp_path / "logs"
    rows = [("run_start", 0, {})] + [
        ("train", step, {"loss": 1.0 / step, "learning_rate": 1e-3, "mean_token_accuracy": value, "host": "vm"})
        for step, value in ((1, None), (2, 0.25), (3, 0.5), (4, 0.375))]  # NaN is written as null
    log_dir.mkdir()
    with open(log_dir / "performance_metrics_20261201_120000.log", "w", encoding="utf-8") as out:
        for index, (event, step, values) in enumerate(rows):
            out.write(json_line(event, "20261201_120000", step, step / 10, values,
                                time=START + timedelta(seconds=index)) + "\n")
    out = cli_json(capsys, "summarize", str(log_dir))
    assert out["train_metrics"] == {"mean_token_accuracy": {
        "last": 0.375, "last_global_step": 4, "min": 0.25, "max": 0.5, "direction": "max",
        "best": {"value": 0.5, "global_step": 3}}}


def write_records(log_dir: Path, run_id: str, rows: list[tuple[str, int, dict]]) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"performance_metrics_{run_id}.log", "w", encoding="utf-8") as out:
        for index, (event, step, values) in enumerate(rows):
            out.write(json_line(event, run_id, step, step / 10, values, time=START + timedelta(seconds=index)) + "\n")


def test_plot_metrics_says_which_metrics_it_left_out(tmp_path, capsys):
    from PIL import Image

    log_dir = tmp_path / "logs"
    names = [f"m{index:02d}" for index in range(30)]
    write_records(log_dir, "20261201_120000", [("run_start", 0, {})] + [
        ("train", step, {"loss": 1.0 / step, "learning_rate": 1e-3, **{name: step * 0.5 for name in names}})
        for step in (1, 2, 3)])
    capsys.readouterr()
    assert main(["plot", str(log_dir), "-o", str(tmp_path / "many.png"), "--metrics", "m*"]) == 0
    out, err = capsys.readouterr()
    assert out == f"wrote {tmp_path / 'many.png'} ({', '.join(names[:24])})\n"
    assert err == ("seo-trainlog: warning: plot --metrics: 30 metrics matched, the figure shows the first 24 (at most "
                   "24 panels); left out: m24, m25, m26, m27, m28, m29. Narrow the globs, or plot the rest in another "
                   "figure: --metrics 'm24,m25,m26,m27,m28,m29'\n")
    assert Image.open(tmp_path / "many.png").size == (1410, 2780)  # 3 columns x 8 rows
    assert main(["plot", str(log_dir), "-o", str(tmp_path / "few.png"), "--metrics", "m0*"]) == 0
    assert capsys.readouterr().err == ""  # all drawn: nothing to say


def test_a_one_panel_metrics_figure_keeps_its_titles_inside(tmp_path):
    log_dir = tmp_path / "logs"
    write_records(log_dir, "20261201_120000", [("run_start", 0, {})] + [
        ("train", step, {"loss": 1.0 / step, "learning_rate": 1e-3, "mean_token_accuracy": step * 0.1})
        for step in (1, 2, 3)] + [("summary", 3, {"status": "completed"})])
    analysis = RunAnalysis("20261201_120000", LogConfig()).add_all(read_records(find_runs(log_dir)[0]))
    figure = build_metrics_figure(analysis, ["mean_token_accuracy"])
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    box = figure.bbox
    texts = [figure._suptitle, *(axes.title for axes in figure.axes), *(axes._left_title for axes in figure.axes)]
    for text in texts:
        if text.get_text():
            extent = text.get_window_extent(renderer)
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and extent.y1 <= box.y1, text.get_text()
    assert figure._suptitle.get_text() == "Run 20261201_120000\ncompleted, global_step 3, epoch 0.3"
