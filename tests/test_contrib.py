"""The shipped Prometheus alerting rules and Grafana dashboard (contrib/): checked with promtool, unit-tested
with promtool's rule tests, their PromQL checked against the exporter's table of names, and both run by a
real Prometheus server scraping an exposition with those names and labels."""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_scale import free_port

from seo_trainlog import LogConfig
from seo_trainlog.watch.anomaly import KINDS
from seo_trainlog.watch.prometheus import LABELS, METRICS, NAMES, open_exporter, stop_servers
from seo_trainlog.record.rank import ProcessRole

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "contrib" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "contrib" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "seo_trainlog.json"

METRIC_NAME = re.compile(r"seo_trainlog_[a-z_]+")
SELECTOR = re.compile(r"(seo_trainlog_[a-z_]+)(\{[^}]*\})?")
LABEL_NAMES = {*LABELS, "trial", *(label for metric in METRICS for label in metric.labels)}
SELECTED = ('run_id=~"$run_id"', 'rank=~"$rank"', 'host=~"$host"')  # in every dashboard selector
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

PROMTOOL = shutil.which(os.environ.get("PROMTOOL", "promtool"))
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found (Debian/Ubuntu: apt-get install prometheus; `make test` installs it)")


PROMETHEUS = shutil.which(os.environ.get("PROMETHEUS", "prometheus"))
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus not found (Debian/Ubuntu: apt-get install prometheus; `make test` installs it)")


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target."""
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"] for target in panel["targets"]]


# --- alerts.yml -----------------------------------------------------------------------------------------

@needs_promtool
def test_alert_rules_pass_promtool_check():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


@needs_promtool
def test_alert_rules_unit_tests_pass():
    """Each alert fires for the bad run with exact labels and annotations and stays silent for the healthy
    and the finished runs (contrib/prometheus/alerts_test.yml)."""
    result = promtool("test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
@pytest.mark.parametrize(("original", "changed"), [
    ("> 600)", "> 6000)"),  # a stall threshold the test data never reaches
    ("1.2 * quantile", "1.0 * quantile"),  # r3's slightly slower balanced rank would count as a straggler
    ("> 0.005", "> 0.001"),  # r6's paces, 3.5 ms apart, would count as a straggler
    ('and on (run_id, rank, trial)\n          (seo_trainlog_run_info{status="running"} == 1)\n        for: 2m',
     "for: 2m"),  # a finished run would page as stalled
])
def test_alert_unit_tests_catch_a_wrong_rule(tmp_path, original, changed):
    """The unit tests can fail: the same tests on a rules file with one rule changed do."""
    text = ALERTS.read_text()
    assert text.count(original) == 1
    (tmp_path / "alerts.yml").write_text(text.replace(original, changed))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    result = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stdout + result.stderr


def test_alert_unit_tests_cover_every_alert_firing_and_silent():
    names = {rule["alert"] for rule in alert_rules()}
    assert names == {"SeoTrainlogJobStalled", "SeoTrainlogLossAnomaly", "SeoTrainlogTrainLossNotFinite",
                     "SeoTrainlogStraggler", "SeoTrainlogStragglerDataWait", "SeoTrainlogDataWaitBound",
                     "SeoTrainlogErrors"}
    firing, silent = set(), set()
    for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for case in test["alert_rule_test"]:
            (firing if case["exp_alerts"] else silent).add(case["alertname"])
    assert firing == names
    assert silent == names


def test_alert_rules_use_only_exported_names_and_labels():
    for rule in alert_rules():
        used = set(METRIC_NAME.findall(rule["expr"]))
        assert used, rule["alert"]
        assert used <= set(NAMES), (rule["alert"], used - set(NAMES))
        text = rule["annotations"]["summary"] + rule["annotations"]["description"]
        assert set(re.findall(r"\$labels\.(\w+)", text)) <= LABEL_NAMES, rule["alert"]
        for label in ("run_id", "rank", "host"):
            assert "$labels." + label in text, (rule["alert"], label)
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert re.fullmatch(r"\d+m", rule["for"]), rule["alert"]
    series = [item["series"] for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
              for item in test["input_series"]]
    assert {METRIC_NAME.match(name).group() for name in series} <= set(NAMES)


def test_rules_that_must_not_page_for_finished_runs_join_on_running_status():
    for rule in alert_rules():
        if rule["alert"] in ("SeoTrainlogJobStalled", "SeoTrainlogStragglerDataWait", "SeoTrainlogDataWaitBound"):
            expr = " ".join(rule["expr"].split())
            assert expr.endswith('and on (run_id, rank, trial) (seo_trainlog_run_info{status="running"} == 1)'), expr


@needs_promtool
def test_readme_rule_files_snippet_loads_in_a_prometheus_config(tmp_path):
    """The README's way of loading the rules: `rule_files:` in prometheus.yml, checked as Prometheus would."""
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "seo_trainlog", "static_configs": [{"targets": ["localhost:9400"]}]}]}))
    result = promtool("check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


# --- the Grafana dashboard ------------------------------------------------------------------------------

def test_dashboard_loads_with_template_variables():
    board = dashboard()
    assert board["schemaVersion"] == 39
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert list(variables) == ["datasource", "run_id", "rank", "host"]
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert variables["run_id"]["definition"] == "label_values(seo_trainlog_global_step, run_id)"
    assert variables["rank"]["definition"] == 'label_values(seo_trainlog_global_step{run_id=~"$run_id"}, rank)'
    assert variables["host"]["definition"] == 'label_values(seo_trainlog_global_step{run_id=~"$run_id"}, host)'
    for name in ("run_id", "rank", "host"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["datasource"] == DATASOURCE
        assert variable["query"]["query"] == variable["definition"]
        assert (variable["includeAll"], variable["allValue"]) == (True, ".*")


def test_dashboard_panels_titles_ids_datasource_units():
    panels = dashboard()["panels"]
    units = {panel["title"]: panel["fieldConfig"]["defaults"]["unit"] for panel in panels}
    assert units == {
        "Run info / status": "none", "Global step": "none", "Training loss": "none", "Eval loss": "none",
        "Learning rate": "none", "Grad norm": "none", "Throughput (samples/s) per rank": "suffix: samples/s",
        "Step time and data time per rank": "s", "Data wait ratio per rank": "percentunit",
        "Time since last logging step": "s", "Memory": "bytes", "GPU utilisation": "percentunit",
        "Anomalies by kind": "none", "Errors": "none"}
    ids = [panel["id"] for panel in panels]
    assert len(set(ids)) == len(ids) == 14
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    memory = next(panel for panel in panels if panel["title"] == "Memory")
    assert [METRIC_NAME.search(target["expr"]).group() for target in memory["targets"]] == [
        "seo_trainlog_resident_memory_bytes", "seo_trainlog_gpu_memory_used_bytes",
        "seo_trainlog_cuda_memory_allocated_bytes"]


def test_dashboard_queries_use_exported_names_and_the_template_variables():
    board = dashboard()
    defined = {variable["name"] for variable in board["templating"]["list"]}
    exprs = dashboard_exprs()
    assert len(exprs) == 17
    used_names = set()
    for title, expr in exprs:
        selectors = SELECTOR.findall(expr)
        assert selectors, title
        for name, matchers in selectors:
            assert name in NAMES, (title, name)
            assert all(matcher in matchers for matcher in SELECTED), (title, expr)
            used_names.add(name)
        assert set(re.findall(r"\$(\w+)", expr)) <= defined | GRAFANA_BUILTINS, (title, expr)
    for panel in board["panels"]:
        for target in panel["targets"]:
            assert set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"])) <= LABEL_NAMES, panel["title"]
    assert used_names == {
        "seo_trainlog_run_info", "seo_trainlog_global_step", "seo_trainlog_train_loss", "seo_trainlog_eval_loss",
        "seo_trainlog_learning_rate", "seo_trainlog_grad_norm", "seo_trainlog_samples_per_second",
        "seo_trainlog_step_time_seconds", "seo_trainlog_data_wait_ratio", "seo_trainlog_data_time_seconds",
        "seo_trainlog_last_step_timestamp_seconds",
        "seo_trainlog_resident_memory_bytes", "seo_trainlog_gpu_memory_used_bytes",
        "seo_trainlog_cuda_memory_allocated_bytes", "seo_trainlog_gpu_utilization_ratio",
        "seo_trainlog_anomalies_total", "seo_trainlog_errors_total"}


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    """Each query, with the template variables filled in as Grafana would, as a recording rule for promtool."""
    values = {"$run_id": ".*", "$rank": ".*", "$host": ".*", "$__rate_interval": "1m"}
    rules = []
    for index, (_, expr) in enumerate(dashboard_exprs()):
        for variable, value in values.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr
        rules.append({"record": f"seo_trainlog:dashboard_query_{index}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


# --- both on a real Prometheus server --------------------------------------------------------------------

RANKS = ({"run_id": "r1", "rank": "0", "local_rank": "0", "node": "0", "host": "h0"},
         {"run_id": "r1", "rank": "1", "local_rank": "0", "node": "1", "host": "h1"})


def exposition(stalled_since: float) -> str:
    """Text exposition of a 2-rank run, one sample per name of the table: rank 1 is slowed (data time 0.16 s
    a step against 0.0005 s, while both wait for data about the same share, 0.876 and 0.894, as measured
    with transformers 5), its loss is NaN, both ranks last logged at ``stalled_since`` and the run is running."""
    extra = {"gpu": "0", "kind": "straggler", "status": "running"}
    values = {"seo_trainlog_train_loss": (1.5, math.nan), "seo_trainlog_data_wait_ratio": (0.876, 0.894),
              "seo_trainlog_data_time_seconds": (0.0005, 0.16), "seo_trainlog_step_time_seconds": (0.013, 0.014),
              "seo_trainlog_last_step_timestamp_seconds": (stalled_since, stalled_since)}
    lines = []
    for metric in METRICS:
        lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} {metric.kind}"]
        for index, labels in enumerate(RANKS):
            pairs = {**labels, **{label: extra[label] for label in metric.labels}}
            text = ",".join(f'{key}="{value}"' for key, value in pairs.items())
            value = values.get(metric.name, (1.0, 1.0))[index]
            lines.append(f"{metric.name}{{{text}}} {'NaN' if math.isnan(value) else repr(value)}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def prometheus_server(tmp_path):
    """A real Prometheus (1 s scrape and rule evaluation, alerts.yml loaded) scraping the exposition above."""
    body = exposition(time.time() - 3600).encode()

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    target = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=target.serve_forever, daemon=True).start()
    try:
        with running_prometheus(tmp_path, target.server_port) as base:
            yield base, tmp_path / "prometheus.log"
    finally:
        target.shutdown()
        target.server_close()


@contextlib.contextmanager
def running_prometheus(tmp_path: Path, target_port: int):
    """A real Prometheus on a free loopback port (1 s scrape and rule evaluation, alerts.yml loaded)
    scraping 127.0.0.1:``target_port``; yields its base URL."""
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "seo_trainlog",
                            "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}]}))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    server = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                               f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def api(base: str, path: str, **params: str):
    url = f"{base}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=10) as response:
        reply = json.load(response)
    assert reply["status"] == "success", reply
    return reply["data"]


def wait_for(check, timeout_s: float = 60.0):
    """``check()`` once it returns something true, or its last answer after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = check()
        except OSError:  # the server is still starting
            found = None
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@needs_prometheus
def test_real_prometheus_runs_the_dashboard_queries_and_the_alerts(prometheus_server):
    base, log_path = prometheus_server
    # three scrapes, so that increase() has samples to work on
    scraped = wait_for(lambda: api(base, "query", query="count_over_time(seo_trainlog_global_step[1m]) >= 3")["result"])
    assert scraped, log_path.read_text()[-3000:]

    board = dashboard()
    variables = {variable["name"]: variable["definition"] for variable in board["templating"]["list"][1:]}
    assert variables["run_id"] == "label_values(seo_trainlog_global_step, run_id)"
    assert api(base, "label/run_id/values", **{"match[]": "seo_trainlog_global_step"}) == ["r1"]
    for label in ("rank", "host"):
        assert variables[label] == f'label_values(seo_trainlog_global_step{{run_id=~"$run_id"}}, {label})'
        values = api(base, f"label/{label}/values", **{"match[]": 'seo_trainlog_global_step{run_id=~"r1"}'})
        assert values == ([r[label] for r in RANKS])
    for title, expr in dashboard_exprs():
        query = expr.replace("$run_id", "r1").replace("$rank", ".*").replace("$host", ".*")
        result = api(base, "query", query=query.replace("$__rate_interval", "1m"))["result"]
        assert sorted(series["metric"]["rank"] for series in result) == ["0", "1"], (title, query, result)

    rules = [rule for group in api(base, "rules")["groups"] for rule in group["rules"]]
    assert sorted(rule["name"] for rule in rules) == sorted(rule["alert"] for rule in alert_rules())
    assert {rule["health"] for rule in rules} == {"ok"}, [(rule["name"], rule.get("lastError")) for rule in rules]
    expected = {("SeoTrainlogJobStalled", "0", "pending"), ("SeoTrainlogJobStalled", "1", "pending"),
                ("SeoTrainlogTrainLossNotFinite", "1", "firing"), ("SeoTrainlogStragglerDataWait", "1", "pending"),
                ("SeoTrainlogDataWaitBound", "0", "pending"), ("SeoTrainlogDataWaitBound", "1", "pending")}

    def alerts():
        found = {(alert["labels"]["alertname"], alert["labels"]["rank"], alert["state"])
                 for alert in api(base, "alerts")["alerts"]}
        return found == expected

    wait_for(alerts, timeout_s=30.0)
    found = {(alert["labels"]["alertname"], alert["labels"]["rank"], alert["state"])
             for alert in api(base, "alerts")["alerts"]}
    assert found == expected
    stalled = [alert for alert in api(base, "alerts")["alerts"]
               if alert["labels"]["alertname"] == "SeoTrainlogJobStalled"]
    assert {alert["annotations"]["summary"] for alert in stalled} == {
        "Run r1 rank 0 on h0 has stalled", "Run r1 rank 1 on h1 has stalled"}


@needs_prometheus
def test_real_prometheus_does_not_page_a_run_before_its_first_logging_step(tmp_path):
    """A run that has started but not logged yet (the first logging step can be minutes away with
    logging_steps=500): the exporter's timestamp is the run's start, not 0, so the stalled-job alert stays
    inactive; the gauges without a value yet have no series, the counters are at 0."""
    port = free_port()
    role = ProcessRole(rank=0, local_rank=0, world_size=1, node_rank=0, host="h0")
    config = LogConfig(log_dir=tmp_path / "logs", prometheus_port=port, prometheus_addr="127.0.0.1")
    warnings: list[str] = []
    started = time.time()
    exporter = open_exporter(config, role, "r1", None, warnings.append, anomaly_kinds=KINDS)
    try:
        with running_prometheus(tmp_path, port) as base:
            scraped = wait_for(lambda: api(base, "query", query="count_over_time(seo_trainlog_run_info[1m]) >= 3")
                               ["result"])
            assert scraped, (tmp_path / "prometheus.log").read_text()[-3000:]
            time.sleep(2.5)  # rules are evaluated every second: at least two evaluations on those samples
            rules = {rule["name"]: rule for group in api(base, "rules")["groups"] for rule in group["rules"]}
            assert rules["SeoTrainlogJobStalled"]["health"] == "ok"
            assert rules["SeoTrainlogJobStalled"]["state"] == "inactive"
            assert api(base, "alerts")["alerts"] == []
            stamp = api(base, "query", query="seo_trainlog_last_step_timestamp_seconds")["result"]
            assert len(stamp) == 1 and started <= float(stamp[0]["value"][1]) <= time.time()
            for name in ("seo_trainlog_global_step", "seo_trainlog_train_loss", "seo_trainlog_eval_loss",
                         "seo_trainlog_step_time_seconds", "seo_trainlog_data_time_seconds"):
                assert api(base, "query", query=name)["result"] == [], name
            assert api(base, "query", query="seo_trainlog_errors_total")["result"][0]["value"][1] == "0"
            anomalies = api(base, "query", query="seo_trainlog_anomalies_total")["result"]
            assert sorted(series["metric"]["kind"] for series in anomalies) == sorted(KINDS)
            assert {series["value"][1] for series in anomalies} == {"0"}
    finally:
        exporter.finish("completed")
        stop_servers()
    assert warnings == []
