"""Masking of secret values before anything reaches a log file."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "<redacted>"
_SECRET_WORDS = frozenset({"token", "secret", "password", "passwd", "credential", "credentials", "apikey"})
_SECRET_PAIR = re.compile(r"(?:^|[^a-z])(?:api|access|private|secret)[_\-]?key")
_NOT_A_SECRET_SUFFIX = frozenset({"id", "ids", "type", "class", "length", "len", "count"})


def is_secret_key(key: object) -> bool:
    """True for names such as ``hub_token``, ``HF_TOKEN``, ``WANDB_API_KEY``, ``aws_access_key_id``,
    ``db_password``, ``client_secret``; false for ``pad_token_id``, ``tokenizer_class``,
    ``include_num_input_tokens_seen``."""
    lowered = str(key).lower()
    words = [word for word in re.split(r"[^a-z0-9]+", lowered) if word]
    if words and words[-1] in _NOT_A_SECRET_SUFFIX and "key" not in words:
        return False
    return bool(_SECRET_WORDS.intersection(words)) or bool(_SECRET_PAIR.search(lowered))


def mask_mapping(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``values`` (recursively) where every value under a secret-looking key that is set
    (not ``None``/empty) is replaced by ``<redacted>``."""
    masked: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            masked[key] = mask_mapping(value)
        elif is_secret_key(key) and value not in (None, "", [], {}) and not isinstance(value, (bool, int, float)):
            masked[key] = MASK
        else:
            masked[key] = value
    return masked
