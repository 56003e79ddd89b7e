"""The DRN serving policy: interleaved slates, exact propensities, logged vectors, loading."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from contracts.events import Feedback, Impression, SlateItem, decode_feedback, encode
from contracts.params import decode_params, encode_params
from services.drn import (
    DuelingQNetwork,
    FeatureLayout,
    candidate_rows,
    probabilistic_interleave,
    team_draft_interleave,
)
from services.drn.publish import published_arrays, published_meta
from services.serving.drn_policy import (
    DRNModel,
    DRNPolicy,
    QScorer,
    drn_builder,
    model_from_published,
)
from services.serving.policies import RankRequest

LAYOUT = FeatureLayout(embedding_dim=4, n_context=3)
N, K = 12, 5


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class FixedSource:
    """A model source that always serves one model (a ParamWatcher stand-in, no Redis)."""

    def __init__(self, model: DRNModel) -> None:
        self.model = model
        self.version = model.store_version

    def current(self) -> tuple[int, DRNModel]:
        return self.version, self.model


def _networks(seed: int = 0) -> tuple[DuelingQNetwork, DuelingQNetwork]:
    online = DuelingQNetwork(LAYOUT.state_dim, LAYOUT.action_dim, (16, 8), seed=seed)
    explore = DuelingQNetwork(LAYOUT.state_dim, LAYOUT.action_dim, (16, 8), seed=seed + 1)
    return online, explore


def _model(explore_version: int = 7) -> DRNModel:
    online, explore = _networks()
    return DRNModel.from_weights(
        online.weights(),
        explore.weights(),
        LAYOUT.state_dim,
        explore_version=explore_version,
        layout=LAYOUT,
        store_version=3,
    )


def _request(seed: int = 0, **extras: object) -> RankRequest:
    rng = np.random.default_rng(seed)
    return RankRequest(
        user_id="u1",
        context=rng.normal(size=LAYOUT.n_context),
        candidates=[f"i{j}" for j in range(N)],
        candidate_labels=np.arange(N, dtype=np.int64),
        item_features=rng.normal(size=(N, LAYOUT.embedding_dim)),
        k=K,
        ts=1.7e9,
        extras=extras,
    )


def _rank_order(scores: np.ndarray) -> list[int]:
    assert len(set(scores.tolist())) == len(scores), "the test needs distinct scores"
    return np.argsort(-scores, kind="stable").tolist()


def _probabilistic_item_probabilities(
    exploit: list[int], explore: list[int], shown: list[int], tau: float
) -> list[float]:
    """P(item in slot j | items above), recomputed from the two rankings.

    Each team draws with P(d) proportional to rank(d)^-tau over its items not yet
    shown, rank(d) being the item's rank in the team's full list (Hofmann et al.).
    """
    weights = [
        {item: (rank + 1.0) ** -tau for rank, item in enumerate(ranking)}
        for ranking in (exploit, explore)
    ]
    out = []
    for item in shown:
        out.append(sum(0.5 * w[item] / sum(w.values()) for w in weights))
        for w in weights:
            del w[item]
    return out


def test_probabilistic_slate_teams_and_propensities_are_exact() -> None:
    model = _model()
    policy = DRNPolicy(FixedSource(model), LAYOUT)
    request = _request()
    state, actions = policy.features(request)
    exploit = _rank_order(model.online.score(state, actions))
    explore = _rank_order(model.explore.score(state, actions))
    assert exploit != explore, "W and W~ must rank differently for the test to bite"
    for seed in range(20):
        slate = policy.rank(request, np.random.default_rng(seed))
        shown = [int(item[1:]) for item in slate.items]
        assert len(shown) == K == len(set(shown))
        assert slate.teams is not None and set(slate.teams) <= {"exploit", "explore"}
        assert slate.model_version == 7
        expected = _probabilistic_item_probabilities(exploit, explore, shown, policy.tau)
        np.testing.assert_allclose(slate.propensities, expected, rtol=1e-9)
        assert 0.0 < min(slate.propensities) and max(slate.propensities) <= 1.0


@pytest.mark.slow
def test_top_slot_propensity_matches_its_frequency() -> None:
    policy = DRNPolicy(FixedSource(_model()), LAYOUT)
    request = _request(1)
    n = 6_000
    rng = np.random.default_rng(5)
    tops: Counter[str] = Counter()
    logged: dict[str, float] = {}
    for _ in range(n):
        slate = policy.rank(request, rng)
        tops[slate.items[0]] += 1
        logged[slate.items[0]] = slate.propensities[0]
    assert sum(logged.values()) == pytest.approx(1.0, abs=0.02)
    for item, count in tops.items():
        p = logged[item]
        assert abs(count / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9


def test_team_draft_teams_place_their_best_remaining_item() -> None:
    model = _model()
    policy = DRNPolicy(FixedSource(model), LAYOUT, interleaving="team_draft")
    request = _request(2)
    state, actions = policy.features(request)
    rankings = {
        "exploit": _rank_order(model.online.score(state, actions)),
        "explore": _rank_order(model.explore.score(state, actions)),
    }
    for seed in range(10):
        slate = policy.rank(request, np.random.default_rng(seed))
        assert slate.teams is not None
        placed: list[int] = []
        for item, team in zip(slate.items, slate.teams, strict=True):
            best = next(i for i in rankings[team] if i not in placed)
            assert int(item[1:]) == best
            placed.append(best)
        counts = Counter(slate.teams)
        assert abs(counts["exploit"] - counts["explore"]) <= 1
        assert math.prod(slate.propensities) > 0


def test_logged_vectors_are_the_scored_ones_and_survive_the_wire() -> None:
    model = _model()
    online, _ = _networks()
    policy = DRNPolicy(FixedSource(model), LAYOUT)
    request = _request(3)
    slate = policy.rank(request, np.random.default_rng(0))
    state, actions = policy.features(request)
    shown = [int(item[1:]) for item in slate.items]
    assert slate.context == state.tolist()
    assert slate.item_features == actions[shown].tolist()
    # The logged (state, action) rows give W's own scores back, through the torch network.
    rows = candidate_rows(np.asarray(slate.context), np.asarray(slate.item_features))
    np.testing.assert_allclose(
        online.score(rows), model.online.score(state, actions)[shown], rtol=1e-5, atol=1e-6
    )
    # Impression -> Feedback JSON keeps the float32 vectors bit for bit.
    impression = Impression(
        request_id="r1",
        user_id="u1",
        ts=1.7e9,
        policy="drn",
        model_version=slate.model_version,
        context=slate.context,
        slate=[
            SlateItem(item_id=i, position=j, propensity=p, team=t, features=f)
            for j, (i, p, t, f) in enumerate(
                zip(
                    slate.items,
                    slate.propensities,
                    slate.teams or [],
                    slate.item_features or [],
                    strict=True,
                )
            )
        ],
    )
    item = impression.slate[1]
    feedback = decode_feedback(
        encode(
            Feedback(
                feedback_id=f"r1/{item.item_id}",
                request_id="r1",
                user_id="u1",
                item_id=item.item_id,
                ts=impression.ts,
                reward=1,
                position=item.position,
                propensity=item.propensity,
                policy="drn",
                model_version=impression.model_version,
                team=item.team,
                context=impression.context,
                item_features=item.features,
            )
        )
    )
    np.testing.assert_array_equal(np.asarray(feedback.context, dtype=np.float32), state)
    np.testing.assert_array_equal(
        np.asarray(feedback.item_features, dtype=np.float32), actions[shown[1]]
    )


def test_numpy_scorer_matches_the_torch_network() -> None:
    online, _ = _networks(4)
    rng = np.random.default_rng(0)
    state = rng.normal(size=LAYOUT.state_dim).astype(np.float32)
    actions = rng.normal(size=(200, LAYOUT.action_dim)).astype(np.float32)
    scorer = QScorer(online.weights(), LAYOUT.state_dim)
    np.testing.assert_allclose(
        scorer.score(state, actions),
        online.score(candidate_rows(state, actions)),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="actions must have"):
        scorer.score(state, actions[:, :-1])


def test_published_version_round_trips_into_the_policy() -> None:
    online, explore = _networks(8)
    blob = encode_params(
        "drn",
        0,
        published_arrays(online.weights(), explore.weights()),
        meta=published_meta(11, LAYOUT),
    )
    decoded = decode_params(blob)
    header = {"meta": decoded.meta}
    model = drn_builder(LAYOUT)(5, header, decoded.arrays)
    assert (model.explore_version, model.store_version, model.layout) == (11, 5, LAYOUT)
    twin = DuelingQNetwork(LAYOUT.state_dim, LAYOUT.action_dim, (16, 8), seed=99)
    twin.load_weights(
        {k.removeprefix("W/"): v for k, v in decoded.arrays.items() if k.startswith("W/")}
    )
    for name, array in online.weights().items():
        np.testing.assert_array_equal(twin.weights()[name], array)
    other = FeatureLayout(embedding_dim=4, n_context=2)
    with pytest.raises(ValueError, match="trained for layout"):
        drn_builder(other)(5, header, decoded.arrays)
    with pytest.raises(ValueError, match="not a DRN model"):
        model_from_published(5, {"meta": {"learner": "linucb"}}, decoded.arrays)


def test_prior_serves_before_the_first_version_and_history_is_used() -> None:
    policy = DRNPolicy(None, LAYOUT, hidden=(8,))
    request = _request(4)
    slate = policy.rank(request, np.random.default_rng(0))
    assert slate.model_version == 0 and len(slate.items) == K
    # W~ = W for the prior: both rankings agree, so the top item is W's best with p >= 1/2.
    assert slate.propensities[0] > 0.5
    embeddings = {f"i{j}": request.item_features[j] for j in range(N)}
    with_history = _request(4, embeddings=embeddings, history=[("i3", 1.7e9 - 60.0)])
    state, actions = policy.features(with_history)
    names = LAYOUT.action_feature_names
    cos = actions[:, names.index("max_cos_recent")]
    assert cos[3] == pytest.approx(1.0, abs=1e-6) and cos.max() == pytest.approx(cos[3])
    assert state[LAYOUT.state_feature_names.index("cold_user")] == 0.0
    with pytest.raises(ValueError, match="request context has 2 values"):
        policy.rank(
            RankRequest(
                user_id="u1",
                context=np.zeros(2),
                candidates=["a"],
                candidate_labels=np.zeros(1, dtype=np.int64),
                item_features=np.zeros((1, LAYOUT.embedding_dim)),
                k=1,
            ),
            np.random.default_rng(0),
        )


def test_interest_columns_drive_the_similarity_features() -> None:
    layout = FeatureLayout(embedding_dim=3, n_context=4)
    policy = DRNPolicy(None, layout, hidden=(8,), interest_columns=2)
    request = RankRequest(
        user_id="u1",
        context=np.array([1.0, 0.0, 0.5, 1.0]),
        candidates=["a", "b"],
        candidate_labels=np.arange(2, dtype=np.int64),
        item_features=np.array([[1.0, 0.0, 5.0], [0.0, 1.0, 0.0]]),
        k=2,
        ts=1.7e9,
    )
    _, actions = policy.features(request)
    cos = actions[:, layout.action_feature_names.index("max_cos_recent")]
    # The interest vector is (1, 0, 0): the context's first two columns, zero-padded.
    np.testing.assert_allclose(cos, [1.0 / math.sqrt(26.0), 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="interest_columns"):
        DRNPolicy(None, layout, interest_columns=5)


@pytest.mark.parametrize("interleave", [probabilistic_interleave, team_draft_interleave])
def test_item_probabilities_are_the_per_slot_conditionals(interleave) -> None:
    exploit, explore = ["a", "b", "c", "d"], ["c", "a", "d", "b"]
    rng = np.random.default_rng(3)
    n = 20_000
    firsts: Counter[str] = Counter()
    pairs: Counter[tuple] = Counter()
    logged: dict[tuple, tuple[float, ...]] = {}
    for _ in range(n):
        slate = interleave(exploit, explore, 2, rng)
        assert math.prod(slate.item_probabilities) == pytest.approx(slate.slate_probability)
        firsts[slate.items[0]] += 1
        pairs[slate.items] += 1
        logged[slate.items] = slate.item_probabilities
    for items, (p_first, p_second) in logged.items():
        # Slot 1 is the marginal of the top item; slot 2 is conditional on slot 1.
        share = firsts[items[0]] / n
        assert abs(share - p_first) < 4 * math.sqrt(p_first * (1 - p_first) / n)
        conditional = pairs[items] / firsts[items[0]]
        m = firsts[items[0]]
        assert abs(conditional - p_second) < 4 * math.sqrt(p_second * (1 - p_second) / m) + 1e-9
