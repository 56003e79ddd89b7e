"""The DRN service: slate feedback → DBGD + replay → W and W̃ published; exactly-once on SIGKILL.

The feedback stream is made the way production makes it: the DRN serving
policy ranks each request with the newest W and W̃ of a twin trainer (as if
publishing were instant), the slate's clicks are drawn from a hidden click
model, and one Feedback per shown item carries the logged state, action
vectors, teams and W̃ draw. The service, fed the same records, therefore sees
verdicts about its *current* W̃ and applies minor updates.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from kafka import KafkaProducer

from contracts.events import Feedback, decode_feedback, encode
from contracts.keys import KeySpace
from contracts.params import decode_params
from services.common import (
    ConsumerRuntime,
    KafkaSettings,
    Record,
    RedisSettings,
    RuntimeSettings,
    TopicSettings,
)
from services.drn.service import DRNProcessor
from services.drn.settings import DRNSettings
from services.evaluation.drn import served_feedback
from services.paramstore import ParamStore, ParamWatcher
from services.serving.drn_policy import DRNPolicy, drn_builder
from services.serving.policies import RankRequest
from tests.integration.processes import FAST_FAILOVER

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
K = 4

#: A small DRN without scheduled or drift-triggered major updates, so that the
#: run is a pure function of the record order (wall-clock never matters).
ENV = {
    "STREAMREC_DRN_EMBEDDING_DIM": "4",
    "STREAMREC_DRN_N_CONTEXT": "3",
    "STREAMREC_DRN_WINDOWS_S": "[60, 600, 3600]",
    "STREAMREC_DRN_INTEREST_COLUMNS": "0",
    "STREAMREC_DRN_HIDDEN": "[16]",
    "STREAMREC_DRN_BUFFER_CAPACITY": "3000",
    "STREAMREC_DRN_MAX_NEXT_ACTIONS": "3",
    "STREAMREC_DRN_VERDICT_WINDOW": "4",
    "STREAMREC_DRN_RETURN_WINDOW_S": "40",
    "STREAMREC_DRN_MAJOR_INTERVAL_S": "0",
    "STREAMREC_DRN_DRIFT_DETECTION": "false",
    "STREAMREC_DRN_PUBLISH_INTERVAL_S": "0.2",
    "STREAMREC_DRN_SEED": "5",
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _settings(group: str, model: str) -> DRNSettings:
    values = {k.removeprefix("STREAMREC_DRN_").lower(): v for k, v in ENV.items()}
    values["windows_s"] = (60.0, 600.0, 3600.0)
    values["hidden"] = (16,)
    return DRNSettings(group=group, model=model, **values)


def _stream(settings: DRNSettings, n_slates: int, seed: int = 0) -> list[Feedback]:
    return served_feedback(settings, n_slates, seed=seed, k=K)


def _reference(settings: DRNSettings, stream: list[Feedback]) -> DRNProcessor:
    """The processor applied in process, in one uninterrupted pass."""
    processor = DRNProcessor(settings, None)
    processor.restore(0, None)
    records = [
        Record("feedback", 0, offset, None, decode_feedback(encode(fb)), 0)
        for offset, fb in enumerate(stream)
    ]
    for start in range(0, len(records), 97):  # batch boundaries must not matter
        processor.apply(records[start : start + 97], None)  # type: ignore[arg-type]
    return processor


def _produce(bootstrap: str, topic: str, stream: list[Feedback]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for fb in stream:
        producer.send(topic, key=fb.user_id.encode(), value=encode(fb))
    producer.flush()
    producer.close()


def _checkpointed(client, keys: KeySpace, group: str) -> tuple[int, dict[str, np.ndarray]]:
    raw = client.hget(keys.checkpoint(group, 0), "state")
    if not raw:
        return 0, {}
    saved = decode_params(raw)
    return int(saved.meta["applied"]), saved.arrays


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _assert_learner_state(arrays: dict[str, np.ndarray], processor: DRNProcessor) -> None:
    expected = processor.trainer.learner.state(include_buffer=True)
    got = {k.removeprefix("learner/"): v for k, v in arrays.items() if k.startswith("learner/")}
    assert set(got) == set(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_service_applies_minor_updates_and_publishes_w_and_w_tilde(
    kafka_bootstrap, redis_url, keyspace, topic_factory, unique_name
) -> None:
    settings = _settings(unique_name("drn"), unique_name("drn-model"))
    stream = _stream(settings, 400)
    topic = topic_factory("feedback")
    dlq = topic_factory("dead-letter")
    _produce(kafka_bootstrap, topic, stream)
    redis_settings = RedisSettings(url=redis_url, namespace=keyspace.namespace)
    store = ParamStore.from_settings(redis_settings)
    processor = DRNProcessor(settings, store)
    runtime = ConsumerRuntime(
        service="drn",
        group=settings.group,
        inputs={topic: decode_feedback},
        processor=processor,
        kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap),
        redis_settings=redis_settings,
        topics=TopicSettings(feedback=topic, dead_letter=dlq),
        settings=RuntimeSettings(checkpoint_interval_s=0.2),
    )
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: processor.applied == len(stream), 60, "all feedback applied")
    finally:
        runtime.stop()
        thread.join(30)
    reference = _reference(settings, stream)
    counters = processor.trainer.counters
    assert counters == reference.trainer.counters
    assert counters["credited"] > 100 and counters["stale"] == 0
    assert counters["minor_updates"] >= 20 and counters["explore_wins"] >= 1
    learner = processor.trainer.learner
    _assert_learner_state(dict(processor.trainer.state()[0]), reference)

    watcher = ParamWatcher(store, settings.model, build=drn_builder(settings.layout()))
    try:
        version, model = watcher.wait_ready(10)
        assert version == processor.published_version
        assert model.explore_version == learner.explore_version
        _, header, arrays = store.latest(settings.model)
        assert 0 < header["offsets"][topic][0] <= len(stream)
        for name, array in learner.weights().items():
            np.testing.assert_array_equal(arrays[f"W/{name}"], array)
        for name, array in learner.explore_weights().items():
            np.testing.assert_array_equal(arrays[f"W_explore/{name}"], array)
        policy = DRNPolicy(watcher, settings.layout(), hidden=settings.hidden)
        rng = np.random.default_rng(1)
        request = RankRequest(
            user_id="u1",
            context=rng.normal(size=3),
            candidates=[f"i{j}" for j in range(8)],
            candidate_labels=np.arange(8, dtype=np.int64),
            item_features=rng.normal(size=(8, 4)),
            k=K,
            ts=1.8e9,
        )
        slate = policy.rank(request, rng)
        assert slate.model_version == learner.explore_version
        state, actions = policy.features(request)
        np.testing.assert_allclose(
            model.online.score(state, actions),
            learner.score(np.hstack([np.tile(state, (8, 1)), actions])),
            rtol=1e-5,
            atol=1e-6,
        )
    finally:
        watcher.close()
        store.close()


def _service(
    topic: str,
    dlq: str,
    group: str,
    model: str,
    kafka: str,
    redis_url: str,
    keys: KeySpace,
    log: Path,
) -> subprocess.Popen:
    env = (
        os.environ
        | ENV
        | {
            "KAFKA_BOOTSTRAP_SERVERS": kafka,
            **FAST_FAILOVER,
            "REDIS_URL": redis_url,
            "REDIS_NAMESPACE": keys.namespace,
            "STREAMREC_TOPIC_FEEDBACK": topic,
            "STREAMREC_TOPIC_DEAD_LETTER": dlq,
            "STREAMREC_DRN_GROUP": group,
            "STREAMREC_DRN_MODEL": model,
            "STREAMREC_RUNTIME_MAX_BATCH": "100",
            "OMP_NUM_THREADS": "1",
        }
    )
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.drn.service"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def test_sigkill_and_restart_keep_drn_state_exactly_once(
    kafka_bootstrap, redis_url, redis_client, keyspace, topic_factory, unique_name, tmp_path
) -> None:
    group, model = unique_name("drn"), unique_name("drn-model")
    settings = _settings(group, model)
    stream = _stream(settings, 3_000, seed=1)
    n = len(stream)
    reference = _reference(settings, stream)
    assert reference.trainer.counters["minor_updates"] > 100
    topic = topic_factory("feedback")
    dlq = topic_factory("dead-letter")
    _produce(kafka_bootstrap, topic, stream)

    def progress() -> int:
        return _checkpointed(redis_client, keyspace, group)[0]

    args = (topic, dlq, group, model, kafka_bootstrap, redis_url, keyspace, tmp_path / "drn.log")
    worker = _service(*args)
    try:
        _wait_for(lambda: progress() > n // 5, 90, "progress before the kill")
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    killed_at = progress()
    assert 0 < killed_at < n, "the kill must land mid-stream"

    worker = _service(*args)
    try:
        _wait_for(lambda: progress() == n, 90, "every record applied after the restart")
        time.sleep(0.5)  # a double application would show in a later checkpoint
        applied, arrays = _checkpointed(redis_client, keyspace, group)
        assert applied == n
        _assert_learner_state(arrays, reference)
        store = ParamStore(redis_client, keys=keyspace)
        _wait_for(
            lambda: (
                store.latest(model)[1]["meta"]["explore_version"]
                == reference.trainer.learner.explore_version
            ),
            30,
            "the final W and W~ published",
        )
        _, header, published = store.latest(model)
        assert killed_at < header["offsets"][topic][0] <= n
        for name, array in reference.trainer.learner.weights().items():
            np.testing.assert_array_equal(published[f"W/{name}"], array)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
