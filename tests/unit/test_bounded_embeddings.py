"""Issue 11 at the embeddings: item ids from producers cannot grow the vocabulary.

Item2Vec keeps the ``max_items`` most recently seen items; the service forgets
the same items in its popularity and first-click records, so the published
lists only name items the published index holds, and the checkpoint stays
bounded under a flood of distinct ids.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from contracts.events import Click
from services.common import Checkpoint, Record
from services.embeddings import Item2Vec
from services.embeddings.service import EmbeddingsProcessor, EmbeddingsSettings

torch.set_num_threads(1)
REDIS_MAX_BULK_BYTES = 512 * 2**20


def sessions(rng: np.random.Generator, n: int, items: int, length: int = 6) -> list[list[str]]:
    return [[f"x{int(k)}" for k in rng.integers(items, size=length)] for _ in range(n)]


def most_recent(batches: list[list[list[str]]], keep: int) -> list[str]:
    """The ``keep`` most recently seen ids, by a plain LRU over every click in order."""
    seen: OrderedDict[str, None] = OrderedDict()
    for batch in batches:
        for sequence in batch:
            for item in sequence:
                seen.pop(item, None)
                seen[item] = None
    return list(seen)[-keep:]


def test_the_vocabulary_keeps_the_most_recently_seen_items():
    rng = np.random.default_rng(0)
    model = Item2Vec(dim=8, window=2, seed=1, max_items=50)
    batches, evicted = [], []
    for _ in range(12):
        batch = sessions(rng, 8, items=400)
        batches.append(batch)
        model.learn_sequences(batch)
        assert len(model) <= 50
        assert set(model.item_ids) == set(most_recent(batches, len(model)))
        evicted += model.drain_evicted()
    everything = {item for batch in batches for sequence in batch for item in sequence}
    assert set(evicted) | set(model.item_ids) == everything
    assert not set(evicted[-20:]) & set(model.item_ids[-20:])
    assert model.drain_evicted() == []


def test_eviction_leaves_the_kept_rows_untouched():
    rng = np.random.default_rng(2)
    capped = Item2Vec(dim=8, window=2, seed=3, max_items=60)
    free = Item2Vec(dim=8, window=2, seed=3)
    while True:
        batch = sessions(rng, 6, items=500)
        capped.learn_sequences(batch)
        free.learn_sequences(batch)
        if capped.drain_evicted():
            break  # the first eviction follows a batch learned alike by both
    ids = capped.item_ids
    np.testing.assert_array_equal(capped.vector(ids)[0], free.vector(ids)[0])
    assert ids == [item for item in free.item_ids if item in set(ids)], "row order is kept"


def test_a_restored_model_forgets_like_the_original():
    rng = np.random.default_rng(4)
    batches = [sessions(rng, 6, items=300) for _ in range(10)]
    original = Item2Vec(dim=8, window=2, seed=5, max_items=80)
    for batch in batches[:5]:
        original.learn_sequences(batch)
    restored = Item2Vec.from_state(original.state(), max_items=80)
    original.drain_evicted()
    for batch in batches[5:]:
        original.learn_sequences(batch)
        restored.learn_sequences(batch)
    assert restored.item_ids == original.item_ids
    np.testing.assert_array_equal(restored.vectors()[1], original.vectors()[1])
    forgotten = original.drain_evicted()
    assert forgotten and restored.drain_evicted() == forgotten


def test_over_the_cap_a_sixteenth_more_goes_so_a_trickle_compacts_rarely():
    model = Item2Vec(dim=4, window=1, seed=0, max_items=160)
    model.learn_sequences([[f"a{i}"] for i in range(160)])
    assert len(model) == 160 and model.drain_evicted() == []
    model.learn_sequences([["new"]])
    assert len(model) == 150
    assert model.drain_evicted() == [f"a{i}" for i in range(11)]
    for i in range(10):
        model.learn_sequences([[f"b{i}"]])
        assert model.drain_evicted() == [], "room for ten more before the next compaction"


def test_an_old_state_loads_and_a_lower_cap_cuts_it_down_at_once():
    model = Item2Vec(dim=4, window=1, seed=0)
    model.learn_sequences([[f"a{i}", f"a{i + 1}"] for i in range(0, 40, 2)])
    state = {name: array for name, array in model.state().items() if name != "last_seen"}
    smaller = Item2Vec.from_state(state, max_items=10)
    assert smaller.item_ids == model.item_ids[-10:], "first sightings order an old state"
    assert smaller.drain_evicted() == model.item_ids[:30]
    with pytest.raises(ValueError, match="max_items"):
        Item2Vec(max_items=0)
    with pytest.raises(ValueError, match="last_seen"):
        Item2Vec.from_state({**model.state(), "last_seen": np.zeros(3, np.int64)})


class Ctx:
    def request_checkpoint(self) -> None:
        pass


def clicks(start: int, n: int, *, users: int) -> list[Record]:
    """Clicks on ``n`` new distinct items by ``users`` users in turn."""
    return [
        Record(
            "clicks",
            0,
            k,
            None,
            Click(event_id=f"e{k}", user_id=f"u{k % users}", item_id=f"spam-{k}", ts=1.7e9 + k),
            0,
        )
        for k in range(start, start + n)
    ]


@pytest.mark.slow
def test_a_flood_of_distinct_item_ids_keeps_the_checkpoint_and_the_lists_bounded():
    cap = 3000
    registry = CollectorRegistry()
    settings = EmbeddingsSettings(max_items=cap, dim=16, popular_n=50, fresh_n=50)
    processor = EmbeddingsProcessor(settings, None, registry)
    processor.restore(0, None)
    sizes = []
    for start in range(0, 60_000, 5000):
        processor.apply(clicks(start, 5000, users=1000), Ctx())
        sizes.append(len(processor.snapshot(0)))
        assert len(processor.model) <= cap
        assert set(processor.stats.first_seen) <= set(processor.model.item_ids)
        job = processor.job()
        assert set(job.popular) | set(job.fresh) <= set(job.item_ids)
    assert max(sizes[1:]) - min(sizes[1:]) < 0.05 * max(sizes), "the checkpoint stopped growing"
    evicted = registry.get_sample_value("streamrec_embeddings_evicted_items_total")
    assert evicted == 60_000 - len(processor.model), "each flooded item forgotten once"
    assert set(processor.stats.first_seen) == set(processor.model.item_ids)
    # A restart restores the bounded model and its consistent records.
    again = EmbeddingsProcessor(settings, None, CollectorRegistry())
    again.restore(0, Checkpoint(state=processor.snapshot(0), written_at=1.0))
    assert again.model.item_ids == processor.model.item_ids
    assert set(again.stats.first_seen) <= set(again.model.item_ids)


def test_the_default_cap_keeps_the_checkpoint_far_below_the_redis_value_limit():
    settings = EmbeddingsSettings()
    small = EmbeddingsProcessor(
        EmbeddingsSettings(max_items=2000, dim=settings.dim), None, CollectorRegistry()
    )
    small.restore(0, None)
    small.apply(clicks(0, 4000, users=500), Ctx())
    assert 1800 < len(small.model) <= 2000
    per_item = len(small.snapshot(0)) / len(small.model)
    assert per_item * settings.max_items < REDIS_MAX_BULK_BYTES / 4
