"""Issue 11 at the bandits service: ids and policy names from producers cannot grow it.

The processor is driven directly (no broker, no Redis): records in, snapshots
(the checkpointed state) out. A flood of a million distinct item ids must leave
each partition's snapshot bounded by ``max_arms``, far below the 512 MB Redis
accepts in one value; invented policy names must not add metric series.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from contracts.events import Feedback
from contracts.params import decode_params, encode_params
from services.bandits.factory import new_learner
from services.bandits.service import (
    CHECKPOINT_BUDGET_BYTES,
    OTHER_POLICY,
    RECENCY,
    BanditsProcessor,
    CatalogLabels,
)
from services.bandits.settings import BanditsSettings
from services.common import Checkpoint, Record

REDIS_MAX_BULK_BYTES = 512 * 2**20
POLICIES = ["linucb", "ts", "ts_beta", "egreedy"]


def feedback(item: str, policy: str, n: int, reward: int = 0) -> Feedback:
    return Feedback(
        feedback_id=f"r{n}/{item}",
        request_id=f"r{n}",
        user_id=f"u{n % 97}",
        item_id=item,
        ts=1.7e9 + n,
        reward=reward,
        position=0,
        propensity=0.5,
        policy=policy,
        context=[0.1 * (n % 7), 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0],
    )


def records(events: list[Feedback], partition: int = 0, offset: int = 0) -> list[Record]:
    return [Record("feedback", partition, offset + i, None, fb, 0) for i, fb in enumerate(events)]


def processor(registry: CollectorRegistry | None = None, **settings: Any) -> BanditsProcessor:
    made = BanditsProcessor(BanditsSettings(**settings), None, registry or CollectorRegistry())
    made.restore(0, None)
    return made


def flood(total: int, chunk: int) -> Iterator[list[Feedback]]:
    """``total`` feedback, each for a distinct item, spread over the four default policies."""
    for lo in range(0, total, chunk):
        yield [feedback(f"spam-{n}", POLICIES[n % 4], n) for n in range(lo, min(lo + chunk, total))]


def snapshot_bound(settings: BanditsSettings) -> int:
    per_arm = sum(
        new_learner(
            spec, context_dim=settings.context_dim, item_dim=settings.item_dim, seed=settings.seed
        ).state_bytes_per_arm()
        for spec in settings.policies.values()
    )
    return settings.max_arms * per_arm + 64 * 1024  # + header and hyperparameters


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.mark.parametrize(
    "ids", [100_000, pytest.param(1_000_000, marks=pytest.mark.slow)], ids=["100k", "1M"]
)
def test_a_flood_of_distinct_item_ids_leaves_the_snapshot_bounded_by_the_cap(ids: int):
    cap = 2000
    registry = CollectorRegistry()
    bandits = processor(registry, max_arms=cap)
    bound = snapshot_bound(bandits.settings)
    sizes = []
    for n, events in enumerate(flood(ids, 5000)):
        bandits.apply(records(events), None)
        if n % 4 == 3:  # every 20k ids
            sizes.append(len(bandits.snapshot(0)))
            assert sizes[-1] <= bound, f"snapshot of {sizes[-1]} bytes after {(n + 1) * 5000} ids"
    assert all(learner.n_arms <= cap for learner in bandits.learners[0].values())
    assert max(sizes[1:]) - min(sizes[1:]) < 0.1 * bound, "the snapshot stopped growing at the cap"
    evicted = sum(
        sample(registry, "streamrec_bandits_evicted_updates_total", policy=p, reason="probation")
        for p in POLICIES
    )
    applied = sum(sample(registry, "streamrec_bandits_updates_total", policy=p) for p in POLICIES)
    held = sum(learner.n_arms for learner in bandits.learners[0].values())
    assert applied == ids
    assert evicted + held == ids, "every flooded update is held or counted as evicted"


def test_the_default_cap_keeps_a_checkpoint_far_below_the_redis_value_limit():
    settings = BanditsSettings()
    assert settings.max_arms == 100_000
    assert snapshot_bound(settings) <= CHECKPOINT_BUDGET_BYTES <= REDIS_MAX_BULK_BYTES // 2
    # Measured, not only computed: a full learner of each default policy at a small cap,
    # scaled to the default one.
    small = processor(max_arms=1000)
    for events in flood(8000, 4000):
        small.apply(records(events), None)
    assert all(learner.n_arms > 900 for learner in small.learners[0].values())
    per_arm = len(small.snapshot(0)) / 1000
    assert per_arm * settings.max_arms < REDIS_MAX_BULK_BYTES / 3


def test_a_cap_whose_checkpoint_would_not_fit_is_refused_at_start():
    with pytest.raises(ValueError, match="STREAMREC_BANDITS_MAX_ARMS to at most"):
        BanditsProcessor(BanditsSettings(max_arms=1_000_000), None, CollectorRegistry())
    hybrid = {"h": {"learner": "hybrid_linucb"}}
    with pytest.raises(ValueError, match="budget"):
        BanditsProcessor(BanditsSettings(policies=hybrid), None, CollectorRegistry())
    BanditsProcessor(BanditsSettings(policies=hybrid, max_arms=20_000), None, CollectorRegistry())


def test_real_items_survive_a_flood_that_outnumbers_the_cap():
    bandits = processor(max_arms=500, admit_after=2)
    real = [feedback(f"i{k}", "linucb", n, reward=1) for n, k in enumerate(list(range(100)) * 3)]
    bandits.apply(records(real), None)
    for events in flood(40_000, 5000):
        bandits.apply(records([fb for fb in events if fb.policy == "linucb"]), None)
    held = set(bandits.learners[0]["linucb"].state()["items"].tolist())
    assert set(range(100)) <= held


class StaticCatalog:
    def __init__(self, labels: list[int]) -> None:
        self._labels = np.array(sorted(labels), dtype=np.int64)

    def labels(self) -> np.ndarray:
        return self._labels


def test_catalog_items_survive_a_flood_of_ids_repeated_past_probation():
    bandits = BanditsProcessor(
        BanditsSettings(max_arms=300, admit_after=2),
        None,
        CollectorRegistry(),
        catalog=StaticCatalog(list(range(50))),
    )
    bandits.restore(0, None)
    bandits.apply(records([feedback(f"i{k}", "linucb", k) for k in range(50)]), None)
    for lo in range(0, 20_000, 2000):
        twice = [feedback(f"spam-{n // 2}", "linucb", n) for n in range(lo, lo + 2000)]
        bandits.apply(records(twice), None)
    held = set(bandits.learners[0]["linucb"].state()["items"].tolist())
    assert set(range(50)) <= held


def test_unknown_policy_names_share_one_metric_label():
    registry = CollectorRegistry()
    bandits = processor(registry)
    invented = [feedback("i1", f"made-up-{n}", n) for n in range(500)]
    known = [feedback("i1", "drn", n) for n in range(3)] + [feedback("i1", "random", 9)]
    bandits.apply(records(invented + known), None)
    labels = {
        sample.labels["policy"]
        for metric in registry.collect()
        if metric.name == "streamrec_bandits_ignored"
        for sample in metric.samples
        if sample.name == "streamrec_bandits_ignored_total"
    }
    assert labels == {OTHER_POLICY, "drn", "random"}
    assert sample(registry, "streamrec_bandits_ignored_total", policy=OTHER_POLICY) == 500
    assert sample(registry, "streamrec_bandits_ignored_total", policy="drn") == 3


def test_a_restored_partition_evicts_like_an_uninterrupted_one():
    # 200 items for 64 arms, all admitted at once: plain least-recently-updated eviction
    # all the time, so the order after the restore depends on the checkpointed recency.
    items = np.random.default_rng(3).integers(200, size=6000)
    stream = [feedback(f"i{k}", "linucb", n, reward=n % 3 == 0) for n, k in enumerate(items)]
    straight, before = processor(max_arms=64, admit_after=1), processor(max_arms=64, admit_after=1)
    straight.apply(records(stream[:2500]), None)
    before.apply(records(stream[:2500]), None)
    after = processor(max_arms=64, admit_after=1)
    after.restore(0, Checkpoint(state=before.snapshot(0)))
    for lo in range(2500, 6000, 100):
        straight.apply(records(stream[lo : lo + 100], offset=lo), None)
        after.apply(records(stream[lo : lo + 100], offset=lo), None)
        expected = straight.learners[0]["linucb"].state()
        got = after.learners[0]["linucb"].state()
        np.testing.assert_array_equal(got["items"], expected["items"], err_msg=f"at {lo}")
        for name in ("gram", "b", "counts"):
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-9, err_msg=name)


def test_a_checkpoint_from_before_the_cap_restores_and_a_lower_cap_evicts_at_once():
    bandits = processor()
    bandits.apply(records([feedback(f"i{n}", "linucb", n) for n in range(300)]), None)
    arrays = decode_params(bandits.snapshot(0)).arrays
    assert f"{RECENCY}/linucb" in arrays
    old = {name: a for name, a in arrays.items() if not name.startswith(RECENCY)}
    registry = CollectorRegistry()
    smaller = processor(registry, max_arms=100)
    smaller.restore(0, Checkpoint(state=encode_params("bandits", 0, old)))
    assert smaller.learners[0]["linucb"].n_arms == 100
    # One update each: on probation (admit_after=2), and counted as such.
    evicted = "streamrec_bandits_evicted_arms_total"
    assert sample(registry, evicted, policy="linucb", reason="probation") == 200
    assert sample(registry, "streamrec_bandits_arms", policy="linucb") == 100


class FakeRedis:
    """The two calls CatalogLabels makes, and a switch to make them fail."""

    def __init__(self) -> None:
        self.version = 1
        self.items = [b"i1", b"i2"]
        self.down = False
        self.reads = 0

    def get(self, key: str) -> bytes:
        if self.down:
            import redis

            raise redis.ConnectionError("down")
        return str(self.version).encode()

    def hkeys(self, key: str) -> list[bytes]:
        self.reads += 1
        return list(self.items)


def test_catalog_labels_reload_only_on_a_new_version_and_survive_redis_failures():
    from contracts.keys import KeySpace

    client, now = FakeRedis(), [0.0]
    catalog = CatalogLabels(client, KeySpace(), refresh_s=5.0, clock=lambda: now[0])  # type: ignore[arg-type]
    first = catalog.labels()
    assert first.tolist() == [1, 2] and client.reads == 1
    now[0] = 10.0
    assert catalog.labels() is first and client.reads == 1, "same version: no re-read"
    client.version, client.items = 2, [b"i3"]
    assert catalog.labels() is first, "not checked again before refresh_s"
    now[0] = 20.0
    assert catalog.labels().tolist() == [3]
    client.down, now[0] = True, 30.0
    assert catalog.labels().tolist() == [3], "the last catalog read serves while Redis is down"
