"""Keeping secrets out of the log files: by key name, and by known value wherever it appears."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

MASK = "<redacted>"
MIN_SECRET_LENGTH = 6  # shorter values are too likely to occur in ordinary text
MAX_DEPTH = 64  # deeper than this, a whole value is masked rather than inspected

# Words that make any non-empty value a secret, numbers included (a PIN, a numeric password).
_STRONG_WORDS = frozenset({"secret", "secrets", "password", "passwords", "passwd", "pwd", "passphrase", "credential",
                           "credentials", "apikey", "apikeys", "authorization", "privatekey", "secretkey",
                           "accesskey", "cookie", "cookies"})
_KEY_QUALIFIERS = frozenset({"api", "access", "private", "secret", "signing", "encryption"})
# "...token" / "...tokens" as the last word is a secret string (hub_token, HF_TOKEN, sessionToken,
# access_tokens); metrics and ids that merely mention tokens are not (mean_token_accuracy,
# pad_token_id, image_token_index), nor are a tokenizer's special tokens (pad_token, eos_token).
_TOKEN_WORDS = frozenset({"token", "tokens"})
_SPECIAL_TOKEN_WORDS = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask", "special"})

STRONG, TOKEN = "strong", "token"
_SHELL_DIRECTORIES = frozenset({"PWD", "OLDPWD"})  # "pwd" elsewhere (db_pwd) is a password
_PLAIN = (str, int, float, bool, type(None), bytes)


def _words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)  # sessionToken -> session_Token
    spaced = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", spaced)  # HFToken -> HF_Token
    return [word for word in re.split(r"[^a-z0-9]+", spaced.lower()) if word]


@functools.lru_cache(maxsize=8192)
def secret_kind(key: str) -> str | None:
    """``"strong"`` (mask every non-empty value), ``"token"`` (mask strings) or None for a key name."""
    words = _words(key)
    if _STRONG_WORDS.intersection(words):
        return STRONG
    for index, word in enumerate(words):
        if word in ("key", "keys") and index > 0 and words[index - 1] in _KEY_QUALIFIERS:
            return STRONG
    if words and words[-1] in _TOKEN_WORDS and not _SPECIAL_TOKEN_WORDS.intersection(words):
        return TOKEN
    return None


def is_secret_key(key: object) -> bool:
    """True for names such as ``hub_token``, ``HF_TOKEN``, ``HFToken``, ``sessionToken``,
    ``access_tokens``, ``WANDB_API_KEY``, ``api_keys``, ``aws_access_key_id``, ``db_password``,
    ``db_pwd``, ``Authorization``, ``client_secret``, ``credentials``; false for ``pad_token_id``,
    ``token_type_ids``, ``mean_token_accuracy``, ``tokenizer_class``, ``eos_token``,
    ``include_num_input_tokens_seen``."""
    return secret_kind(str(key)) is not None


def _masks(kind: str | None, value: Any) -> bool:
    if kind is None or value is None or isinstance(value, bool) or (isinstance(value, (str, bytes)) and not value):
        return False
    return kind == STRONG or isinstance(value, (str, bytes))


def mask_mapping(values: Mapping[Any, Any]) -> dict[Any, Any]:
    """A copy of ``values`` where what sits under a secret-looking key is ``<redacted>``.

    Recurses into mappings, lists, dataclasses and objects with ``to_dict()`` (which become dicts).
    Under a strong secret key (password, secret, api_key, credential...) every non-empty value is
    masked, numbers included; under a ``...token`` key every string. ``None``, booleans and empty
    strings stay (they reveal nothing). Masked strings are remembered by :data:`REDACTOR`, so the
    same value is masked wherever else it would be written. Beyond 64 levels of nesting the whole
    value is masked.
    """
    if all(type(value) in _PLAIN and secret_kind(key if type(key) is str else str(key)) is None
           for key, value in values.items()):
        return dict(values)  # the common case: plain values under plain names
    return {key: _mask(value, secret_kind(str(key)), 1) for key, value in values.items()}


def _expand(value: Any) -> Any:
    """Dataclasses and objects with ``to_dict()`` as dicts, so that their keys are inspected too."""
    if isinstance(value, _PLAIN) or isinstance(value, type):
        return value
    try:
        if dataclasses.is_dataclass(value):
            return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
        to_dict = getattr(value, "to_dict", None)
        if callable(to_dict):
            converted = to_dict()
            if isinstance(converted, Mapping):
                return converted
    except Exception:
        pass
    return value


def _mask(value: Any, kind: str | None, depth: int) -> Any:
    if kind is None and type(value) in _PLAIN:  # most logged values: nothing to look into
        return value
    if depth > MAX_DEPTH:
        return MASK
    value = _expand(value)
    if isinstance(value, Mapping):
        return {key: _mask(item, kind or secret_kind(str(key)), depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_mask(item, kind, depth + 1) for item in value]
    if _masks(kind, value):
        if isinstance(value, str):
            REDACTOR.add(value)
        return MASK
    return value


def remember_secrets(values: Mapping[Any, Any]) -> None:
    """Teach :data:`REDACTOR` the string values under secret-looking keys of ``values``."""
    mask_mapping(values)


def _forms(value: str) -> set[str]:
    """The ways a secret appears in text: as is, in ``repr``/``str`` of containers and exceptions
    (escaped quotes and backslashes), URL-encoded, and each of those JSON-escaped."""
    backslashed = value.replace("\\", "\\\\")
    forms = {value, repr(value)[1:-1], backslashed.replace("'", "\\'"), backslashed.replace('"', '\\"'),
             urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)}
    forms |= {json.dumps(form, ensure_ascii=False)[1:-1] for form in forms}
    forms |= {json.dumps(form)[1:-1] for form in forms}
    return {form for form in forms if len(form) >= MIN_SECRET_LENGTH}


# Secrets recognisable by their shape, wherever they appear (an exception message, a logged string,
# a URL): the password of a URL, the value of an ``Authorization`` scheme, secret-named URL query or
# ``name=value`` parameters, and the token formats of the usual services. Each pattern runs only on
# text holding one of its literal triggers (most records hold none). The value classes never take a
# quote or a backslash, so that a JSON line stays valid when a match inside it is replaced.
_SECRET_PARAMETERS = ("access_token", "refresh_token", "id_token", "auth_token", "token", "api_key", "apikey",
                      "client_secret", "secret", "password", "passwd")
_COLON_PARAMETERS = tuple(name for name in _SECRET_PARAMETERS if name != "token")  # not "pad_token: [MASK]"
# (triggers, pattern, case-insensitive): an insensitive pattern's triggers are matched in lower case
_SHAPES: tuple[tuple[tuple[str, ...], re.Pattern[str], bool], ...] = (
    # scheme://user:PASSWORD@host (a password may hold "@": up to the last one before the host)
    (("://",), re.compile(r"(?P<keep>://[^/\s:@\"'\\]+:)[^/\s\"'\\]+(?=@[^@/\s\"'\\]+)"), False),
    (("bearer",), re.compile(r"(?P<keep>\bBearer\s+)[A-Za-z0-9._~+/=-]{8,}", re.I), True),  # any Bearer credential
    (("authorization",),  # Basic and Token credentials only in a header: the words are common in prose
     re.compile(r"(?P<keep>\bAuthorization\W{0,3}\s*(?:Basic|Token)\s+)[A-Za-z0-9._~+/=-]{8,}", re.I), True),
    (tuple(f"{name}=" for name in _SECRET_PARAMETERS),
     re.compile(r"(?P<keep>(?<![A-Za-z0-9])(?:" + "|".join(_SECRET_PARAMETERS) + r")=)[^&\s\"'\\,;]{6,}", re.I), True),
    (tuple(f"{name}:" for name in _COLON_PARAMETERS),
     re.compile(r"(?P<keep>(?<![A-Za-z0-9])(?:" + "|".join(_COLON_PARAMETERS) + r"):[ \t]*)[^\s\"'\\,;]{6,}", re.I), True),
    (("hf_",), re.compile(r"\bhf_[A-Za-z0-9]{30,}"), False),  # Hugging Face
    (("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
     re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}|\bgithub_pat_[A-Za-z0-9_]{22,}"), False),  # GitHub
    (("AKIA", "ASIA"), re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), False),  # AWS access key id
    (("sk-",), re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"), False),  # OpenAI / Anthropic style keys
    (("xox",), re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), False),  # Slack
    (("glpat-",), re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}"), False),  # GitLab
    (("AIza",), re.compile(r"\bAIza[0-9A-Za-z_-]{35}"), False),  # Google API key
    (("eyJ",), re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"), False),  # JSON Web Token
)


def _mask_shape(match: re.Match[str]) -> str:
    return (match.groupdict().get("keep") or "") + MASK


def mask_shapes(text: str) -> str:
    """``text`` with the secrets recognisable by their shape (see ``_SHAPES``) replaced by ``<redacted>``."""
    lowered = None
    for triggers, pattern, insensitive in _SHAPES:
        if insensitive and lowered is None:
            lowered = text.lower()
        haystack = lowered if insensitive else text
        for trigger in triggers:
            if trigger in haystack:
                text = pattern.sub(_mask_shape, text)
                lowered = None
                break
    return text


class Redactor:
    """Replaces known secret values by ``<redacted>`` in any text, in every form they are written in
    (see :func:`_forms`), and the secrets recognisable by their shape (:func:`mask_shapes`). Values come from environment variables with secret-looking names
    (``HF_TOKEN``, ``WANDB_API_KEY``...; re-read when a run opens and when an error is written) and
    from every string masked by :func:`mask_mapping`; values shorter than 6 characters are ignored.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: tuple[str, ...] = ()
        self._known: set[str] = set()

    def add(self, value: str) -> None:
        value = value.strip()
        if len(value) < MIN_SECRET_LENGTH or value in self._known:
            return
        with self._lock:
            self._known.add(value)
            forms = set(self._values) | _forms(value)
            # longest first, so that a secret containing another is replaced whole
            self._values = tuple(sorted(forms, key=len, reverse=True))

    def add_environment(self, environ: Mapping[str, str]) -> None:
        """Remember the values of the secret-looking environment variables (``HF_TOKEN``,
        ``WANDB_API_KEY``...); the shell's ``PWD``/``OLDPWD`` are directories, not passwords."""
        for name, value in environ.items():
            if value and name.upper() not in _SHELL_DIRECTORIES and secret_kind(name) is not None:
                self.add(value)

    def __call__(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, MASK)
        return mask_shapes(text)

    def redact_record(self, record: dict) -> None:
        """A loguru patcher: redacts the record's message in place."""
        record["message"] = self(record["message"])


REDACTOR = Redactor()
