"""Dueling Q-network: decomposition, V's independence from the action, weight I/O."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.drn.network import DuelingQNetwork

STATE, ACTION = 6, 4


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, STATE + ACTION)).astype(np.float32)


def test_dueling_decomposition_shapes_and_sum() -> None:
    net = DuelingQNetwork(STATE, ACTION, hidden=(16, 8), seed=0)
    rows = torch.from_numpy(_rows(7))
    value, advantage = net.decompose(rows)
    assert value.shape == advantage.shape == (7,)
    torch.testing.assert_close(net(rows), value + advantage)
    assert net.score(_rows(7)).shape == (7,)
    assert net.score(_rows(7)).dtype == np.float32
    assert net.score(np.zeros((0, STATE + ACTION))).shape == (0,)


def test_value_depends_on_state_only() -> None:
    net = DuelingQNetwork(STATE, ACTION, hidden=(16, 8), seed=1)
    rows = _rows(5)
    other_action = rows.copy()
    other_action[:, STATE:] = _rows(5, seed=9)[:, STATE:]
    other_state = rows.copy()
    other_state[:, :STATE] = _rows(5, seed=9)[:, :STATE]
    v, a = (t.detach().numpy() for t in net.decompose(torch.from_numpy(rows)))
    v_action, a_action = (t.detach().numpy() for t in net.decompose(torch.from_numpy(other_action)))
    v_state, a_state = (t.detach().numpy() for t in net.decompose(torch.from_numpy(other_state)))
    np.testing.assert_array_equal(v_action, v)  # bit-identical: V never sees the action
    assert np.abs(a_action - a).max() > 0
    assert np.abs(v_state - v).max() > 0
    assert np.abs(a_state - a).max() > 0


def test_parameter_names_and_shapes() -> None:
    net = DuelingQNetwork(STATE, ACTION, hidden=(16, 8), seed=0)
    shapes = {name: w.shape for name, w in net.weights().items()}
    assert shapes == {
        "value.fc1.weight": (16, STATE),
        "value.fc1.bias": (16,),
        "value.fc2.weight": (8, 16),
        "value.fc2.bias": (8,),
        "value.out.weight": (1, 8),
        "value.out.bias": (1,),
        "advantage.fc1.weight": (16, STATE + ACTION),
        "advantage.fc1.bias": (16,),
        "advantage.fc2.weight": (8, 16),
        "advantage.fc2.bias": (8,),
        "advantage.out.weight": (1, 8),
        "advantage.out.bias": (1,),
    }
    assert all(w.dtype == np.float32 for w in net.weights().values())
    assert all(np.all(w != 0) for w in net.weights().values())  # DBGD needs non-zero params


def test_seeded_init_is_deterministic() -> None:
    a = DuelingQNetwork(STATE, ACTION, seed=42).weights()
    b = DuelingQNetwork(STATE, ACTION, seed=42).weights()
    c = DuelingQNetwork(STATE, ACTION, seed=43).weights()
    assert list(a) == list(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["value.fc1.weight"], c["value.fc1.weight"])


def test_weights_round_trip_exactly_and_are_copies() -> None:
    source = DuelingQNetwork(STATE, ACTION, seed=3)
    weights = source.weights()
    target = DuelingQNetwork(STATE, ACTION, seed=4)
    target.load_weights(weights)
    np.testing.assert_array_equal(target.score(_rows(50)), source.score(_rows(50)))
    weights["value.out.bias"][0] += 1.0  # mutating an export must not touch either network
    np.testing.assert_array_equal(target.score(_rows(3)), source.score(_rows(3)))
    assert all(np.array_equal(v, target.weights()[k]) for k, v in source.weights().items())


def test_load_weights_rejects_mismatches_and_changes_nothing() -> None:
    net = DuelingQNetwork(STATE, ACTION, hidden=(8,), seed=0)
    before = net.weights()
    good = net.weights()

    missing = dict(good)
    del missing["advantage.out.bias"]
    with pytest.raises(ValueError, match=r"missing \['advantage.out.bias'\]"):
        net.load_weights(missing)
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        net.load_weights({**good, "extra": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match=r"'value.fc1.weight': shape \(8, 5\), expected \(8, 6\)"):
        net.load_weights({**good, "value.fc1.weight": np.zeros((8, 5), np.float32)})
    with pytest.raises(ValueError, match="'value.out.bias': dtype int64"):
        net.load_weights({**good, "value.out.bias": np.zeros(1, np.int64)})
    # A bad tensor late in the dict must not leave the earlier ones half-loaded.
    poisoned = {k: v + 1 for k, v in good.items()}
    poisoned["advantage.out.bias"] = np.array([np.nan], np.float32)
    with pytest.raises(ValueError, match="'advantage.out.bias' contains NaN"):
        net.load_weights(poisoned)
    assert all(np.array_equal(before[k], v) for k, v in net.weights().items())


def test_bad_dimensions_and_rows_are_rejected() -> None:
    with pytest.raises(ValueError, match="state_dim and action_dim"):
        DuelingQNetwork(0, ACTION)
    with pytest.raises(ValueError, match="hidden"):
        DuelingQNetwork(STATE, ACTION, hidden=())
    net = DuelingQNetwork(STATE, ACTION, seed=0)
    with pytest.raises(ValueError, match=r"shape \(n, 10\)"):
        net.score(np.zeros((3, 9)))
    bad = _rows(2)
    bad[1, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        net.score(bad)
