"""Replay (Li et al., WSDM 2011) is unbiased on uniform logs of a known world; log reading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from contracts.events import Feedback, encode, feedback_id
from services.evaluation.metrics import interleaving_win_rate
from services.evaluation.online import UniformRandomPolicy, make_policy
from services.evaluation.replay import (
    LoggedEvent,
    frozen_policy_estimates,
    group_feedback,
    interleaving_credits,
    read_feedback_log,
    replay,
    top_slot_events,
    uniform_log,
)
from services.simulator import World, WorldConfig

# Stationary (no drift, fixed catalog), so true values can be computed after logging.
CONFIG = WorldConfig(n_users=300, n_items=100, n_candidates=10)


class AffinityGuess:
    """A fixed target policy: rank items by ``item_features . context`` (no learning)."""

    def select(
        self, context: np.ndarray, items: np.ndarray, item_features: np.ndarray, k: int
    ) -> np.ndarray:
        scores = item_features @ context[: item_features.shape[1]]
        return np.argsort(-scores, kind="stable")[:k]

    def update(self, *args: object) -> None:
        """Fixed: learns nothing."""


def _true_top_value(world: World, events: list[LoggedEvent], policy: AffinityGuess) -> float:
    """Mean true top-position click probability of the policy's picks over ``events``."""
    total = 0.0
    for event in events:
        pick = int(policy.select(event.context, event.items, event.item_features, 1)[0])
        total += world.attractiveness(event.user_id, [f"i{event.items[pick]}"])[0]
    return total / len(events)


@pytest.fixture(scope="module")
def logged() -> tuple[World, list[LoggedEvent]]:
    world = World(CONFIG, seed=21)
    return world, uniform_log(world, 20_000, seed=5)


def test_replay_is_unbiased_for_a_fixed_policy(logged: tuple[World, list[LoggedEvent]]) -> None:
    world, events = logged
    policy = AffinityGuess()
    truth = _true_top_value(world, events, policy)
    result = replay(policy, events)
    assert result.total == 20_000
    assert result.estimate.covers(truth), (result.estimate, truth)
    # The guess is informative: far better than the random top item.
    random_truth = np.mean(
        [world.attractiveness(e.user_id, [f"i{e.items[e.action]}"])[0] for e in events]
    )
    assert truth > 2 * random_truth


def test_matched_fraction_is_one_over_k(logged: tuple[World, list[LoggedEvent]]) -> None:
    _, events = logged
    result = replay(AffinityGuess(), events)
    n, p = result.total, 1 / 10
    assert abs(result.match_rate - p) < 4 * np.sqrt(p * (1 - p) / n)
    assert result.estimate.n == result.matched


def test_replay_of_a_learning_policy_beats_random(
    logged: tuple[World, list[LoggedEvent]],
) -> None:
    _, events = logged
    linucb = replay(make_policy("linucb", context_dim=9, item_dim=8, seed=0), events)
    uniform = replay(UniformRandomPolicy(seed=0), events)
    assert linucb.estimate.value > uniform.estimate.value + 2 * uniform.estimate.stderr


def test_frozen_policy_estimates_cover_the_truth(
    logged: tuple[World, list[LoggedEvent]],
) -> None:
    world, events = logged
    policy = AffinityGuess()
    estimates = frozen_policy_estimates(policy, events, train_fraction=0.5)
    truth = _true_top_value(world, events[10_000:], policy)
    assert set(estimates) == {"ips", "snips", "dr"}
    for name, estimate in estimates.items():
        assert estimate.n == 10_000
        assert estimate.covers(truth), (name, estimate, truth)


def test_replay_refuses_non_uniform_logs() -> None:
    event = LoggedEvent(
        context=np.ones(2),
        items=np.arange(4, dtype=np.int64),
        item_features=np.zeros((4, 0)),
        action=1,
        reward=1.0,
        propensity=0.5,
    )
    with pytest.raises(ValueError, match="event 0 has propensity 0.5 over 4 candidates"):
        replay(AffinityGuess(), [event])
    with pytest.raises(ValueError, match="matched none of the 0"):
        replay(AffinityGuess(), [])


# --------------------------------------------------------------------- Feedback logs


def _feedback(request: str, item: str, position: int, **fields: object) -> Feedback:
    values: dict[str, object] = {
        "feedback_id": feedback_id(request, item),
        "request_id": request,
        "user_id": "u1",
        "item_id": item,
        "ts": 1.7e9,
        "reward": 0,
        "position": position,
        "propensity": 0.5,
        "policy": "random",
        "context": [1.0, 0.5],
        "item_features": [float(position)],
    }
    values.update(fields)
    return Feedback(**values)  # type: ignore[arg-type]


def _write(path: Path, events: list[Feedback]) -> Path:
    path.write_bytes(b"".join(encode(e) + b"\n" for e in events))
    return path


def test_read_feedback_log_groups_orders_and_dedupes(tmp_path: Path) -> None:
    events = [
        _feedback("r2", "i7", 1, ts=1.7e9 + 5, reward=1),
        _feedback("r1", "i3", 1),
        _feedback("r1", "i4", 0, reward=1),
        _feedback("r1", "i4", 0, reward=1),  # re-emitted by at-least-once delivery
        _feedback("r2", "i8", 0, ts=1.7e9 + 5),
    ]
    path = _write(tmp_path / "log.jsonl", events)
    path.write_bytes(path.read_bytes() + b"\n   \n")
    slates = read_feedback_log(path)
    assert [s.request_id for s in slates] == ["r1", "r2"]
    first = slates[0]
    assert first.items == ["i4", "i3"] and first.positions.tolist() == [0, 1]
    assert first.rewards.tolist() == [1, 0] and first.item_features.tolist() == [[0.0], [1.0]]
    np.testing.assert_array_equal(first.context, [1.0, 0.5])
    top = top_slot_events(slates)
    assert [(e.items.tolist(), e.action, e.reward, e.propensity) for e in top] == [
        ([4, 3], 0, 1.0, 0.5),
        ([8, 7], 0, 0.0, 0.5),
    ]


def test_read_feedback_log_names_the_bad_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "log.jsonl", [_feedback("r1", "i1", 0)])
    path.write_bytes(path.read_bytes() + b'{"feedback_id": "x"}\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2: invalid: Expected `str` of length >= 3"):
        read_feedback_log(path)


def test_conflicting_slates_are_refused() -> None:
    with pytest.raises(ValueError, match="two items at one position"):
        group_feedback([_feedback("r1", "i1", 0), _feedback("r1", "i2", 0)])
    with pytest.raises(ValueError, match="item features of widths"):
        group_feedback([_feedback("r1", "i1", 0), _feedback("r1", "i2", 1, item_features=[])])


def test_top_slot_events_need_a_uniform_logger() -> None:
    greedy = group_feedback(
        [_feedback("r1", "i1", 0, propensity=1.0), _feedback("r1", "i2", 1, propensity=1.0)]
    )
    with pytest.raises(ValueError, match="not shown in uniformly random order"):
        top_slot_events(greedy)
    assert top_slot_events(greedy, logging_policy="random_only") == []
    lonely = group_feedback([_feedback("r1", "i1", 0)])
    assert top_slot_events(lonely) == []


def test_interleaving_credits_from_teams() -> None:
    slates = group_feedback(
        [
            _feedback("r1", "i1", 0, team="explore", reward=1),
            _feedback("r1", "i2", 1, team="exploit"),
            _feedback("r2", "i1", 0, team="exploit", reward=1, ts=1.7e9 + 1),
            _feedback("r2", "i2", 1, team="explore", reward=1, ts=1.7e9 + 1),
            _feedback("r3", "i5", 0, ts=1.7e9 + 2),  # not interleaved
        ]
    )
    explore, exploit = interleaving_credits(slates)
    assert explore.tolist() == [1, 1] and exploit.tolist() == [0, 1]
    win = interleaving_win_rate(explore, exploit)
    assert (win.wins_a, win.wins_b, win.ties) == (1, 0, 1)


def _uniform_feedback_log(world: World, n: int, seed: int) -> list[Feedback]:
    """What the joiner emits for uniformly random, randomly ordered slates of the world."""
    rng = np.random.default_rng(seed)
    k, out = world.config.slate_size, []
    for step in range(n):
        request = world.request()
        chosen = rng.choice(len(request.candidates), size=k, replace=False)
        items = [request.candidates[j] for j in chosen]
        clicks = world.sample_clicks(request.user_id, items, rng=rng)
        features = world.item_features(items)
        for position, item in enumerate(items):
            out.append(
                Feedback(
                    feedback_id=feedback_id(f"r{step}", item),
                    request_id=f"r{step}",
                    user_id=request.user_id,
                    item_id=item,
                    ts=request.ts,
                    reward=int(clicks[position]),
                    position=position,
                    propensity=k / len(request.candidates),
                    policy="random",
                    context=request.context.tolist(),
                    item_features=features[position].tolist(),
                )
            )
    rng.shuffle(out)  # the joiner emits in attribution-close order, not slate order
    return out


@pytest.mark.slow
def test_replay_on_a_feedback_log_is_unbiased(tmp_path: Path) -> None:
    world = World(CONFIG, seed=33)
    path = _write(tmp_path / "feedback.jsonl", _uniform_feedback_log(world, 6000, seed=2))
    events = top_slot_events(read_feedback_log(path), logging_policy="random")
    assert len(events) == 6000 and {e.n_candidates for e in events} == {5}
    policy = AffinityGuess()
    truth = _true_top_value(world, events, policy)
    result = replay(policy, events)
    assert result.estimate.covers(truth), (result.estimate, truth)
    assert abs(result.match_rate - 0.2) < 4 * np.sqrt(0.2 * 0.8 / 6000)
