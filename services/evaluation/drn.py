"""DRN in the online evaluation, and the multi-seed DRN vs bandit comparison.

:class:`DRNSlatePolicy` runs the production pieces in process: the serving
policy (:class:`services.serving.drn_policy.DRNPolicy`: features, W and W̃
scores, probabilistic interleaving) ranks each request, and the service's
:class:`services.drn.trainer.DRNTrainer` learns from the clicks (DBGD verdicts,
replay, scheduled and drift-triggered major updates). Only Kafka, Redis and the
publish delay are left out: the trainer's newest W and W̃ serve the next request.

The simulated world's request context begins with the user's interest vector
(``latent_dim`` columns, the space the item features live in), so the policy
uses them as the user's interest vector (``interest_columns``): the user-item
similarity columns then compare each candidate with what the user likes. The
world's users arrive independently of what they were shown, so there is no
return signal to learn and the evaluation uses the click-only model (γ = 0).
The serving time of request ``t`` is the world's clock, so the feature windows
and the major-update interval are in simulated seconds.

:func:`compare` runs DRN and baselines on the same worlds over several seeds
and scenarios and reports the CTR of the second half of each run (mean ± sd
over seeds, and the paired difference), cumulative regret, nDCG@k of the shown
slates against the true attractiveness, and DRN's DBGD win rate over time.

>>> from services.simulator import WorldConfig
>>> config = WorldConfig(n_users=20, n_items=30, n_candidates=10, scenario="nonlinear")
>>> drn = make_drn_policy(config, seed=0, major_interval_steps=20, major_min_transitions=16)
>>> run = simulate_ranked({"drn": drn}, config=config, steps=40, seed=0)
>>> run.result.expected.shape, run.ndcg["drn"].shape, drn.trainer.counters["slates"]
((1, 40), (40,), 40)
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from contracts.events import Feedback
from services.drn import EXPLOIT, EXPLORE, DRNLearner, FeatureLayout
from services.drn.settings import DRNSettings
from services.drn.slates import SlateFeedback
from services.drn.trainer import DRNTrainer
from services.evaluation.metrics import interleaving_win_rate, ndcg_at_k
from services.evaluation.online import OnlineResult, SlatePolicy, make_policy, policy_rng
from services.serving.drn_policy import DRNModel, DRNPolicy
from services.serving.policies import RankedSlate, RankRequest
from services.simulator.world import World, WorldConfig


class LearnerSource:
    """Serves a trainer's current W and W̃ to :class:`DRNPolicy` (no ParamStore in between)."""

    def __init__(self, trainer: DRNTrainer) -> None:
        self.trainer = trainer
        self._model: DRNModel | None = None

    @property
    def version(self) -> int:
        return self.trainer.learner.explore_version

    def current(self) -> tuple[int, DRNModel]:
        """The model of the learner's current W̃ draw, rebuilt only when the draw changed."""
        learner = self.trainer.learner
        if self._model is None or self._model.explore_version != learner.explore_version:
            self._model = DRNModel.from_weights(
                learner.weights(),
                learner.explore_weights(),
                learner.state_dim,
                explore_version=learner.explore_version,
            )
        return self._model.explore_version, self._model


class ClickWindows:
    """Clicks per item over sliding event-time windows: the layout's popularity columns.

    >>> windows = ClickWindows((10.0, 100.0))
    >>> windows.add([7, 8, 9], [1.0, 0.0, 1.0], now=5.0)
    >>> windows.add([7], [1.0], now=45.0)
    >>> windows.counts([7, 8, 9], now=50.0).tolist()
    [[1.0, 2.0], [0.0, 0.0], [0.0, 1.0]]
    """

    def __init__(self, windows_s: Sequence[float]) -> None:
        self.windows_s = tuple(float(w) for w in windows_s)
        self._times: dict[int, list[float]] = defaultdict(list)

    def add(
        self, items: Sequence[int] | np.ndarray, clicks: Sequence[float] | np.ndarray, now: float
    ) -> None:
        """Record the clicked ``items`` at time ``now`` (times must not go backwards)."""
        for item, click in zip(items, clicks, strict=True):
            if click:
                times = self._times[int(item)]
                times.append(now)
                horizon = now - max(self.windows_s)
                if times[0] < horizon:
                    del times[: bisect_left(times, horizon)]

    def counts(self, items: Sequence[int] | np.ndarray, now: float) -> np.ndarray:
        """``(n, W)`` clicks on each item within each window before ``now``."""
        out = np.zeros((len(items), len(self.windows_s)))
        for row, item in enumerate(items):
            times = self._times.get(int(item))
            if times:
                for column, window in enumerate(self.windows_s):
                    out[row, column] = len(times) - bisect_left(times, now - window)
        return out


@dataclass
class WinSeries:
    """Per interleaved slate: clicks credited to W (exploit) and to W̃ (explore)."""

    exploit: list[float] = field(default_factory=list)
    explore: list[float] = field(default_factory=list)

    def windowed(self, window: int) -> np.ndarray:
        """W̃'s win rate (ties excluded) in consecutive windows of ``window`` slates; NaN
        for a window without a decided slate."""
        a, b = np.asarray(self.explore), np.asarray(self.exploit)
        n = len(a) // window
        out = np.full(n, np.nan)
        for i in range(n):
            rows = slice(i * window, (i + 1) * window)
            wins, losses = int(np.sum(a[rows] > b[rows])), int(np.sum(b[rows] > a[rows]))
            if wins + losses:
                out[i] = wins / (wins + losses)
        return out


class DRNSlatePolicy:
    """DRN + DBGD as a :class:`~services.evaluation.online.SlatePolicy`; see the module doc.

    Args:
        policy: the serving policy (its source must be a :class:`LearnerSource`).
        trainer: the trainer behind ``policy.source``.
        clock: event time of request ``t`` (1-based) is ``start + t * step_seconds``.
    """

    def __init__(
        self,
        policy: DRNPolicy,
        trainer: DRNTrainer,
        *,
        start: float,
        step_seconds: float,
        seed: int = 0,
    ) -> None:
        self.policy = policy
        self.trainer = trainer
        self.start = float(start)
        self.step_seconds = float(step_seconds)
        self.popularity = ClickWindows(policy.layout.windows_s)
        self.wins = WinSeries()
        self._rng = np.random.default_rng(seed)
        self._step = 0
        self._served: RankedSlate | None = None

    @property
    def now(self) -> float:
        return self.start + self._step * self.step_seconds

    def select(
        self, context: np.ndarray, items: np.ndarray, item_features: np.ndarray, k: int
    ) -> np.ndarray:
        """Rows of the interleaved slate, best first."""
        self._step += 1
        request = RankRequest(
            user_id="",
            context=context,
            candidates=[str(i) for i in range(len(items))],
            candidate_labels=items,
            item_features=item_features,
            k=k,
            ts=self.now,
            extras={"popularity": self.popularity.counts(items, self.now)},
        )
        self._served = self.policy.rank(request, self._rng)
        return np.array([int(i) for i in self._served.items], dtype=np.int64)

    def update(
        self,
        context: np.ndarray,
        items: np.ndarray,
        item_features: np.ndarray,
        rewards: np.ndarray,
    ) -> None:
        """Learn from the clicks on the slate :meth:`select` served last."""
        served = self._served
        if served is None or served.context is None or served.item_features is None:
            raise ValueError("update() must follow select()")
        clicks = np.asarray(rewards, dtype=np.float32)
        teams = tuple(served.teams or (None,) * len(clicks))
        by_team: dict[str, float] = {EXPLOIT: 0.0, EXPLORE: 0.0}
        for team, click in zip(teams, clicks, strict=True):
            if team is not None:
                by_team[team] += float(click)
        self.wins.exploit.append(by_team[EXPLOIT])
        self.wins.explore.append(by_team[EXPLORE])
        self.trainer.observe(
            SlateFeedback(
                user_id=None,
                ts=self.now,
                explore_version=served.model_version,
                state=np.asarray(served.context, dtype=np.float32),
                actions=np.asarray(served.item_features, dtype=np.float32),
                clicks=clicks,
                teams=teams,
            )
        )
        self.popularity.add(items, clicks, self.now)
        self._served = None


def make_drn_policy(
    config: WorldConfig,
    *,
    seed: int = 0,
    hidden: Sequence[int] = (64, 32),
    gamma: float = 0.0,
    alpha: float = 0.1,
    eta: float = 0.05,
    lr: float = 1e-3,
    batch_size: int = 128,
    buffer_capacity: int = 20_000,
    verdict_window: int = 10,
    major_interval_steps: int = 250,
    major_steps: int = 50,
    major_min_transitions: int = 512,
    drift_delta: float | None = 0.002,
    interleaving: str = "probabilistic",
    window_steps: Sequence[int] = (500, 2_000, 8_000),
) -> DRNSlatePolicy:
    """DRN + DBGD for ``World(config)``, with windows and T_R in requests (of simulated time).

    The defaults are the ones the comparison in ``benchmarks/results`` uses.
    """
    layout = FeatureLayout(
        embedding_dim=config.item_dim,
        n_context=config.context_dim,
        windows_s=tuple(w * config.step_seconds for w in window_steps),
    )
    learner = DRNLearner(
        layout.state_dim,
        layout.action_dim,
        hidden=hidden,
        gamma=gamma,
        alpha=alpha,
        eta=eta,
        lr=lr,
        batch_size=batch_size,
        buffer_capacity=buffer_capacity,
        seed=seed,
    )
    trainer = DRNTrainer(
        learner,
        verdict_window=verdict_window,
        return_window_s=0.0,
        major_interval_s=major_interval_steps * config.step_seconds,
        major_steps=major_steps,
        major_min_transitions=major_min_transitions,
        drift_delta=drift_delta,
    )
    policy = DRNPolicy(
        LearnerSource(trainer),
        layout,
        interleaving=interleaving,  # type: ignore[arg-type]
        interest_columns=config.latent_dim,
        hidden=hidden,
        seed=seed,
    )
    return DRNSlatePolicy(
        policy, trainer, start=config.start_time, step_seconds=config.step_seconds, seed=seed
    )


def served_feedback(
    settings: DRNSettings,
    n_slates: int,
    *,
    seed: int = 0,
    n_items: int = 40,
    n_users: int = 25,
    n_candidates: int = 10,
    k: int = 4,
    start: float = 1.7e9,
    gap_s: float = 3.0,
) -> list[Feedback]:
    """Feedback of ``n_slates`` DRN slates, as the joiner would emit it (tests, benchmarks).

    A twin of the service's learner (same settings and seed) ranks every request
    through :class:`DRNPolicy` and learns from each slate right away, as if
    publishing were instant; clicks come from a hidden logistic model of the
    item embeddings. A DRN service fed these records therefore sees verdicts
    about its current W̃ and follows the twin's updates exactly.
    """
    trainer = settings.trainer()
    layout = settings.layout()
    policy = DRNPolicy(
        LearnerSource(trainer),
        layout,
        interest_columns=min(settings.interest_columns, layout.n_context),
        hidden=settings.hidden,
    )
    rng = np.random.default_rng(seed)
    item_vectors = rng.normal(size=(n_items, layout.embedding_dim))
    taste = rng.normal(size=layout.embedding_dim)
    out: list[Feedback] = []
    for s in range(n_slates):
        user = f"u{rng.integers(n_users)}"
        chosen = rng.choice(n_items, size=n_candidates, replace=False)
        ts = start + gap_s * s
        request = RankRequest(
            user_id=user,
            context=rng.normal(size=layout.n_context),
            candidates=[f"i{c}" for c in chosen],
            candidate_labels=chosen.astype(np.int64),
            item_features=item_vectors[chosen],
            k=k,
            ts=ts,
        )
        slate = policy.rank(request, rng)
        assert slate.teams is not None and slate.item_features is not None
        assert slate.context is not None
        shown = [int(item[1:]) for item in slate.items]
        clicked = rng.random(len(shown)) < 1 / (1 + np.exp(1.5 - item_vectors[shown] @ taste))
        for j, item in enumerate(slate.items):
            out.append(
                Feedback(
                    feedback_id=f"r{s}/{item}",
                    request_id=f"r{s}",
                    user_id=user,
                    item_id=item,
                    ts=ts,
                    reward=int(clicked[j]),
                    position=j,
                    propensity=slate.propensities[j],
                    policy=settings.policy,
                    model_version=slate.model_version,
                    team=slate.teams[j],  # type: ignore[arg-type]
                    context=slate.context,
                    item_features=slate.item_features[j],
                )
            )
        trainer.observe(
            SlateFeedback(
                user_id=user,
                ts=ts,
                explore_version=slate.model_version,
                state=np.asarray(slate.context, dtype=np.float32),
                actions=np.asarray(slate.item_features, dtype=np.float32),
                clicks=clicked.astype(np.float32),
                teams=tuple(slate.teams),
            )
        )
    return out


@dataclass(frozen=True, eq=False)
class RankedRun:
    """An online run plus the nDCG@k of every shown slate (true attractiveness as gains)."""

    result: OnlineResult
    ndcg: dict[str, np.ndarray]
    k: int


def simulate_ranked(
    policies: Mapping[str, SlatePolicy],
    *,
    config: WorldConfig,
    steps: int,
    seed: int = 0,
    ndcg_k: int | None = None,
) -> RankedRun:
    """:func:`services.evaluation.online.simulate`, also scoring each slate's nDCG@k.

    The same world, request sequence and per-policy click streams as ``simulate``
    (so results agree with it); the gain of a candidate is its true click
    probability at the top position, the ideal ranking is the best slate.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not policies:
        raise ValueError("simulate_ranked needs at least one policy")
    k = config.slate_size
    ndcg_k = ndcg_k or k
    world = World(config, seed=seed)
    names = tuple(policies)
    rngs = [policy_rng(seed, name) for name in names]
    best = np.empty(steps)
    expected = np.empty((len(names), steps))
    clicks = np.empty((len(names), steps), dtype=np.int64)
    ndcg = np.empty((len(names), steps))
    for t in range(steps):
        request = world.request()
        features = world.item_features(request.candidates)
        best[t] = world.best_slate_value(request.user_id, request.candidates)
        gains = dict(
            zip(
                request.candidates,
                world.attractiveness(request.user_id, request.candidates).tolist(),
                strict=True,
            )
        )
        for p, name in enumerate(names):
            policy = policies[name]
            rows = np.asarray(policy.select(request.context, request.candidate_labels, features, k))
            if len(rows) != min(k, len(request.candidates)) or len(set(rows.tolist())) != len(rows):
                raise ValueError(f"policy {name!r} returned rows {rows.tolist()}, not a slate")
            shown = [request.candidates[r] for r in rows]
            probs = world.click_probabilities(request.user_id, shown)
            clicked = rngs[p].random(len(probs)) < probs
            policy.update(
                request.context,
                request.candidate_labels[rows],
                features[rows],
                clicked.astype(np.float64),
            )
            expected[p, t] = probs.sum()
            clicks[p, t] = clicked.sum()
            ndcg[p, t] = ndcg_at_k(shown, gains, ndcg_k)
    result = OnlineResult(
        policies=names,
        scenario=config.scenario,
        seed=seed,
        slate_size=k,
        best=best,
        expected=expected,
        clicks=clicks,
    )
    return RankedRun(result=result, ndcg={n: ndcg[p] for p, n in enumerate(names)}, k=ndcg_k)


def _mean_sd(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    sd = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "sd": sd}


def second_half_ctr(result: OnlineResult) -> dict[str, float]:
    """Realised CTR (clicks per shown item) of each policy over the second half of the run."""
    half = result.steps // 2
    shown = (result.steps - half) * result.slate_size
    return {p: float(result.clicks[i, half:].sum() / shown) for i, p in enumerate(result.policies)}


def compare(
    *,
    policies: Sequence[str] = ("drn", "linucb"),
    scenarios: Sequence[str] = ("nonlinear", "linear"),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 20_000,
    window: int | None = None,
    drn_params: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run ``policies`` (``"drn"``, names for ``make_policy``) per scenario over ``seeds``.

    Returns a JSON-ready report. Per scenario: second-half CTR per policy (per
    seed, mean ± sd), final cumulative regret, mean nDCG@k over the second
    half, windowed CTR (mean over seeds); with ``"drn"`` also the paired
    difference DRN − each other policy (mean ± sd over seeds and a 95 % t
    interval) and DRN's DBGD win rate per window (mean over seeds) and over
    the second half (Wilson interval, all seeds pooled).
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    if not policies or len(set(policies)) != len(policies):
        raise ValueError(f"give distinct policies, got {list(policies)}")
    if not seeds:
        raise ValueError("give at least one seed")
    window = window or max(1, steps // 40)
    return {
        "steps": steps,
        "seeds": list(seeds),
        "window": window,
        "policies": list(policies),
        "drn_params": dict(drn_params or {}),
        "scenarios": {
            scenario: _compare_scenario(
                WorldConfig(scenario=scenario),  # type: ignore[arg-type]
                policies,
                seeds,
                steps,
                window,
                drn_params or {},
                progress,
            )
            for scenario in scenarios
        },
    }


def _compare_scenario(
    config: WorldConfig,
    names: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    window: int,
    drn_params: Mapping[str, Any],
    progress: bool,
) -> dict[str, Any]:
    half = steps // 2
    per_seed: list[dict[str, Any]] = []
    windowed: dict[str, list[np.ndarray]] = defaultdict(list)
    win_windows: list[np.ndarray] = []
    pooled = WinSeries()
    for seed in seeds:
        policies: dict[str, SlatePolicy] = {}
        for name in names:
            if name == "drn":
                policies[name] = make_drn_policy(config, seed=seed, **drn_params)
            else:
                policies[name] = make_policy(
                    name, context_dim=config.context_dim, item_dim=config.item_dim, seed=seed
                )
        run = simulate_ranked(policies, config=config, steps=steps, seed=seed)
        result = run.result
        regret = result.cumulative_regret()
        outcome: dict[str, Any] = {
            "seed": seed,
            "ctr_second_half": second_half_ctr(result),
            "cumulative_regret": {p: float(r[-1]) for p, r in regret.items()},
            "ndcg_second_half": {p: float(v[half:].mean()) for p, v in run.ndcg.items()},
            "best_ctr_second_half": float(
                result.best[half:].sum() / ((steps - half) * result.slate_size)
            ),
        }
        drn = policies.get("drn")
        if isinstance(drn, DRNSlatePolicy):
            outcome["dbgd"] = drn.trainer.counters
            win_windows.append(drn.wins.windowed(window))
            pooled.exploit.extend(drn.wins.exploit[half:])
            pooled.explore.extend(drn.wins.explore[half:])
        per_seed.append(outcome)
        for name, series in result.windowed_ctr(window).items():
            windowed[name].append(series)
        if progress:
            ctrs = ", ".join(f"{p} {c:.4f}" for p, c in outcome["ctr_second_half"].items())
            print(f"{config.scenario} seed {seed}: second-half CTR {ctrs}", flush=True)
    body: dict[str, Any] = {
        "config": {
            "scenario": config.scenario,
            "drift": config.drift,
            "n_users": config.n_users,
            "n_items": config.n_items,
            "n_candidates": config.n_candidates,
            "slate_size": config.slate_size,
        },
        "summary": {
            "best_ctr_second_half": _mean_sd([s["best_ctr_second_half"] for s in per_seed]),
            "policies": {
                name: {
                    metric: _mean_sd([s[metric][name] for s in per_seed])
                    for metric in ("ctr_second_half", "cumulative_regret", "ndcg_second_half")
                }
                for name in names
            },
        },
        "per_seed": per_seed,
        "window_ends": (np.arange(1, steps // window + 1) * window).tolist(),
        "windowed_ctr_mean": {
            name: np.mean(series, axis=0).tolist() for name, series in windowed.items()
        },
    }
    if "drn" in names:
        body["summary"]["differences"] = {
            f"drn-{name}": _paired(
                [s["ctr_second_half"]["drn"] - s["ctr_second_half"][name] for s in per_seed]
            )
            for name in names
            if name != "drn"
        }
        rate = interleaving_win_rate(pooled.explore, pooled.exploit)
        body["dbgd_win_rate_windowed_mean"] = _nan_mean_columns(np.vstack(win_windows))
        body["dbgd_win_rate_second_half"] = {
            "rate": rate.rate,
            "ci95": [rate.ci_low, rate.ci_high],
            "explore_wins": rate.wins_a,
            "exploit_wins": rate.wins_b,
            "ties": rate.ties,
        }
    return body


def _nan_mean_columns(rows: np.ndarray) -> list[float | None]:
    """Column means ignoring NaN; ``None`` (JSON null) where a column is all NaN."""
    known = ~np.isnan(rows)
    counts = known.sum(axis=0)
    sums = np.where(known, rows, 0.0).sum(axis=0)
    return [float(t / c) if c else None for t, c in zip(sums, counts, strict=True)]


def _paired(diffs: Sequence[float]) -> dict[str, Any]:
    """Mean ± sd of per-seed differences and a 95 % Student-t interval of the mean."""
    stats = _mean_sd(diffs)
    n = len(diffs)
    # Two-sided 95 % quantiles of Student's t for 1..9 degrees of freedom; 1.96 beyond.
    t_quantiles = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)
    quantile = t_quantiles[n - 2] if 1 < n <= 10 else 1.96
    half = quantile * stats["sd"] / math.sqrt(n)
    return {
        **stats,
        "per_seed": list(diffs),
        "ci95": [stats["mean"] - half, stats["mean"] + half],
    }


def plot_comparison(report: Mapping[str, Any], directory: str | Path) -> list[Path]:
    """Per scenario, ``drn_<scenario>_ctr.png`` (windowed CTR, mean over seeds); with DRN
    also ``drn_dbgd_win_rate.png`` (W̃'s interleaving win rate per window, every scenario)."""
    from services.evaluation.plots import plot_series  # on demand: matplotlib imports in ~0.7 s

    directory = Path(directory)
    paths = []
    win_rates = {}
    for scenario, body in report["scenarios"].items():
        ends = np.asarray(body["window_ends"])
        paths.append(
            plot_series(
                {p: np.asarray(v) for p, v in body["windowed_ctr_mean"].items()},
                f"CTR per {report['window']}-request window (mean of {len(report['seeds'])} seeds)",
                directory / f"drn_{scenario}_ctr.png",
                x=ends,
                title=f"DRN + DBGD vs baselines, {scenario} world",
            )
        )
        if "dbgd_win_rate_windowed_mean" in body:
            win_rates[scenario] = np.array(body["dbgd_win_rate_windowed_mean"], dtype=float)
    if win_rates:
        ends = np.asarray(next(iter(report["scenarios"].values()))["window_ends"])
        paths.append(
            plot_series(
                win_rates,
                "W̃ win rate of decided interleaved slates",
                directory / "drn_dbgd_win_rate.png",
                x=ends,
                title="DBGD: how often the explorer W̃ beats W (0.5 = as good)",
            )
        )
    return paths
