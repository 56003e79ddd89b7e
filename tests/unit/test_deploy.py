"""deploy/ checked without Docker or a cluster: structure, probes, real setting and metric names.

Docker and Kubernetes cannot run here, so the compose file and the manifests are
checked for what breaks deployments in practice: a service missing, a probe on a
port the container does not open, an environment variable no settings class reads
(a typo is silently ignored by pydantic-settings), a panel or alert on a metric
no service exposes. ``tests/integration/test_prometheus.py`` runs the real
Prometheus and promtool on the same files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from services.stack.command import STACK_SERVICES, metrics_port, write_prometheus_config

try:
    import yaml
except ImportError:  # the checks that need no YAML parser still run
    yaml = None

needs_yaml = pytest.mark.skipif(
    yaml is None, reason="PyYAML (add it to the dev extra) parses the deploy manifests"
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
HTTP_SERVICES = {"gateway": 8080, "serving": 8090}
METRICS_PORT = 9100
#: Where each service's /metrics is open: the gateway's HTTP port; everyone else's
#: runtime metrics port (serving's HTTP /metrics needs its bearer token).
OPEN_METRICS = {"gateway": 8080}
_DECLARED = re.compile(r"\b(Counter|Gauge|Histogram)\(\s*\"(streamrec_\w+)\"")
_REFERENCED = re.compile(r"\bstreamrec_\w+")


def exposed_metric_names() -> set[str]:
    """Every sample name the services can expose, from the metric declarations in services/."""
    names: set[str] = set()
    for path in (ROOT / "services").rglob("*.py"):
        for kind, name in _DECLARED.findall(path.read_text()):
            if kind == "Counter":
                names.add(name.removesuffix("_total") + "_total")
            elif kind == "Histogram":
                names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
            else:
                names.add(name)
    return names


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the Grafana dashboard."""
    dashboard = json.loads((DEPLOY / "grafana" / "streamrec.json").read_text())
    return [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def referenced_metrics(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in _REFERENCED.findall(expr)}


def settings_env_names() -> set[str]:
    """Environment variables some streamrec settings class reads (upper case)."""
    from pydantic import AliasChoices
    from pydantic_settings import BaseSettings

    from services.bandits.settings import BanditsSettings
    from services.common.settings import (
        KafkaSettings,
        RedisSettings,
        RuntimeSettings,
        TopicSettings,
    )
    from services.drn.settings import DRNSettings
    from services.embeddings.service import EmbeddingsSettings
    from services.gateway.app import GatewaySettings
    from services.guard.service import GuardSettings
    from services.joiner.service import JoinerSettings
    from services.sequences.service import SequencesSettings
    from services.serving.api import ServingSettings

    classes: list[type[BaseSettings]] = [
        KafkaSettings,
        RedisSettings,
        TopicSettings,
        RuntimeSettings,
        GatewaySettings,
        JoinerSettings,
        BanditsSettings,
        SequencesSettings,
        EmbeddingsSettings,
        DRNSettings,
        GuardSettings,
        ServingSettings,
    ]
    names = set()
    for cls in classes:
        prefix = cls.model_config.get("env_prefix", "")
        for field_name, field in cls.model_fields.items():
            alias = field.validation_alias
            if isinstance(alias, AliasChoices):
                names.update(str(choice).upper() for choice in alias.choices)
            elif isinstance(alias, str):
                names.add(alias.upper())
            else:
                names.add(f"{prefix}{field_name}".upper())
    return names


@pytest.fixture(scope="module")
def env_names() -> set[str]:
    return settings_env_names()


# -- metrics referenced by the dashboard and the alerts -------------------------------


def test_the_metric_inventory_covers_what_operations_needs():
    exposed = exposed_metric_names()
    for name in (
        "streamrec_consumer_events_total",
        "streamrec_consumer_lag_records",
        "streamrec_consumer_checkpoint_timestamp_seconds",
        "streamrec_consumer_dead_letters_total",
        "streamrec_params_publish_seconds_bucket",
        "streamrec_params_publish_bytes",
        "streamrec_params_publish_timestamp_seconds",
        "streamrec_params_reader_age_seconds",
        "streamrec_index_version",
        "streamrec_index_age_seconds",
        "streamrec_index_swap_failures_total",
        "streamrec_serving_request_seconds_bucket",
        "streamrec_bandits_ctr_ratio",
        "streamrec_drn_minor_updates_total",
        "streamrec_joiner_clicks_total",
    ):
        assert name in exposed, name


def test_every_dashboard_metric_is_exposed_by_some_service():
    unknown = referenced_metrics(dashboard_expressions()) - exposed_metric_names()
    assert not unknown, f"the dashboard references metrics no service exposes: {sorted(unknown)}"


@needs_yaml
def test_every_alert_metric_is_exposed_by_some_service():
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    expressions = [rule["expr"] for group in groups for rule in group["rules"]]
    unknown = referenced_metrics(expressions) - exposed_metric_names()
    assert not unknown, f"the alerts reference metrics no service exposes: {sorted(unknown)}"


def test_the_dashboard_shows_every_metric_family_of_the_inventory():
    shown = {
        re.sub(r"_(bucket|sum|count|total)$", "", n)
        for n in referenced_metrics(dashboard_expressions())
    }
    declared = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in exposed_metric_names()}
    missing = declared - shown
    assert not missing, f"metrics without a panel: {sorted(missing)}"


def test_dashboard_panels_are_described_and_uniquely_numbered():
    dashboard = json.loads((DEPLOY / "grafana" / "streamrec.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["description"], panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"


@needs_yaml
def test_every_alert_has_a_summary_and_a_severity():
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    names = [rule["alert"] for group in groups for rule in group["rules"]]
    assert len(names) == len(set(names))
    for group in groups:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]


# -- Prometheus configs -------------------------------------------------------------


@needs_yaml
def test_the_compose_prometheus_scrapes_every_service_on_its_metrics_port():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "streamrec")
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:{OPEN_METRICS.get(name, METRICS_PORT)}" for name in STACK_SERVICES}


@needs_yaml
def test_the_kubernetes_prometheus_finds_every_metrics_service():
    config = yaml.safe_load((DEPLOY / "prometheus" / "kubernetes.yml").read_text())
    found = {}
    for sd in config["scrape_configs"][0]["dns_sd_configs"]:
        for name in sd["names"]:
            found[name.split("-metrics.")[0]] = sd["port"]
    assert found == {name: OPEN_METRICS.get(name, METRICS_PORT) for name in STACK_SERVICES}


def test_streamrec_up_writes_file_sd_targets_for_every_process(tmp_path):
    services = {
        "gateway": {"metrics_port": 4001, "http_port": 5001},
        "joiner": {"metrics_port": 4002, "http_port": None},
    }
    path = write_prometheus_config(tmp_path, services)
    assert path == tmp_path / "prometheus" / "prometheus.yml"
    config = json.loads(path.read_text())  # JSON is YAML: Prometheus reads it as it is
    files = config["scrape_configs"][0]["file_sd_configs"][0]["files"]
    assert [Path(f) for f in files] == [tmp_path / "prometheus" / "targets.json"]
    targets = json.loads(Path(files[0]).read_text())
    assert targets == [
        {"targets": ["127.0.0.1:5001"], "labels": {"component": "gateway"}},
        {"targets": ["127.0.0.1:4002"], "labels": {"component": "joiner"}},
    ]


def test_streamrec_up_scrapes_serving_on_its_open_metrics_port_not_the_authenticated_one():
    serving = {"metrics_port": 4003, "http_port": 5003}
    assert metrics_port("serving", serving) == 4003
    assert metrics_port("gateway", {"metrics_port": 4001, "http_port": 5001}) == 5001


# -- docker compose -----------------------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())


@needs_yaml
def test_compose_runs_kafka_in_kraft_mode_and_redis_with_persistence_and_a_password():
    services = _compose()["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    assert "KAFKA_ZOOKEEPER_CONNECT" not in kafka["environment"]
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "--requirepass" in command
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])


@needs_yaml
def test_compose_runs_every_service_with_real_settings_names(env_names):
    compose = _compose()
    services = compose["services"]
    for name in STACK_SERVICES:
        service = services[name]
        assert service["command"] == ["run", name]
        assert service["healthcheck"]["test"], name
        assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully"
        unknown = set(service["environment"]) - env_names
        assert not unknown, f"{name}: no settings class reads {sorted(unknown)}"
    assert services["topics"]["command"] == ["topics"]
    assert services["gateway"]["environment"]["STREAMREC_GATEWAY_TOKEN"].startswith("${")
    assert services["serving"]["environment"]["STREAMREC_SERVING_TOKEN"].startswith("${")


def _published(port: str | int) -> tuple[str, str]:
    """(host address, host port) of a compose ``ports`` entry; address "" = every interface."""
    parts = str(port).split(":")
    if len(parts) == 3:
        return parts[0], parts[1]
    return "", parts[0]


@needs_yaml
def test_compose_publishes_serving_and_prometheus_on_loopback_only():
    services = _compose()["services"]
    for name in ("serving", "prometheus"):
        published = [_published(p) for p in services[name].get("ports", [])]
        assert published, f"{name} publishes no port (the docs say where to reach it)"
        for address, _ in published:
            assert address == "127.0.0.1", f"{name} is published on every host interface"
    example = (DEPLOY / "compose" / "example.env").read_text()
    assert "STREAMREC_SERVING_TOKEN=" in example


@needs_yaml
def test_compose_mounts_files_that_exist():
    compose_dir = DEPLOY / "compose"
    services = _compose()["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (compose_dir / source).resolve().exists(), f"{name}: {source}"
    build = services["gateway"]["build"]
    assert (compose_dir / build["context"] / build["dockerfile"]).resolve().is_file()
    assert (compose_dir / "example.env").is_file()


# -- Kubernetes -----------------------------------------------------------------------


def _manifests() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _objects(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _manifests() if d["kind"] == kind}


@needs_yaml
def test_k8s_has_one_deployment_per_service_with_resources_and_probes():
    deployments = _objects("Deployment")
    assert set(deployments) == set(STACK_SERVICES)
    for name, deployment in deployments.items():
        spec = deployment["spec"]
        assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"]
        (container,) = spec["template"]["spec"]["containers"]
        assert container["args"] == ["run", name]
        requests = container["resources"]["requests"]
        assert requests["cpu"] and requests["memory"], name
        assert container["resources"]["limits"]["memory"], name
        ports = {p["containerPort"] for p in container["ports"]}
        expected = {HTTP_SERVICES.get(name, METRICS_PORT), OPEN_METRICS.get(name, METRICS_PORT)}
        assert ports == expected, name
        assert not any("hostPort" in p for p in container["ports"]), name
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert container[probe]["httpGet"]["port"] in ports, f"{name} {probe}"
        if name in HTTP_SERVICES:
            assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
        # Liveness must not depend on a model being published, or pods restart forever,
        # nor on a token the kubelet does not send (serving's HTTP /metrics needs one).
        assert container["livenessProbe"]["httpGet"]["path"] == "/metrics"
        assert container["livenessProbe"]["httpGet"]["port"] == OPEN_METRICS.get(name, METRICS_PORT)


@needs_yaml
def test_k8s_single_learners_never_run_twice():
    deployments = _objects("Deployment")
    for name in ("drn", "embeddings", "guard"):
        assert deployments[name]["spec"]["replicas"] == 1
        assert deployments[name]["spec"]["strategy"]["type"] == "Recreate"


@needs_yaml
def test_k8s_config_is_real_settings_names_and_every_reference_resolves(env_names):
    config_maps, secrets = _objects("ConfigMap"), _objects("Secret")
    config = config_maps["streamrec-config"]["data"]
    secret = secrets["streamrec-secrets"]["stringData"]
    unknown = (set(config) | set(secret)) - env_names
    assert not unknown, f"no settings class reads {sorted(unknown)}"
    assert {
        "REDIS_PASSWORD",
        "STREAMREC_GATEWAY_TOKEN",
        "STREAMREC_SERVING_TOKEN",
        "KAFKA_SASL_PASSWORD",
    } <= set(secret)
    claims = _objects("PersistentVolumeClaim")
    for deployment in _objects("Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        for source in pod["containers"][0]["envFrom"]:
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in config_maps
            else:
                assert source["secretRef"]["name"] in secrets
        for volume in pod["volumes"]:
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets
            else:
                assert volume["persistentVolumeClaim"]["claimName"] in claims


@needs_yaml
def test_k8s_services_expose_gateway_and_serving_and_every_metrics_port():
    services = _objects("Service")
    deployments = _objects("Deployment")
    for name, port in HTTP_SERVICES.items():
        assert services[name]["spec"]["ports"][0]["port"] == port
        assert (
            services[name]["spec"]["selector"]
            == deployments[name]["spec"]["selector"]["matchLabels"]
        )
    for name in STACK_SERVICES:
        metrics = services[f"{name}-metrics"]["spec"]
        assert metrics["clusterIP"] == "None"
        assert metrics["ports"][0]["port"] == OPEN_METRICS.get(name, METRICS_PORT)


@needs_yaml
def test_k8s_publishes_nothing_on_node_ports_or_load_balancers():
    for name, service in _objects("Service").items():
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", name
