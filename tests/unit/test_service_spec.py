"""Every consumer service is one :class:`ServiceSpec`; the environment beats its defaults.

Building a runtime connects nothing (clients connect on first use), so these run
without Kafka or Redis.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from services.bandits.service import SPEC as BANDITS
from services.common.runtime import ConsumerRuntime
from services.common.service import ServiceSpec, build_runtime
from services.drn.service import SPEC as DRN
from services.embeddings.service import SPEC as EMBEDDINGS
from services.joiner.service import SPEC as JOINER
from services.sequences.service import SPEC as SEQUENCES

SPECS = {spec.name: spec for spec in (JOINER, SEQUENCES, BANDITS, DRN, EMBEDDINGS)}
# The service's own checkpoint cadence where the environment says nothing.
# (The publishing services checkpoint, then publish, at their publish interval.)
DEFAULT_INTERVAL_S = {
    "joiner": 1.0,
    "sequences": 1.0,
    "bandits": 0.25,
    "drn": 1.0,
    "embeddings": 30.0,
}


@pytest.fixture(autouse=True)
def _snapshots(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("STREAMREC_EMBEDDINGS_SNAPSHOT_DIR", str(tmp_path / "snapshots"))


def built(spec: ServiceSpec) -> Iterator[ConsumerRuntime]:
    runtime = build_runtime(spec, CollectorRegistry())
    try:
        yield runtime
    finally:
        runtime.processor.close()
        runtime.close()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_checkpoint_interval_variable_beats_the_services_default(name, monkeypatch) -> None:
    monkeypatch.setenv("STREAMREC_RUNTIME_CHECKPOINT_INTERVAL_S", "7.5")
    for runtime in built(SPECS[name]):
        assert runtime.settings.checkpoint_interval_s == 7.5
        assert runtime.service == name


@pytest.mark.parametrize("name", sorted(SPECS))
def test_without_the_variable_each_service_keeps_its_own_cadence(name, monkeypatch) -> None:
    monkeypatch.delenv("STREAMREC_RUNTIME_CHECKPOINT_INTERVAL_S", raising=False)
    monkeypatch.delenv(f"STREAMREC_{name.upper()}_PUBLISH_INTERVAL_S", raising=False)
    for runtime in built(SPECS[name]):
        assert runtime.settings.checkpoint_interval_s == DEFAULT_INTERVAL_S[name]


def test_a_services_kafka_default_applies_unless_the_operator_sets_it(monkeypatch) -> None:
    monkeypatch.delenv("KAFKA_MAX_PARTITION_FETCH_BYTES", raising=False)
    for runtime in built(JOINER):
        assert runtime.kafka.max_partition_fetch_bytes == 256 * 1024
    monkeypatch.setenv("KAFKA_MAX_PARTITION_FETCH_BYTES", "65536")
    for runtime in built(JOINER):
        assert runtime.kafka.max_partition_fetch_bytes == 65536
