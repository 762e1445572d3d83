"""``TrainingArguments(report_to="seo_trainlog")``: our entry in transformers' integration table."""

from __future__ import annotations

REPORT_TO_NAME = "seo_trainlog"


def register_report_to(callback_class: type) -> None:
    """Add ``seo_trainlog`` to ``transformers.integrations.integration_utils.INTEGRATION_TO_CALLBACK``
    (the table ``Trainer`` reads ``report_to`` names from). Idempotent; an entry someone else put
    under that name is left alone."""
    from transformers.integrations import integration_utils

    integration_utils.INTEGRATION_TO_CALLBACK.setdefault(REPORT_TO_NAME, callback_class)
