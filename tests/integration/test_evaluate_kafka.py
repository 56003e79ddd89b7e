"""``streamrec evaluate --from-kafka`` and ``streamrec export-log`` against a real Kafka.

A simulated log whose true policy values are known (services.evaluation.logged.
simulate_log) is produced to real impressions and feedback topics, in two halves
two hours apart in record time. Evaluation over the whole log must find every
record, give the same estimates as the in-memory evaluation of the same events
and cover the true values; a time range and an offset range must each read
exactly the second (first) half; the exports hold one row per feedback record
in range and parse.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from contracts.events import encode
from contracts.keys import KeySpace
from contracts.params import encode_params
from services.cli import main
from services.evaluation.logged import (
    SimulatedLog,
    build_policy,
    decisions_from_log,
    evaluate_policies,
    simulate_log,
    train,
)
from services.evaluation.online import LearnerPolicy
from services.paramstore import ParamStore
from services.simulator.world import World, WorldConfig

pytestmark = pytest.mark.integration

CONFIG = WorldConfig(n_users=200, n_items=60, n_candidates=10, slate_size=3, position_decay=0.0)
POLICIES = ["random", "linucb:alpha=0.5"]
HALF = 600


def produce(bootstrap: str, impressions: str, feedback: str, log: SimulatedLog, ts_ms: int) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for imp in log.impressions:
        producer.send(impressions, encode(imp), key=imp.user_id.encode(), timestamp_ms=ts_ms)
    for event in log.feedback:
        producer.send(feedback, encode(event), key=event.user_id.encode(), timestamp_ms=ts_ms)
    producer.flush()
    producer.close()


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    ends = consumer.end_offsets(tps)
    consumer.close()
    return {tp.partition: offset for tp, offset in ends.items()}


def test_evaluate_and_export_a_range_of_a_real_feedback_topic(
    kafka_bootstrap: str, topic_factory, tmp_path: Path, capsys
) -> None:
    impressions, feedback = topic_factory("impressions", 2), topic_factory("feedback", 2)
    world = World(CONFIG, seed=5)
    first = simulate_log(world, HALF, epsilon=0.3, seed=5)
    second = simulate_log(world, HALF, epsilon=0.3, seed=6)
    now_ms = int(time.time() * 1000)
    produce(kafka_bootstrap, impressions, feedback, first, now_ms - 7_200_000)
    middle = end_offsets(kafka_bootstrap, feedback)
    produce(kafka_bootstrap, impressions, feedback, second, now_ms)
    topics = ["--kafka", kafka_bootstrap, "--feedback-topic", feedback]
    topics += ["--impressions-topic", impressions]
    rounds = HALF * CONFIG.slate_size

    out = tmp_path / "all"
    argv = ["evaluate", "--from-kafka", *topics, "--policies", ",".join(POLICIES)]
    assert main([*argv, "--seed", "1", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["log"] == {
        "decisions": 2 * HALF,
        "rounds": 2 * rounds,
        "feedback_records": 2 * rounds,
        "skipped": {},
    }
    assert (out / "estimates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "linucb:alpha=0.5         dr" in table and "(logger not uniform)" in table

    # The same events evaluated in memory: Kafka delivered exactly them.
    decisions, _ = decisions_from_log(
        first.impressions + second.impressions, first.feedback + second.feedback
    )
    expected = evaluate_policies(POLICIES, decisions, seed=1)
    truth = SimulatedLog(first.impressions, first.feedback, first.truth | second.truth).true_value
    for policy in expected.policies:
        value = truth(expected.evaluation, policy.target.inclusion)
        for kind in ("ips", "snips", "dr"):
            got = report["policies"][policy.spec][kind]
            estimate = policy.estimates[kind]
            assert estimate is not None
            assert got["value"] == pytest.approx(estimate.value, rel=1e-12)
            assert got["ci_low"] <= value <= got["ci_high"], (policy.spec, kind, value, got)
        assert report["policies"][policy.spec]["replay"] is None

    # A time range: only the second half (its impressions are within the lookback).
    since = ["--since", str(now_ms / 1000 - 60)]
    assert main([*argv, *since, "--out", str(tmp_path / "since")]) == 0
    since_report = json.loads((tmp_path / "since" / "results.json").read_text())
    assert since_report["log"]["feedback_records"] == rounds
    assert since_report["log"]["decisions"] == HALF

    # An offset range per partition: only the first half.
    to_offset = ",".join(f"{p}:{o}" for p, o in middle.items())
    assert main([*argv, "--to-offset", to_offset, "--out", str(tmp_path / "offsets")]) == 0
    offsets_report = json.loads((tmp_path / "offsets" / "results.json").read_text())
    assert offsets_report["log"]["feedback_records"] == rounds
    assert offsets_report["ranges"][feedback] == {str(p): [0, o] for p, o in middle.items()}

    # Exports of the second half: one row per feedback record in range.
    obp_path, dsjson_path = tmp_path / "log.npz", tmp_path / "log.dsjson"
    export = ["export-log", "--from-kafka", *topics, *since]
    assert main([*export, "--format", "obp", "--out", str(obp_path)]) == 0
    with np.load(obp_path) as arrays:
        assert int(arrays["n_rounds"]) == rounds == len(arrays["reward"]) == len(arrays["pscore"])
        assert set(arrays["action_ids"][arrays["action"]].tolist()) <= {
            f.item_id for f in second.feedback
        }
        assert arrays["reward"].sum() == sum(f.reward for f in second.feedback)
    assert main([*export, "--format", "dsjson", "--out", str(dsjson_path)]) == 0
    lines = [json.loads(line) for line in dsjson_path.read_text().splitlines()]
    assert len(lines) == rounds
    assert {line["EventId"] for line in lines} == {f.feedback_id for f in second.feedback}


def test_a_missing_topic_is_a_clear_error(kafka_bootstrap: str, capsys) -> None:
    argv = ["evaluate", "--from-kafka", "--kafka", kafka_bootstrap]
    argv += ["--feedback-topic", "no-such-topic-x1", "--impressions-topic", "no-such-topic-x2"]
    assert main(argv) == 2
    assert "'no-such-topic-x1' does not exist" in capsys.readouterr().err


def test_a_saved_model_version_is_evaluated_as_saved(
    kafka_bootstrap: str, redis_url: str, keyspace: KeySpace, topic_factory, tmp_path, monkeypatch
) -> None:
    """``model@version`` loads a bandit version from a real Redis and is not trained further:
    its estimates equal those of the same learner evaluated frozen in memory."""
    impressions, feedback = topic_factory("impressions", 1), topic_factory("feedback", 1)
    log = simulate_log(World(CONFIG, seed=8), 300, epsilon=0.3, seed=8)
    produce(kafka_bootstrap, impressions, feedback, log, int(time.time() * 1000))
    decisions, _ = decisions_from_log(log.impressions, log.feedback)
    policy = build_policy("linucb:alpha=0.5", decisions, seed=1)
    train(policy, decisions[:100])
    assert isinstance(policy, LearnerPolicy)
    blob = encode_params("bandit-x", 0, policy.learner.state(), meta={"learner": "linucb"})
    store = ParamStore.from_url(redis_url, keys=keyspace, registry=CollectorRegistry())
    version = store.publish("bandit-x", {"p0": blob})
    store.close()
    monkeypatch.setenv("REDIS_NAMESPACE", keyspace.namespace)
    spec = f"bandit-x@{version}"
    argv = ["evaluate", "--from-kafka", "--kafka", kafka_bootstrap, "--feedback-topic", feedback]
    argv += ["--impressions-topic", impressions, "--redis", redis_url, "--policies", spec]
    assert main([*argv, "--seed", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    expected = evaluate_policies([spec], decisions, seed=1, frozen={spec: policy})
    [frozen] = expected.policies
    for kind in ("ips", "snips", "dr"):
        estimate = frozen.estimates[kind]
        assert estimate is not None
        assert report["policies"][spec][kind]["value"] == pytest.approx(estimate.value, rel=1e-12)
    missing = [*argv[:-2], "--policies", "bandit-x@999"]
    assert main(missing) == 2
