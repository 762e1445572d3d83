"""Keeping secrets out of the log files: by key name, and by known value wherever it appears."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from typing import Any

MASK = "<redacted>"
MIN_SECRET_LENGTH = 6  # shorter values are too likely to occur in ordinary text

_SECRET_WORDS = frozenset({"token", "secret", "secrets", "password", "passwd", "passphrase", "credential",
                           "credentials", "apikey", "privatekey", "secretkey", "accesskey"})
_KEY_QUALIFIERS = frozenset({"api", "access", "private", "secret", "signing", "encryption"})
_TOKEN_ID_WORDS = frozenset({"id", "ids", "type", "types"})  # pad_token_id, token_type_ids: vocabulary indices


def _words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)  # sessionToken -> session_Token
    return [word for word in re.split(r"[^a-z0-9]+", spaced.lower()) if word]


def is_secret_key(key: object) -> bool:
    """True for names such as ``hub_token``, ``HF_TOKEN``, ``sessionToken``, ``WANDB_API_KEY``,
    ``aws_access_key_id``, ``db_password``, ``client_secret``, ``credentials``; false for
    ``pad_token_id``, ``token_type_ids``, ``tokenizer_class``, ``include_num_input_tokens_seen``."""
    words = _words(str(key))
    if "token" in words and words[-1] in _TOKEN_ID_WORDS and "key" not in words:
        return False
    if _SECRET_WORDS.intersection(words):
        return True
    return any(word == "key" and index > 0 and words[index - 1] in _KEY_QUALIFIERS
               for index, word in enumerate(words))


def _is_blank(value: Any) -> bool:
    return value is None or isinstance(value, bool) or (isinstance(value, (str, bytes)) and not value)


def mask_mapping(values: Mapping[Any, Any], *, _depth: int = 0) -> dict[Any, Any]:
    """A copy of ``values`` where everything under a secret-looking key is ``<redacted>``.

    Recurses into mappings and lists; a whole mapping or list under a secret key is masked leaf by
    leaf. ``None``, booleans and empty strings stay as they are (they reveal nothing). String
    values that are masked are also remembered by :data:`REDACTOR`, so the same value is masked
    wherever else it would be written.
    """
    return {key: _mask(value, is_secret_key(key), _depth + 1) for key, value in values.items()}


def _mask(value: Any, secret: bool, depth: int) -> Any:
    if depth > 32:
        return value
    if isinstance(value, Mapping):
        return {key: _mask(item, secret or is_secret_key(key), depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mask(item, secret, depth + 1) for item in value]
    if secret and not _is_blank(value):
        if isinstance(value, str):
            REDACTOR.add(value)
        return MASK
    return value


def remember_secrets(values: Mapping[Any, Any]) -> None:
    """Teach :data:`REDACTOR` the string values under secret-looking keys of ``values``."""
    mask_mapping(values)


class Redactor:
    """Replaces known secret values by ``<redacted>`` in any text (and in their JSON-escaped form).

    Values come from environment variables with secret-looking names (``HF_TOKEN``,
    ``WANDB_API_KEY``...) and from every string masked by :func:`mask_mapping`; values shorter
    than 6 characters are ignored.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: tuple[str, ...] = ()

    def add(self, value: str) -> None:
        value = value.strip()
        if len(value) < MIN_SECRET_LENGTH:
            return
        escaped = json.dumps(value, ensure_ascii=False)[1:-1]
        with self._lock:
            known = set(self._values)
            known.update({value, escaped})
            # longest first, so that a secret containing another is replaced whole
            self._values = tuple(sorted(known, key=len, reverse=True))

    def add_environment(self, environ: Mapping[str, str]) -> None:
        for name, value in environ.items():
            if is_secret_key(name) and value:
                self.add(value)

    def __call__(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, MASK)
        return text

    def redact_record(self, record: dict) -> None:
        """A loguru patcher: redacts the record's message in place."""
        if self._values:
            record["message"] = self(record["message"])


REDACTOR = Redactor()
