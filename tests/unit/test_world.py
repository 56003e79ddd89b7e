"""The simulated world: reproducible, calibrated, and consistent with its own ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from contracts.ids import item_label, item_labels
from services.simulator import World, WorldConfig, position_bias

SMALL = WorldConfig(n_users=200, n_items=120, n_candidates=30)


def _random_slate_value(world: World, n_requests: int, seed: int) -> tuple[float, float]:
    """Mean expected clicks of a uniformly random slate and of the best slate."""
    rng = np.random.default_rng(seed)
    k = world.config.slate_size
    random_value, best_value = 0.0, 0.0
    for _ in range(n_requests):
        request = world.request()
        slate = [request.candidates[j] for j in rng.choice(len(request.candidates), k, False)]
        random_value += world.slate_value(request.user_id, slate)
        best_value += world.best_slate_value(request.user_id, request.candidates)
    return random_value / n_requests, best_value / n_requests


def test_same_seed_same_world_and_requests() -> None:
    a, b, c = World(SMALL, seed=3), World(SMALL, seed=3), World(SMALL, seed=4)
    for _ in range(20):
        ra, rb, rc = a.request(), b.request(), c.request()
        assert (ra.user_id, ra.candidates, ra.step, ra.ts) == (
            rb.user_id,
            rb.candidates,
            rb.step,
            rb.ts,
        )
        np.testing.assert_array_equal(ra.context, rb.context)
        np.testing.assert_array_equal(
            a.click_probabilities(ra.user_id, ra.candidates),
            b.click_probabilities(rb.user_id, rb.candidates),
        )
    assert ra.candidates != rc.candidates
    np.testing.assert_array_equal(a.item_features(a.catalog()), b.item_features(b.catalog()))


def test_clicks_and_sessions_do_not_change_the_request_sequence() -> None:
    quiet, busy = World(SMALL, seed=5), World(SMALL, seed=5)
    for _ in range(30):
        rq, rb = quiet.request(), busy.request()
        busy.sample_clicks(rb.user_id, rb.candidates[:5])
        busy.sample_session(rb.user_id, 10)
        assert rq.user_id == rb.user_id and rq.candidates == rb.candidates


def test_request_shape_and_ids() -> None:
    world = World(SMALL, seed=1)
    request = world.request()
    assert request.step == 1 and world.step == 1
    assert request.context.shape == (world.context_dim,) == (9,)
    assert request.context[-1] == 1.0
    assert len(request.candidates) == 30 == len(set(request.candidates))
    assert set(request.candidates) <= set(world.catalog())
    np.testing.assert_array_equal(request.candidate_labels, item_labels(request.candidates))
    assert request.user_id in set(world.user_ids())
    assert world.item_features(request.candidates).shape == (30, world.item_dim)


def test_context_observes_the_users_interests() -> None:
    # Each user's context is their (hidden) interest vector plus small noise, so two
    # requests of the same user have nearly the same context.
    world = World(SMALL, seed=2)
    seen: dict[str, np.ndarray] = {}
    close = 0
    for _ in range(2000):
        request = world.request()
        if request.user_id in seen:
            close += np.linalg.norm(seen[request.user_id] - request.context) < 0.5
        seen[request.user_id] = request.context
    assert close > 500


def test_candidates_are_all_items_when_the_catalog_is_small() -> None:
    world = World(WorldConfig(n_users=10, n_items=8, n_candidates=20), seed=0)
    assert sorted(world.request().candidates) == sorted(world.catalog())


@pytest.mark.parametrize("scenario", ["linear", "nonlinear"])
def test_random_slate_ctr_is_calibrated_and_best_slate_is_much_better(scenario: str) -> None:
    config = WorldConfig(scenario=scenario, base_ctr=0.05)
    world = World(config, seed=11)
    random_value, best_value = _random_slate_value(world, 3000, seed=0)
    random_ctr = random_value / config.slate_size
    assert random_ctr == pytest.approx(0.05, rel=0.1)
    assert best_value > 3.0 * random_value


def test_base_ctr_is_a_knob() -> None:
    world = World(WorldConfig(n_users=300, base_ctr=0.1), seed=2)
    random_value, _ = _random_slate_value(world, 2000, seed=1)
    assert random_value / 5 == pytest.approx(0.1, rel=0.1)


def test_position_bias_is_monotone_and_scales_click_probabilities() -> None:
    bias = position_bias(np.arange(10), 0.5)
    assert bias[0] == 1.0 and np.all(np.diff(bias) < 0)
    world = World(SMALL, seed=0)
    request = world.request()
    item = request.candidates[0]
    probs = world.click_probabilities(request.user_id, [item] * 5, positions=[0, 1, 2, 3, 4])
    assert np.all(np.diff(probs) < 0)
    np.testing.assert_allclose(probs, probs[0] * world.position_bias(np.arange(5)))
    np.testing.assert_allclose(probs[0], world.attractiveness(request.user_id, [item])[0])


def test_best_slate_is_the_optimum_over_orderings() -> None:
    world = World(SMALL, seed=9)
    rng = np.random.default_rng(0)
    for _ in range(20):
        request = world.request()
        best = world.best_slate(request.user_id, request.candidates)
        value = world.best_slate_value(request.user_id, request.candidates)
        assert world.slate_value(request.user_id, best) == pytest.approx(value)
        for _ in range(20):
            slate = list(rng.choice(request.candidates, 5, replace=False))
            assert world.slate_value(request.user_id, slate) <= value + 1e-12


def test_sampled_clicks_match_probabilities() -> None:
    world = World(SMALL, seed=4)
    request = world.request()
    items = request.candidates[:5]
    probs = world.click_probabilities(request.user_id, items)
    rng = np.random.default_rng(0)
    n = 20_000
    clicks = np.mean([world.sample_clicks(request.user_id, items, rng=rng) for _ in range(n)], 0)
    np.testing.assert_allclose(clicks, probs, atol=4 * np.sqrt(0.25 / n))
    again = world.sample_clicks(request.user_id, items, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(
        again, world.sample_clicks(request.user_id, items, rng=np.random.default_rng(7))
    )


def test_drift_changes_affinities_only_when_on() -> None:
    for drift, should_change in ((0.0, False), (0.5, True)):
        world = World(WorldConfig(n_users=50, n_items=60, drift=drift), seed=1)
        items = world.catalog()
        before = world.attractiveness("u3", items)
        relevant = world.relevant_items("u3", 10)
        world.advance(5000)
        after = world.attractiveness("u3", items)
        assert bool(np.max(np.abs(after - before)) > 0.02) is should_change
        assert (world.relevant_items("u3", 10) != relevant) is should_change


def test_nonlinear_scenario_drifts_by_default_and_has_time_of_day() -> None:
    config = WorldConfig(n_users=50, n_items=60, scenario="nonlinear")
    assert config.drift and config.drift > 0
    assert config.context_dim == 11 and config.item_dim == 10
    world = World(WorldConfig(n_users=50, n_items=60, scenario="nonlinear", drift=0.0), seed=0)
    request = world.request()
    angle = 2 * np.pi * request.time_of_day
    np.testing.assert_allclose(request.context[8:10], [np.cos(angle), np.sin(angle)])
    items = world.catalog()
    morning = world.attractiveness("u1", items)
    world.advance(config.day_length // 2)
    evening = world.attractiveness("u1", items)
    assert np.max(np.abs(morning - evening)) > 0.05
    world.advance(config.day_length // 2)
    np.testing.assert_allclose(world.attractiveness("u1", items), morning)


def test_catalog_grows_and_retires() -> None:
    config = WorldConfig(n_users=50, n_items=40, n_candidates=40, item_birth_rate=0.1)
    world = World(config, seed=3)
    start = set(world.catalog())
    for _ in range(1000):
        request = world.request()
    grown = set(world.catalog())
    assert start < grown and 60 < len(grown) - len(start) < 140
    assert set(request.candidates) - start  # new items get offered
    assert max(item_label(i) for i in grown) == len(grown) - 1

    shrinking = World(WorldConfig(n_users=50, n_items=40, item_retire_rate=0.02), seed=3)
    shrinking.advance(1000)
    live = set(shrinking.catalog())
    assert 5 <= len(live) < 40
    for _ in range(50):
        assert set(shrinking.request().candidates) <= live


def test_retirement_keeps_a_full_slate() -> None:
    world = World(WorldConfig(n_users=10, n_items=10, n_candidates=10, item_retire_rate=1.0))
    world.advance(100)
    assert len(world.catalog()) == world.config.slate_size
    assert len(world.request().candidates) == world.config.slate_size


def test_relevant_items_are_the_top_by_click_probability() -> None:
    world = World(SMALL, seed=6)
    world.request()
    catalog = world.catalog()
    for user in ("u0", "u17", "u150"):
        top = world.relevant_items(user, 20)
        top_position = world.click_probabilities(user, catalog, [0] * len(catalog))
        probs = dict(zip(catalog, top_position, strict=True))
        ranked = sorted(catalog, key=probs.__getitem__, reverse=True)
        assert set(top) == set(ranked[:20])
        assert [probs[i] for i in top] == sorted((probs[i] for i in top), reverse=True)


def test_sessions_follow_the_users_tastes() -> None:
    world = World(SMALL, seed=8)
    hits, total = 0, 0
    for n in range(50):
        user = f"u{n}"
        session = world.sample_session(user, 20)
        assert len(set(session)) == 20 and set(session) <= set(world.catalog())
        hits += len(set(session) & set(world.relevant_items(user, 20)))
        total += 20
    # Random sessions would hit 20/120 = 17% of the top 20; taste makes it far more.
    assert hits / total > 0.3


def test_item_labels_round_trip_and_hash_foreign_ids() -> None:
    assert item_label("i0") == 0 and item_label("i123") == 123
    foreign = item_label("article-7")
    assert foreign >= 2**62 and foreign == item_label("article-7")
    assert item_label("i12x") != item_label("i12")
    assert item_labels(["i3", "i1"]).dtype == np.int64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_users": 0}, "n_users must be >= 1"),
        ({"n_candidates": 3}, "n_candidates (3) must be >= slate_size (5)"),
        ({"base_ctr": 0.9}, "base_ctr must be in"),
        ({"scenario": "cubic"}, "scenario must be one of"),
        ({"drift": -1.0}, "drift must be finite and >= 0"),
        ({"item_birth_rate": float("nan")}, "item_birth_rate must be finite"),
        ({"extra_context": -1}, "extra_context must be >= 0"),
    ],
)
def test_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        WorldConfig(**kwargs)  # type: ignore[arg-type]


def test_extra_context_columns_are_noise_before_the_bias() -> None:
    world = World(WorldConfig(n_users=20, n_items=30, extra_context=3), seed=0)
    contexts = np.array([world.request().context for _ in range(200)])
    assert contexts.shape == (200, 12)
    assert np.all(contexts[:, -1] == 1.0) and np.std(contexts[:, 8:11]) > 0.1


def test_unknown_ids_are_rejected() -> None:
    world = World(SMALL, seed=0)
    with pytest.raises(ValueError, match="unknown user id 'u999'"):
        world.attractiveness("u999", ["i0"])
    with pytest.raises(ValueError, match="unknown item id 'i9999'"):
        world.attractiveness("u1", ["i9999"])
    with pytest.raises(ValueError, match="got 1 positions for 2 items"):
        world.click_probabilities("u1", ["i0", "i1"], positions=[0])
