"""Counterfactual evaluation of slate policies on a logged Impression + Feedback stream.

A *decision* is one served slate: the candidates the logging policy chose from
(``Impression.candidates``), the items it showed and, per shown item, the
reward and the logged propensity (``Feedback``). The logged propensity of a
bandit slate is the item's exact marginal probability of being in the slate
(docs/decisions.md §9), so the unit of evaluation is a *round* -- one shown item --
and a target policy's probability of a round is its probability of showing
that item among the same candidates in a slate of the same size:

* IPS / SNIPS / doubly robust over rounds with ``w = pi(a in S | x) / mu(a in S | x)``
  estimate the target's reward per shown item (its CTR for 0/1 rewards);
* replay (Li et al., WSDM 2011) is the mean reward of the rounds the target
  would also have shown; it is unbiased only when the logger's slates are
  uniformly random (every round's propensity ``k / K``), otherwise it is
  reported as unavailable.

Both rest on the item-level assumption that an item's reward does not depend
on where in the slate, or next to what, it is shown (the world's
``position_decay = 0``). The rounds of one slate are dependent, so every
interval is cluster-robust over decisions
(:func:`~services.evaluation.estimators.clustered_stderr`).

The target policies are learners with given hyperparameters: each learns from
the logged slates of the first ``train_fraction`` of decisions (as the bandits
service would from that feedback), is frozen, and is evaluated on the rest.
Deterministic learners contribute the indicator of the item being in their top
``k``; sampling learners (Thompson) one sampled slate's indicator, an unbiased
estimate of the probability; ``random`` its exact ``k / K``. DR's reward model
is each item's mean reward on the training decisions shrunk to the overall mean.

:func:`obp_arrays` and :func:`dsjson_lines` write the same rounds for Open
Bandit Pipeline and Vowpal Wabbit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from contracts.events import Feedback, Impression, SlateItem, feedback_id
from contracts.ids import item_labels
from services.bandits import LEARNERS
from services.evaluation.estimators import Estimate, doubly_robust, ips, snips
from services.evaluation.online import (
    POLICY_NAMES,
    SlatePolicy,
    UniformRandomPolicy,
    make_policy,
)
from services.serving.slate import build_slate
from services.simulator.world import World

#: The estimators :func:`evaluate_policies` reports, in order.
ESTIMATORS = ("ips", "snips", "dr", "replay")


@dataclass(frozen=True, eq=False)
class Decision:
    """One logged slate: candidates, the shown rows in position order, rewards, propensities."""

    request_id: str
    user_id: str
    ts: float
    policy: str
    context: np.ndarray
    candidates: list[str]
    #: Rows of ``candidates`` shown, ordered by position.
    shown: np.ndarray
    positions: np.ndarray
    rewards: np.ndarray
    #: Logged probability of each shown item being in the slate.
    propensities: np.ndarray
    #: Item features per candidate, shape (K, f); rows of unshown candidates are
    #: NaN when the log does not carry them.
    item_features: np.ndarray

    @property
    def slate_size(self) -> int:
        """k, the number of items shown."""
        return len(self.shown)


@dataclass(frozen=True)
class LogSummary:
    """What reading a log kept and left out (and why)."""

    decisions: int
    rounds: int
    feedback_records: int
    #: Reason -> number of feedback records left out.
    skipped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain fields, for JSON reports."""
        return {
            "decisions": self.decisions,
            "rounds": self.rounds,
            "feedback_records": self.feedback_records,
            "skipped": dict(self.skipped),
        }


def parse_policy_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``name[:key=value[:key=value...]]`` -> (name, hyperparameters).

    Values are read as JSON where they parse (numbers, booleans), else as strings.

    >>> parse_policy_spec("linucb:alpha=0.5")
    ('linucb', {'alpha': 0.5})
    """
    name, *pairs = spec.strip().split(":")
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
    params: dict[str, Any] = {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"policy {spec!r}: expected key=value, got {pair!r}")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    if name == "random" and params:
        raise ValueError(f"policy {spec!r}: random takes no hyperparameters")
    return name, params


def decisions_from_log(
    impressions: Iterable[Impression],
    feedback: Iterable[Feedback],
    *,
    logging_policy: str | None = None,
) -> tuple[list[Decision], LogSummary]:
    """Join feedback to its impressions into decisions, in impression-time order.

    Feedback is left out (and counted by reason) when its impression is not in
    ``impressions``, the impression logged no candidates, another policy served
    it, the slate was interleaved (DRN's per-slot propensities are not
    inclusion probabilities, docs/decisions.md §13), or not every shown item has its
    feedback yet. Re-emitted feedback (same ``feedback_id``) counts once.
    """
    by_request = {imp.request_id: imp for imp in impressions}
    grouped: dict[str, dict[str, Feedback]] = {}
    total = 0
    for event in feedback:
        total += 1
        grouped.setdefault(event.request_id, {}).setdefault(event.feedback_id, event)
    skipped: dict[str, int] = {}
    decisions = []
    for request_id, events in grouped.items():
        reason = _unusable(by_request.get(request_id), events, logging_policy)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + len(events)
            continue
        decisions.append(_decision(by_request[request_id], events))
    decisions.sort(key=lambda d: d.ts)
    rounds = sum(d.slate_size for d in decisions)
    return decisions, LogSummary(len(decisions), rounds, total, skipped)


def _unusable(
    impression: Impression | None, events: Mapping[str, Feedback], logging_policy: str | None
) -> str | None:
    if impression is None:
        return "impression not in range"
    if logging_policy is not None and impression.policy != logging_policy:
        return "other logging policy"
    if not impression.candidates:
        return "impression logged no candidates"
    if any(item.team is not None for item in impression.slate):
        return "interleaved slate"
    shown = {feedback_id(impression.request_id, item.item_id) for item in impression.slate}
    if set(events) != shown:
        return "slate feedback incomplete"
    if not {item.item_id for item in impression.slate} <= set(impression.candidates):
        return "shown item not among candidates"
    return None


def _decision(impression: Impression, events: Mapping[str, Feedback]) -> Decision:
    slate = sorted(impression.slate, key=lambda item: item.position)
    row = {item_id: i for i, item_id in enumerate(impression.candidates)}
    by_item = {e.item_id: e for e in events.values()}
    widths = {len(item.features) for item in slate}
    width = widths.pop() if len(widths) == 1 else 0
    features = np.full((len(impression.candidates), width), np.nan)
    for item in slate:
        if width:
            features[row[item.item_id]] = item.features
    return Decision(
        request_id=impression.request_id,
        user_id=impression.user_id,
        ts=impression.ts,
        policy=impression.policy,
        context=np.asarray(impression.context, dtype=np.float64),
        candidates=list(impression.candidates),
        shown=np.array([row[item.item_id] for item in slate], dtype=np.int64),
        positions=np.array([item.position for item in slate], dtype=np.int64),
        rewards=np.array([float(by_item[item.item_id].reward) for item in slate]),
        propensities=np.array([by_item[item.item_id].propensity for item in slate]),
        item_features=features,
    )


# -- target policies ----------------------------------------------------------------


def _widths(decisions: Sequence[Decision]) -> tuple[int, int]:
    contexts = {len(d.context) for d in decisions}
    features = {d.item_features.shape[1] for d in decisions}
    if len(contexts) != 1 or len(features) != 1:
        raise ValueError(
            f"the log mixes context widths {sorted(contexts)} or item feature widths "
            f"{sorted(features)}; the learners need one of each"
        )
    return contexts.pop(), features.pop()


def build_policy(spec: str, decisions: Sequence[Decision], *, seed: int = 0) -> SlatePolicy:
    """A fresh policy from ``spec`` (:func:`parse_policy_spec`) sized for the log."""
    name, params = parse_policy_spec(spec)
    context_dim, item_dim = _widths(decisions)
    if name in LEARNERS and LEARNERS[name].uses_item_features:
        if any(np.isnan(d.item_features).any() for d in decisions):
            raise ValueError(
                f"{name} scores candidates by their item features, which the log carries "
                "only for shown items"
            )
    try:
        return make_policy(name, context_dim=context_dim, item_dim=item_dim, seed=seed, **params)
    except TypeError as exc:
        raise ValueError(f"policy {spec!r}: {exc}") from None


def train(policy: SlatePolicy, decisions: Iterable[Decision]) -> None:
    """Update ``policy`` with every logged slate (all its shown items), in order."""
    for d in decisions:
        policy.update(
            d.context,
            item_labels(d.candidates)[d.shown],
            d.item_features[d.shown],
            d.rewards,
        )


def inclusion(policy: SlatePolicy, decision: Decision) -> np.ndarray:
    """The target's probability of showing each candidate in a slate of the logged size.

    Exact (``k / K``) for the uniformly random policy; otherwise the indicator of
    the candidate being in the slate the policy picks now.
    """
    k, n = decision.slate_size, len(decision.candidates)
    if isinstance(policy, UniformRandomPolicy):
        return np.full(n, k / n)
    rows = policy.select(
        decision.context, item_labels(decision.candidates), decision.item_features, k
    )
    chosen = np.zeros(n)
    chosen[np.asarray(rows, dtype=np.int64)] = 1.0
    return chosen


@dataclass(frozen=True)
class RoundArrays:
    """The evaluation part's rounds as flat arrays, one entry per shown item."""

    #: Index of each round's decision (the cluster of dependent rounds).
    decision: np.ndarray
    reward: np.ndarray
    pscore: np.ndarray
    #: Slate size of each round's decision.
    slate_size: np.ndarray
    uniform: bool


def round_arrays(decisions: Sequence[Decision]) -> RoundArrays:
    """Flatten ``decisions`` to :class:`RoundArrays`."""
    sizes = [d.slate_size for d in decisions]
    uniform = all(
        np.allclose(d.propensities, d.slate_size / len(d.candidates), rtol=1e-6) for d in decisions
    )
    return RoundArrays(
        decision=np.repeat(np.arange(len(decisions)), sizes),
        reward=np.concatenate([d.rewards for d in decisions]),
        pscore=np.concatenate([d.propensities for d in decisions]),
        slate_size=np.repeat(np.array(sizes, dtype=np.float64), sizes),
        uniform=uniform,
    )


@dataclass(frozen=True)
class RewardModel:
    """Each item's mean reward on the training decisions, shrunk to the overall mean."""

    sums: dict[str, float]
    counts: dict[str, int]
    overall: float

    @classmethod
    def fit(cls, decisions: Iterable[Decision]) -> RewardModel:
        """Fit on ``decisions`` (no decisions: every prediction is 0)."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for d in decisions:
            for row, reward in zip(d.shown, d.rewards, strict=True):
                item = d.candidates[row]
                sums[item] = sums.get(item, 0.0) + float(reward)
                counts[item] = counts.get(item, 0) + 1
        n = sum(counts.values())
        return cls(sums, counts, sum(sums.values()) / n if n else 0.0)

    def predict(self, items: Sequence[str]) -> np.ndarray:
        """Predicted reward of each item (one pseudo-observation of the overall mean)."""
        return np.array(
            [(self.sums.get(i, 0.0) + self.overall) / (self.counts.get(i, 0) + 1) for i in items]
        )


@dataclass(frozen=True)
class TargetArrays:
    """A target policy's side of the rounds: its probabilities and the reward model."""

    #: ``pi(a in S | x)`` of each round's logged item.
    probability: np.ndarray
    #: ``q(x, a)`` at each round's logged item.
    q_logged: np.ndarray
    #: ``sum_a pi(a in S | x) q(x, a) / k``: the model's reward per shown item of the target.
    q_target: np.ndarray
    #: ``pi(a in S | x)`` of every candidate, per decision (for the ground truth and export).
    inclusion: list[np.ndarray]


def target_arrays(
    policy: SlatePolicy, decisions: Sequence[Decision], model: RewardModel
) -> TargetArrays:
    """Evaluate the frozen ``policy`` on ``decisions``."""
    probability, q_logged, q_target, per_decision = [], [], [], []
    for d in decisions:
        pi = inclusion(policy, d)
        q = model.predict(d.candidates)
        per_decision.append(pi)
        probability.append(pi[d.shown])
        q_logged.append(q[d.shown])
        q_target.append(np.full(d.slate_size, float(pi @ q) / d.slate_size))
    return TargetArrays(
        probability=np.concatenate(probability),
        q_logged=np.concatenate(q_logged),
        q_target=np.concatenate(q_target),
        inclusion=per_decision,
    )


def estimate_all(
    rounds: RoundArrays, target: TargetArrays, *, level: float = 0.95
) -> dict[str, Estimate | None]:
    """IPS, SNIPS, DR and replay (None unless the logger was uniform) over ``rounds``."""
    common: dict[str, Any] = {
        "logging_propensity": rounds.pscore,
        "target_probability": target.probability,
        "level": level,
        "clusters": rounds.decision,
    }
    estimates: dict[str, Estimate | None] = {
        "ips": ips(rounds.reward, **common),
        "snips": snips(rounds.reward, **common) if target.probability.sum() > 0 else None,
        "dr": doubly_robust(
            rounds.reward,
            predicted_logged=target.q_logged,
            predicted_target=target.q_target,
            **common,
        ),
        "replay": None,
    }
    if rounds.uniform and target.probability.sum() > 0:
        # Replay is SNIPS over the rounds the target also shows, without weights.
        estimates["replay"] = snips(
            rounds.reward,
            logging_propensity=np.ones_like(rounds.pscore),
            target_probability=target.probability,
            level=level,
            clusters=rounds.decision,
        )
    return estimates


@dataclass(frozen=True)
class PolicyEvaluation:
    """One target policy's estimates on the evaluation part of the log."""

    spec: str
    estimates: dict[str, Estimate | None]
    target: TargetArrays


@dataclass(frozen=True)
class OffPolicyResult:
    """Every target policy's estimates, and how the log was split."""

    training: Sequence[Decision]
    evaluation: Sequence[Decision]
    rounds: RoundArrays
    policies: list[PolicyEvaluation]


def split(decisions: Sequence[Decision], train_fraction: float) -> int:
    """How many of ``decisions`` (the head) train the policies for ``train_fraction``."""
    if not 0.0 <= train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in [0, 1), got {train_fraction}")
    head = int(len(decisions) * train_fraction)
    if head == len(decisions):
        raise ValueError("no decisions left to evaluate on")
    return head


def evaluate_policies(
    specs: Sequence[str],
    decisions: Sequence[Decision],
    *,
    train_fraction: float = 0.5,
    seed: int = 0,
    level: float = 0.95,
    frozen: Mapping[str, SlatePolicy] | None = None,
) -> OffPolicyResult:
    """Train each policy of ``specs`` on the log's head, freeze it, estimate it on the rest.

    A spec in ``frozen`` (e.g. a saved model version) is evaluated as given,
    without training; every other spec is built by :func:`build_policy`.
    """
    if not decisions:
        raise ValueError("no decisions to evaluate on")
    head = split(decisions, train_fraction)
    training, evaluation = decisions[:head], decisions[head:]
    model = RewardModel.fit(training)
    rounds = round_arrays(evaluation)
    results = []
    for spec in specs:
        if frozen is not None and spec in frozen:
            policy = frozen[spec]
        else:
            policy = build_policy(spec, decisions, seed=seed)
            train(policy, training)
        try:
            target = target_arrays(policy, evaluation, model)
        except ValueError as exc:
            raise ValueError(f"policy {spec!r} cannot score this log: {exc}") from None
        results.append(PolicyEvaluation(spec, estimate_all(rounds, target, level=level), target))
    return OffPolicyResult(training, evaluation, rounds, results)


# -- export -------------------------------------------------------------------------


def action_ids(decisions: Sequence[Decision]) -> list[str]:
    """The action vocabulary of an export: every candidate item id, sorted.

    Action ``j`` of the OBP arrays and action ``j`` of a DSJson ``c._multi`` list
    is ``action_ids(...)[j]`` resp. the decision's ``j``-th candidate.
    """
    return sorted({item for d in decisions for item in d.candidates})


def obp_arrays(decisions: Sequence[Decision]) -> dict[str, np.ndarray]:
    """The rounds as Open Bandit Pipeline ``bandit_feedback`` arrays (one round per shown item).

    Keys: ``n_rounds``, ``n_actions``, ``len_list``, ``action`` (index into
    ``action_ids``), ``position``, ``reward``, ``pscore`` (the logged inclusion
    propensity), ``context`` (n_rounds, d), ``action_context`` (n_actions, f;
    an item's features as last logged, 0 where never shown), ``request`` (the
    decision index of each round), ``action_ids`` (the item id of each action)
    and ``candidates`` (n_rounds, n_actions: 1 where the action was a candidate).
    """
    if not decisions:
        raise ValueError("no decisions to export")
    ids = action_ids(decisions)
    index = {item: j for j, item in enumerate(ids)}
    context_dim, item_dim = _widths(decisions)
    action_context = np.zeros((len(ids), item_dim))
    action, position, request, rows = [], [], [], []
    for i, d in enumerate(decisions):
        mask = np.zeros(len(ids), dtype=np.int8)
        mask[[index[item] for item in d.candidates]] = 1
        for row, pos in zip(d.shown, d.positions, strict=True):
            j = index[d.candidates[row]]
            action.append(j)
            position.append(int(pos))
            request.append(i)
            rows.append(mask)
            if item_dim:
                action_context[j] = d.item_features[row]
    rounds = round_arrays(decisions)
    request_arr = np.array(request, dtype=np.int64)
    return {
        "n_rounds": np.array(len(action)),
        "n_actions": np.array(len(ids)),
        "len_list": np.array(int(max(position)) + 1),
        "action": np.array(action, dtype=np.int64),
        "position": np.array(position, dtype=np.int64),
        "reward": rounds.reward,
        "pscore": rounds.pscore,
        "context": np.stack([decisions[i].context for i in request_arr]).reshape(
            len(action), context_dim
        ),
        "action_context": action_context,
        "request": request_arr,
        "action_ids": np.array(ids),
        "candidates": np.stack(rows),
    }


def dsjson_lines(decisions: Sequence[Decision]) -> Iterator[str]:
    """One Vowpal Wabbit DSJson line per shown item (a CB decision over the candidates).

    ``_label_cost`` is ``-reward``, ``_labelIndex`` the shown item's index in
    ``c._multi`` (the decision's candidates, in logged order), ``a`` the
    1-based action list starting with it, ``p`` its logged propensity first;
    ``c`` holds the shared context (``ctx``) and one ``_multi`` entry per
    candidate with its ``id`` (and ``f`` features where logged).
    """
    for d in decisions:
        multi: list[dict[str, Any]] = []
        for row, item in enumerate(d.candidates):
            entry: dict[str, Any] = {"id": item}
            if d.item_features.shape[1] and not np.isnan(d.item_features[row]).any():
                entry["f"] = d.item_features[row].tolist()
            multi.append(entry)
        shared = {"ctx": d.context.tolist(), "_multi": multi}
        n = len(d.candidates)
        for row, pos, reward, prop in zip(
            d.shown, d.positions, d.rewards, d.propensities, strict=True
        ):
            index = int(row)
            order = [index + 1] + [j + 1 for j in range(n) if j != index]
            rest = (1.0 - float(prop)) / (n - 1) if n > 1 else 0.0
            line = {
                "_label_cost": -float(reward),
                "_label_probability": float(prop),
                "_label_Action": index + 1,
                "_labelIndex": index,
                "EventId": feedback_id(d.request_id, d.candidates[index]),
                "Timestamp": d.ts,
                "Version": "1",
                "position": int(pos),
                "a": order,
                "c": shared,
                "p": [float(prop)] + [rest] * (n - 1),
            }
            yield json.dumps(line, separators=(",", ":"))


# -- simulated logs with known truth -------------------------------------------------


@dataclass(frozen=True, eq=False)
class SimulatedLog:
    """A simulated log and each request's true click probability of every candidate."""

    impressions: list[Impression]
    feedback: list[Feedback]
    #: request_id -> true reward probability of each candidate (in candidate order).
    truth: dict[str, np.ndarray]

    def true_value(self, decisions: Sequence[Decision], inclusions: Sequence[np.ndarray]) -> float:
        """The target's true reward per shown item over ``decisions``, given its inclusion
        probabilities (:attr:`TargetArrays.inclusion`)."""
        shown = sum(d.slate_size for d in decisions)
        pairs = zip(decisions, inclusions, strict=True)
        clicks = sum(float(pi @ self.truth[d.request_id]) for d, pi in pairs)
        return clicks / shown


def simulate_log(
    world: World,
    n_requests: int,
    *,
    epsilon: float = 1.0,
    seed: int = 0,
    policy: str = "logger",
) -> SimulatedLog:
    """``n_requests`` of ``world`` served epsilon-greedily and logged as Impression + Feedback.

    The greedy ranking is by the items' popularity under a fixed noisy score
    (so ``epsilon < 1`` is a non-uniform logger); propensities are exact
    (:func:`services.serving.slate.build_slate`). Clicks are drawn from the
    world's click probability *without* position bias, so the item-level
    assumption of this module holds and the truth is known exactly.
    """
    rng = np.random.default_rng(seed)
    k = world.config.slate_size
    impressions, feedback, truth = [], [], {}
    for n in range(n_requests):
        request = world.request()
        features = world.item_features(request.candidates)
        probs = world.attractiveness(request.user_id, request.candidates)
        scores = probs + rng.normal(0.0, 0.05, size=len(probs))
        slate = build_slate(scores, k, epsilon, rng)
        request_id = f"r{seed}-{n}"
        items = [
            SlateItem(
                item_id=request.candidates[row],
                position=pos,
                propensity=float(prop),
                features=features[row].tolist(),
            )
            for pos, (row, prop) in enumerate(zip(slate.indices, slate.propensities, strict=True))
        ]
        impressions.append(
            Impression(
                request_id=request_id,
                user_id=request.user_id,
                ts=request.ts,
                policy=policy,
                slate=items,
                context=request.context.tolist(),
                candidates=list(request.candidates),
            )
        )
        clicks = rng.random(k) < probs[slate.indices]
        feedback.extend(
            Feedback(
                feedback_id=feedback_id(request_id, item.item_id),
                request_id=request_id,
                user_id=request.user_id,
                item_id=item.item_id,
                ts=request.ts,
                reward=int(clicked),
                position=item.position,
                propensity=item.propensity,
                policy=policy,
                context=request.context.tolist(),
                item_features=item.features,
            )
            for item, clicked in zip(items, clicks, strict=True)
        )
        truth[request_id] = probs
    return SimulatedLog(impressions, feedback, truth)
