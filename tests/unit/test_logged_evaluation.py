"""Counterfactual evaluation on logged slates (services.evaluation.logged).

* the estimators agree exactly with Open Bandit Pipeline's on the exported arrays;
* on simulated logs whose true policy values are known, the 95% intervals cover
  the truth at about the stated rate over seeds (and do not when the logged
  propensities are misstated, so the check can fail);
* the log is joined, filtered and exported as documented.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from obp.ope import DoublyRobust, InverseProbabilityWeighting
from obp.ope import SelfNormalizedInverseProbabilityWeighting as SelfNormalizedIPW

from contracts.events import Feedback, Impression, SlateItem
from services.cli import main
from services.evaluation.estimators import Estimate, clustered_stderr, ips
from services.evaluation.kafka_log import parse_offsets, parse_time
from services.evaluation.logged import (
    Decision,
    RewardModel,
    SimulatedLog,
    decisions_from_log,
    dsjson_lines,
    evaluate_policies,
    obp_arrays,
    parse_policy_spec,
    simulate_log,
)
from services.simulator.world import World, WorldConfig

CONFIG = WorldConfig(n_users=200, n_items=60, n_candidates=10, slate_size=3, position_decay=0.0)


def simulated(seed: int, n: int, epsilon: float) -> tuple[SimulatedLog, list[Decision]]:
    log = simulate_log(World(CONFIG, seed=seed), n, epsilon=epsilon, seed=seed)
    decisions, summary = decisions_from_log(log.impressions, log.feedback)
    assert summary.decisions == n and not summary.skipped
    return log, decisions


def test_clustered_stderr_with_one_event_per_cluster_is_the_iid_one() -> None:
    values = np.random.default_rng(0).random(50)
    iid = Estimate.of_mean(values)
    clustered = clustered_stderr(values - values.mean(), np.arange(50), 50)
    assert clustered == pytest.approx(iid.stderr, rel=1e-12)


def test_clustered_stderr_sees_dependence_the_iid_one_misses() -> None:
    # Each cluster repeats one draw 5 times: 20 independent values, not 100.
    draws = np.repeat(np.random.default_rng(1).random(20), 5)
    clusters = np.repeat(np.arange(20), 5)
    iid = ips(draws, logging_propensity=np.ones(100), target_probability=np.ones(100))
    robust = ips(
        draws, logging_propensity=np.ones(100), target_probability=np.ones(100), clusters=clusters
    )
    assert robust.value == iid.value
    assert robust.stderr == pytest.approx(Estimate.of_mean(draws[::5]).stderr, rel=1e-9)
    assert robust.stderr > 2 * iid.stderr


def test_ips_snips_dr_match_open_bandit_pipeline_exactly() -> None:
    """OBP's estimators on the exported arrays give our point estimates to float precision.

    Our rounds are shown items with inclusion propensities; in OBP's terms each
    round is a single-slot decision whose action distribution is the target's
    inclusion probability over the candidates divided by the slate size k (so
    it sums to 1), with the logged propensity divided by k too: the weights are
    the same ratios.
    """
    _, decisions = simulated(seed=3, n=600, epsilon=0.3)
    result = evaluate_policies(["linucb:alpha=0.5", "ts_beta", "random"], decisions, seed=3)
    arrays = obp_arrays(result.evaluation)
    n, n_actions = int(arrays["n_rounds"]), int(arrays["n_actions"])
    column = {item: j for j, item in enumerate(arrays["action_ids"].tolist())}
    model = RewardModel.fit(result.training)
    k = np.array([result.evaluation[r].slate_size for r in arrays["request"]], dtype=float)
    for policy in result.policies:
        action_dist = np.zeros((n, n_actions, 1))
        rewards_model = np.zeros((n, n_actions, 1))
        for i, r in enumerate(arrays["request"]):
            d = result.evaluation[r]
            columns = [column[c] for c in d.candidates]
            action_dist[i, columns, 0] = policy.target.inclusion[r] / d.slate_size
            rewards_model[i, columns, 0] = model.predict(d.candidates)
        inputs = {
            "reward": arrays["reward"],
            "action": arrays["action"],
            "position": np.zeros(n, dtype=np.int64),
            "pscore": arrays["pscore"] / k,
            "action_dist": action_dist,
        }
        ours = policy.estimates
        assert ours["ips"] is not None and ours["snips"] is not None and ours["dr"] is not None
        assert InverseProbabilityWeighting().estimate_policy_value(**inputs) == pytest.approx(
            ours["ips"].value, rel=1e-12, abs=1e-15
        )
        assert SelfNormalizedIPW().estimate_policy_value(**inputs) == pytest.approx(
            ours["snips"].value, rel=1e-12, abs=1e-15
        )
        dr = DoublyRobust().estimate_policy_value(
            **inputs, estimated_rewards_by_reg_model=rewards_model
        )
        assert dr == pytest.approx(ours["dr"].value, rel=1e-12, abs=1e-15)


@pytest.mark.slow
def test_intervals_cover_the_true_values_at_the_stated_rate_over_seeds() -> None:
    """20 seeds x two loggers (epsilon-greedy 0.3, uniform) x three targets.

    Per (logger, target, estimator) cell at least 16 of 20 of the 95% intervals
    must cover the truth: a correct 95% interval fails that with probability
    P(Bin(20, 0.95) <= 15) = 0.3%; pooled over every cell, at least 90%
    (3.5 standard deviations below 95%). The negative control states the
    epsilon-greedy logger's propensities as uniform (k/K), which is what a
    evaluation ignoring the logged propensities would do: its IPS intervals for
    LinUCB then miss the truth in most seeds (all 20 here).
    """
    cells: dict[tuple[float, str, str], list[bool]] = {}
    misstated: list[bool] = []
    for seed in range(20):
        for epsilon in (0.3, 1.0):
            log, decisions = simulated(seed, 800, epsilon)
            result = evaluate_policies(
                ["random", "linucb:alpha=0.5", "ts_beta"], decisions, seed=seed
            )
            for policy in result.policies:
                truth = log.true_value(result.evaluation, policy.target.inclusion)
                for kind, estimate in policy.estimates.items():
                    if estimate is not None:
                        cells.setdefault((epsilon, policy.spec, kind), []).append(
                            estimate.covers(truth)
                        )
                if epsilon == 0.3 and policy.spec.startswith("linucb"):
                    uniform = np.concatenate(
                        [np.full(d.slate_size, d.slate_size / 10) for d in result.evaluation]
                    )
                    wrong = ips(
                        result.rounds.reward,
                        logging_propensity=uniform,
                        target_probability=policy.target.probability,
                        clusters=result.rounds.decision,
                    )
                    misstated.append(wrong.covers(truth))
    assert len(cells) == 3 * 3 + 3 * 4  # replay only under the uniform logger
    for cell, covered in cells.items():
        assert sum(covered) >= 16, (cell, sum(covered))
    pooled = [c for covered in cells.values() for c in covered]
    assert sum(pooled) / len(pooled) >= 0.90
    assert sum(misstated) <= 5, sum(misstated)


def test_replay_is_unavailable_unless_the_logger_is_uniform() -> None:
    _, skewed = simulated(seed=1, n=200, epsilon=0.3)
    _, uniform = simulated(seed=1, n=200, epsilon=1.0)
    [on_skewed] = evaluate_policies(["linucb"], skewed).policies
    [on_uniform] = evaluate_policies(["linucb"], uniform).policies
    assert on_skewed.estimates["replay"] is None
    assert on_uniform.estimates["replay"] is not None


def slate(request_id: str, items: list[str], *, policy: str = "linucb", team=None) -> Impression:
    return Impression(
        request_id=request_id,
        user_id="u1",
        ts=1.7e9,
        policy=policy,
        slate=[
            SlateItem(item_id=item, position=p, propensity=0.5, team=team)
            for p, item in enumerate(items)
        ],
        context=[1.0, 0.5],
        candidates=[*items, "i99"],
    )


def feedback(request_id: str, item: str, position: int, reward: int = 1) -> Feedback:
    return Feedback(
        feedback_id=f"{request_id}/{item}",
        request_id=request_id,
        user_id="u1",
        item_id=item,
        ts=1.7e9,
        reward=reward,
        position=position,
        propensity=0.5,
        policy="linucb",
        context=[1.0, 0.5],
    )


def test_the_join_keeps_complete_slates_and_says_why_it_left_the_rest_out() -> None:
    impressions = [
        slate("a", ["i1", "i2"]),
        slate("b", ["i1", "i2"]),
        slate("c", ["i1"], policy="other"),
        slate("d", ["i1"], team="exploit"),
        Impression(
            request_id="e",
            user_id="u1",
            ts=1.7e9,
            policy="linucb",
            slate=[SlateItem(item_id="i1", position=0, propensity=0.5)],
        ),
    ]
    events = [
        feedback("a", "i1", 0),
        feedback("a", "i2", 1, reward=0),
        feedback("a", "i2", 1, reward=0),  # re-emitted: counted once
        feedback("b", "i1", 0),  # i2's feedback not there yet
        feedback("c", "i1", 0),
        feedback("d", "i1", 0),
        feedback("e", "i1", 0),
        feedback("z", "i1", 0),  # impression outside the range
    ]
    decisions, summary = decisions_from_log(impressions, events, logging_policy="linucb")
    assert [d.request_id for d in decisions] == ["a"]
    assert decisions[0].rewards.tolist() == [1.0, 0.0]
    assert decisions[0].candidates == ["i1", "i2", "i99"]
    assert summary.feedback_records == 8
    assert summary.skipped == {
        "slate feedback incomplete": 1,
        "other logging policy": 1,
        "interleaved slate": 1,
        "impression logged no candidates": 1,
        "impression not in range": 1,
    }


def test_obp_arrays_and_dsjson_lines_hold_one_round_per_shown_item() -> None:
    _, decisions = simulated(seed=2, n=50, epsilon=0.5)
    arrays = obp_arrays(decisions)
    rounds = sum(d.slate_size for d in decisions)
    assert int(arrays["n_rounds"]) == rounds == len(arrays["action"])
    assert int(arrays["len_list"]) == CONFIG.slate_size
    assert arrays["context"].shape == (rounds, len(decisions[0].context))
    assert arrays["action_context"].shape == (int(arrays["n_actions"]), 8)
    first = decisions[0]
    shown = [first.candidates[r] for r in first.shown]
    assert [arrays["action_ids"][a] for a in arrays["action"][: first.slate_size]] == shown
    assert arrays["candidates"][0].sum() == len(first.candidates)
    lines = [json.loads(line) for line in dsjson_lines(decisions)]
    assert len(lines) == rounds
    line = lines[1]
    index = line["_labelIndex"]
    assert line["c"]["_multi"][index]["id"] == first.candidates[first.shown[1]]
    assert line["a"][0] == index + 1 and sorted(line["a"]) == list(range(1, 11))
    assert line["_label_cost"] == -first.rewards[1]
    assert line["p"][0] == line["_label_probability"] == first.propensities[1]
    assert sum(line["p"]) == pytest.approx(1.0)


def test_policy_specs_and_offsets_parse_or_say_what_is_wrong() -> None:
    assert parse_policy_spec("linucb:alpha=0.5:ridge=2") == ("linucb", {"alpha": 0.5, "ridge": 2})
    with pytest.raises(ValueError, match="unknown policy"):
        parse_policy_spec("lin:alpha=1")
    with pytest.raises(ValueError, match="key=value"):
        parse_policy_spec("linucb:alpha")
    with pytest.raises(ValueError, match="no hyperparameters"):
        parse_policy_spec("random:x=1")
    _, decisions = simulated(seed=0, n=20, epsilon=1.0)
    with pytest.raises(ValueError, match="nope"):
        evaluate_policies(["linucb:nope=1"], decisions)
    with pytest.raises(ValueError, match="only for shown items"):
        evaluate_policies(["hybrid_linucb"], decisions)
    assert parse_offsets("7") == 7
    assert parse_offsets("0:7,1:9") == {0: 7, 1: 9}
    with pytest.raises(argparse.ArgumentTypeError):
        parse_offsets("0:-1")


def test_times_parse_as_epoch_seconds_or_iso_8601_in_utc() -> None:
    assert parse_time("1700000000.5") == 1_700_000_000.5
    assert parse_time("2023-11-14T22:13:20") == 1_700_000_000.0
    assert parse_time("2023-11-14T23:13:20+01:00") == 1_700_000_000.0
    with pytest.raises(argparse.ArgumentTypeError):
        parse_time("yesterday")


def test_hyperparameters_and_model_versions_need_from_kafka(capsys) -> None:
    assert main(["evaluate", "--policies", "linucb:alpha=1", "--steps", "10"]) == 2
    assert "need --from-kafka" in capsys.readouterr().err
