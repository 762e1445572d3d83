"""Which way is better for a logged metric: one table, extended by ``LogConfig.metric_directions``.

Every place that picks a "best" value (``seo-trainlog summarize``, ``compare``, the report, the run
manifest) asks :func:`direction`; a metric without a direction gets no best, only its last value
and range.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping
from typing import Literal

Direction = Literal["min", "max"] | None
LOWER: Direction = "min"
HIGHER: Direction = "max"
NONE: Direction = None

# (words, direction): a rule matches a metric whose name (prefix removed, lower-cased, split into
# words on ``_ / @ - .`` and spaces) holds ``words`` in a row. The rule with the most words wins;
# between rules of as many words, the one matching later in the name (its head noun:
# ``accuracy_count`` is a count, ``decode_time_s`` a time).
RULES: tuple[tuple[tuple[str, ...], Direction], ...] = (
    # lower is better: losses, errors, distances to the reference
    *(((word,), LOWER) for word in (
        "loss", "error", "err", "errors", "wer", "cer", "ter", "perplexity", "ppl", "nll", "mae", "mse", "rmse",
        "rmsle", "mape", "smape", "bpc", "bpb", "brier")),
    (("logps", "rejected"), LOWER),
    # higher is better: agreement with the reference, ranking quality, preference margins
    *(((word,), HIGHER) for word in (
        "accuracy", "accuracies", "acc", "f1", "precision", "recall", "bleu", "sacrebleu", "rouge", "rouge1",
        "rouge2", "rougel", "rougelsum", "meteor", "chrf", "bertscore", "exact", "em", "auc", "auroc", "map", "ndcg",
        "mrr", "spearman", "pearson", "matthews", "mcc", "r2", "kappa", "iou", "miou", "dice", "winrate", "reward")),
    (("error", "rate"), LOWER),
    (("exact", "match"), HIGHER),
    (("win", "rate"), HIGHER),
    (("rewards", "margins"), HIGHER),
    (("rewards", "accuracies"), HIGHER),
    (("mean", "token", "accuracy"), HIGHER),
    # no direction: counters, sizes, timings, rates of the run, values that only describe it
    *(((word,), NONE) for word in (
        "num", "count", "tokens", "token", "samples", "steps", "epoch", "step", "runtime", "time", "memory",
        "entropy", "logits", "norm", "lr", "kl", "std", "length", "len", "size", "scale", "temperature", "flos")),
    (("learning", "rate"), NONE),
    (("grad", "norm"), NONE),
    (("rewards", "chosen"), NONE),
    (("rewards", "rejected"), NONE),
    (("logps", "chosen"), NONE),
    (("samples", "per", "second"), NONE),
    (("steps", "per", "second"), NONE),
    (("tokens", "per", "second"), NONE),
    (("model", "preparation", "time"), NONE),
    (("acc", "norm"), HIGHER),  # lm-evaluation-harness: length-normalised accuracy
)
# a name ending in one of these words is a spread or an error bar of a metric, never better one way:
# ``rewards/margins_std``, ``acc_stderr`` (whatever rule the words before it match)
SPREAD_WORDS = frozenset({"std", "stderr", "stddev", "var", "variance", "sem"})
PREFIXES = ("eval", "test", "train", "predict", "val", "validation")  # Trainer's and the common metric_key_prefix
_WORDS = re.compile(r"[_/@\-.\s]+")
_VALUES = {"min": LOWER, "max": HIGHER, None: NONE}


class Directions:
    """The table (:data:`RULES`) plus the user's ``overrides`` (name or :mod:`fnmatch` glob ->
    ``"min"``, ``"max"`` or ``None``), which win over the table: an exact name first, then the
    longest matching glob. Build with :func:`directions`; :meth:`of` answers."""

    def __init__(self, overrides: Mapping[str, Direction] | None = None) -> None:
        self.overrides = dict(check_overrides(overrides or {}, "metric_directions"))
        self._globs = sorted((pattern for pattern in self.overrides if _is_glob(pattern)), key=len, reverse=True)
        self._rules: dict[tuple[str, ...], Direction] = dict(RULES)
        self._lengths = sorted({len(words) for words in self._rules}, reverse=True)
        self._cache: dict[tuple[str, str | None], Direction] = {}

    def of(self, metric: str, prefix: str | None = None) -> Direction:
        """``"min"`` (lower is better), ``"max"`` (higher is better) or ``None`` (no best) for
        ``metric``, e.g. ``eval_loss`` -> ``"min"``, ``eval_rewards/margins`` -> ``"max"``,
        ``eval_num_tokens`` -> ``None``, an unknown name -> ``None``. ``prefix``: the record's metric
        prefix (a custom ``metric_key_prefix``), removed with its ``_`` before matching; the common
        ones (:data:`PREFIXES`) always are. Raises nothing."""
        key = (metric, prefix)
        found = self._cache.get(key, ...)
        if found is ...:
            found = self._find(metric, prefix)
            if len(self._cache) < 10_000:
                self._cache[key] = found
        return found  # type: ignore[return-value]

    def _find(self, metric: str, prefix: str | None) -> Direction:
        base = strip_prefix(metric, prefix)
        for name in (metric, base):
            if name in self.overrides:
                return self.overrides[name]
        for pattern in self._globs:
            if fnmatch.fnmatchcase(metric, pattern) or fnmatch.fnmatchcase(base, pattern):
                return self.overrides[pattern]
        words = [word for word in _WORDS.split(base.lower()) if word]
        if words and words[-1] in SPREAD_WORDS:
            return NONE
        for length in self._lengths:
            matches = [(end, self._rules[tuple(words[end - length:end])]) for end in range(length, len(words) + 1)
                       if tuple(words[end - length:end]) in self._rules]
            if matches:
                return matches[-1][1]
        return NONE


def strip_prefix(metric: str, prefix: str | None = None) -> str:
    """``metric`` without its ``<prefix>_`` (``prefix``, else one of :data:`PREFIXES`)."""
    for candidate in ((prefix,) if prefix else ()) + PREFIXES:
        if metric.startswith(f"{candidate}_") and len(metric) > len(candidate) + 1:
            return metric[len(candidate) + 1:]
    return metric


def directions(overrides: Mapping[str, Direction] | None = None) -> Directions:
    """The :class:`Directions` of ``overrides`` (a config's ``metric_directions``); the table alone
    is built once."""
    if not overrides:
        return _DEFAULT
    return Directions(overrides)


def check_overrides(value: object, name: str) -> dict[str, Direction]:
    """``value`` as a ``{name-or-glob: "min"|"max"|None}`` dict; a JSON object string is parsed
    (``SEO_TRAINLOG_METRIC_DIRECTIONS``).

    Raises:
        ValueError: naming ``name``, the bad entry and the accepted values.
    """
    accepted = 'accepted values: a mapping of metric name or glob to "min", "max" or null/None'
    given = value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{name}={given!r} is not valid JSON ({exc}); {accepted}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"{name}={given!r} is not valid; {accepted}")
    checked: dict[str, Direction] = {}
    for pattern, direction in value.items():
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(f"{name}: key {pattern!r} is not valid; {accepted}")
        lowered = direction.strip().lower() if isinstance(direction, str) else direction
        if lowered not in _VALUES:
            raise ValueError(f"{name}: {pattern!r}: {direction!r} is not valid; {accepted}")
        checked[pattern] = _VALUES[lowered]
    return checked


def better(direction: Direction, value: float, than: float) -> bool:
    """``value`` is strictly better than ``than`` in ``direction`` (never for ``None``)."""
    return value < than if direction == LOWER else value > than if direction == HIGHER else False


def _is_glob(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


_DEFAULT = Directions()
