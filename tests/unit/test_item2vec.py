from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from services.embeddings import Item2Vec
from services.simulator import World, WorldConfig

torch.set_num_threads(1)

CLUSTERS, PER_CLUSTER = 8, 25


def item(cluster: int, position: int) -> str:
    return f"c{cluster}-i{position}"


def clustered_sessions(rng: np.random.Generator, n: int, length: int = 10) -> list[list[str]]:
    """Sessions that stay in one cluster, with 10% clicks on random items anywhere."""
    sessions = []
    for _ in range(n):
        cluster = int(rng.integers(CLUSTERS))
        session = []
        for _ in range(length):
            if rng.random() < 0.1:
                session.append(item(int(rng.integers(CLUSTERS)), int(rng.integers(PER_CLUSTER))))
            else:
                session.append(item(cluster, int(rng.integers(PER_CLUSTER))))
        sessions.append(session)
    return sessions


def test_vocabulary_grows_lazily_and_keeps_learned_rows() -> None:
    model = Item2Vec(dim=8, window=2, seed=3)
    model.learn_sequences([["a", "b", "c", "a", "b"]] * 5)
    ids_before, before = model.vectors()
    assert ids_before == ["a", "b", "c"]
    # 300 new items force several reallocations of the tables; the input rows of
    # items absent from these batches are neither moved nor touched.
    for start in range(0, 300, 50):
        model.learn_sequences([[f"n{i}" for i in range(start, start + 50)]])
    ids_after, after = model.vectors()
    assert len(model) == 303
    assert ids_after[:3] == ["a", "b", "c"]
    assert ids_after[3:] == [f"n{i}" for i in range(300)]
    np.testing.assert_array_equal(after[:3], before)
    assert np.abs(after[3:]).sum() > 0


def test_vector_masks_unknown_items() -> None:
    model = Item2Vec(dim=4, seed=0)
    model.learn_sequences([["x", "y"]])
    vectors, known = model.vector(["y", "nope", "x"], normalize=True)
    assert known.tolist() == [True, False, True]
    np.testing.assert_array_equal(vectors[1], np.zeros(4, np.float32))
    np.testing.assert_allclose(np.linalg.norm(vectors[[0, 2]], axis=1), 1.0, rtol=1e-6)


def test_state_round_trip_is_exact_and_training_continues_identically() -> None:
    rng = np.random.default_rng(11)
    model = Item2Vec(dim=12, window=3, negatives=4, lr=0.05, batch_size=64, seed=5)
    model.learn_sequences(clustered_sessions(rng, 40))
    model.learn_sequences([["é-ünïcode", "日本", "c0-i1"]])
    state = model.state()
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in state.values())

    clone = Item2Vec.from_state(state)
    for name, array in clone.state().items():
        np.testing.assert_array_equal(array, state[name], err_msg=name)
    assert clone.item_ids == model.item_ids
    assert (clone.dim, clone.window, clone.negatives, clone.lr) == (12, 3, 4, 0.05)

    batch = clustered_sessions(rng, 20) + [["brand-new", "c1-i2"]]
    assert clone.learn_sequences(batch) == model.learn_sequences(batch)
    np.testing.assert_array_equal(clone.vectors()[1], model.vectors()[1])


def test_same_seed_same_vectors() -> None:
    batch = clustered_sessions(np.random.default_rng(2), 30)
    first, second = Item2Vec(dim=8, seed=9), Item2Vec(dim=8, seed=9)
    assert first.learn_sequences(batch) == second.learn_sequences(batch)
    np.testing.assert_array_equal(first.vectors()[1], second.vectors()[1])


def test_planted_clusters_are_nearest_neighbours() -> None:
    rng = np.random.default_rng(0)
    model = Item2Vec(dim=16, window=5, negatives=5, seed=1)
    losses = [model.learn_sequences(clustered_sessions(rng, 100)) for _ in range(20)]
    assert losses[-1] < 0.7 * losses[0]

    ids, vectors = model.vectors(normalize=True)
    clusters = np.array([int(i.split("-")[0][1:]) for i in ids])
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    k = 10
    neighbours = np.argsort(-similarity, axis=1)[:, :k]
    precision = float((clusters[neighbours] == clusters[:, None]).mean())
    chance = (PER_CLUSTER - 1) / (CLUSTERS * PER_CLUSTER - 1)
    assert precision > 0.8, f"same-cluster precision@{k} {precision:.2f} (chance {chance:.2f})"


def test_short_sequences_give_no_pairs() -> None:
    model = Item2Vec(seed=0)
    assert np.isnan(model.learn_sequences([["a"], [], ["b"]]))
    assert len(model) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 0}, "dim must be a positive integer"),
        ({"window": 1.5}, "window must be a positive integer"),
        ({"negatives": -1}, "negatives must be a non-negative integer"),
        ({"lr": float("nan")}, "lr must be a positive finite number"),
    ],
)
def test_bad_hyperparameters(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Item2Vec(**kwargs)


def test_bad_inputs_and_state() -> None:
    model = Item2Vec(dim=4, seed=0)
    with pytest.raises(ValueError, match="got a str"):
        model.learn_sequences(["abc"])
    model.learn_sequences([["a", "b"]])
    state = model.state()
    state["in_vectors"] = state["in_vectors"][:, :3]
    with pytest.raises(ValueError, match=r"in_vectors has shape \(2, 3\), expected \(2, 4\)"):
        Item2Vec.from_state(state)
    with pytest.raises(ValueError, match="missing arrays"):
        Item2Vec.from_state({"in_vectors": np.zeros((0, 4), np.float32)})


def test_beats_popularity_on_simulator_ground_truth() -> None:
    """Issue 4 acceptance: embeddings improve recall@20 over popularity on the simulator.

    Item2Vec learns incrementally from a stream of sampled sessions (one pass, batches
    of 200); a user is the mean of the vectors of a fresh session of theirs, and their
    recommendations are its 20 nearest items. Popularity recommends the 20 most
    clicked items of the same stream. Both are scored against the world's true top-20.
    """
    world = World(WorldConfig(n_users=400, n_items=300), seed=3)
    users = world.user_ids()
    stream = [world.sample_session(user, 15) for _ in range(10) for user in users]
    # World sessions are unordered draws, so the whole session is one context window.
    model = Item2Vec(dim=16, window=15, seed=0)
    for start in range(0, len(stream), 200):
        model.learn_sequences(stream[start : start + 200])
    popular = {item for item, _ in Counter(i for s in stream for i in s).most_common(20)}

    ids, vectors = model.vectors(normalize=True)
    embedding_recall, popularity_recall = [], []
    for user in users[:200]:
        relevant = set(world.relevant_items(user, 20))
        recent, known = model.vector(world.sample_session(user, 10), normalize=True)
        nearest = np.argsort(-(vectors @ recent[known].mean(axis=0)))[:20]
        embedding_recall.append(len(relevant & {ids[j] for j in nearest}) / 20)
        popularity_recall.append(len(relevant & popular) / 20)
    embedding, popularity = float(np.mean(embedding_recall)), float(np.mean(popularity_recall))
    assert embedding > popularity + 0.05, (
        f"recall@20 {embedding:.3f} vs popularity {popularity:.3f}"
    )
