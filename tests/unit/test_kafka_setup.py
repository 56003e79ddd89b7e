"""The embedded Apache Kafka's set-up logic: pinned version, Java and jar discovery, config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.stack import kafka
from services.stack.servers import ServerError

ROOT = Path(__file__).resolve().parents[2]


def test_the_python_side_pins_the_release_the_pom_resolves() -> None:
    pom = (ROOT / "deploy" / "kafka" / "pom.xml").read_text()
    assert re.search(r"<kafka.version>([^<]+)</kafka.version>", pom).group(1) == kafka.KAFKA_VERSION


def _fake_java(tmp_path: Path, version: str) -> Path:
    home = tmp_path / "jdk"
    (home / "bin").mkdir(parents=True)
    java = home / "bin" / "java"
    java.write_text(f"#!/bin/sh\necho 'openjdk version \"{version}\" 2020-01-01' >&2\n")
    java.chmod(0o755)
    return home


def test_an_old_java_is_refused_with_what_to_install_or_pass(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("JAVA_HOME", str(_fake_java(tmp_path, "11.0.2")))
    kafka.find_java.cache_clear()
    try:
        with pytest.raises(ServerError, match=r"Java 11.*needs Java 17\+.*--kafka HOST:PORT"):
            kafka.find_java()
    finally:
        kafka.find_java.cache_clear()


def test_no_java_at_all_says_what_to_install(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    kafka.find_java.cache_clear()
    try:
        with pytest.raises(ServerError, match=r"no Java found.*openjdk-17.*--kafka"):
            kafka.find_java()
    finally:
        kafka.find_java.cache_clear()


def test_a_java_17_is_accepted(tmp_path, monkeypatch) -> None:
    home = _fake_java(tmp_path, "17.0.15")
    monkeypatch.setenv("JAVA_HOME", str(home))
    kafka.find_java.cache_clear()
    try:
        assert kafka.find_java() == home / "bin" / "java"
    finally:
        kafka.find_java.cache_clear()


def test_missing_or_half_fetched_jars_point_to_make_kafka(tmp_path) -> None:
    with pytest.raises(ServerError, match=r"make kafka.*Maven.*--kafka"):
        kafka.kafka_classpath(tmp_path)
    (tmp_path / "libs").mkdir()
    (tmp_path / "libs" / "kafka_2.13.jar").write_bytes(b"")
    with pytest.raises(ServerError, match="not installed"):  # no .complete: fetch interrupted
        kafka.kafka_classpath(tmp_path)
    (tmp_path / ".complete").touch()
    assert kafka.kafka_classpath(tmp_path) == str(tmp_path / "libs" / "kafka_2.13.jar")


def test_the_cache_follows_xdg_and_can_be_overridden(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("STREAMREC_KAFKA_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kafka.kafka_home() == tmp_path / "streamrec" / f"kafka-{kafka.KAFKA_VERSION}"
    monkeypatch.setenv("STREAMREC_KAFKA_HOME", str(tmp_path / "elsewhere"))
    assert kafka.kafka_home() == tmp_path / "elsewhere"


def test_cluster_ids_are_22_base64url_characters_not_starting_with_a_dash() -> None:
    ids = {kafka.new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}", i) for i in ids)


@pytest.mark.parametrize(
    ("nodes", "replicas", "isr"), [(1, "1", "1"), (3, "3", "2"), (5, "3", "2")]
)
def test_internal_topics_replicate_as_far_as_the_cluster_allows(nodes, replicas, isr) -> None:
    settings = kafka.broker_settings(nodes)
    assert settings["offsets.topic.replication.factor"] == replicas
    assert settings["transaction.state.log.replication.factor"] == replicas
    assert settings["transaction.state.log.min.isr"] == isr
    assert settings["group.initial.rebalance.delay.ms"] == "0"


def test_a_node_is_a_combined_broker_and_controller_on_loopback(tmp_path) -> None:
    node = kafka.KafkaNode(node_id=2, port=9192, controller_port=9193, directory=tmp_path)
    lines = node.properties("1@127.0.0.1:9093,2@127.0.0.1:9193", {"num.io.threads": "4"})
    config = dict(line.split("=", 1) for line in lines.splitlines())
    assert config["process.roles"] == "broker,controller"
    assert config["node.id"] == "2"
    assert config["listeners"] == "PLAINTEXT://127.0.0.1:9192,CONTROLLER://127.0.0.1:9193"
    assert config["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9192"
    assert config["controller.quorum.voters"] == "1@127.0.0.1:9093,2@127.0.0.1:9193"
    assert config["log.dirs"] == str(tmp_path / "data")
    assert config["num.io.threads"] == "4"
