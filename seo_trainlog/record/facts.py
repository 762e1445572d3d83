"""The facts of a run gathered at train begin: dataset sizes, run shape, ``TrainingArguments`` and
the model's class, parameter counts and config, for the hyperparameters record. A part that cannot be
read is written as ``<unavailable: ...>``; nothing here stops training."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from . import format as _format
from .logger import TrainLogger


def write_hyperparameters(tlog: TrainLogger, hyperparameters: dict[str, Any], args, model,
                          started: str) -> None:
    """Complete ``hyperparameters`` (:func:`gather_hyperparameters`) with ``TrainingArguments.to_dict()``
    and the model's facts, write them, then the ``started`` message. Run as a deferred job."""
    hyperparameters["training_args"] = _safely(args.to_dict)
    if model is not None:
        hyperparameters["model"] = _model_facts(model)
    tlog.log_hyperparameters(hyperparameters)
    tlog.log_message(started)


def dataset_size(dataloader) -> int | None:
    try:
        return len(dataloader.dataset)
    except Exception:
        return None


def _safely(build: Callable[[], Any]) -> Any:
    try:
        return build()
    except Exception as exc:
        return f"<unavailable: {type(exc).__name__}: {_format.safe_str(exc)}>"


def _eval_examples(eval_dataloader, trainer) -> int | dict[str, int | None] | None:
    """Rows of the evaluation data: the dataloader's, else the trainer's ``eval_dataset`` (a dict of
    datasets gives a dict of sizes)."""
    size = dataset_size(eval_dataloader)
    if size is not None:
        return size
    dataset = getattr(trainer, "eval_dataset", None)
    if isinstance(dataset, Mapping):
        return {str(name): _length(part) for name, part in dataset.items()}
    return _length(dataset)


def _length(dataset) -> int | None:
    try:
        return len(dataset)
    except Exception:
        return None


def _model_facts(model) -> dict[str, Any]:
    """The model's class, parameter counts (one pass) and config (``to_dict``)."""
    def counts() -> tuple[int, int]:
        total = trainable = 0
        for parameter in model.parameters():
            count = parameter.numel()
            total += count
            if parameter.requires_grad:
                trainable += count
        return total, trainable

    counted = _safely(counts)
    facts: dict[str, Any] = {"class": type(model).__name__,
                             "parameters": counted[0] if isinstance(counted, tuple) else counted,
                             "trainable_parameters": counted[1] if isinstance(counted, tuple) else counted}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        facts["config"] = _safely(config.to_dict)
    return facts


def gather_hyperparameters(args, state, model, train_dataloader, eval_dataloader,
                           trainer=None) -> dict[str, Any]:
    """Dataset sizes and run shape, taken now; the places of TrainingArguments (``to_dict`` blanks
    ``*_token`` fields) and the model's facts, which :func:`write_hyperparameters` fills (:func:`_model_facts`).
    A part that cannot be read is written as ``<unavailable: ...>``; training is never stopped here."""
    values: dict[str, Any] = {"training_args": None}  # filled by write_hyperparameters, as "model" is
    if model is not None:
        values["model"] = None
    values["data"] = {"train_examples": dataset_size(train_dataloader),
                      "eval_examples": _eval_examples(eval_dataloader, trainer)}
    values["run"] = {
        "world_size": args.world_size,
        "max_steps": state.max_steps,
        "num_train_epochs": state.num_train_epochs,
        "train_batch_size": state.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "start_global_step": state.global_step,
        "trial_name": state.trial_name,
        "trial_params": state.trial_params,
    }
    return values
