"""Tokens seen, tokens per second and model FLOPs utilisation (MFU) of a training run.

MFU follows PaLM (Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways", appendix B):
the model FLOPs of training one token are ``6 * N`` (forward 2N, backward 4N, N = trainable
parameters) plus the attention term ``12 * L * H * S`` (L layers, H hidden size, S sequence length),
and MFU is the achieved rate ``tokens_per_second * (6N + 12LHS)`` over the peak FLOPs of the run's
devices. Recomputation (gradient checkpointing) is not counted: it is model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Peak dense (no sparsity) TFLOPS per device, by dtype, from NVIDIA's datasheets: "NVIDIA A100 Tensor
# Core GPU" datasheet (2021), "NVIDIA H100 Tensor Core GPU" datasheet (2023: SXM, PCIe, NVL), "NVIDIA
# H200 Tensor Core GPU" product brief (2024), "NVIDIA L4", "NVIDIA L40S", "NVIDIA L40", "NVIDIA A10",
# "NVIDIA A30", "NVIDIA A40" datasheets, "NVIDIA V100 Tensor Core GPU" datasheet (SXM2, PCIe, V100S),
# "NVIDIA T4" datasheet. The datasheets print tensor-core figures with sparsity; these are half of
# those. ``None``: the device has no tensor-core path for that dtype (V100/T4: no bf16, no tf32).
# The A10G (AWS) has no NVIDIA datasheet and is not in the table: set SEO_TRAINLOG_PEAK_TFLOPS.
#            name pattern (on NVML's name)           bf16    fp16    tf32    fp32
PEAK_TFLOPS: tuple[tuple[str, dict[str, float | None]], ...] = tuple(
    (pattern, {"bf16": bf16, "fp16": fp16, "tf32": tf32, "fp32": fp32}) for pattern, bf16, fp16, tf32, fp32 in (
        (r"\bH200\b.*\bNVL\b", 835.5, 835.5, 417.5, 60.0),
        (r"\bH200\b", 989.5, 989.5, 494.5, 67.0),
        (r"\bH100\b.*\bNVL\b", 835.5, 835.5, 417.5, 60.0),
        (r"\bH100\b.*\bPCIE\b", 756.5, 756.5, 378.0, 51.2),
        (r"\bH100\b", 989.5, 989.5, 494.5, 67.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
        (r"\bA100\b", 312.0, 312.0, 156.0, 19.5),  # SXM4 and PCIe, 40 and 80 GB
        (r"\bL40S\b", 362.0, 362.0, 183.0, 91.6),
        (r"\bL40\b", 181.0, 181.0, 90.5, 90.5),
        (r"\bL4\b", 121.0, 121.0, 60.0, 30.3),
        (r"\bA10\b", 125.0, 125.0, 62.5, 31.2),
        (r"\bA30\b", 165.0, 165.0, 82.0, 10.3),
        (r"\bA40\b", 149.7, 149.7, 74.8, 37.4),
        (r"\bV100S\b", None, 130.0, None, 16.4),
        (r"\bV100\b.*\bPCIE\b", None, 112.0, None, 14.0),
        (r"\bV100\b", None, 125.0, None, 15.7),  # SXM2
        (r"\bT4\b", None, 65.0, None, 8.1),
    ))
DTYPES = ("bf16", "fp16", "tf32", "fp32")


def peak_tflops_for(gpu_name: str, dtype: str) -> float | None:
    """Peak dense TFLOPS of one device named ``gpu_name`` (as NVML's ``nvmlDeviceGetName`` returns it,
    e.g. ``"NVIDIA H100 80GB HBM3"``, ``"NVIDIA A100-SXM4-80GB"``, ``"Tesla T4"``) for ``dtype``
    (``bf16``, ``fp16``, ``tf32``, ``fp32``), from :data:`PEAK_TFLOPS`; None for a device or dtype not
    in the table.

    Raises:
        ValueError: for a dtype not in :data:`DTYPES`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not valid; accepted values: {', '.join(DTYPES)}")
    name = re.sub(r"[-_]", " ", gpu_name).upper()
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, name):
            return peaks[dtype]
    return None


def training_dtype(args: Any) -> str:
    """The dtype of the matrix multiplications, from ``TrainingArguments``: ``bf16`` when
    ``args.bf16``, ``fp16`` when ``args.fp16``, ``tf32`` when ``args.tf32`` is true, else ``fp32``."""
    if getattr(args, "bf16", False):
        return "bf16"
    if getattr(args, "fp16", False):
        return "fp16"
    return "tf32" if getattr(args, "tf32", None) else "fp32"


def device_name(local_rank: int | None) -> str | None:
    """NVML's name of this process's GPU (the CUDA device of ``local_rank``); None without NVML or GPU."""
    try:
        from .monitor import NvmlReader

        reader = NvmlReader(local_rank)
    except Exception:
        return None
    try:
        name = reader._nvml.nvmlDeviceGetName(reader._devices[0][1])
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return None
    finally:
        reader.close()


def flops_per_token(trainable_parameters: int, num_layers: int | None = None, hidden_size: int | None = None,
                    seq_len: float | None = None) -> float:
    """Model FLOPs of training on one token (PaLM appendix B): ``6 * trainable_parameters``, plus
    ``12 * num_layers * hidden_size * seq_len`` when all three are known."""
    flops = 6.0 * trainable_parameters
    if num_layers and hidden_size and seq_len:
        flops += 12.0 * num_layers * hidden_size * seq_len
    return flops


def mfu_pct(tokens_per_second: float, peak_flops: float | None, trainable_parameters: int | None,
            num_layers: int | None = None, hidden_size: int | None = None, seq_len: float | None = None
            ) -> float | None:
    """``100 * tokens_per_second * flops_per_token(...) / peak_flops`` (``peak_flops``: FLOP/s of all
    the run's devices together); None when the peak or the parameter count is unknown."""
    if not peak_flops or not trainable_parameters:
        return None
    return 100.0 * tokens_per_second * flops_per_token(trainable_parameters, num_layers, hidden_size, seq_len) \
        / peak_flops


@dataclass
class TokenMeter:
    """One run's token bookkeeping (the callback's; numbers only, no I/O).

    The :class:`~seo_trainlog.TimedDataCollator` counts each batch as it is collated (the DataLoader
    reads ahead); the meter hands each count to the optimizer step that trained on the batch. The
    DataLoader yields an epoch's batch ``i`` from worker ``i % workers``, so the counts are taken
    per worker in that order. ``seen``: tokens of the batches this rank trained on so far;
    ``substeps``: micro-batches of gradient accumulation since the last take (the last micro-batch
    of a step is the step itself); ``owed``: batches used whose counts have not reached the main
    process yet (DataLoader workers), taken next time; ``epoch_batches``: batches of this epoch taken;
    ``carry``: ``(tokens, padded length sum, batches)`` of the previous epoch's last batches, taken
    when the epoch began and credited to the next logging step (``credit_steps`` of its steps);
    ``trainer_seen``: the Trainer's own ``num_input_tokens_seen`` at the previous logging step;
    ``counted_from``: the global_step a resumed run's count began at, when the checkpoint held no count.
    """

    trainable_parameters: int | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    peak_flops: float | None = None  # FLOP/s of every device of the run together
    workers: int = 1
    seen: int = 0
    substeps: int = 0
    owed: int = 0
    epoch_batches: int = 0
    credit_steps: int = 0
    carry: tuple[int, int, int] = (0, 0, 0)
    counted_any: bool = False
    trainer_seen: int | None = None
    untokenised_noted: bool = False
    counted_from: int | None = None  # a resumed run without a saved count: the global_step ours began at

    def wanted(self, steps: int) -> int:
        """Batches used and not yet taken, after ``steps`` optimizer steps since the last take."""
        return max(0, steps - self.credit_steps) + self.substeps + self.owed

    def new_epoch(self, stats: Any, steps: int) -> None:
        """An epoch begins, ``steps`` optimizer steps after the last logging step: take the previous
        epoch's batches not yet taken (counts still missing are dropped) and restart the index."""
        wanted = self.wanted(steps)
        taken, tokens, length = stats.take(wanted, self.epoch_batches, self.workers)
        carried = self.carry
        self.carry = (carried[0] + tokens, carried[1] + length, carried[2] + taken)
        self.credit_steps, self.substeps, self.owed, self.epoch_batches = steps, 0, 0, 0

    def take(self, stats: Any, steps: int) -> dict[str, int] | None:
        """This rank's numbers of the logging interval that ran ``steps`` optimizer steps: pops the
        counts of the batches used from ``stats`` (the train phase's
        :class:`~seo_trainlog.watch.timing.CollateStats`): ``tokens``, ``tokens_seen`` (cumulative),
        ``seq_len_sum``, ``seq_batches``; None when no batch was ever counted."""
        wanted = self.wanted(steps)
        taken, tokens, length = stats.take(wanted, self.epoch_batches, self.workers)
        self.owed, self.epoch_batches = wanted - taken, self.epoch_batches + taken
        self.credit_steps = self.substeps = 0
        carried, self.carry = self.carry, (0, 0, 0)
        tokens, length, taken = tokens + carried[0], length + carried[1], taken + carried[2]
        if taken:
            self.counted_any = True
        if not self.counted_any:
            return None
        self.seen += tokens
        return {"tokens": tokens, "tokens_seen": self.seen, "seq_len_sum": length, "seq_batches": taken}

    def fields(self, logs: Mapping[str, Any], interval_s: float | None, own: Mapping[str, int] | None,
               others: list[Mapping[str, Any]] | None, world_size: int) -> dict[str, Any]:
        """The record's token fields: ``num_input_tokens_seen`` (unless the Trainer logged its own,
        which then stays), ``tokens_per_second`` and ``mfu_pct``. ``others``: the other ranks'
        numbers at this step (None: not all known, then a distributed run gets no all-rank field)."""
        out: dict[str, Any] = {}
        interval = seen = None
        length = batches = 0
        if own is not None:
            length, batches = own["seq_len_sum"], own["seq_batches"]
        trainer = logs.get("num_input_tokens_seen")
        if isinstance(trainer, int) and not isinstance(trainer, bool):
            if self.trainer_seen is not None:
                interval = trainer - self.trainer_seen
            self.trainer_seen = trainer
        elif own is not None and (world_size == 1 or others is not None):
            parts = [own, *(others or ())]
            seen = sum(int(part["tokens_seen"]) for part in parts)
            interval = sum(int(part["tokens"]) for part in parts)
            length = sum(int(part.get("seq_len_sum", 0)) for part in parts)
            batches = sum(int(part.get("seq_batches", 0)) for part in parts)
            out["num_input_tokens_seen"] = seen
            if self.counted_from is not None:
                out["tokens_counted_from_global_step"] = self.counted_from
        if interval is None or not interval_s:
            return out
        rate = interval / interval_s
        out["tokens_per_second"] = rate
        out["mfu_pct"] = mfu_pct(rate, self.peak_flops, self.trainable_parameters, self.num_layers,
                                 self.hidden_size, length / batches if batches else None)
        return out


def model_shape(model: Any) -> tuple[int | None, int | None, int | None]:
    """``(trainable parameters, num_hidden_layers, hidden_size)`` of a model (config values None
    when the config does not give them)."""
    try:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    except Exception:
        trainable = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        try:
            config = config.get_text_config()
        except Exception:
            pass
    layers, hidden = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    return (trainable, layers if isinstance(layers, int) else None, hidden if isinstance(hidden, int) else None)
