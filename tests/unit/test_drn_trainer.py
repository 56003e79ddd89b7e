"""The DRN trainer: DBGD verdicts, returns, drift-triggered major updates, state round trip.

Pure: slates in, no Kafka or Redis (the service around it is tested in
tests/integration/test_drn_service.py).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from services.drn.slates import SlateFeedback
from tests.harness import small_drn_settings

SETTINGS = small_drn_settings()


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_trainer_verdicts_returns_and_state_round_trip() -> None:
    settings = SETTINGS
    trainer = settings.trainer()
    learner = trainer.learner
    rng = np.random.default_rng(0)
    layout = settings.layout()

    def slate(user: str, ts: float, version: int, clicks: list[int], teams: tuple) -> SlateFeedback:
        return SlateFeedback(
            user_id=user,
            ts=ts,
            explore_version=version,
            state=rng.normal(size=layout.state_dim).astype(np.float32),
            actions=rng.normal(size=(len(clicks), layout.action_dim)).astype(np.float32),
            clicks=np.asarray(clicks, dtype=np.float32),
            teams=teams,
        )

    teams = ("exploit", "explore")
    weights = learner.weights()
    # Stale verdicts (an older W~) change nothing and do not count towards the window.
    for i in range(10):
        trainer.observe(slate("a", 1.7e9 + i, 0, [0, 1], teams))
    assert trainer.counters["stale"] == 10 and trainer.counters["minor_updates"] == 0
    # Three explore wins and one exploit win: the majority moves W towards W~.
    version, delta = learner.explore_version, learner.exploration_delta()
    for clicks in ([0, 1], [1, 0], [0, 1], [0, 1]):
        trainer.observe(slate("b", 1.7e9 + 20, version, clicks, teams))
    assert trainer.counters["explore_wins"] == 1 and learner.explore_version == version + 1
    for name, w in weights.items():
        np.testing.assert_array_equal(learner.weights()[name], w + np.float32(0.05) * delta[name])
    # Returns: user "b" comes back 5 s later (within 40 s), user "a" never does.
    before = len(learner.buffer)
    trainer.observe(slate("b", 1.7e9 + 25, 0, [1, 0], teams))
    returned = learner.buffer.transitions()
    assert len(learner.buffer) == before + 2 and trainer.counters["returns"] >= 1
    assert (returned.next_counts[-2:] == 2).all()
    np.testing.assert_array_equal(returned.rewards[-2:], [0.0 + 0.5, 1.0 + 0.5])
    trainer.observe(slate("c", 1.7e9 + 100, 0, [0, 0], teams))  # the watermark passes "a", "b"
    assert trainer.pending == 1
    done = learner.buffer.transitions()
    assert done.done[-4:].all()

    # State round trip, also after major updates (Adam moments included).
    trainer.major_update()
    twin = settings.trainer()
    twin.load_state(*trainer.state())
    later = [slate("d", 1.7e9 + 200 + i, 0, [1, 0], teams) for i in range(6)]
    for side in (trainer, twin):
        for s in later:  # verdicts about the current W~ draw, whatever it is by then
            side.observe(replace(s, explore_version=side.learner.explore_version))
        side.major_update()
    assert trainer.counters["minor_updates"] == 2
    arrays, meta = trainer.state()
    twin_arrays, twin_meta = twin.state()
    assert meta == twin_meta and set(arrays) == set(twin_arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(twin_arrays[name], array, err_msg=name)


def test_drift_triggers_a_major_update() -> None:
    settings = SETTINGS.model_copy(update={"drift_detection": True, "major_min_transitions": 64})
    trainer = settings.trainer()
    layout = settings.layout()
    state = np.zeros(layout.state_dim, dtype=np.float32)
    actions = np.zeros((4, layout.action_dim), dtype=np.float32)
    for i in range(1_200):
        ctr = 0.0 if i < 600 else 1.0
        trainer.observe(
            SlateFeedback(
                None, 1.7e9 + i, 0, state, actions, np.full(4, ctr, np.float32), (None,) * 4
            )
        )
    assert trainer.counters["drift_detections"] >= 1
    assert trainer.counters["major_updates"] >= 1 and trainer.last_major is not None
    assert trainer.last_major.trigger == "drift"
    assert trainer.counters["untagged"] == 1_200
