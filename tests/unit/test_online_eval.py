"""Online simulation of bandit policies on the world, its plots, and ``streamrec evaluate``."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest

from contracts.events import Feedback, encode, feedback_id
from services.evaluation import command
from services.evaluation.online import (
    POLICY_NAMES,
    LearnerPolicy,
    SlatePolicy,
    UniformRandomPolicy,
    make_policy,
    simulate,
)
from services.evaluation.plots import plot_online, plot_rates, plot_series
from services.simulator import World, WorldConfig

CONFIG = WorldConfig(n_users=300, n_items=100, n_candidates=20)
PNG = b"\x89PNG\r\n\x1a\n"


def _policies(*names: str, config: WorldConfig = CONFIG) -> dict[str, SlatePolicy]:
    return {
        name: make_policy(name, context_dim=config.context_dim, item_dim=config.item_dim, seed=1)
        for name in names
    }


def test_linucb_beats_random_by_a_clear_margin() -> None:
    result = simulate(_policies("linucb", "random"), config=CONFIG, steps=3000, seed=4)
    ctr, expected = result.ctr(), result.expected_ctr()
    assert expected["random"] == pytest.approx(CONFIG.base_ctr, rel=0.15)
    assert expected["linucb"] > 1.8 * expected["random"]
    assert ctr["linucb"] > 1.5 * ctr["random"]
    regret = result.cumulative_regret()
    assert regret["linucb"][-1] < 0.7 * regret["random"][-1]
    assert np.all(np.diff(regret["random"]) >= -1e-12)
    # LinUCB improves as it learns: its last windows beat its first.
    windows = result.windowed_ctr(500)["linucb"]
    assert windows.shape == (6,) and windows[-2:].mean() > windows[0]


def test_every_policy_name_runs() -> None:
    for scenario in ("linear", "nonlinear"):
        config = WorldConfig(n_users=50, n_items=40, n_candidates=10, scenario=scenario)
        result = simulate(_policies(*POLICY_NAMES, config=config), config=config, steps=40)
        assert result.policies == POLICY_NAMES
        assert result.clicks.shape == (len(POLICY_NAMES), 40)
        assert np.all(result.expected <= result.best + 1e-12)


def test_runs_share_requests_and_policies_keep_their_click_streams() -> None:
    alone = simulate(_policies("random"), config=CONFIG, steps=300, seed=9)
    together = simulate(_policies("linucb", "random"), config=CONFIG, steps=300, seed=9)
    np.testing.assert_array_equal(alone.best, together.best)
    np.testing.assert_array_equal(alone.clicks[0], together.clicks[1])
    other_seed = simulate(_policies("random"), config=CONFIG, steps=300, seed=10)
    assert not np.array_equal(alone.best, other_seed.best)


def test_summary_is_json_ready() -> None:
    result = simulate({"random": UniformRandomPolicy(seed=0)}, config=CONFIG, steps=100)
    summary = json.loads(json.dumps(result.summary(window=25)))
    assert summary["steps"] == 100 and summary["window_ends"] == [25, 50, 75, 100]
    assert len(summary["windowed_ctr"]["random"]) == 4
    assert summary["policies"]["random"]["cumulative_regret"] > 0


def test_learner_policy_update_changes_its_choices() -> None:
    from services.bandits import new_learner

    policy = LearnerPolicy(new_learner({"learner": "ts_beta"}, context_dim=3, seed=0))
    items = np.array([5, 6], dtype=np.int64)
    features = np.zeros((2, 0))
    for _ in range(30):
        policy.update(np.ones(3), items, features, np.array([1.0, 0.0]))
    picks = [int(policy.select(np.ones(3), items, features, 1)[0]) for _ in range(20)]
    assert picks.count(0) >= 18


def test_make_policy_widths_follow_the_bandit_feature_layout() -> None:
    hybrid = make_policy("hybrid_linucb", context_dim=3, item_dim=2)
    assert isinstance(hybrid, LearnerPolicy)
    assert hybrid.learner.hyperparameters()["shared_dim"] == 6
    assert hybrid.learner.n_features == 3 + 6
    rows = hybrid.select(np.ones(3), np.array([1, 2], dtype=np.int64), np.ones((2, 2)), 2)
    assert sorted(rows.tolist()) == [0, 1]


def test_make_policy_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown policy 'ucb9'"):
        make_policy("ucb9", context_dim=3, item_dim=2)


def test_plots_are_written(tmp_path: Path) -> None:
    result = simulate(_policies("linucb", "random"), config=CONFIG, steps=200, seed=1)
    paths = plot_online(result, tmp_path / "plots", window=20)
    assert [p.name for p in paths] == ["ctr.png", "regret.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    series = plot_series({"a": np.arange(5.0)}, "y", tmp_path / "series.png")
    assert series.read_bytes().startswith(PNG)
    with pytest.raises(ValueError, match="has 5 points for 2 x values"):
        plot_series({"a": np.arange(5.0)}, "y", tmp_path / "bad.png", x=np.arange(2))


def test_rates_are_plotted_with_bands_and_a_steps_panel(tmp_path: Path) -> None:
    x = np.arange(1.0, 6.0)
    path = plot_rates(
        {"a": (x, np.array([1, 2, 0, 3, 4]), np.array([10, 10, 0, 10, 10]))},
        tmp_path / "rates.png",
        ylabel="CTR",
        xlabel="s",
        steps={"index": (x, np.array([0, 1, 1, 2, 3]))},
    )
    assert path.read_bytes().startswith(PNG)
    with pytest.raises(ValueError, match="differ in length"):
        plot_rates({"a": (x, x, x[:2])}, tmp_path / "bad.png", ylabel="y", xlabel="x")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def test_evaluate_command_online(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = _args("--policies", "linucb,random", "--steps", "300", "--seed", "2", "--out", str(out))
    assert command.run(args) == 0
    printed = capsys.readouterr().out
    assert "linucb" in printed and "best slate" in printed
    # The verdict closes the output with the rule and both intervals.
    assert "learning policies beat random (CTR with 95% Wilson intervals" in printed
    assert re.search(r"\n  random 0\.\d{3} \[0\.\d{3}, 0\.\d{3}\]\n", printed)
    assert re.search(r"\n  linucb 0\.\d{3} \[0\.\d{3}, 0\.\d{3}\]: ", printed)
    report = json.loads((out / "results.json").read_text())
    assert set(report["policies"]) == {"linucb", "random"} and report["steps"] == 300
    assert (out / "ctr.png").read_bytes().startswith(PNG)
    assert (out / "regret.png").stat().st_size > 0


def test_evaluate_command_rejects_bad_policies() -> None:
    with pytest.raises(SystemExit):
        _args("--policies", "linucb,nope")


def _feedback_log(path: Path, n: int) -> Path:
    world = World(CONFIG, seed=3)
    rng = np.random.default_rng(0)
    lines = []
    for step in range(n):
        request = world.request()
        items = [request.candidates[j] for j in rng.choice(20, size=5, replace=False)]
        clicks = world.sample_clicks(request.user_id, items, rng=rng)
        for position, item in enumerate(items):
            event = Feedback(
                feedback_id=feedback_id(f"r{step}", item),
                request_id=f"r{step}",
                user_id=request.user_id,
                item_id=item,
                ts=request.ts,
                reward=int(clicks[position]),
                position=position,
                propensity=0.25,
                policy="random",
                context=request.context.tolist(),
                item_features=world.item_features([item])[0].tolist(),
            )
            lines.append(encode(event))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("mode", ["--replay", "--ips"])
def test_evaluate_command_offline(
    mode: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = _feedback_log(tmp_path / "feedback.jsonl", 400)
    out = tmp_path / "offline"
    args = _args(mode, str(log), "--policies", "linucb,hybrid_linucb,random", "--out", str(out))
    assert command.run(args) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["events"] == 400
    if mode == "--replay":
        assert 40 < report["policies"]["random"]["matched"] < 120
    else:
        assert set(report["policies"]["linucb"]) == {"ips", "snips", "dr"}
    assert "random" in capsys.readouterr().out


def test_evaluate_command_reports_bad_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert command.run(_args("--replay", str(bad))) == 2
    assert "bad.jsonl:1: malformed" in capsys.readouterr().err
    assert command.run(_args("--ips", str(tmp_path / "missing.jsonl"))) == 2
