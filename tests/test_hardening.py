"""Hardening: secrets in the shapes real messages carry, a disk that fills up then frees, counters
printed as integers."""

from __future__ import annotations

import base64
import collections
import errno
import json
import os
import re
import shutil
import subprocess

import pytest
from conftest import RunFiles, all_text, quiet

from seo_trainlog import TrainLogger
from seo_trainlog.record import sinks as _sinks
from seo_trainlog.record.sinks import RecordFile

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
        tlog.log_message("started with PWD=/work/main/runs OLDPWD=/tmp/old-dir")
        tlog.log_hyperparameters({"password_length": 12, "num_secrets": 3, "credit_score": 700, "pad_token": "[PAD]"})
    run = RunFiles(log_dir, tlog.run_id)
    assert ("num_tokens=582, mean_token_accuracy=0.5, password_length=12, num_secrets=3, use_secret=True, "
            "hub_token=None, pad_token: [PAD], Authorization: Bearer <redacted>") in run.messages("seo_engine")
    assert "started with PWD=/work/main/runs OLDPWD=/tmp/old-dir" in run.messages("seo_engine")  # directories
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


# ---------------------------------------------------------------------------------------- disk full, then freed


class SimulatedDisk:
    """A disk with ``free_bytes`` left (None: no limit), at the OS boundary: a write takes what fits
    and returns its count, the next one raises ENOSPC, as write(2) on a full file system does."""

    def __init__(self) -> None:
        self.free_bytes: int | None = None

    def open(self, path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        return self.File(self, handle) if mode == "ab" else handle

    class File:
        def __init__(self, disk, raw) -> None:
            self.disk, self.raw = disk, raw

        def write(self, data) -> int:
            if self.disk.free_bytes is None:
                return self.raw.write(data)
            if self.disk.free_bytes == 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            count = self.raw.write(bytes(data[:self.disk.free_bytes]))
            self.disk.free_bytes -= count
            return count

        def __getattr__(self, name):
            return getattr(self.raw, name)


@pytest.fixture(params=["tmpfs", "simulated"])
def full_disk(request, tmp_path, monkeypatch):
    """(log directory, fill(), free()): a real 1 MiB tmpfs where mounting is allowed (root), else
    skipped; and the simulated disk, always."""
    if request.param == "simulated":
        disk = SimulatedDisk()
        monkeypatch.setattr(_sinks, "open", disk.open, raising=False)
        yield tmp_path / "logs", lambda: setattr(disk, "free_bytes", 700), lambda: setattr(disk, "free_bytes", None)
        return
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if getattr(os, "geteuid", lambda: -1)() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs was refused (a container without CAP_SYS_ADMIN)")
    filler = mount_point / "filler"

    def fill() -> None:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            for size in (65536, 4096, 1):
                try:
                    while True:
                        os.write(fd, b"x" * size)
                except OSError as error:
                    assert error.errno == errno.ENOSPC
        finally:
            os.close(fd)

    try:
        yield mount_point / "logs", fill, filler.unlink
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_disk_full_then_freed_writes_no_record_twice_and_counts_what_was_lost(full_disk, monkeypatch):
    log_dir, fill, free = full_disk
    monkeypatch.setattr(RecordFile, "HOLD_BYTES", 2000)  # so that the full disk costs records
    pad = "p" * 200

    def record(tlog, index):
        tlog.log_metrics("mine", {"index": index, "pad": pad})
        tlog.log_training_progress(0.1, index, 0.5, 1e-4, metrics={"note": pad})

    with TrainLogger(quiet(log_dir, flush_interval_s=3600)) as tlog:  # flushed here, not by the clock
        for index in range(1, 21):
            record(tlog, index)
        tlog.flush()
        fill()
        for index in range(21, 61):
            record(tlog, index)
            if index % 10 == 0:
                tlog.flush()
        free()
        for index in range(61, 81):
            record(tlog, index)
        tlog.flush()
        tlog.log_message("after the disk was freed", category="training")  # reports the notices
    run = RunFiles(log_dir, tlog.run_id)
    rows = [json.loads(line) for line in run.path("performance_metrics").read_text().split("\n") if line]  # none cut short
    mine = collections.Counter(row["index"] for row in rows if row["event"] == "mine")
    trained = collections.Counter(row["global_step"] for row in rows if row["event"] == "train")
    steps = collections.Counter(int(step) for step in re.findall(r"Step (\d+):", run.path("training_progress").read_text()))
    for counts in (mine, trained, steps):
        assert set(counts.values()) == {1}  # no record written twice
        assert set(range(1, 21)) | set(range(61, 81)) <= set(counts)  # before and after: all there
    lost_json = (80 - len(mine)) + (80 - len(trained))
    lost_text = 80 - len(steps)
    assert lost_json > 0 and lost_text > 0  # the full disk cost records
    notices = [m for m in run.messages("errors") if m.startswith("seo_trainlog: ")]
    assert len(notices) == len(set(notices))  # the errors file (written at every record) holds none twice
    for path, lost in ((tlog.files["metrics"], lost_json), (tlog.files["training"], lost_text)):
        about = [m for m in notices if str(path) in m]
        assert len(about) == 2 and about[0].startswith(f"seo_trainlog: cannot write to {path}: OSError: [Errno 28]")
        assert about[1] == f"seo_trainlog: writing to {path} works again after {lost} lost records"


# ---------------------------------------------------------------------------------------- counters and grammar


def test_counters_print_as_integers_in_text_logs(log_dir):
    counters = {"num_tokens": 582.0, "num_input_tokens_seen": 1024.0, "total_flos": 3e12, "train_samples": 32.0,
                "grad_norm": 2.0, "mean_token_accuracy": 1.0, "tokens_per_second": 100.0, "num_tokens_mean": 582.0,
                "num_tokens_partial": 582.5}
    with TrainLogger(quiet(log_dir)) as tlog:
        tlog.log_training_progress(0.5, 10.0, 0.25, 1e-4, metrics=counters)
        tlog.log_training_summary(1.0, 10.0, 0.2, 0.1, 5.0, extra={"num_input_tokens_seen": 2048.0, "train_loss": 1.0})
    run = RunFiles(log_dir, tlog.run_id)
    messages = run.messages("training_progress")
    assert messages[:2] == [
        "Epoch 0.5, Step 10: Loss=0.250000, LR=1.00e-04",
        "Metrics: num_tokens=582, num_input_tokens_seen=1024, total_flos=3000000000000, train_samples=32, "
        "grad_norm=2.000000, mean_token_accuracy=1.000000, tokens_per_second=100.000000, "
        "num_tokens_mean=582.000000, num_tokens_partial=582.500000"]
    for line in ("Total steps: 10", "Final loss: 0.200000", "num_input_tokens_seen: 2048", "train_loss: 1.000000"):
        assert line in messages, line
    row = run.records("train")[0]  # the JSON keeps the numbers as they came
    assert (row["num_tokens"], row["total_flos"], row["grad_norm"]) == (582.0, 3e12, 2.0)


def test_one_thing_is_written_in_the_singular(log_dir, capsys):
    from seo_trainlog import LogConfig
    from seo_trainlog.watch.anomaly import AnomalyDetector

    with TrainLogger(quiet(log_dir, console=True)) as tlog:
        tlog.log_hyperparameters({"learning_rate": 1e-4})
        tlog.log_training_summary(1.0, 1, 0.2, 0.1, 5.0)
    err = capsys.readouterr().err
    assert "seo_trainlog | hyperparameters: 1 value logged" in err
    assert "seo_trainlog | training completed: 1 step, 1 epoch, final loss 0.200000" in err
    detector = AnomalyDetector(LogConfig(log_dir=log_dir, plateau_evals=1, console=False))
    found = [a.message for step in (1, 2) for a in detector.update("eval", {"eval_loss": 1.0, "metric_prefix": "eval"}, step)]
    assert found == ["Plateau at global_step 2: eval_loss has not improved on its best 1 for 1 evaluation (min delta 0)"]


def test_what_the_full_disk_refused_is_written_by_the_flusher_once_space_returns(log_dir, monkeypatch):
    import time

    disk = SimulatedDisk()
    monkeypatch.setattr(_sinks, "open", disk.open, raising=False)
    with TrainLogger(quiet(log_dir, flush_interval_s=0.1)) as tlog:
        disk.free_bytes = 50  # 50 more bytes, for all the files of the run: then the disk is full
        for index in range(1, 4):
            tlog.log_metrics("mine", {"index": index})
        tlog.flush()
        disk.free_bytes = None  # space returns; no record is written after it
        deadline = time.monotonic() + 30
        while tlog.files["metrics"].read_text().count("\"event\":\"mine\"") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        rows = [json.loads(line) for line in tlog.files["metrics"].read_text().splitlines()]
        assert [row["index"] for row in rows if row["event"] == "mine"] == [1, 2, 3]
