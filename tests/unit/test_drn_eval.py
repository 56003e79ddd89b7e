"""DRN in the in-process online evaluation: it runs, learns, and reports its DBGD win rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.evaluation.drn import (
    compare,
    make_drn_policy,
    plot_comparison,
    second_half_ctr,
    simulate_ranked,
)
from services.evaluation.online import make_policy, simulate
from services.simulator.world import WorldConfig

CONFIG = WorldConfig(n_users=40, n_items=60, n_candidates=15, scenario="nonlinear")
SMALL = {"major_interval_steps": 40, "major_steps": 10, "major_min_transitions": 64}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _run(steps: int = 300, seed: int = 3):
    drn = make_drn_policy(CONFIG, seed=seed, hidden=(16, 8), **SMALL)
    linucb = make_policy(
        "linucb", context_dim=CONFIG.context_dim, item_dim=CONFIG.item_dim, seed=seed
    )
    run = simulate_ranked({"drn": drn, "linucb": linucb}, config=CONFIG, steps=steps, seed=seed)
    return drn, run


def test_drn_runs_learns_and_records_its_win_rate() -> None:
    drn, run = _run()
    counters = drn.trainer.counters
    assert counters["slates"] == 300 and counters["credited"] == 300  # no delay in process
    assert counters["stale"] == 0 and counters["untagged"] == 0
    assert counters["minor_updates"] >= 1 and counters["major_updates"] >= 3
    assert counters["transitions"] == 300 * CONFIG.slate_size
    assert len(drn.wins.explore) == len(drn.wins.exploit) == 300
    # Credited clicks per slate add up to the realised clicks of DRN's slates.
    clicks = run.result.clicks[run.result.policies.index("drn")]
    np.testing.assert_array_equal(np.add(drn.wins.explore, drn.wins.exploit), clicks)
    windowed = drn.wins.windowed(50)
    assert windowed.shape == (6,)
    decided = windowed[~np.isnan(windowed)]
    assert decided.size > 0 and ((decided >= 0) & (decided <= 1)).all()
    for name, ndcg in run.ndcg.items():
        assert ndcg.shape == (300,) and ((ndcg > 0) & (ndcg <= 1 + 1e-12)).all(), name
    # W moved: the served model is no longer the prior.
    assert drn.policy.model().explore_version == drn.trainer.learner.explore_version > 1


def test_runs_are_reproducible_for_a_seed() -> None:
    _, first = _run(steps=120)
    _, second = _run(steps=120)
    np.testing.assert_array_equal(first.result.clicks, second.result.clicks)
    np.testing.assert_array_equal(first.ndcg["drn"], second.ndcg["drn"])


def test_ranked_simulation_agrees_with_the_plain_one() -> None:
    config = WorldConfig(n_users=30, n_items=40, n_candidates=10)

    def policies():
        return {
            name: make_policy(
                name, context_dim=config.context_dim, item_dim=config.item_dim, seed=1
            )
            for name in ("linucb", "random")
        }

    plain = simulate(policies(), config=config, steps=150, seed=4)
    ranked = simulate_ranked(policies(), config=config, steps=150, seed=4)
    np.testing.assert_array_equal(ranked.result.clicks, plain.clicks)
    np.testing.assert_allclose(ranked.result.expected, plain.expected)
    assert second_half_ctr(ranked.result)["linucb"] == pytest.approx(
        plain.clicks[0, 75:].sum() / (75 * config.slate_size)
    )


def test_comparison_report_and_plots(tmp_path: Path) -> None:
    report = compare(
        scenarios=("nonlinear",),
        seeds=(0, 1),
        steps=80,
        window=20,
        drn_params={"hidden": (8,), **SMALL},
    )
    body = report["scenarios"]["nonlinear"]
    summary = body["summary"]
    assert set(summary["policies"]) == {"drn", "linucb"}
    difference = summary["differences"]["drn-linucb"]
    assert len(difference["per_seed"]) == 2
    low, high = difference["ci95"]
    assert low <= difference["mean"] <= high
    assert len(body["window_ends"]) == len(body["dbgd_win_rate_windowed_mean"]) == 4
    assert 0.0 <= body["dbgd_win_rate_second_half"]["rate"] <= 1.0
    paths = plot_comparison(report, tmp_path)
    assert {p.name for p in paths} == {"drn_nonlinear_ctr.png", "drn_dbgd_win_rate.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
