"""The shipped Prometheus alerting rules (contrib/): checked with promtool, unit-tested with promtool's rule
tests, and their PromQL checked against the exporter's table of names."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from seo_trainlog._prometheus import LABELS, METRICS, NAMES

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "contrib" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "contrib" / "prometheus" / "alerts_test.yml"

METRIC_NAME = re.compile(r"seo_trainlog_[a-z_]+")
LABEL_NAMES = {*LABELS, "trial", *(label for metric in METRICS for label in metric.labels)}

PROMTOOL = shutil.which(os.environ.get("PROMTOOL", "promtool"))
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found (Debian/Ubuntu: apt-get install prometheus; `make test` installs it)")


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


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
    ("(1.5 * quantile", "(1.0 * quantile"),  # r3's slightly slower rank would count as a straggler
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
