"""Offline evaluation on logged feedback: the replay evaluator and frozen-policy IPS/DR.

Replay (Li, Chu, Langford and Wang, WSDM 2011): stream events logged by a
*uniformly random* policy over K candidates; the evaluated policy picks from the
same candidates; where it picks the logged action the event counts -- its
reward is recorded and the policy learns from it -- and otherwise the event is
skipped as if it never happened. Because the logged action is independent of
everything else, the matched events are a 1/K random sample of what the policy
would have experienced online, so the mean matched reward is an unbiased
estimate of the policy's per-request reward, learning included.

Logged slates. A ``Feedback`` log (``contracts.events``) records what was shown
and clicked, but not the candidates a slate was drawn from. The candidate set
of a logged slate is therefore the slate itself and the logged action is the
item at the top position: :func:`top_slot_events` asks "which of these items
would the policy put on top, and was it clicked there?". Under a logger that
shows a uniformly random slate in uniformly random order (the ``random``
policy; every item's propensity equal and below 1) the top item is uniform over
the slate, which is exactly replay's requirement with K = slate length.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contracts.events import EventError, Feedback, Team, decode_feedback
from contracts.ids import item_labels
from services.evaluation.estimators import Estimate, doubly_robust, ips, snips
from services.evaluation.online import SlatePolicy
from services.simulator.world import World


@dataclass(frozen=True, eq=False)
class LoggedEvent:
    """One logged bandit decision: candidates, the action taken and its reward."""

    context: np.ndarray
    #: int64 item labels of the K candidates.
    items: np.ndarray
    #: One feature row per candidate, shape (K, f); f may be 0.
    item_features: np.ndarray
    #: Row of ``items`` the logging policy chose.
    action: int
    reward: float
    #: Probability that the logging policy chose ``action``.
    propensity: float
    user_id: str = ""

    @property
    def n_candidates(self) -> int:
        """K, the number of candidates."""
        return len(self.items)


@dataclass(frozen=True)
class ReplayResult:
    """The replay estimate of a policy's per-request reward."""

    estimate: Estimate
    matched: int
    total: int

    @property
    def match_rate(self) -> float:
        """Fraction of logged events the policy matched (about 1/K)."""
        return self.matched / self.total if self.total else 0.0


def _check_uniform(event: LoggedEvent, index: int) -> None:
    if not math.isclose(event.propensity * event.n_candidates, 1.0, rel_tol=1e-6):
        raise ValueError(
            f"replay needs a uniformly random logging policy: event {index} has propensity "
            f"{event.propensity} over {event.n_candidates} candidates"
        )


def replay(
    policy: SlatePolicy, events: Iterable[LoggedEvent], *, level: float = 0.95
) -> ReplayResult:
    """Li et al.'s replay of ``policy`` over uniformly logged ``events``, in order.

    The policy is updated with each matched event's reward (one row: the
    matched item), so learning policies are evaluated as they would learn online.
    Raises ValueError if an event's propensity is not ``1/K``.
    """
    rewards: list[float] = []
    total = 0
    for index, event in enumerate(events):
        _check_uniform(event, index)
        total += 1
        pick = int(policy.select(event.context, event.items, event.item_features, 1)[0])
        if pick != event.action:
            continue
        rewards.append(event.reward)
        row = slice(event.action, event.action + 1)
        policy.update(
            event.context, event.items[row], event.item_features[row], np.array([event.reward])
        )
    if not rewards:
        raise ValueError(f"the policy matched none of the {total} logged events")
    return ReplayResult(Estimate.of_mean(np.asarray(rewards), level), len(rewards), total)


def frozen_policy_estimates(
    policy: SlatePolicy,
    events: Sequence[LoggedEvent],
    *,
    train_fraction: float = 0.5,
    level: float = 0.95,
) -> dict[str, Estimate]:
    """IPS, SNIPS and DR estimates of ``policy`` after training it on the log's head.

    The policy learns from every logged action in the first ``train_fraction``
    of ``events`` (its reward is observed whatever the policy would have done),
    then is frozen and evaluated on the rest with the logged propensities. The
    target probability of the logged action is the indicator that the policy
    picks it; for a sampling policy that indicator is an unbiased estimate of
    the probability, so the estimators stay unbiased. DR's reward model is each
    item's mean reward on the training part, shrunk towards the overall mean.
    """
    if not 0.0 <= train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in [0, 1), got {train_fraction}")
    split = int(len(events) * train_fraction)
    train, test = events[:split], events[split:]
    if not test:
        raise ValueError("no events left to evaluate on")
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for event in train:
        row = slice(event.action, event.action + 1)
        policy.update(
            event.context, event.items[row], event.item_features[row], np.array([event.reward])
        )
        label = int(event.items[event.action])
        sums[label] = sums.get(label, 0.0) + event.reward
        counts[label] = counts.get(label, 0) + 1
    overall = sum(sums.values()) / len(train) if train else 0.0

    def predicted(label: int) -> float:
        # One pseudo-observation of the overall mean keeps rare items' estimates sane.
        return (sums.get(label, 0.0) + overall) / (counts.get(label, 0) + 1)

    n = len(test)
    rewards, mu, pi = np.empty(n), np.empty(n), np.empty(n)
    q_logged, q_target = np.empty(n), np.empty(n)
    for i, event in enumerate(test):
        pick = int(policy.select(event.context, event.items, event.item_features, 1)[0])
        rewards[i] = event.reward
        mu[i] = event.propensity
        pi[i] = float(pick == event.action)
        q_logged[i] = predicted(int(event.items[event.action]))
        q_target[i] = predicted(int(event.items[pick]))
    return {
        "ips": ips(rewards, logging_propensity=mu, target_probability=pi, level=level),
        "snips": snips(rewards, logging_propensity=mu, target_probability=pi, level=level),
        "dr": doubly_robust(
            rewards,
            logging_propensity=mu,
            target_probability=pi,
            predicted_logged=q_logged,
            predicted_target=q_target,
            level=level,
        ),
    }


def uniform_log(world: World, n_events: int, *, seed: int = 0) -> list[LoggedEvent]:
    """``n_events`` requests of ``world`` answered by a uniformly random single item.

    The logged item is shown at the top position and its click drawn from the
    world's true probability with a generator seeded by ``seed``.
    """
    rng = np.random.default_rng(seed)
    events = []
    for _ in range(n_events):
        request = world.request()
        k = len(request.candidates)
        action = int(rng.integers(k))
        shown = request.candidates[action]
        clicked = rng.random() < world.click_probabilities(request.user_id, [shown])[0]
        events.append(
            LoggedEvent(
                context=request.context,
                items=request.candidate_labels,
                item_features=world.item_features(request.candidates),
                action=action,
                reward=float(clicked),
                propensity=1.0 / k,
                user_id=request.user_id,
            )
        )
    return events


@dataclass(frozen=True, eq=False)
class LoggedSlate:
    """All feedback of one served slate (one ``request_id``), ordered by position."""

    request_id: str
    user_id: str
    ts: float
    policy: str
    model_version: int
    context: np.ndarray
    items: list[str]
    positions: np.ndarray
    rewards: np.ndarray
    propensities: np.ndarray
    #: Shape (len(items), f); f is 0 when the log carries no item features.
    item_features: np.ndarray
    teams: list[Team | None] = field(default_factory=list)

    def team_clicks(self, team: Team) -> float:
        """Reward (clicks, or graded rewards) of the items ``team`` contributed to an
        interleaved slate."""
        return float(sum(r for r, t in zip(self.rewards, self.teams, strict=True) if t == team))


def group_feedback(feedback: Iterable[Feedback]) -> list[LoggedSlate]:
    """Group Feedback events into slates by ``request_id``, ordered by impression time.

    Re-emitted feedback (same ``feedback_id``, as at-least-once delivery
    produces) is counted once. Raises ValueError for a slate with two items at
    one position or item features of differing widths.
    """
    by_request: dict[str, dict[str, Feedback]] = {}
    for event in feedback:
        by_request.setdefault(event.request_id, {}).setdefault(event.feedback_id, event)
    slates = [
        _slate(request_id, list(events.values())) for request_id, events in by_request.items()
    ]
    slates.sort(key=lambda s: s.ts)
    return slates


def _slate(request_id: str, events: list[Feedback]) -> LoggedSlate:
    events.sort(key=lambda e: e.position)
    positions = np.array([e.position for e in events], dtype=np.int64)
    if len(np.unique(positions)) != len(positions):
        raise ValueError(f"slate {request_id!r} has two items at one position")
    widths = {len(e.item_features) for e in events}
    if len(widths) != 1:
        raise ValueError(f"slate {request_id!r} has item features of widths {sorted(widths)}")
    first = events[0]
    return LoggedSlate(
        request_id=request_id,
        user_id=first.user_id,
        ts=first.ts,
        policy=first.policy,
        model_version=first.model_version,
        context=np.asarray(first.context, dtype=np.float64),
        items=[e.item_id for e in events],
        positions=positions,
        rewards=np.array([e.reward for e in events], dtype=np.float64),
        propensities=np.array([e.propensity for e in events]),
        item_features=np.array([e.item_features for e in events], dtype=np.float64).reshape(
            len(events), widths.pop()
        ),
        teams=[e.team for e in events],
    )


def read_feedback_log(path: str | Path) -> list[LoggedSlate]:
    """Read a JSONL file of Feedback events (one per line) into logged slates.

    Blank lines are skipped; an invalid line raises ValueError naming the file,
    the line number and the reason.
    """
    path = Path(path)
    events = []
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                events.append(decode_feedback(line.rstrip(b"\r\n")))
            except EventError as exc:
                raise ValueError(f"{path}:{number}: {exc.reason}") from None
    return group_feedback(events)


def top_slot_events(
    slates: Iterable[LoggedSlate], *, logging_policy: str | None = None
) -> list[LoggedEvent]:
    """Replayable events from logged slates: the candidates are the slate's items and
    the logged action is its top item, with propensity ``1/len(slate)``.

    Only slates of ``logging_policy`` (all, if None) with at least two items and
    a top position are used. Raises ValueError for a slate whose items'
    propensities differ or equal 1, since its order was not uniformly random.
    """
    events = []
    for slate in slates:
        if logging_policy is not None and slate.policy != logging_policy:
            continue
        k = len(slate.items)
        if k < 2 or slate.positions[0] != 0:
            continue
        if np.ptp(slate.propensities) > 1e-9 or slate.propensities[0] >= 1.0:
            raise ValueError(
                f"slate {slate.request_id!r} (policy {slate.policy!r}) was not shown in uniformly "
                f"random order: propensities {slate.propensities.tolist()}"
            )
        events.append(
            LoggedEvent(
                context=slate.context,
                items=item_labels(slate.items),
                item_features=slate.item_features,
                action=0,
                reward=float(slate.rewards[0]),
                propensity=1.0 / k,
                user_id=slate.user_id,
            )
        )
    return events


def interleaving_credits(slates: Iterable[LoggedSlate]) -> tuple[np.ndarray, np.ndarray]:
    """Per interleaved slate, the reward of the ``explore`` and of the ``exploit`` team's items.

    Slates without team labels are left out; feed the pair to
    :func:`services.evaluation.metrics.interleaving_win_rate`.
    """
    explore, exploit = [], []
    for slate in slates:
        if any(t is not None for t in slate.teams):
            explore.append(slate.team_clicks("explore"))
            exploit.append(slate.team_clicks("exploit"))
    return np.array(explore, dtype=np.float64), np.array(exploit, dtype=np.float64)
