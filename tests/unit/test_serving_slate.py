"""Logged propensities are the slate's exact marginal inclusion probabilities.

For a slate of ``k`` of ``n`` candidates the inclusion probabilities of all
candidates sum to ``k``; the propensity logged for each shown item must be its
own, and over many seeded draws the inclusion frequencies must match them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from contracts.events import Impression, decode_impression, encode
from contracts.ids import item_labels
from services.bandits.factory import new_learner
from services.bandits.settings import BanditsSettings
from services.catalog import CandidateLists, ItemCatalog
from services.serving.policies import BanditPolicy, PolicyRouter, RandomPolicy, RankRequest
from services.serving.recommender import BadRequest, Recommender, RecommenderConfig
from services.serving.slate import build_slate

DRAWS = 10_000


def inclusion_probabilities(scores: np.ndarray, k: int, epsilon: float) -> np.ndarray:
    """Reference: P(candidate shown) for distinct scores, epsilon-uniform over the top k."""
    n = len(scores)
    k = min(k, n)
    top = np.zeros(n)
    top[np.argsort(-scores)[:k]] = 1.0
    return (1.0 - epsilon) * top + epsilon * k / n


def empirical_inclusion(draw, n: int, draws: int = DRAWS) -> np.ndarray:
    shown = np.zeros(n)
    for _ in range(draws):
        shown[draw()] += 1
    return shown / draws


@pytest.mark.parametrize(("n", "k", "epsilon"), [(8, 3, 0.3), (30, 5, 0.05), (4, 4, 0.5)])
def test_build_slate_propensities_are_exact_and_sum_to_k(n: int, k: int, epsilon: float) -> None:
    rng = np.random.default_rng(n * 100 + k)
    scores = rng.standard_normal(n)
    expected = inclusion_probabilities(scores, k, epsilon)
    assert expected.sum() == pytest.approx(k)
    logged = np.full(n, np.nan)

    def draw() -> np.ndarray:
        slate = build_slate(scores, k, epsilon, rng)
        assert len(slate.indices) == len(set(slate.indices.tolist())) == k
        np.testing.assert_allclose(slate.propensities, expected[slate.indices])
        logged[slate.indices] = slate.propensities
        return slate.indices

    frequency = empirical_inclusion(draw, n)
    # Five binomial standard errors: a wrong propensity is off by far more.
    tolerance = 5 * np.sqrt(expected * (1 - expected) / DRAWS) + 1e-9
    assert np.all(np.abs(frequency - expected) <= tolerance), (frequency, expected)
    np.testing.assert_allclose(logged, expected)


def test_random_policy_logs_k_over_n() -> None:
    n, k = 10, 3
    request = RankRequest(
        user_id="u1",
        context=np.zeros(2),
        candidates=[f"i{i}" for i in range(n)],
        candidate_labels=np.arange(n),
        item_features=np.zeros((n, 1)),
        k=k,
    )
    rng = np.random.default_rng(0)

    def draw() -> list[int]:
        ranked = RandomPolicy().rank(request, rng)
        assert ranked.propensities == [k / n] * k
        return [int(item[1:]) for item in ranked.items]

    frequency = empirical_inclusion(draw, n, draws=5_000)
    np.testing.assert_allclose(frequency, k / n, atol=5 * np.sqrt(0.21 / 5_000))


def test_tied_scores_log_their_marginal_probability() -> None:
    n, k, epsilon = 6, 2, 0.1
    scores = np.zeros(n)
    rng = np.random.default_rng(1)
    logged: list[float] = []

    def draw() -> np.ndarray:
        slate = build_slate(scores, k, epsilon, rng)
        logged.extend(slate.propensities.tolist())
        return slate.indices

    frequency = empirical_inclusion(draw, n, draws=2_000)
    np.testing.assert_allclose(frequency, k / n, atol=0.05)
    np.testing.assert_allclose(logged, k / n)


# -- at the serving level --------------------------------------------------------


@dataclass
class ListLog:
    """An impression sink that keeps what it is given (the real one produces to Kafka)."""

    impressions: list[Impression] = field(default_factory=list)

    def log(self, impression: Impression) -> None:
        self.impressions.append(impression)


@dataclass
class FixedLists:
    lists: CandidateLists

    def current(self) -> CandidateLists:
        return self.lists


def trained_linucb(catalog: ItemCatalog, settings: BanditsSettings, seed: int):
    learner = new_learner(
        settings.policies["linucb"],
        context_dim=settings.context_dim,
        item_dim=settings.item_dim,
        seed=settings.seed,
    )
    rng = np.random.default_rng(seed)
    items = item_labels(list(catalog.item_ids))
    picks = rng.integers(len(items), size=400)
    context = rng.standard_normal((400, settings.context_dim))
    X = learner.policy_features(context, np.empty((400, 0)))
    learner.update(items[picks], X, (rng.random(400) < 0.3).astype(float))
    return learner


def test_recommender_logs_one_impression_per_answer_with_exact_propensities() -> None:
    settings = BanditsSettings()
    n = 12
    catalog = ItemCatalog(
        [f"i{i}" for i in range(n)],
        np.random.default_rng(2).standard_normal((n, settings.item_dim)),
    )
    learner = trained_linucb(catalog, settings, seed=3)
    epsilon, k = 0.2, 3
    log = ListLog()
    recommender = Recommender(
        policies={"linucb": BanditPolicy("linucb", learner, None, epsilon=epsilon)},
        router=PolicyRouter({"linucb": 1.0}),
        history=None,
        index=None,
        feed=FixedLists(CandidateLists(popular=("i3", "i1"), fresh=("i7",), catalog=catalog)),
        impressions=log,
        config=RecommenderConfig(
            context_dim=settings.context_dim, item_dim=settings.item_dim, min_candidates=n
        ),
        seed=4,
    )
    context = np.random.default_rng(5).standard_normal(settings.context_dim)
    X = learner.policy_features(context, catalog.matrix)
    expected = inclusion_probabilities(
        learner.score(item_labels(list(catalog.item_ids)), X), k, epsilon
    )
    assert expected.sum() == pytest.approx(k)
    shown = np.zeros(n)
    draws = 3_000
    for _ in range(draws):
        answer = recommender.recommend("u1", k, context)
        assert answer.cold_start and answer.candidates == n
        impression = log.impressions[-1]
        assert impression.request_id == answer.request_id
        # What goes to Kafka passes the same validation as any producer's impression.
        assert decode_impression(encode(impression)) == impression
        for item in impression.slate:
            row = catalog.positions[item.item_id]
            assert item.propensity == pytest.approx(expected[row])
            assert item.features == pytest.approx(catalog.matrix[row].tolist())
            shown[row] += 1
        assert impression.context == pytest.approx(context.tolist())
    assert len(log.impressions) == draws
    tolerance = 5 * np.sqrt(expected * (1 - expected) / draws) + 1e-9
    assert np.all(np.abs(shown / draws - expected) <= tolerance)


def test_recommender_refuses_bad_input_with_every_reason() -> None:
    catalog = ItemCatalog(["i1", "i2"], np.zeros((2, 8)))
    log = ListLog()
    recommender = Recommender(
        policies={"random": RandomPolicy()},
        router=PolicyRouter({"random": 1.0}),
        history=None,
        index=None,
        feed=FixedLists(CandidateLists((), (), catalog)),
        impressions=log,
        config=RecommenderConfig(context_dim=3, max_k=10),
    )
    with pytest.raises(BadRequest) as caught:
        recommender.recommend("", 11, [1.0, float("nan"), 2.0])
    assert len(caught.value.reasons) == 3
    with pytest.raises(BadRequest, match="context must hold 3 numbers"):
        recommender.recommend("u1", 2, [1.0])
    with pytest.raises(BadRequest, match="k must be an integer"):
        recommender.recommend("u1", True, None)  # type: ignore[arg-type]
    assert log.impressions == []
    assert len(recommender.recommend("u1", 5).items) == 2  # k larger than the pool: all of it
