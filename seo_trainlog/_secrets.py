"""Keeping secrets out of the log files: by key name, and by known value wherever it appears."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import threading
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "<redacted>"
MIN_SECRET_LENGTH = 6  # shorter values are too likely to occur in ordinary text
MAX_DEPTH = 64  # deeper than this, a whole value is masked rather than inspected

# Words that make any non-empty value a secret, numbers included (a PIN, a numeric password).
_STRONG_WORDS = frozenset({"secret", "secrets", "password", "passwords", "passwd", "pwd", "passphrase", "credential",
                           "credentials", "cred", "creds", "apikey", "apikeys", "authorization", "privatekey",
                           "secretkey", "accesskey", "cookie", "cookies"})
# A name that measures a secret (password_length, num_secrets, min_password_len) holds a number, not
# the secret: its numbers stay, its strings are still masked.
_MEASURE_WORDS = frozenset({"length", "len", "count", "num", "size", "min", "max", "bits", "rounds", "iterations",
                            "ttl", "timeout", "expiry", "age"})
_KEY_QUALIFIERS = frozenset({"api", "access", "private", "secret", "signing", "encryption"})
# "...token" / "...tokens" as the last word is a secret string (hub_token, HF_TOKEN, sessionToken,
# access_tokens); metrics and ids that merely mention tokens are not (mean_token_accuracy,
# pad_token_id, image_token_index), nor are a tokenizer's special tokens (pad_token, eos_token).
_TOKEN_WORDS = frozenset({"token", "tokens"})
_SPECIAL_TOKEN_WORDS = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask", "special"})

STRONG, TOKEN = "strong", "token"
_SHELL_DIRECTORIES = frozenset({"PWD", "OLDPWD"})  # "pwd" elsewhere (db_pwd) is a password
_PLAIN = (str, int, float, bool, type(None), bytes)
# Every word above holds one of these: a key name without any of them (most names) is not split into words.
_TRIGGERS = ("secret", "pass", "pwd", "cred", "key", "auth", "cookie", "token")
_TRIGGER = re.compile("|".join(_TRIGGERS))


_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
_CAPITALS = re.compile(r"([A-Z]+)([A-Z][a-z])")
_SEPARATORS = re.compile(r"[^a-z0-9]+")


def _words(key: str) -> list[str]:
    spaced = _CAMEL.sub(r"\1_\2", key)  # sessionToken -> session_Token
    spaced = _CAPITALS.sub(r"\1_\2", spaced)  # HFToken -> HF_Token
    return [word for word in _SEPARATORS.split(spaced.lower()) if word]


@functools.lru_cache(maxsize=8192)
def secret_kind(key: str) -> str | None:
    """``"strong"`` (mask every non-empty value), ``"token"`` (mask strings) or None for a key name.

    Strong: a name holding secret, password, passwd, pwd, passphrase, credential(s), cred(s),
    authorization, cookie, or api/access/private/secret/signing/encryption + key (``db_creds``,
    ``aws_cred``, ``x-api-key``). Token: a name ending in token(s) that is not a tokenizer's special
    token (``hub_token``; not ``pad_token``), and a strong name that measures it (``password_length``,
    ``num_secrets``: their numbers are not secrets)."""
    if key in _SHELL_DIRECTORIES:  # the shell's PWD and OLDPWD are directories, not passwords
        return None
    if _TRIGGER.search(key.lower()) is None:
        return None
    words = _words(key)
    strong = bool(_STRONG_WORDS.intersection(words)) or any(
        word in ("key", "keys") and index > 0 and words[index - 1] in _KEY_QUALIFIERS
        for index, word in enumerate(words))
    if strong:
        return TOKEN if _MEASURE_WORDS.intersection(words) else STRONG
    if words and words[-1] in _TOKEN_WORDS and not _SPECIAL_TOKEN_WORDS.intersection(words):
        return TOKEN
    return None


def is_secret_key(key: object) -> bool:
    """True for names such as ``hub_token``, ``HF_TOKEN``, ``HFToken``, ``sessionToken``,
    ``access_tokens``, ``WANDB_API_KEY``, ``api_keys``, ``aws_access_key_id``, ``db_password``,
    ``db_pwd``, ``Authorization``, ``client_secret``, ``credentials``, ``db_creds``, ``aws_cred``;
    false for ``pad_token_id``, ``token_type_ids``, ``mean_token_accuracy``, ``tokenizer_class``,
    ``eos_token``, ``include_num_input_tokens_seen``, ``credit_score``."""
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
    if kind is None and isinstance(value, _PLAIN):  # nothing to look into (str and int enums too)
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


def secret_keys(keys: Iterable[Any]) -> list[str]:
    """The keys of ``keys`` for which :func:`is_secret_key` is true, in order: one search of all the
    names joined (a ``TrainingArguments`` has about 120) rather than one per name."""
    names = [str(key) for key in keys]
    plain = [index for index, name in enumerate(names) if "\n" not in name]  # (a name with a newline: alone)
    joined = "\n".join(names[index] for index in plain).lower()  # (lower() never makes a newline)
    candidates = {plain[joined.count("\n", 0, match.start())] for match in _TRIGGER.finditer(joined)}
    candidates.update(index for index, name in enumerate(names) if "\n" in name)
    return [names[index] for index in sorted(candidates) if secret_kind(names[index]) is not None]


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
# a URL): the password of a URL, the value of an ``Authorization`` scheme, and the token formats of
# the usual services; then the values written after a secret name (see ``mask_named_values``). Each
# pattern runs only on text holding one of its literal triggers (most records hold none). The value
# classes never take a quote or a backslash, so that a JSON line stays valid when a match inside it
# is replaced.
# (triggers, pattern, case-insensitive): an insensitive pattern's triggers are matched in lower case
_SHAPES: tuple[tuple[tuple[str, ...], re.Pattern[str], bool], ...] = (
    # scheme://user:PASSWORD@host, the user may be empty (redis://:PASSWORD@host); a password may
    # hold "@": up to the last one before the host
    (("://",), re.compile(r"(?P<keep>://[^/\s:@\"'\\]*:)[^/\s\"'\\]+(?=@[^@/\s\"'\\]+)"), False),
    (("bearer",), re.compile(r"(?P<keep>\bBearer\s+)[A-Za-z0-9._~+/=-]{8,}", re.I), True),  # any Bearer credential
    (("authorization",),  # Basic and Token credentials only in a header: the words are common in prose
     re.compile(r"(?P<keep>\bAuthorization\W{0,3}\s*(?:Basic|Token)\s+)[A-Za-z0-9._~+/=-]{8,}", re.I), True),
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


# A name that may be a secret's (``secret_kind`` decides), quoted or not, then ``=`` or ``:``:
# ``password=...``, ``api_key='...'``, ``{'password': ...}``, ``{"password": ...}`` and the same
# JSON-escaped inside a JSON line (``{\"password\": \"...\"}``), ``?access_token=...``,
# ``PASSWORD: ...``, ``x-api-key: ...``.
_NAME_TRIGGERS = ("secret", "pass", "pwd", "cred", "key", "cookie", "token", "authorization")
_TRIGGER = re.compile("|".join(_NAME_TRIGGERS))  # searched in lower case: far faster than re.I
_TRIGGER_ANY_CASE = re.compile("|".join(_NAME_TRIGGERS), re.I)
_NAME_TAIL = re.compile(r"[A-Za-z0-9_.-]*")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_AFTER_NAME = re.compile(r"(?P<close>\\?[\"'])?[ \t]*(?P<sep>[:=])[ \t]*")
_QUOTES = ('\\"', "\\'", '"', "'")  # JSON-escaped first
_UNQUOTED = re.compile(r"[^\s\"'\\,;&(){}\[\]<>]+")  # never a quote, a backslash or a JSON delimiter
_SCHEMES = frozenset({"bearer", "basic", "token", "digest"})  # Authorization: Bearer <the secret>
_HARMLESS = frozenset({"True", "False", "None", "true", "false", "null", "none"})
_NUMBER = re.compile(r"[-+]?(?:\d[\d_]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _closing(text: str, begin: int, quote: str, in_json: bool) -> int:
    """Where the string opened by ``quote`` before ``begin`` ends (escape pairs skipped), or -1 when it
    does not end on its line (in a JSON line: within its JSON string)."""
    index, length = begin, len(text)
    while index < length:
        char = text[index]
        if char == "\\":
            if len(quote) == 2:  # a string inside a JSON string: its own escapes are JSON-escaped too
                if text.startswith(quote, index):
                    return index
                if text.startswith("\\\\", index):  # its backslash escapes the next character
                    index += 4 if text.startswith("\\", index + 2) else 3
                    continue
            index += 2
            continue
        if char == quote or char == "\n" or (in_json and char == '"'):
            return index if char == quote else -1
        index += 1
    return -1


def _closing_bracket(text: str, begin: int) -> int:
    """The end (exclusive) of the bracketed value starting at ``begin`` (quoted strings skipped), or
    -1 when its brackets do not close on its line."""
    depth, index, length = 0, begin, len(text)
    while index < length:
        char = text[index]
        if char in "{[(":
            depth += 1
        elif char in "}])":
            depth -= 1
            if depth == 0:
                return index + 1
        elif char in "'\"":
            end = _closing(text, index + 1, char, False)
            if end < 0:
                return -1
            index = end
        elif char == "\\":
            index += 1
        elif char == "\n":
            return -1
        index += 1
    return -1


def _value_span(text: str, start: int, kind: str, quoted_name: bool, sep: str, in_json: bool) -> tuple[int, int] | None:
    """The span of the value written at ``start`` after a secret name, or None when nothing there
    is to be masked."""
    for quote in _QUOTES:
        if text.startswith(quote, start):
            begin = start + len(quote)
            end = _closing(text, begin, quote, in_json)
            if end > begin:
                return begin, end
            if end == begin:
                return None  # an empty string
            start = begin  # a quote that does not close: the value up to the first delimiter
            break
    if not in_json and text.startswith(("{", "[", "("), start):  # creds={'user': ..., 'pass': ...}
        end = _closing_bracket(text, start)
        return (start, end) if end > 0 else None
    match = _UNQUOTED.match(text, start)
    if match is None:
        return None
    if match.group().lower() in _SCHEMES and text[match.end():match.end() + 1] in (" ", "\t"):
        match = _UNQUOTED.match(text, match.end() + 1)  # Authorization: Bearer <the secret>
        if match is None:
            return None
    value = match.group()
    if value in _HARMLESS or (kind == TOKEN and _NUMBER.fullmatch(value)):
        return None
    if sep == ":" and not quoted_name and len(value) < MIN_SECRET_LENGTH:
        return None  # prose ("password: see below", "token: 5"): only values long enough to be secrets
    return match.span()


def mask_named_values(text: str, lowered: str | None = None) -> str:
    """``text`` with the values written after secret names (see :func:`secret_kind`) replaced by
    ``<redacted>``: ``password=x``, ``api_key='x'``, ``{'password': 'x'}``, ``{"password": "x"}``
    (also JSON-escaped inside a JSON line), ``?access_token=x&``, ``db_creds=x``,
    ``credentials={...}`` (a bracketed value closing on its line is masked whole), ``Authorization:
    Bearer x``. Under a ``...token`` name, numbers stay (``num_tokens=582``); ``True``, ``False``,
    ``None``, ``null`` and empty strings stay. After an unquoted ``name:`` (prose), a value shorter
    than 6 characters stays. An unquoted value ends at a space, a quote, a backslash or one of
    ``,;&(){}[]<>``."""
    in_json = text.startswith('{"')  # one of our JSON lines: never cross one of its strings
    pieces: list[str] = []
    done = 0  # the text before this is in pieces
    skip = 0  # the triggers before this are in a name looked at, or in a masked value
    lowered = text.lower() if lowered is None else lowered
    # a trigger word, then the whole name around it (where lower case changes the length, as "İ"
    # does, positions in the lowered text are not those of the text: search it in any case)
    triggers = _TRIGGER.finditer(lowered) if len(lowered) == len(text) else _TRIGGER_ANY_CASE.finditer(text)
    for trigger in triggers:
        if trigger.start() < skip:
            continue
        name_end = _NAME_TAIL.match(text, trigger.end()).end()
        name_start = trigger.start()
        while name_start > 0 and text[name_start - 1] in _NAME_CHARS:
            name_start -= 1
        after = _AFTER_NAME.match(text, name_end)
        kind = secret_kind(text[name_start:name_end]) if after is not None else None
        skip = name_end
        if kind is None:
            continue
        span = _value_span(text, after.end(), kind, after["close"] is not None, after["sep"], in_json)
        if span is None or text[span[0]:span[1]] == MASK:
            continue
        begin, end = span
        mask = MASK
        close = after["close"]
        if close and close.endswith('"') and begin == after.end():  # "pin":1234 -> "pin":"<redacted>"
            mask = close + MASK + close
        pieces += (text[done:begin], mask)
        done = skip = end
    if not pieces:
        return text
    pieces.append(text[done:])
    return "".join(pieces)


def mask_shapes(text: str) -> str:
    """``text`` with the secrets recognisable by their shape (see ``_SHAPES``) and the values written
    after secret names (:func:`mask_named_values`) replaced by ``<redacted>``."""
    lowered = text.lower()
    for triggers, pattern, insensitive in _SHAPES:
        haystack = lowered if insensitive else text
        for trigger in triggers:
            if trigger in haystack:
                text = pattern.sub(_mask_shape, text)
                lowered = text.lower()
                break
    if any(trigger in lowered for trigger in _NAME_TRIGGERS):
        text = mask_named_values(text, lowered)
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
