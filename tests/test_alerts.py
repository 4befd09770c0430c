"""deploy/prometheus: the alert rules and the scrape config.

The structure is checked with PyYAML (a dev dependency); when `promtool` is
installed (Debian package `prometheus`), it also checks both files and runs
the rules' unit tests in tests/alerts_test.yml.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from server.metrics import Metrics
from worker.channel.messages import Status
from worker.channel.types import Priority

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DURATION = re.compile(r"^\d+[smhd]$")
THRESHOLDS = {  # the service targets each required alert encodes
    "ShoalLowBatchUtilization": "< 0.6",
    "ShoalQueueTooLong": "> 100",
    "ShoalSlowTokenLatency": "> 0.2",
    "ShoalLowCompletionRate": "< 0.95",
}


def rules() -> list[dict]:
    document = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    assert set(document) == {"groups"}
    found = []
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["name"]
        found += group["rules"]
    return found


def exported_names() -> set[str]:
    """Every sample name the server exports (with one worker seen, so per-worker ones too)."""
    metrics = Metrics()
    metrics.observe_on_scrape(lambda: dict.fromkeys(Priority, 0), lambda: 0)
    metrics.worker_ready(0, 64)
    metrics.worker_status(0, Status(0, 0, 4, 0, 64, 1024, 0, 0, 0, 0))
    for histogram in (metrics.ttft, metrics.inter_token, metrics.latency):
        histogram.observe(0.1)
    metrics.queue_time.labels("normal").observe(0.1)
    metrics.rpc_done("Submit", "OK")
    return {s.name for family in metrics.registry.collect() for s in family.samples}


def test_alert_rules_are_well_formed_and_use_exported_metrics() -> None:
    found = rules()
    names = [rule["alert"] for rule in found]
    assert len(names) == len(set(names))
    assert set(THRESHOLDS) <= set(names)
    exported = exported_names()
    for rule in found:
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        assert "for" not in rule or DURATION.match(rule["for"]), rule
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]")
        for metric in re.findall(r"\bshoal_\w+", expr):
            assert metric in exported, f"{rule['alert']}: {metric} is not exported"
        if rule["alert"] in THRESHOLDS:
            assert THRESHOLDS[rule["alert"]] in " ".join(expr.split()), rule["alert"]
            assert DURATION.match(rule["for"])  # sustained, not one bad scrape


def test_prometheus_config_scrapes_shoal_and_loads_the_rules() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    for path in config["rule_files"]:
        assert (PROMETHEUS / path).is_file()
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "shoal"]
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == ["shoal:9090"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
@pytest.mark.parametrize(
    "command",
    [
        ["check", "rules", "deploy/prometheus/alerts.yml"],
        ["check", "config", "deploy/prometheus/prometheus.yml"],
        ["test", "rules", "tests/alerts_test.yml"],
    ],
)
def test_promtool(command: list[str]) -> None:
    done = subprocess.run(["promtool", *command], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
