"""The Prometheus exporter: a real Prometheus server scraping a real Trainer run, the textfile for
node_exporter, the Pushgateway push, and what happens when a port is taken or prometheus-client is
missing."""

from __future__ import annotations

import base64
import http.server
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import LINE, RunFiles, all_text, quiet, tiny_model
from test_scale import failure_text, free_port, launch
from transformers import TrainerCallback

from seo_trainlog import LogConfig, TimedDataCollator, TrainLogCallback
from seo_trainlog.watch.anomaly import KINDS
from seo_trainlog.watch.prometheus import LABELS, MB, METRICS, NAMES, open_exporter, stop_servers, textfile_path
from seo_trainlog.record.rank import ProcessRole

prometheus_client = pytest.importorskip("prometheus_client", reason="prometheus-client is in the dev extra")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

HOST = socket.gethostname()
HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _servers():
    yield
    stop_servers()  # a /metrics server otherwise lives as long as the process (the pytest session)


def families(text: str) -> dict[str, list]:
    """``{family name: [samples]}`` of an exposition, parsed by prometheus-client's own parser."""
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(text: str, name: str, **labels: str) -> float:
    """The one sample named ``name`` whose labels include ``labels``."""
    matches = [sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items()]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode("utf-8")


def warnings_of(run: RunFiles) -> list[str]:
    return [m.group(4) for m in map(LINE.match, run.lines("errors")) if m and m.group(3) == "WARNING"]


def run_labels(run_id: str) -> dict[str, str]:
    return {"run_id": run_id, "rank": "0", "local_rank": "0", "node": "0", "host": HOST}


# ---------------------------------------------------------------- a real Prometheus server


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None)
    if found is None:
        pytest.skip("Prometheus is not installed and could not be installed: `make test` installs Debian's "
                    "`prometheus` package as root when apt-get is there (or: apt-get install -y prometheus)")
    return found


class PrometheusServer:
    """A real Prometheus (Debian's package) on a free loopback port, scraping ``target`` every second."""

    def __init__(self, binary: str, work: Path, target: str) -> None:
        self.port = free_port()
        work.mkdir(parents=True, exist_ok=True)
        config = work / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                          "scrape_configs:\n  - job_name: seo_trainlog\n"
                          f"    static_configs:\n      - targets: ['{target}']\n", encoding="utf-8")
        self.log = work / "prometheus.out"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                get(f"{self.url}/-/ready")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"Prometheus did not start: {self.log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.1)

    def query(self, expression: str) -> list[dict]:
        answer = json.loads(get(f"{self.url}/api/v1/query?query={urllib.parse.quote(expression)}"))
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def wait_for(self, expression: str, expected: str, timeout_s: float = 20.0) -> list[dict]:
        """The query's result once its (single) value is ``expected``."""
        deadline = time.monotonic() + timeout_s
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(expression)
            if len(result) == 1 and result[0]["value"][1] == expected:
                return result
            time.sleep(0.2)
        raise AssertionError(f"{expression} never became {expected}: last {result}; "
                             f"{self.log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def test_a_real_prometheus_scrapes_the_run_while_it_trains(make_trainer, log_dir, tmp_path):
    binary = prometheus_binary()
    port = free_port()
    server = PrometheusServer(binary, tmp_path / "prometheus", f"127.0.0.1:{port}")
    seen: dict[str, list[dict]] = {}

    class PauseAtStep3(TrainerCallback):
        """After our on_log of step 3 (it comes later in the list): wait until Prometheus has it."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step == 3 and "loss" in (logs or {}):
                seen["step"] = server.wait_for("seo_trainlog_global_step", "3")
                seen["running"] = server.wait_for('seo_trainlog_run_info{status="running"}', "1")

    try:
        trainer = make_trainer(max_steps=6)
        trainer.add_callback(TrainLogCallback(quiet(log_dir, prometheus_port=port, prometheus_addr="127.0.0.1")))
        trainer.add_callback(PauseAtStep3())
        trainer.train()
        run = RunFiles(log_dir)
        final = [r["global_step"] for r in run.records("train")][-1]
        assert final == 6 == trainer.state.global_step
        result = server.wait_for("seo_trainlog_global_step", str(final))
        expected = {"__name__": "seo_trainlog_global_step", "job": "seo_trainlog", "instance": f"127.0.0.1:{port}",
                    **run_labels(run.run_id)}
        assert result[0]["metric"] == expected
        assert seen["step"][0]["metric"] == expected  # scraped during the run, with the run's labels
        assert seen["running"][0]["metric"]["run_id"] == run.run_id
        done = server.wait_for('seo_trainlog_run_info{status="completed"}', "1")
        assert done[0]["metric"]["run_id"] == run.run_id
        assert server.query('seo_trainlog_run_info{status="running"}') == []  # the final status replaced it
        loss = server.wait_for("seo_trainlog_train_loss", repr(float(run.records("train")[-1]["loss"])))
        assert loss[0]["metric"]["run_id"] == run.run_id
        assert warnings_of(run) == []
    finally:
        server.stop()
    assert server.process.returncode is not None


# ---------------------------------------------------------------- the textfile


def test_textfile_holds_the_runs_values_and_is_replaced_atomically(make_trainer, log_dir, tmp_path):
    directory = tmp_path / "textfile"
    path = directory / "seo_trainlog.prom"
    reads: list[bytes] = []
    stop = threading.Event()

    def reader() -> None:  # what node_exporter would read at any moment: always a whole file
        while not stop.is_set():
            try:
                reads.append(path.read_bytes())
            except FileNotFoundError:
                pass
            time.sleep(0.001)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    started = time.time()
    trainer = make_trainer(max_steps=12)
    trainer.add_callback(TrainLogCallback(quiet(log_dir, prometheus_textfile=path, flush_interval_s=0.05)))
    trainer.train()
    ended = time.time()
    stop.set()
    thread.join()

    assert sorted(os.listdir(directory)) == ["seo_trainlog.prom"]  # no temporary file left behind
    assert len(reads) > 1
    for content in reads:  # never a partial file
        text = content.decode("utf-8")
        assert text.endswith("\n") and "seo_trainlog_run_info{" in text
        assert set(families(text)) >= {"seo_trainlog_global_step", "seo_trainlog_run_info"}

    run = RunFiles(log_dir)
    last = run.records("train")[-1]
    text = path.read_text(encoding="utf-8")
    labels = run_labels(run.run_id)
    assert value(text, "seo_trainlog_global_step", **labels) == last["global_step"] == 12
    assert value(text, "seo_trainlog_epoch", **labels) == last["epoch"]
    assert value(text, "seo_trainlog_train_loss", **labels) == last["loss"]
    assert value(text, "seo_trainlog_learning_rate", **labels) == last["learning_rate"]
    assert value(text, "seo_trainlog_grad_norm", **labels) == last["grad_norm"]
    assert value(text, "seo_trainlog_step_time_seconds", **labels) == last["step_time_s"]
    assert value(text, "seo_trainlog_data_wait_ratio", **labels) == last["data_wait_pct"] * 0.01
    assert value(text, "seo_trainlog_samples_per_second", **labels) == last["samples_per_second"]
    assert value(text, "seo_trainlog_resident_memory_bytes", **labels) == last["rss_mb"] * MB
    assert started <= value(text, "seo_trainlog_last_step_timestamp_seconds", **labels) <= ended
    assert value(text, "seo_trainlog_run_info", status="completed", **labels) == 1
    assert "running" not in text
    assert value(text, "seo_trainlog_errors_total", **labels) == 0
    for kind in KINDS:  # as many as the run recorded (a loaded machine may see a throughput_drop)
        assert value(text, "seo_trainlog_anomalies_total", kind=kind, **labels) == \
            sum(record["kind"] == kind for record in run.records("anomaly"))
    # the labels are exactly the run's: no trial outside a hyperparameter search
    sample = families(text)["seo_trainlog_global_step"][0]
    assert sample.labels == labels


def test_textfile_and_eval_loss_and_errors_count(make_trainer, log_dir, tmp_path, tiny_dataset):
    path = tmp_path / "seo.prom"

    class FailAtStep4(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise RuntimeError("boom at step 4")

    trainer = make_trainer(max_steps=8, eval_strategy="steps", eval_steps=2,
                           eval_dataset=tiny_dataset.select(range(8)), callbacks=[FailAtStep4()])
    trainer.add_callback(TrainLogCallback(quiet(log_dir, prometheus_textfile=path)))
    with pytest.raises(RuntimeError, match="boom at step 4"):
        trainer.train()
    run = RunFiles(log_dir)
    text = path.read_text(encoding="utf-8")
    labels = run_labels(run.run_id)
    evaluation = run.records("eval")[-1]
    assert evaluation["global_step"] == 2
    assert value(text, "seo_trainlog_eval_loss", **labels) == evaluation["eval_loss"]
    assert value(text, "seo_trainlog_errors_total", **labels) == 1 == len(run.records("error"))
    assert value(text, "seo_trainlog_run_info", status="failed", **labels) == 1
    assert value(text, "seo_trainlog_global_step", **labels) == run.records("train")[-1]["global_step"] == 3


def test_anomalies_are_counted_by_kind(make_trainer, log_dir, tmp_path):
    path = tmp_path / "seo.prom"
    model = tiny_model()
    calls = []

    def nan_loss_at_3(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            output.loss = output.loss * math.nan
        return output

    model.register_forward_hook(nan_loss_at_3)
    trainer = make_trainer(max_steps=5, model=model)
    trainer.add_callback(TrainLogCallback(quiet(log_dir, prometheus_textfile=path)))
    trainer.train()
    run = RunFiles(log_dir)
    kinds = [record["kind"] for record in run.records("anomaly")]
    assert "non_finite" in kinds
    text = path.read_text(encoding="utf-8")
    labels = run_labels(run.run_id)
    for kind in KINDS:
        assert value(text, "seo_trainlog_anomalies_total", kind=kind, **labels) == kinds.count(kind)


def test_a_hyperparameter_search_labels_each_trial(make_trainer, log_dir, tmp_path, tiny_dataset):
    pytest.importorskip("optuna")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    port = free_port()
    trainer = make_trainer(max_steps=2, model_init=tiny_model, eval_dataset=tiny_dataset.select(range(8)))
    trainer.add_callback(TrainLogCallback(quiet(log_dir, prometheus_port=port, prometheus_addr="127.0.0.1",
                                                prometheus_textfile=tmp_path / "seo.prom")))
    seen = []

    class Scrape(TrainerCallback):  # what /metrics serves at the end of each trial
        def on_train_end(self, args, state, control, **kwargs):
            seen.append(get(f"http://127.0.0.1:{port}/metrics"))

    trainer.add_callback(Scrape())
    trainer.hyperparameter_search(direction="minimize", backend="optuna", n_trials=2, hp_name=lambda t: f"t{t.number}",
                                  hp_space=lambda t: {"learning_rate": t.suggest_float("learning_rate", 1e-4, 1e-2)})
    stamps = sorted(p.name[len("seo_engine_"):-4] for p in log_dir.glob("seo_engine_*.log"))
    assert len(stamps) == 2 == len(seen)
    for trial, (stamp, text) in enumerate(zip(stamps, seen)):
        labels = {**run_labels(stamp), "trial": f"t{trial}"}
        assert [sample.labels for sample in families(text)["seo_trainlog_global_step"]] == [labels]
        assert value(text, "seo_trainlog_global_step", **labels) == 2
    assert value((tmp_path / "seo.prom").read_text(), "seo_trainlog_run_info", status="completed",
                 **run_labels(stamps[1]), trial="t1") == 1


def test_textfile_name_per_rank():
    role = ProcessRole(rank=3, local_rank=1, world_size=4, node_rank=1, host="h")
    assert textfile_path(Path("/t/seo_trainlog.prom"), role) == Path("/t/seo_trainlog_rank3.prom")
    single = ProcessRole(rank=0, local_rank=0, world_size=1, node_rank=0, host="h")
    assert textfile_path(Path("/t/seo_trainlog.prom"), single) == Path("/t/seo_trainlog.prom")


# ---------------------------------------------------------------- the /metrics server


def test_a_port_in_use_is_one_warning_and_training_completes(make_trainer, log_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        trainer = make_trainer(max_steps=4)
        trainer.add_callback(TrainLogCallback(quiet(log_dir, prometheus_port=port, prometheus_addr="127.0.0.1",
                                                    prometheus_textfile=tmp_path / "seo.prom")))
        trainer.train()
    run = RunFiles(log_dir)
    warnings = warnings_of(run)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"Prometheus: cannot serve /metrics on port {port} (127.0.0.1:{port}): OSError")
    assert "the port is in use. Training goes on without it." in warnings[0]
    assert run.records("summary")[0]["status"] == "completed"
    assert [r["global_step"] for r in run.records("train")] == [1, 2, 3, 4]
    # the other outputs still work
    assert value((tmp_path / "seo.prom").read_text(), "seo_trainlog_global_step", **run_labels(run.run_id)) == 4


def test_the_same_process_training_again_reuses_its_server(make_trainer, log_dir):
    port = free_port()
    config = quiet(log_dir, prometheus_port=port, prometheus_addr="127.0.0.1")
    url = f"http://127.0.0.1:{port}/metrics"
    first = make_trainer(max_steps=3)
    first.add_callback(TrainLogCallback(config))
    first.train()
    run_a = RunFiles(log_dir).run_id
    text = get(url)
    assert value(text, "seo_trainlog_global_step", **run_labels(run_a)) == 3
    assert value(text, "seo_trainlog_run_info", status="completed", **run_labels(run_a)) == 1

    second = make_trainer(max_steps=2)  # another Trainer, another callback, the same port
    second.add_callback(TrainLogCallback(config))
    second.train()
    run_b = RunFiles(log_dir).run_id
    assert run_b != run_a
    text = get(url)
    assert value(text, "seo_trainlog_global_step", **run_labels(run_b)) == 2
    assert f'run_id="{run_a}"' not in text  # the new run replaced the finished run's series

    first.train()  # the first Trainer again
    run_c = RunFiles(log_dir).run_id
    assert run_c not in (run_a, run_b)
    text = get(url)
    assert value(text, "seo_trainlog_global_step", **run_labels(run_c)) == 3
    assert f'run_id="{run_b}"' not in text
    for run_id in (run_a, run_b, run_c):
        assert warnings_of(RunFiles(log_dir, run_id)) == []


def test_one_server_serves_the_open_runs_and_the_last_finished_one(tmp_path):
    """Runs of one process on one port: those still open are all served (Trainers in two threads);
    a finished run's series stay until a newer run attaches."""
    port = free_port()
    config = LogConfig(log_dir=tmp_path / "logs", prometheus_port=port, prometheus_addr="127.0.0.1")
    role = ProcessRole(rank=0, local_rank=0, world_size=1, node_rank=0, host="node-a")
    warnings: list[str] = []
    first, second = (open_exporter(config, role, stamp, None, warnings.append)
                     for stamp in ("20260101_000001", "20260101_000002"))
    first.observe_train(7, 1.0, {"loss": float("nan")}, "loss", {}, {})
    second.observe_train(9, 1.0, {"loss": 0.5}, "loss", {}, {})
    text = get(f"http://127.0.0.1:{port}/metrics")
    assert value(text, "seo_trainlog_global_step", run_id="20260101_000001") == 7
    assert math.isnan(value(text, "seo_trainlog_train_loss", run_id="20260101_000001"))  # exposed as NaN
    assert value(text, "seo_trainlog_global_step", run_id="20260101_000002") == 9
    first.finish("completed")
    assert value(get(f"http://127.0.0.1:{port}/metrics"), "seo_trainlog_run_info", run_id="20260101_000001",
                 status="completed") == 1
    third = open_exporter(config, role, "20260101_000003", None, warnings.append)
    text = get(f"http://127.0.0.1:{port}/metrics")
    assert "20260101_000001" not in text  # finished, replaced by the newer run
    assert value(text, "seo_trainlog_global_step", run_id="20260101_000002") == 9  # still open: still served
    assert value(text, "seo_trainlog_run_info", run_id="20260101_000003", status="running") == 1
    assert first.url == second.url == third.url == f"http://127.0.0.1:{port}/metrics"
    assert warnings == []


def test_linger_stops_the_server_after_the_run(make_trainer, log_dir):
    port = free_port()
    trainer = make_trainer(max_steps=2)
    trainer.add_callback(TrainLogCallback(quiet(log_dir, prometheus_port=port, prometheus_addr="127.0.0.1",
                                                prometheus_linger_s=0.5)))
    trainer.train()
    run_id = RunFiles(log_dir).run_id
    assert value(get(f"http://127.0.0.1:{port}/metrics"), "seo_trainlog_global_step", **run_labels(run_id)) == 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            get(f"http://127.0.0.1:{port}/metrics")
        except (urllib.error.URLError, ConnectionError):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the /metrics server still answers 10 s after a 0.5 s linger")
    with socket.socket() as probe:  # nothing listens there any more (SO_REUSEADDR: as servers bind)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


def test_every_rank_of_a_torchrun_launch_exports_its_own_series(log_dir, tmp_path):
    """Rank 1 writes no train records, yet exports its own step time and memory with its labels, on
    port + local_rank, to its own textfile; its collator sleeps 0.15 s a batch, and its data time (the
    straggler detector's: TimedDataCollator time per step) shows it."""
    port = free_port()
    while True:  # port + 1 free too
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port + 1))
            break
        except OSError:
            port = free_port()
    result = launch(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(HERE / "prometheus_child.py"), str(log_dir), "ddp", str(port), str(tmp_path / "seo.prom"))
    assert result.returncode == 0, failure_text(result)
    run = RunFiles(log_dir)
    assert sorted(os.listdir(tmp_path)) == ["logs", "seo_rank0.prom", "seo_rank1.prom"]
    rank1_file, = log_dir.glob("performance_metrics_rank1_*.log")
    last = {0: run.records("train")[-1],
            1: [record for record in map(json.loads, rank1_file.read_text().splitlines())
                if record["event"] == "rank_step"][-1]}
    assert last[0]["global_step"] == last[1]["global_step"] == 4
    for rank in (0, 1):
        labels = {**run_labels(run.run_id), "rank": str(rank), "local_rank": str(rank)}
        textfile = (tmp_path / f"seo_rank{rank}.prom").read_text(encoding="utf-8")
        scraped = (log_dir / f"scraped_rank{rank}.prom").read_text(encoding="utf-8")  # from port + local_rank
        for text in (textfile, scraped):
            assert value(text, "seo_trainlog_global_step", **labels) == 4
            assert value(text, "seo_trainlog_step_time_seconds", **labels) > 0
            assert 0 <= value(text, "seo_trainlog_data_wait_ratio", **labels) <= 1
            assert value(text, "seo_trainlog_resident_memory_bytes", **labels) > 10 * MB
            assert value(text, "seo_trainlog_run_info", status="completed", **labels) == 1
            assert {sample.labels["rank"] for sample in families(text)["seo_trainlog_global_step"]} == {str(rank)}
            # the straggler detector's own data time: the last interval's collate time per step
            assert value(text, "seo_trainlog_data_time_seconds", **labels) == \
                last[rank]["collate_time_s"] / last[rank]["steps"]
    assert last[1]["collate_time_s"] / last[1]["steps"] >= 0.15 / 2  # at least one slept batch in 2 steps
    assert run.records("summary")[0]["status"] == "completed"


# ---------------------------------------------------------------- prometheus-client missing


def test_without_prometheus_client_one_warning_and_training_goes_on(log_dir, tmp_path):
    port = free_port()
    child = subprocess.run([sys.executable, str(HERE / "prometheus_child.py"), str(log_dir), "no_client", str(port),
                            str(tmp_path / "seo.prom")], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.returncode == 0, child.stderr[-3000:]
    assert "training finished" in child.stdout
    run = RunFiles(log_dir)
    warnings = warnings_of(run)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("Prometheus export is off: prometheus-client is not installed (")
    assert "pip install 'seo_trainlog[prometheus]'" in warnings[0]
    assert run.records("summary")[0]["status"] == "completed"
    assert not (tmp_path / "seo.prom").exists()


# ---------------------------------------------------------------- the Pushgateway


class FakePushgateway(http.server.ThreadingHTTPServer):
    """Stands for the Pushgateway: records each request (method, path, body) and answers 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str, str]] = []
        self.authorizations: list[str | None] = []  # the Authorization header of each request
        gateway = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode("utf-8")
                gateway.requests.append((self.command, self.path, self.headers["Content-Type"], body))
                gateway.authorizations.append(self.headers["Authorization"])
                self.send_response(200)
                self.end_headers()

            do_POST = do_PUT

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()


def test_pushed_to_the_gateway_at_the_end(make_trainer, log_dir):
    gateway = FakePushgateway()
    try:
        trainer = make_trainer(max_steps=3)
        trainer.add_callback(TrainLogCallback(quiet(log_dir, pushgateway_url=f"127.0.0.1:{gateway.server_port}")))
        trainer.train()
    finally:
        gateway.shutdown()
        gateway.server_close()
    run = RunFiles(log_dir)
    assert len(gateway.requests) == 1
    method, path, content_type, body = gateway.requests[0]
    assert (method, path) == ("PUT", f"/metrics/job/seo_trainlog/rank/0/run_id/{run.run_id}")
    assert content_type.startswith("text/plain; version=0.0.4")
    labels = run_labels(run.run_id)
    assert value(body, "seo_trainlog_global_step", **labels) == 3
    assert value(body, "seo_trainlog_train_loss", **labels) == run.records("train")[-1]["loss"]
    assert value(body, "seo_trainlog_run_info", status="completed", **labels) == 1
    assert warnings_of(run) == []


def train_with_dead_pushgateway(make_trainer, config, log_dir, port):
    """Train 2 steps with ``config`` (a Pushgateway at ``port`` where nothing listens): the run and its
    warnings, checked to be the one push failure with the URL's credentials redacted."""
    trainer = make_trainer(max_steps=2)
    trainer.add_callback(TrainLogCallback(config))
    trainer.train()
    run = RunFiles(log_dir)
    warnings = warnings_of(run)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"Prometheus: pushing to the Pushgateway http://<redacted>@127.0.0.1:{port} "
                                  "failed: URLError:")
    return run, warnings


def test_a_dead_pushgateway_is_one_warning_without_its_credentials(make_trainer, log_dir):
    port = free_port()  # nothing listens there
    config = quiet(log_dir, pushgateway_url=f"http://ops:s3cr3tpw@127.0.0.1:{port}")
    run, _ = train_with_dead_pushgateway(make_trainer, config, log_dir, port)
    assert run.records("summary")[0]["status"] == "completed"
    assert "s3cr3tpw" not in all_text(log_dir)


# ---------------------------------------------------------------- names, units, labels


PROMETHEUS_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
NOT_BASE_UNITS = ("_mb", "_mib", "_megabytes", "_kb", "_ms", "_milliseconds", "_pct", "_percent", "_s", "_minutes")


def test_every_exposed_name_follows_prometheus_naming(tmp_path):
    """Every metric of the table, exposed (GPU readings included), by Prometheus' naming rules."""
    warnings: list[str] = []
    role = ProcessRole(rank=0, local_rank=0, world_size=1, node_rank=0, host="node-a")
    config = LogConfig(log_dir=tmp_path / "logs", prometheus_textfile=tmp_path / "all.prom")
    exporter = open_exporter(config, role, "20260101_000000", "trial-7", warnings.append, anomaly_kinds=KINDS)
    exporter.observe_train(5, 0.5, {"loss": 0.25, "learning_rate": 1e-4, "grad_norm": 2.0, "epoch": 0.5}, "loss",
                           {"step_time_s": 0.125, "data_wait_pct": 12.5, "samples_per_second": 64.0},
                           {"rss_mb": 512.0, "rss_mb_max": 600.0, "gpu0_mem_used_mb": 1024.0, "gpu0_util_pct": 50.0,
                            "gpu1_util_pct": 25.0, "gpu0_mem_util_pct": 7.0, "cuda0_allocated_mb": 256.0,
                            "cuda0_max_allocated_mb": 300.0})
    exporter.observe_eval({"eval_loss": 0.5})
    exporter.count_anomaly("loss_spike")
    exporter.count_error()
    exporter.finish("completed")
    assert warnings == []
    text = (tmp_path / "all.prom").read_text(encoding="utf-8")
    exposed = list(text_string_to_metric_families(text))
    counters = {f.name for f in exposed if f.type == "counter"}
    # prometheus-client adds each counter's creation time as a gauge <name>_created (standard)
    created = {f.name for f in exposed if f.name.endswith("_created") and f.name[:-len("_created")] in counters}
    assert created == {f"{name}_created" for name in counters}
    assert sorted(f.name + ("_total" if f.type == "counter" else "") for f in exposed
                  if f.name not in created) == sorted(NAMES)
    for family in exposed:
        assert PROMETHEUS_NAME.match(family.name) and family.name.startswith("seo_trainlog_")
        assert not family.name.endswith(NOT_BASE_UNITS), family.name
        assert family.documentation
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name == f"{family.name}_total"
            else:
                assert family.type == "gauge" and sample.name == family.name and not sample.name.endswith("_total")
            assert set(sample.labels) >= {*LABELS, "trial"}
            assert all(PROMETHEUS_NAME.match(label) and not label.startswith("__") for label in sample.labels)
    for metric in METRICS:
        assert (metric.kind == "counter") == metric.name.endswith("_total")
        assert metric.name.endswith(("_bytes", "_seconds", "_ratio", "_total", "_info", "_step", "_epoch", "_loss",
                                     "_rate", "_norm", "_per_second")), metric.name
    labels = {"run_id": "20260101_000000", "rank": "0", "local_rank": "0", "node": "0", "host": "node-a",
              "trial": "trial-7"}
    # values in base units: MiB -> bytes, percent -> ratio
    assert value(text, "seo_trainlog_gpu_memory_used_bytes", gpu="0", **labels) == 1024 * MB
    assert value(text, "seo_trainlog_gpu_utilization_ratio", gpu="0", **labels) == 0.5
    assert value(text, "seo_trainlog_gpu_utilization_ratio", gpu="1", **labels) == 0.25
    assert value(text, "seo_trainlog_cuda_memory_allocated_bytes", gpu="0", **labels) == 256 * MB
    assert value(text, "seo_trainlog_resident_memory_bytes", **labels) == 512 * MB
    assert value(text, "seo_trainlog_data_wait_ratio", **labels) == 0.125
    assert value(text, "seo_trainlog_step_time_seconds", **labels) == 0.125
    assert value(text, "seo_trainlog_eval_loss", **labels) == 0.5
    assert value(text, "seo_trainlog_anomalies_total", kind="loss_spike", **labels) == 1
    assert value(text, "seo_trainlog_anomalies_total", kind="plateau", **labels) == 0
    assert value(text, "seo_trainlog_errors_total", **labels) == 1


def test_prometheus_settings_from_the_environment():
    config = LogConfig.from_env({"SEO_TRAINLOG_PROMETHEUS_PORT": "9400", "SEO_TRAINLOG_PROMETHEUS_ADDR": "127.0.0.1",
                                 "SEO_TRAINLOG_PROMETHEUS_LINGER": "30",
                                 "SEO_TRAINLOG_PROMETHEUS_TEXTFILE": "/var/lib/node_exporter/seo.prom",
                                 "SEO_TRAINLOG_PUSHGATEWAY": "http://pushgateway:9091"})
    assert (config.prometheus_port, config.prometheus_addr, config.prometheus_linger_s) == (9400, "127.0.0.1", 30.0)
    assert config.prometheus_textfile == Path("/var/lib/node_exporter/seo.prom")
    assert config.pushgateway_url == "http://pushgateway:9091"
    default = LogConfig()
    assert (default.prometheus_port, default.prometheus_addr, default.prometheus_linger_s,
            default.prometheus_textfile, default.pushgateway_url) == (None, "0.0.0.0", None, None, None)
    for variable, raw, accepted in (("SEO_TRAINLOG_PROMETHEUS_PORT", "70000", "an integer from 1 to 65535"),
                                    ("SEO_TRAINLOG_PROMETHEUS_PORT", "http", "an integer from 1 to 65535"),
                                    ("SEO_TRAINLOG_PROMETHEUS_LINGER", "-1", "a number from 0 to 86400"),
                                    ("SEO_TRAINLOG_PUSHGATEWAY", "ftp://gateway", "a Pushgateway URL"),
                                    ("SEO_TRAINLOG_PROMETHEUS_ADDR", "a b", "an address to bind")):
        with pytest.raises(ValueError, match=re.escape(f"{variable}={raw!r} is not valid; accepted values: {accepted}")):
            LogConfig.from_env({variable: raw})
    assert math.isclose(LogConfig(prometheus_linger_s=0).prometheus_linger_s, 0.0)


# ---------------------------------------------------------------- series only with values; credentials


def test_before_the_first_logging_step_only_measured_series_and_the_start_time(make_trainer, log_dir, tmp_path):
    """Before the first logging step: no gauge at a 0 nobody measured, the counters at 0 (increase() needs
    them), the last-step timestamp at the run's start (the stalled-job alert counts from there); a run
    that never evaluates never exports an eval loss."""
    port = free_port()
    path = tmp_path / "seo.prom"
    seen: dict[str, str] = {}

    class ScrapeAtTrainBegin(TrainerCallback):  # after ours in the list: our exporter is open
        def on_train_begin(self, args, state, control, **kwargs):
            seen["text"] = get(f"http://127.0.0.1:{port}/metrics")
            seen["time"] = time.time()

    started = time.time()
    trainer = make_trainer(max_steps=4, logging_steps=2)
    trainer.add_callback(TrainLogCallback(quiet(log_dir, prometheus_port=port, prometheus_addr="127.0.0.1",
                                                prometheus_textfile=path)))
    trainer.add_callback(ScrapeAtTrainBegin())
    trainer.train()
    run = RunFiles(log_dir)
    labels = run_labels(run.run_id)
    begin = families(seen["text"])
    unmeasured = ("seo_trainlog_global_step", "seo_trainlog_epoch", "seo_trainlog_train_loss",
                  "seo_trainlog_eval_loss", "seo_trainlog_learning_rate", "seo_trainlog_grad_norm",
                  "seo_trainlog_samples_per_second", "seo_trainlog_step_time_seconds",
                  "seo_trainlog_data_wait_ratio", "seo_trainlog_data_time_seconds")
    for name in unmeasured:
        assert begin.get(name, []) == [], name
    assert started <= value(seen["text"], "seo_trainlog_last_step_timestamp_seconds", **labels) <= seen["time"]
    assert value(seen["text"], "seo_trainlog_errors_total", **labels) == 0
    assert sorted(sample.labels["kind"] for sample in begin["seo_trainlog_anomalies"]
                  if sample.name == "seo_trainlog_anomalies_total") == sorted(KINDS)
    assert {sample.value for sample in begin["seo_trainlog_anomalies"] if sample.name.endswith("_total")} == {0.0}
    assert value(seen["text"], "seo_trainlog_run_info", status="running", **labels) == 1
    end = path.read_text(encoding="utf-8")
    assert families(end).get("seo_trainlog_eval_loss", []) == []  # never evaluated: no eval loss at all
    assert value(end, "seo_trainlog_train_loss", **labels) == run.records("train")[-1]["loss"]
    assert value(end, "seo_trainlog_global_step", **labels) == 4


@pytest.mark.parametrize("timed", [True, False])
def test_data_time_is_the_straggler_detectors_own_data_time(make_trainer, log_dir, tmp_path, tokenizer, timed):
    """seo_trainlog_data_time_seconds: the TimedDataCollator's time per step when there is one, else the
    data wait per step, as in the run's records (what the straggler detector compares)."""
    from transformers import DataCollatorWithPadding

    path = tmp_path / "seo.prom"
    collator = DataCollatorWithPadding(tokenizer)
    trainer = make_trainer(max_steps=4, logging_steps=2,
                           data_collator=TimedDataCollator(collator) if timed else collator)
    trainer.add_callback(TrainLogCallback(quiet(log_dir, prometheus_textfile=path)))
    trainer.train()
    run = RunFiles(log_dir)
    last = run.records("train")[-1]
    text = path.read_text(encoding="utf-8")
    expected = last["collate_time_s"] / 2 if timed else last["data_wait_s"]
    assert "collate_time_s" in last if timed else "collate_time_s" not in last
    assert value(text, "seo_trainlog_data_time_seconds", **run_labels(run.run_id)) == pytest.approx(expected, rel=1e-9)


def test_pushgateway_without_scheme_keeps_its_password_out_of_every_log(make_trainer, log_dir):
    port = free_port()  # nothing listens there
    config = LogConfig.from_env({"SEO_TRAINLOG_DIR": str(log_dir), "SEO_TRAINLOG_CONSOLE": "0",
                                 "SEO_TRAINLOG_PUSHGATEWAY": f"user:secretpw@127.0.0.1:{port}"})
    assert config.pushgateway_url == f"http://user:secretpw@127.0.0.1:{port}"  # http, not a scheme "user"
    assert "secretpw" not in repr(config) and "secretpw" not in str(config)
    assert f"pushgateway_url='http://<redacted>@127.0.0.1:{port}'" in repr(config)
    run, warnings = train_with_dead_pushgateway(make_trainer, config, log_dir, port)
    assert [record["message"] for record in run.records("warning")] == warnings
    assert "secretpw" not in all_text(log_dir)


def test_config_repr_and_errors_never_show_the_pushgateway_password():
    config = LogConfig(pushgateway_url="http://u:secretpw@h")
    assert "secretpw" not in repr(config)
    assert "pushgateway_url='http://<redacted>@h'" in repr(config)
    assert config.pushgateway_url == "http://u:secretpw@h"
    for bad in ("ftp://u:secretpw@h", "http://u:secretpw@h:99999", "u:secretpw@h:port"):
        with pytest.raises(ValueError) as error:
            LogConfig(pushgateway_url=bad)
        assert "secretpw" not in str(error.value)
        assert str(error.value).startswith("pushgateway_url='")
        assert "<redacted>@h" in str(error.value)


def test_pushgateway_credentials_are_sent_as_basic_auth(make_trainer, log_dir):
    gateway = FakePushgateway()
    try:
        trainer = make_trainer(max_steps=2)
        url = f"http://ops:s3cr3t@pw@127.0.0.1:{gateway.server_port}"  # a password holding "@"
        trainer.add_callback(TrainLogCallback(quiet(log_dir, pushgateway_url=url)))
        trainer.train()
    finally:
        gateway.shutdown()
        gateway.server_close()
    run = RunFiles(log_dir)
    assert warnings_of(run) == []
    assert [(method, path) for method, path, _, _ in gateway.requests] == [
        ("PUT", f"/metrics/job/seo_trainlog/rank/0/run_id/{run.run_id}")]
    assert gateway.authorizations == ["Basic " + base64.b64encode(b"ops:s3cr3t@pw").decode("ascii")]
    assert value(gateway.requests[0][3], "seo_trainlog_global_step", **run_labels(run.run_id)) == 2
    assert "s3cr3t@pw" not in all_text(log_dir)
