"""Graded-reward run: learners trained on the combined graded reward vs on clicks only.

The simulator's world (services/simulator/world.py, linear scenario, 300 items, 50
candidates a request, slates of 5) decides clicks; a purchase model
(services/simulator/purchases.py) turns a click into a purchase with the item's
hidden conversion rate, worth the item's value in [0.2, 1]. Both signals are
combined as the joiner combines them, with the rule ``RULE`` (clicks weigh 0.2,
purchases 1, summed and capped at 1: :class:`services.common.rewards.RewardRule`).

Each learner (``ts_beta``: Beta Thompson with fractional updates, ``linucb``) runs
twice per seed on the same requests and the same click and purchase draws
(common random numbers per learner and seed): once updated with the graded reward,
once with the click alone (the reward before graded rewards existed). A uniformly
random policy is the floor. Reported: the mean graded reward per request (the
slate's sum) over all requests and over the last half, mean ± sd over ``SEEDS``,
and the paired difference graded − clicks per seed (same world, same draws);
the click-through rate too, since a learner of graded rewards may trade clicks
for purchases. No Kafka or Redis: the learning signal is what is compared; the
joiner's combination is the same :class:`RewardRule`.

Run: ``python -m benchmarks.rewards`` (writes benchmarks/results/rewards.json).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.host import describe_host
from services.common.rewards import RewardRule
from services.evaluation.online import make_policy
from services.simulator.purchases import PurchaseModel
from services.simulator.world import World, WorldConfig

OUT = Path(__file__).parent / "results" / "rewards.json"
SEEDS = (1, 2, 3)
STEPS = 6_000
RULE = RewardRule({"click": 0.2, "purchase": 1.0}, combine="sum")
LEARNERS = ("ts_beta", "linucb")
CONFIG = WorldConfig(base_ctr=0.1)


def _graded(clicked: np.ndarray, purchased: np.ndarray) -> np.ndarray:
    """The rule's reward of each shown item from its click and purchase value."""
    out = np.empty(len(clicked))
    for j, (click, value) in enumerate(zip(clicked, purchased, strict=True)):
        signals = {"click": 1.0} if click else {}
        if value > 0:
            signals["purchase"] = float(value)
        out[j] = RULE.reward(signals)
    return out


def run(learner: str, signal: str, seed: int) -> dict[str, float]:
    """One learner trained on ``signal`` ("graded", "clicks", or "none" for random)."""
    world = World(CONFIG, seed=seed)
    purchases = PurchaseModel(seed=seed)
    # Common random numbers: the same click and purchase draws for every signal.
    rng = np.random.default_rng([seed, zlib.crc32(learner.encode())])
    policy = make_policy(learner, context_dim=world.context_dim, item_dim=world.item_dim, seed=seed)
    k = CONFIG.slate_size
    rewards = np.empty(STEPS)
    clicks = np.empty(STEPS)
    for t in range(STEPS):
        request = world.request()
        features = world.item_features(request.candidates)
        rows = np.asarray(policy.select(request.context, request.candidate_labels, features, k))
        shown = [request.candidates[r] for r in rows]
        draws = rng.random(len(shown))
        clicked = draws < world.click_probabilities(request.user_id, shown)
        purchased = purchases.sample(shown, clicked, rng)
        graded = _graded(clicked, purchased)
        learned = graded if signal == "graded" else clicked.astype(np.float64)
        policy.update(request.context, request.candidate_labels[rows], features[rows], learned)
        rewards[t] = graded.sum()
        clicks[t] = clicked.sum()
    half = STEPS // 2
    return {
        "graded_reward_per_request": float(rewards.mean()),
        "graded_reward_per_request_last_half": float(rewards[half:].mean()),
        "ctr": float(clicks.mean() / k),
    }


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values)}


def main() -> int:
    started = time.perf_counter()
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    conditions = [(name, signal) for name in LEARNERS for signal in ("graded", "clicks")]
    conditions.append(("random", "none"))
    for name, signal in conditions:
        key = name if signal == "none" else f"{name}/{signal}"
        runs[key] = {"seeds": [run(name, signal, seed) for seed in SEEDS]}
        print(key, runs[key]["seeds"], flush=True)
    summary: dict[str, Any] = {}
    for key, result in runs.items():
        seeds = result["seeds"]
        summary[key] = {
            metric: _mean_sd([s[metric] for s in seeds])
            for metric in (
                "graded_reward_per_request",
                "graded_reward_per_request_last_half",
                "ctr",
            )
        } | {"per_seed": seeds}
    paired = {
        name: {
            metric: _mean_sd(
                [
                    g[metric] - c[metric]
                    for g, c in zip(
                        runs[f"{name}/graded"]["seeds"],
                        runs[f"{name}/clicks"]["seeds"],
                        strict=True,
                    )
                ]
            )
            for metric in ("graded_reward_per_request", "graded_reward_per_request_last_half")
        }
        for name in LEARNERS
    }
    report = {
        "what": "mean graded reward per request (slate of 5) on the simulator, learners "
        "trained on the combined graded reward vs clicks only; mean ± sd over seeds",
        "rule": {"weights": RULE.weights, "combine": RULE.combine, "default": RULE.default},
        "world": {
            "scenario": CONFIG.scenario,
            "n_items": CONFIG.n_items,
            "n_candidates": CONFIG.n_candidates,
            "slate_size": CONFIG.slate_size,
            "base_ctr": CONFIG.base_ctr,
        },
        "purchases": "conversion logit-normal around 0.2 (spread 1.5), value U[0.2, 1], per item",
        "steps": STEPS,
        "seeds": list(SEEDS),
        "results": summary,
        "graded_minus_clicks_same_seed": paired,
        "host": describe_host(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    for key, result in summary.items():
        reward = result["graded_reward_per_request"]
        last = result["graded_reward_per_request_last_half"]
        print(
            f"{key:16s} graded reward/request {reward['mean']:.4f} ± {reward['sd']:.4f}"
            f"  last half {last['mean']:.4f} ± {last['sd']:.4f}"
            f"  ctr {result['ctr']['mean']:.4f}"
        )
    for name, diff in paired.items():
        last = diff["graded_reward_per_request_last_half"]
        print(f"{name}: graded − clicks, last half {last['mean']:+.4f} ± {last['sd']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
