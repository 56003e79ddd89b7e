"""Position-aware vs position-blind learners on the simulator, which has position bias.

    python benchmarks/position.py [--quick] [--seeds N] [--steps N]

Every learner runs in :func:`services.evaluation.simulate` on the same seeded
worlds (``World`` clicks follow the position-based model ``θ_p · sigmoid(...)``,
``θ_p = 1 / (1 + p) ** position_decay``) in three variants:

* ``blind``: today's learner, every slot counted as examined;
* ``pbm``: position-aware (docs/decisions.md §23), θ estimated online from the
  policy's own slates, 5% of which it shows shuffled (their cost is included);
* ``pbm_true``: position-aware with the simulator's true θ (no estimation), the
  ceiling of the approach.

Two worlds: the default (``position_decay`` 0.5, slates of 5: θ_4 = 0.45) and a
stronger bias (decay 1.0, slates of 10: θ_9 = 0.1). CTR is realised clicks per
shown item over all steps and over the last quarter (the learned regime); mean ±
sd over seeds. ``exam_spread`` diagnoses the blind learner: the coefficient of
variation, across the items it showed (weighted by shows), of the mean true θ
of the slots each item was shown in. The blind estimate of an item is its
relevance times that mean, so when the spread is small the bias is nearly a
common factor, which leaves the ranking (and so the CTR) unchanged.
Prints a table and writes ``benchmarks/results/position.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from host import describe_host  # noqa: E402

from services.bandits import BanditLearner, ExaminationModel, new_learner  # noqa: E402
from services.evaluation import LearnerPolicy, PositionAwarePolicy, simulate  # noqa: E402
from services.simulator import WorldConfig  # noqa: E402
from services.simulator.world import position_bias  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "position.json"
LEARNERS: dict[str, dict[str, Any]] = {
    "linucb": {"learner": "linucb", "alpha": 0.5},
    "ts_beta": {"learner": "ts_beta"},
}
WORLDS: dict[str, dict[str, Any]] = {
    "default (decay 0.5, slate 5)": {"position_decay": 0.5, "slate_size": 5},
    "strong (decay 1.0, slate 10)": {"position_decay": 1.0, "slate_size": 10},
}
#: Share of the ``pbm`` policies' slates shown shuffled to estimate θ.
SHUFFLE = 0.05


class ExposureTracker(LearnerPolicy):
    """A blind learner that also records the true θ of the slots each item was shown in."""

    def __init__(self, learner: BanditLearner, theta: np.ndarray) -> None:
        super().__init__(learner)
        self.theta = theta
        self.shows: dict[int, list[float]] = {}

    def update(
        self,
        context: np.ndarray,
        items: np.ndarray,
        item_features: np.ndarray,
        rewards: np.ndarray,
    ) -> None:
        for position, item in enumerate(items.tolist()):
            seen = self.shows.setdefault(item, [0.0, 0.0])
            seen[0] += 1.0
            seen[1] += float(self.theta[position])
        super().update(context, items, item_features, rewards)

    def spread(self) -> float:
        """Show-weighted coefficient of variation of the items' mean examination."""
        counts = np.array([s[0] for s in self.shows.values()])
        means = np.array([s[1] for s in self.shows.values()]) / counts
        mean = np.average(means, weights=counts)
        return float(np.sqrt(np.average((means - mean) ** 2, weights=counts)) / mean)


def true_model(theta: np.ndarray) -> ExaminationModel:
    """An examination model that has, in effect, seen infinitely many random slates."""
    model = ExaminationModel(len(theta), prior_shows=0.0)
    shows = np.full(len(theta), 1e12)
    model.load({"shows": shows, "rewards": shows * theta * 0.1})
    return model


def run_world(world: dict[str, Any], seed: int, steps: int) -> dict[str, Any]:
    config = WorldConfig(**world)
    theta = position_bias(np.arange(config.slate_size), config.position_decay)
    policies: dict[str, Any] = {}
    trackers = {}
    for name, spec in LEARNERS.items():

        def make(spec: dict[str, Any] = spec) -> BanditLearner:
            return new_learner(spec, context_dim=config.context_dim, seed=seed)

        trackers[name] = ExposureTracker(make(), theta)
        policies[f"{name}/blind"] = trackers[name]
        policies[f"{name}/pbm"] = PositionAwarePolicy(
            make(), ExaminationModel(config.slate_size), shuffle=SHUFFLE, seed=seed
        )
        policies[f"{name}/pbm_true"] = PositionAwarePolicy(make(), true_model(theta), shuffle=0.0)
    started = time.perf_counter()
    result = simulate(policies, config=config, steps=steps, seed=seed)
    quarters = result.windowed_ctr(steps // 4)
    out: dict[str, Any] = {
        "seconds": time.perf_counter() - started,
        "best_ctr": result.best_ctr(),
        "ctr": result.ctr(),
        "ctr_last_quarter": {p: float(v[3]) for p, v in quarters.items()},
        "ctr_quarters": {p: v.tolist() for p, v in quarters.items()},
        "exam_spread": {name: t.spread() for name, t in trackers.items()},
        "theta_estimated": {
            name: policies[f"{name}/pbm"].examination.theta().round(3).tolist() for name in LEARNERS
        },
    }
    return out


def mean_sd(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation."""
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1))}


def summarise(runs: list[dict[str, Any]], key: str) -> dict[str, dict[str, float]]:
    """``mean_sd`` over runs of each policy's ``run[key][policy]``."""
    return {p: mean_sd([r[key][p] for r in runs]) for p in runs[0][key]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--quick", action="store_true", help="3 seeds, 1,000 steps")
    args = parser.parse_args()
    seeds, steps = (3, 1000) if args.quick else (args.seeds, args.steps)
    report: dict[str, Any] = {
        "host": describe_host(),
        "seeds": list(range(seeds)),
        "steps": steps,
        "shuffle": SHUFFLE,
        "learners": LEARNERS,
        "ctr_over": "ctr: all steps; ctr_last_quarter: steps (3 steps/4, steps]",
        "worlds": {},
    }
    for label, world in WORLDS.items():
        runs = [run_world(world, seed, steps) for seed in range(seeds)]
        ctr, late = summarise(runs, "ctr"), summarise(runs, "ctr_last_quarter")
        spread = summarise(runs, "exam_spread")
        report["worlds"][label] = {
            "config": world,
            "best_ctr": float(np.mean([r["best_ctr"] for r in runs])),
            "ctr": ctr,
            "ctr_last_quarter": late,
            "lift_last_quarter": {
                f"{name}/{variant}": mean_sd(
                    [
                        r["ctr_last_quarter"][f"{name}/{variant}"]
                        / r["ctr_last_quarter"][f"{name}/blind"]
                        - 1.0
                        for r in runs
                    ]
                )
                for name in LEARNERS
                for variant in ("pbm", "pbm_true")
            },
            "exam_spread_blind": spread,
            "runs": runs,
        }
        best = report["worlds"][label]["best_ctr"]
        print(f"\n{label}: {seeds} seeds x {steps} steps, best CTR {best:.4f}")
        print(
            f"{'policy':<18}{'CTR all steps':>20}{'CTR last quarter':>20}{'lift last quarter':>20}"
        )
        lifts = report["worlds"][label]["lift_last_quarter"]
        for p in ctr:
            lift = lifts.get(p)
            lift_text = f"{100 * lift['mean']:+.1f} ± {100 * lift['sd']:.1f}%" if lift else "-"
            print(
                f"{p:<18}{ctr[p]['mean']:>11.4f} ± {ctr[p]['sd']:.4f}"
                f"{late[p]['mean']:>11.4f} ± {late[p]['sd']:.4f}{lift_text:>20}"
            )
        for name, value in spread.items():
            print(f"exam spread of {name}/blind: {value['mean']:.3f} ± {value['sd']:.3f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
