"""Hardening: secrets in the shapes real messages carry, a disk that fills up then frees, counters
printed as integers."""

from __future__ import annotations

import base64

from conftest import RunFiles, all_text, quiet

from seo_trainlog import TrainLogger

# ---------------------------------------------------------------------------------------- secrets


def test_secrets_in_the_shapes_real_messages_carry_are_masked(log_dir):
    try:
        raise RuntimeError("login refused for {'password': 'x'}")
    except RuntimeError as error:
        raised = error
    with TrainLogger(quiet(log_dir)) as tlog:
        tlog.log_error(raised, context='payload {"password": "hunter2secret"}')
        tlog.log_error(ValueError("Client(api_key='k1', host='h') failed"), context='Client(api_key="apikeySECRET7")')
        tlog.log_message("connecting to redis://:secretpw@host:6379/0 with db_creds=credsSECRET1 and "
                         "{'aws_cred': 'ac9'} and {'password': 4242}")
        tlog.log_hyperparameters({"cache_url": "redis://:secretpw@host:6379/0", "db_creds": "credsSECRET1",
                                  "aws_cred": "ac9", "note": "{'password': 'x'}",
                                  "payload": '{"password": "hunter2secret"}', "password_length": 12})
        tlog.log_metrics("custom", {"note": "{'password': 'x'}", "payload": '{"password": "hunter2secret"}',
                                    "call": "Client(api_key='k1')", "nested": {"call": "Client(api_key='k1')"}})
    run = RunFiles(log_dir, tlog.run_id)
    assert run.messages("errors") == [
        "Error: RuntimeError: login refused for {'password': '<redacted>'}",
        'Context: payload {"password": "<redacted>"}',
        "Error: ValueError: Client(api_key='<redacted>', host='h') failed",
        'Context: Client(api_key="<redacted>")',
    ]
    trace = run.path("error_tracking").read_text()
    assert "RuntimeError: login refused for {'password': '<redacted>'}\n" in trace and "'x'" not in trace
    errors = run.records("error")
    assert [(row["message"], row["context"]) for row in errors] == [
        ("login refused for {'password': '<redacted>'}", 'payload {"password": "<redacted>"}'),
        ("Client(api_key='<redacted>', host='h') failed", 'Client(api_key="<redacted>")'),
    ]
    assert errors[0]["traceback"].endswith("RuntimeError: login refused for {'password': '<redacted>'}")
    assert ("connecting to redis://:<redacted>@host:6379/0 with db_creds=<redacted> and "
            "{'aws_cred': '<redacted>'} and {'password': <redacted>}") in run.messages("seo_engine")
    hyper = run.messages("training_progress")
    for line in ("cache_url: redis://:<redacted>@host:6379/0", "db_creds: <redacted>", "aws_cred: <redacted>",
                 "note: {'password': '<redacted>'}", 'payload: {"password": "<redacted>"}', "password_length: 12"):
        assert line in hyper, line
    assert run.records("hyperparameters")[0]["hyperparameters"] == {
        "cache_url": "redis://:<redacted>@host:6379/0", "db_creds": "<redacted>", "aws_cred": "<redacted>",
        "note": "{'password': '<redacted>'}", "payload": '{"password": "<redacted>"}', "password_length": 12}
    custom = run.records("custom")[0]
    assert (custom["note"], custom["payload"], custom["call"], custom["nested"]) == (
        "{'password': '<redacted>'}", '{"password": "<redacted>"}', "Client(api_key='<redacted>')",
        {"call": "Client(api_key='<redacted>')"})
    text = all_text(log_dir)
    for secret in ("hunter2secret", "secretpw", "credsSECRET1", "apikeySECRET7", "'k1'", "'ac9'", "4242"):
        assert secret not in text, secret


def test_ordinary_text_next_to_secret_names_is_kept(log_dir):
    with TrainLogger(quiet(log_dir)) as tlog:
        tlog.log_message("num_tokens=582, mean_token_accuracy=0.5, password_length=12, num_secrets=3, "
                         "use_secret=True, hub_token=None, pad_token: [PAD], Authorization: Bearer abcdefgh123")
        tlog.log_hyperparameters({"password_length": 12, "num_secrets": 3, "credit_score": 700, "pad_token": "[PAD]"})
    run = RunFiles(log_dir, tlog.run_id)
    assert ("num_tokens=582, mean_token_accuracy=0.5, password_length=12, num_secrets=3, use_secret=True, "
            "hub_token=None, pad_token: [PAD], Authorization: Bearer <redacted>") in run.messages("seo_engine")
    assert run.records("hyperparameters")[0]["hyperparameters"] == {
        "password_length": 12, "num_secrets": 3, "credit_score": 700, "pad_token": "[PAD]"}


B64 = base64.b64encode(b"b64-SECRET-value").decode()


def test_what_cannot_be_masked_is_what_the_readme_says(log_dir, monkeypatch):
    """The README's list of what is not caught, each shown as it happens."""
    monkeypatch.setenv("DB_PASSWORD", "ab12c")  # under 6 characters: not looked for in free text
    monkeypatch.setenv("MY_DB_PASS", "notanameSECRET")  # a name that does not look secret
    monkeypatch.setenv("HF_TOKEN", "b64-SECRET-value")  # known, but written base64-encoded
    with TrainLogger(quiet(log_dir)) as tlog:
        tlog.log_message("connected with ab12c; password=ab12c")
        tlog.log_message("connected with notanameSECRET")
        tlog.log_message(f"as base64: {B64}, as is: b64-SECRET-value")
        tlog.log_message("the password is hunter2secret")  # no name=value, no known value or shape
        tlog.log_message("password: abc12")  # prose after "name:": values under 6 characters stay
        tlog.log_hyperparameters({"login": {"user": "bob", "pass": "passSECRET1"}})  # "pass" is not a secret name
    run = RunFiles(log_dir, tlog.run_id)
    messages = run.messages("seo_engine")
    for line in ("connected with ab12c; password=<redacted>", "connected with notanameSECRET",
                 f"as base64: {B64}, as is: <redacted>",
                 "the password is hunter2secret", "password: abc12", "login.pass: passSECRET1"):
        assert line in messages, line
