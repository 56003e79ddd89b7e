"""The deploy/ Prometheus files against the real tools: promtool, and a real Prometheus
scraping a running embedded stack through the file_sd targets ``streamrec up`` writes.

Debian's ``prometheus`` package provides both binaries; ``.ci/run`` installs it,
so these tests skip only on a machine without it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.stack.servers import free_port
from tests.integration.processes import FAST_FAILOVER, ROOT, wait_for
from tests.unit.test_deploy import (
    dashboard_expressions,
    exposed_metric_names,
    referenced_metrics,
)

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
DEPLOY = ROOT / "deploy" / "prometheus"
SERVICES = ("gateway", "joiner", "bandits", "serving")
#: What `up` starts and Prometheus scrapes: the services and the console.
TARGETS = {*SERVICES, "console"}

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        PROMETHEUS is None or PROMTOOL is None,
        reason="Debian's prometheus (server + promtool) is not installed; "
        "`apt-get install prometheus` (.ci/run does)",
    ),
]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_alert_rules():
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_fires_the_guard_alert_while_the_guard_pin_stands():
    # Unit tests of the rule (series in, alerts out) next to this file.
    rules_test = ROOT / "tests" / "integration" / "promtool" / "guard_alert.yml"
    result = _promtool("test", "rules", str(rules_test))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("config", ["prometheus.yml", "kubernetes.yml"])
def test_promtool_accepts_the_scrape_configs(config):
    result = _promtool("check", "config", config)
    assert result.returncode == 0, result.stdout + result.stderr


class PrometheusAPI:
    """The few HTTP API calls the test needs."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=f"{self.url}/api/v1", timeout=10)

    def get(self, path: str, **params: str) -> object:
        body = self.client.get(path, params=params).json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.get("/query", query=expr)
        assert isinstance(data, dict)
        return data["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else float("nan")

    def names(self) -> set[str]:
        data = self.get("/label/__name__/values")
        assert isinstance(data, list)
        return set(data)

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).is_success
        except httpx.HTTPError:
            return False


@pytest.fixture
def stack_run_dir(tmp_path: Path) -> Iterator[Path]:
    """``streamrec up --simulate`` with a short attribution window, until the test ends."""
    run_dir = tmp_path / "run"
    env = os.environ | {
        **FAST_FAILOVER,
        "STREAMREC_JOINER_WINDOW_S": "3",
        "STREAMREC_JOINER_LATENESS_S": "1",
    }
    with open(tmp_path / "up.log", "wb") as log:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "up",
                "--run-dir",
                str(run_dir),
                "--services",
                ",".join(SERVICES),
                "--simulate",
                "--rate",
                "50",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield run_dir
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()


@pytest.fixture
def prometheus(stack_run_dir: Path, tmp_path: Path) -> Iterator[PrometheusAPI]:
    """A real Prometheus on the config ``streamrec up`` wrote, plus the alert rules."""
    generated = stack_run_dir / "prometheus" / "prometheus.yml"
    wait_for(generated.exists, 60, "streamrec up to write its Prometheus config")
    # The generated file is JSON (valid YAML); add the rules so they are evaluated too.
    config = json.loads(generated.read_text())
    config["rule_files"] = [str(DEPLOY / "alerts.yml")]
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(json.dumps(config))
    port = free_port()
    assert PROMETHEUS is not None
    with open(tmp_path / "prometheus.log", "wb") as log:
        server = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    api = PrometheusAPI(port)
    try:
        wait_for(api.ready, 30, "prometheus to be ready")
        yield api
    finally:
        server.terminate()
        server.wait(30)


def _every_target_up(api: PrometheusAPI) -> bool:
    up = api.query('up{job="streamrec"}')
    return {r["metric"]["component"] for r in up if r["value"][1] == "1"} == TARGETS


def test_a_real_prometheus_scrapes_the_embedded_stack(prometheus: PrometheusAPI):
    api = prometheus
    wait_for(lambda: _every_target_up(api), 90, "every stack target to be up")
    targets = api.get("/targets")
    assert isinstance(targets, dict)
    assert {t["labels"]["component"] for t in targets["activeTargets"]} == TARGETS

    # The loop is closed: serving answers, the joiner joins, the bandits publish.
    for expr in (
        "sum(streamrec_gateway_requests_total)",
        'sum(streamrec_consumer_events_total{service="joiner",outcome="applied"})',
        'sum(streamrec_consumer_events_total{service="bandits",outcome="applied"})',
        "sum(streamrec_serving_request_seconds_count)",
        "sum(streamrec_params_publish_seconds_count)",
        "sum(streamrec_joiner_feedback_total)",
    ):
        wait_for(lambda e=expr: api.value(e) > 0, 90, expr)

    # Counters move between two scrapes (2 s apart in the generated config).
    applied = "sum(streamrec_consumer_events_total)"
    first = api.value(applied)
    wait_for(lambda: api.value(applied) > first, 30, f"{applied} to grow past {first}")

    for expr in (
        "streamrec_consumer_lag_records",
        "streamrec_consumer_checkpoint_timestamp_seconds",
        "streamrec_consumer_assigned_partitions",
        "streamrec_params_reader_version",
        "streamrec_params_publish_timestamp_seconds",
        "streamrec_params_publish_bytes",
        "streamrec_index_version",
        "streamrec_bandits_ctr_ratio",
        "streamrec_joiner_clicks_total",
        "streamrec_joiner_policy_feedback_total",
        "streamrec_console_target_up",
    ):
        assert api.query(expr), f"{expr} has no series"
    # A checkpoint was written recently, and policies publish versions per model.
    assert api.value("time() - max(streamrec_consumer_checkpoint_timestamp_seconds)") < 600
    published = {r["metric"]["model"] for r in api.query("streamrec_params_version")}
    assert published, "no model published"

    # The alert rules, as this Prometheus loaded them, evaluate against real series.
    def loaded_rules() -> list[dict]:
        groups = api.get("/rules")
        assert isinstance(groups, dict)
        return [r for g in groups["groups"] for r in g["rules"]]

    def rules_evaluated() -> bool:
        rules = loaded_rules()
        return bool(rules) and all(r["lastEvaluation"].startswith("2") for r in rules)

    wait_for(rules_evaluated, 30, "every alert rule to be evaluated")
    rules = loaded_rules()
    assert {"StreamrecConsumerLagGrowing", "StreamrecServingLatencyHigh"} <= {
        r["name"] for r in rules
    }
    unhealthy = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not unhealthy

    # Every dashboard and alert expression is valid PromQL for this Prometheus, and
    # every metric they name is either scraped now or declared in the code (series
    # of services not started here, or that need traffic this run does not make).
    # Grafana's range variables become fixed durations.
    grafana = {"$__rate_interval": "1m", "$__range": "1h"}
    expressions = []
    for expr in dashboard_expressions():
        for variable, duration in grafana.items():
            expr = expr.replace(variable, duration)
        expressions.append(expr)
    expressions += [r["query"] for r in rules]
    for expr in expressions:
        api.query(expr)
    scraped = api.names()
    referenced = referenced_metrics(expressions)
    assert referenced - scraped <= exposed_metric_names()
    shown_now = referenced & scraped
    for name in (
        "streamrec_consumer_events_total",
        "streamrec_consumer_lag_records",
        "streamrec_consumer_batch_seconds_bucket",
        "streamrec_gateway_request_seconds_bucket",
        "streamrec_serving_request_seconds_bucket",
        "streamrec_serving_requests_total",
        "streamrec_params_publish_seconds_bucket",
        "streamrec_index_age_seconds",
    ):
        assert name in shown_now, name
