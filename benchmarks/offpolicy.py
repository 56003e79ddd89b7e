"""Counterfactual evaluation from the log: interval coverage, bias and width against the
simulator's ground truth, and the estimation rate.

    python benchmarks/offpolicy.py [--seeds N] [--requests N]

Per seed, ``services.evaluation.logged.simulate_log`` logs ``--requests`` requests
of the simulated world (200 users, 60 items, 10 candidates, slates of 3, clicks
without position bias) under two loggers: epsilon-greedy (epsilon 0.3, exact
inclusion propensities) and uniform. Three targets -- ``random``,
``linucb:alpha=0.5`` and ``ts_beta`` -- learn from the first half and are
evaluated on the second with IPS, SNIPS, doubly robust and (uniform logger
only) replay; the truth is the target's exact expected reward per shown item on
the evaluated requests. Reported per (logger, target, estimator): how often the
95% interval covered the truth, the mean signed error (bias), the root mean
squared error and the mean interval width; and the evaluation rate (decisions
per second, three targets, training included). Writes
``benchmarks/results/offpolicy.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from host import describe_host  # noqa: E402

from services.evaluation.logged import (  # noqa: E402
    decisions_from_log,
    evaluate_policies,
    simulate_log,
)
from services.simulator.world import World, WorldConfig  # noqa: E402

CONFIG = WorldConfig(n_users=200, n_items=60, n_candidates=10, slate_size=3, position_decay=0.0)
TARGETS = ["random", "linucb:alpha=0.5", "ts_beta"]
LOGGERS = {"epsilon_greedy_0.3": 0.3, "uniform": 1.0}
RESULTS = Path(__file__).resolve().parent / "results" / "offpolicy.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--requests", type=int, default=800)
    args = parser.parse_args()
    rows: dict[tuple[str, str, str], list[tuple[float, float, float, float]]] = {}
    decisions_total, seconds = 0, 0.0
    for seed in range(args.seeds):
        for logger, epsilon in LOGGERS.items():
            log = simulate_log(World(CONFIG, seed=seed), args.requests, epsilon=epsilon, seed=seed)
            start = time.perf_counter()
            decisions, _ = decisions_from_log(log.impressions, log.feedback)
            result = evaluate_policies(TARGETS, decisions, seed=seed)
            seconds += time.perf_counter() - start
            decisions_total += len(decisions)
            for policy in result.policies:
                truth = log.true_value(result.evaluation, policy.target.inclusion)
                for kind, e in policy.estimates.items():
                    if e is not None:
                        rows.setdefault((logger, policy.spec, kind), []).append(
                            (truth, e.value, e.ci_low, e.ci_high)
                        )
    cells: list[dict[str, Any]] = []
    header = ("logger", "target", "est.", "cover", "bias", "rmse", "width")
    print("{:<20} {:<18} {:<7} {:>6} {:>8} {:>7} {:>7}".format(*header))
    for (logger, target, kind), values in rows.items():
        truth, value, low, high = (np.array(column) for column in zip(*values, strict=True))
        cell = {
            "logger": logger,
            "target": target,
            "estimator": kind,
            "seeds": len(values),
            "coverage": float(np.mean((low <= truth) & (truth <= high))),
            "bias": float(np.mean(value - truth)),
            "rmse": float(np.sqrt(np.mean((value - truth) ** 2))),
            "mean_width": float(np.mean(high - low)),
            "mean_truth": float(np.mean(truth)),
        }
        cells.append(cell)
        print(
            f"{logger:<20} {target:<18} {kind:<7} {cell['coverage']:6.3f} {cell['bias']:+8.4f} "
            f"{cell['rmse']:7.4f} {cell['mean_width']:7.4f}"
        )
    rate = decisions_total / seconds
    pooled = sum(c["coverage"] * c["seeds"] for c in cells) / sum(c["seeds"] for c in cells)
    print(f"pooled coverage {pooled:.3f}; {rate:,.0f} decisions/s evaluated (3 targets)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "config": {"seeds": args.seeds, "requests": args.requests, "targets": TARGETS},
        "level": 0.95,
        "pooled_coverage": pooled,
        "decisions_per_second": rate,
        "cells": cells,
        "host": describe_host("obp"),
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
