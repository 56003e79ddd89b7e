"""How the parts of one version become one header and one set of arrays (no Redis)."""

from __future__ import annotations

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from contracts.params import ParamError, ParamSet, decode_params, encode_params
from services.bandits import BetaThompson, LinUCB, learner_from_params
from services.paramstore import ParamStore, ParamWatcher, combine_parts, param_metrics


def part(arrays: dict[str, np.ndarray], *, offsets=None, meta=None, created_at=1.0) -> ParamSet:
    return decode_params(
        encode_params("m", 0, arrays, offsets=offsets, meta=meta, created_at=created_at)
    )


def test_one_part_is_returned_as_is() -> None:
    only = part({"w": np.arange(3.0)}, offsets={"feedback": {2: 5}}, meta={"k": 1}, created_at=9.0)
    header, arrays = combine_parts("m", 4, {"main": only})
    assert header == {
        "model": "m",
        "version": 4,
        "parts": ["main"],
        "offsets": {"feedback": {2: 5}},
        "meta": {"k": 1},
        "created_at": 9.0,
    }
    np.testing.assert_array_equal(arrays["w"], np.arange(3.0))


def test_several_parts_combine_in_part_name_order() -> None:
    parts = {
        "p1": part({"w": np.array([1.0])}, meta={"learner": "x", "owner": "b"}, created_at=3.0),
        "p0": part({"w": np.array([2.0])}, meta={"learner": "x", "owner": "a"}, created_at=7.0),
    }
    calls = []

    def first_minus_second(states: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        calls.append([s["w"][0] for s in states])
        return {"w": states[0]["w"] - states[1]["w"]}

    header, arrays = combine_parts("m", 2, parts, combine=first_minus_second)
    assert calls == [[2.0, 1.0]]
    assert arrays["w"].tolist() == [1.0]
    assert header["parts"] == ["p0", "p1"]
    assert header["meta"] == {"learner": "x"}  # only what every part agrees on
    assert header["created_at"] == 7.0  # the newest part


def test_offsets_union_and_conflicts() -> None:
    same = {"feedback": {0: 3}}
    header, _ = combine_parts(
        "m",
        1,
        {"W": part({}, offsets=same), "W_explore": part({}, offsets=same)},
        combine=lambda states: {},
    )
    assert header["offsets"] == {"feedback": {0: 3}}
    with pytest.raises(ParamError, match=r"parts 'a' and 'b' disagree on feedback\[0\] \(3 vs 4\)"):
        combine_parts(
            "m",
            1,
            {"a": part({}, offsets=same), "b": part({}, offsets={"feedback": {0: 4}})},
            combine=lambda states: {},
        )


def test_learner_merge_combines_parts() -> None:
    rng = np.random.default_rng(3)
    items = rng.integers(0, 4, size=40)
    rewards = (rng.random(40) < 0.5).astype(float)
    whole = BetaThompson(seed=0)
    whole.update(items, None, rewards)
    parts = {}
    for index, rows in enumerate((slice(0, 15), slice(15, 40))):
        learner = BetaThompson(seed=0)
        learner.update(items[rows], None, rewards[rows])
        parts[f"p{index}"] = part(learner.state(), meta={"learner": BetaThompson.name})
    header, arrays = combine_parts("m", 1, parts, combine=BetaThompson.merge)
    for name, value in whole.state().items():
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)
    rebuilt = learner_from_params(1, header, arrays, seed=0)
    assert isinstance(rebuilt, BetaThompson) and rebuilt.n_arms == whole.n_arms


def test_several_parts_need_a_combiner() -> None:
    linucb = LinUCB(dim=2).state()
    mixed = {
        "p0": part(linucb, meta={"learner": "linucb"}),
        "p1": part(BetaThompson().state(), meta={"learner": "ts_beta"}),
    }
    with pytest.raises(ParamError, match="pass combine="):
        combine_parts("m", 1, mixed)


def test_learner_from_params_refuses_what_is_not_a_learner_state() -> None:
    with pytest.raises(ParamError, match="names no bandit learner"):
        learner_from_params(1, {"model": "m", "meta": {}}, {})
    with pytest.raises(ParamError, match="unknown bandit learner 'nope'"):
        learner_from_params(1, {"model": "m", "meta": {"learner": "nope"}}, {})
    with pytest.raises(ParamError, match=r"v1: linucb state lacks arrays"):
        learner_from_params(
            1, {"model": "m", "meta": {"learner": "linucb"}}, {"items": np.zeros(0)}
        )


def test_constructor_arguments_are_checked() -> None:
    client = redis.Redis()  # never connects: nothing here talks to Redis
    with pytest.raises(ValueError, match="blob_ttl_s must be a positive number"):
        ParamStore(client, blob_ttl_s=0)
    with pytest.raises(ValueError, match="keep_versions must be an integer >= 1"):
        ParamStore(client, keep_versions=0)
    with pytest.raises(ValueError, match="decode_responses=False"):
        ParamStore(redis.Redis(decode_responses=True))
    with pytest.raises(ValueError, match="poll_interval_s must be a positive number"):
        ParamWatcher(ParamStore(client), "m", poll_interval_s=float("nan"))
    with pytest.raises(ValueError, match="model name must match"):
        ParamWatcher(ParamStore(client), "a}b")


def test_stores_share_one_registry() -> None:
    registry = CollectorRegistry()
    # A second set of the same series in one registry would raise "Duplicated timeseries".
    stores = [ParamStore(redis.Redis(), registry=registry) for _ in range(2)]
    assert stores[0].registry is stores[1].registry
    assert param_metrics(registry) is param_metrics(registry)
