"""Graded rewards: the combination rule, the joiner's third stream, old feedback, Beta TS."""

from __future__ import annotations

import numpy as np
import pytest

from contracts.events import (
    Click,
    EventError,
    Feedback,
    Impression,
    Reward,
    SlateItem,
    decode_feedback,
    decode_reward,
    encode,
)
from contracts.ids import item_labels
from services.bandits import BetaThompson
from services.common.rewards import RewardRule, RewardRuleError, RewardSettings
from services.common.settings import TopicSettings
from services.gateway.sdk import EventProducer
from services.joiner.join import PartitionJoin
from tests.harness import MemoryBroker, MemoryProducer

T0 = 1.7e9
RULE = RewardRule({"click": 0.5, "purchase": 1.0, "dwell": 0.5}, combine="sum")


def _impression(request_id: str = "r1", ts: float = T0, items: str = "abc") -> Impression:
    slate = [SlateItem(item_id=i, position=p, propensity=0.5) for p, i in enumerate(items)]
    return Impression(request_id=request_id, user_id="u", ts=ts, policy="ts_beta", slate=slate)


def _reward(event_id: str, item: str, kind: str, value: float, ts: float, request_id: str = "r1"):
    return Reward(
        event_id=event_id,
        user_id="u",
        request_id=request_id,
        item_id=item,
        kind=kind,
        value=value,
        ts=ts,
    )


def _click(event_id: str, item: str, ts: float, request_id: str | None = "r1") -> Click:
    return Click(event_id=event_id, user_id="u", item_id=item, ts=ts, request_id=request_id)


def _join(rule: RewardRule = RULE) -> PartitionJoin:
    return PartitionJoin(window_s=10, lateness_s=2, rule=rule)


def _by_item(feedback: list[Feedback]) -> dict[str, Feedback]:
    return {fb.item_id: fb for fb in feedback}


def test_rule_takes_the_largest_value_per_kind_then_max_or_capped_sum() -> None:
    signals = {"click": 1.0, "purchase": 0.3}
    assert RULE.reward(signals) == pytest.approx(0.8)
    assert RULE.reward({"click": 1.0, "purchase": 0.9}) == 1.0  # capped
    maximum = RewardRule({"click": 0.5, "purchase": 1.0}, combine="max")
    assert maximum.reward(signals) == 0.5
    assert RewardRule({"click": 1.0}, default=0.1).reward({}) == 0.1
    assert RewardRule().reward({"click": 1.0}) == 1.0 and not RewardRule().graded


def test_rule_refuses_bad_configuration_and_unconfigured_kinds() -> None:
    with pytest.raises(RewardRuleError, match="combine"):
        RewardRule(combine="mean")
    with pytest.raises(RewardRuleError, match="weight"):
        RewardRule({"purchase": 2.0})
    with pytest.raises(ValueError):
        RewardSettings(weights={"Bad Kind": 1.0})
    assert RULE.refusal("purchase") is None
    assert "not configured" in (RULE.refusal("rating") or "")
    assert "reserved" in (RULE.refusal("click") or "")


def test_settings_read_the_rule_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_REWARD_WEIGHTS", '{"click": 0.2, "purchase": 1}')
    monkeypatch.setenv("STREAMREC_REWARD_COMBINE", "sum")
    monkeypatch.setenv("STREAMREC_REWARD_DEFAULT", "0.05")
    rule = RewardSettings().rule()
    assert (rule.weights, rule.combine, rule.default, rule.graded) == (
        {"click": 0.2, "purchase": 1.0},
        "sum",
        0.05,
        True,
    )


def test_several_signals_combine_into_each_items_reward() -> None:
    join = _join()
    assert join.impression(_impression(), 0) == []
    join.click(_click("c1", "a", T0 + 1), 0)
    join.reward(_reward("e1", "a", "purchase", 0.3, T0 + 2), 0)
    join.reward(_reward("e2", "b", "purchase", 0.4, T0 + 2), 1)
    join.reward(_reward("e3", "b", "purchase", 0.2, T0 + 3), 2)  # smaller: the largest counts
    join.reward(_reward("e4", "b", "dwell", 0.9, T0 + 3), 3)
    out = _by_item(join.advance(T0 + 20))
    assert out["a"].reward == pytest.approx(0.8)
    assert out["a"].signals == {"click": 1.0, "purchase": 0.3}
    assert out["a"].clicked and out["a"].clicked_at == T0 + 1
    assert out["b"].reward == pytest.approx(0.4 + 0.45)
    assert out["b"].signals == {"purchase": 0.4, "dwell": 0.9} and not out["b"].clicked
    assert (out["c"].reward, out["c"].signals) == (0.0, {})
    assert join.stats["rewards_matched"] == 4


def test_the_rewards_stream_holds_the_watermark_until_it_has_passed() -> None:
    join = _join()
    join.impression(_impression(), 0)
    join.click(_click("c1", "a", T0 + 30), 0)
    assert join.advance(T0 + 30, rewards=False) == []  # clicks and impressions are past
    assert len(join.advance(T0 + 30, impressions=False, clicks=False)) == 3


def test_a_rewards_before_their_impression_wait_for_it() -> None:
    join = _join()
    join.reward(_reward("e1", "a", "purchase", 0.7, T0 + 1), 0)
    join.impression(_impression(), 0)
    assert _by_item(join.advance(T0 + 20))["a"].reward == pytest.approx(0.7)


def test_duplicate_reward_events_are_dropped_by_event_id() -> None:
    rule = RewardRule({"click": 1.0, "purchase": 1.0}, combine="sum")
    join = _join(rule)
    join.impression(_impression(), 0)
    join.reward(_reward("e1", "a", "purchase", 0.3, T0 + 1), 0)
    join.reward(_reward("e1", "a", "purchase", 0.3, T0 + 1), 1)
    join.reward(_reward("e1", "a", "purchase", 0.3, T0 + 1), 2)
    out = _by_item(join.advance(T0 + 20))
    assert out["a"].reward == pytest.approx(0.3)
    assert (join.stats["rewards_duplicate"], join.stats["rewards_matched"]) == (2, 1)


def test_late_signals_are_counted_and_reward_nothing() -> None:
    join = _join()
    join.impression(_impression(), 0)
    # Outside the window (10 s), while the impression is still open.
    join.reward(_reward("e1", "a", "purchase", 1.0, T0 + 11), 0)
    out = _by_item(join.advance(T0 + 20))
    assert out["a"].reward == 0.0
    # After the impression closed.
    assert join.reward(_reward("e2", "b", "purchase", 1.0, T0 + 21), 1) == []
    # For an item the slate did not show, and for an impression that never comes.
    join.impression(_impression("r2", T0 + 22), 1)
    join.reward(_reward("e3", "z", "purchase", 1.0, T0 + 23, request_id="r2"), 2)
    join.reward(_reward("e4", "a", "purchase", 1.0, T0 + 23, request_id="r9"), 3)
    join.advance(T0 + 1000)
    assert join.stats["rewards_late"] == 2
    assert join.stats["rewards_not_in_slate"] == 1
    assert join.stats["rewards_unmatched"] == 1


def test_clicks_alone_keep_rewarding_one_under_the_default_rule() -> None:
    join = PartitionJoin(window_s=10, lateness_s=2)
    join.impression(_impression(), 0)
    join.click(_click("c1", "a", T0 + 1), 0)
    out = _by_item(join.advance(T0 + 20))  # no rewards stream: it does not hold the watermark
    assert (out["a"].reward, out["b"].reward) == (1.0, 0.0)
    assert out["a"].signals == {"click": 1.0}


def test_older_feedback_with_an_integer_reward_still_decodes() -> None:
    old = (
        b'{"schema_version": 1, "feedback_id": "r/i", "request_id": "r", "user_id": "u",'
        b' "item_id": "i", "ts": 1.7e9, "reward": 1, "position": 0, "propensity": 0.5,'
        b' "policy": "linucb"}'
    )
    fb = decode_feedback(old)
    assert (fb.reward, fb.signals, fb.clicked) == (1.0, {}, True)
    assert decode_feedback(encode(fb)) == fb


def test_reward_events_are_validated() -> None:
    good = _reward("e1", "a", "purchase", 0.5, T0)
    assert decode_reward(encode(good)) == good
    for bad in (
        encode(good).replace(b"0.5", b"1.5"),
        encode(good).replace(b'"purchase"', b'"Purchase!"'),
    ):
        with pytest.raises(EventError):
            decode_reward(bad)


@pytest.mark.parametrize("true_mean", [0.15, 0.5, 0.8])
def test_beta_thompson_posterior_mean_converges_to_the_mean_graded_reward(
    true_mean: float,
) -> None:
    """Fractional updates (S += r, F += 1 - r): the posterior mean is
    (α₀ + Σr) / (α₀ + β₀ + n), which converges to E[r] for rewards in [0, 1]."""
    rng = np.random.default_rng(7)
    learner = BetaThompson(seed=0)
    items = item_labels(["a"])
    n = 20_000
    # Graded rewards with mean true_mean: a Beta law, never 0/1 only.
    rewards = rng.beta(4 * true_mean, 4 * (1 - true_mean), size=n)
    learner.update(np.repeat(items, n), None, rewards)
    state = learner.state()
    mean = (1 + state["successes"][0]) / (2 + state["successes"][0] + state["failures"][0])
    assert mean == pytest.approx(true_mean, abs=4 * 0.5 / np.sqrt(n))
    # Sampled scores concentrate there too.
    draws = np.array([learner.score(items)[0] for _ in range(2000)])
    assert draws.mean() == pytest.approx(true_mean, abs=0.01)


def test_the_sdk_sends_configured_reward_kinds_to_the_rewards_topic_only() -> None:
    topics = TopicSettings()
    broker = MemoryBroker({topics.rewards: 1})
    sdk = EventProducer(topics=topics, producer=MemoryProducer(broker))  # type: ignore[arg-type]
    sdk.send_reward(_reward("e1", "a", "purchase", 0.5, T0), RULE)
    with pytest.raises(EventError, match="not configured"):
        sdk.send_reward(_reward("e2", "a", "rating", 0.5, T0), RULE)
    with pytest.raises(EventError, match="reserved"):
        sdk.send_reward(_reward("e3", "a", "click", 1.0, T0), RULE)
    assert [decode_reward(m.value).event_id for m in broker.read(topics.rewards)] == ["e1"]
