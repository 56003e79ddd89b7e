"""``streamrec evaluate``: compare policies online on the simulated world, or offline on a log.

Online (default): every policy in ``--policies`` runs ``--steps`` requests on the
same seeded world; prints final CTR and regret, the verdict against ``random``
(:mod:`services.evaluation.verdict`: a win only when the 95% Wilson intervals
do not overlap), and with ``--out DIR`` writes
``results.json``, ``ctr.png`` and ``regret.png``. With ``drn`` among the policies
or ``--seeds N`` > 1 the run repeats over N seeds (:func:`services.evaluation.drn.compare`)
and reports second-half CTR (mean ± sd), regret, nDCG@k and, for DRN, the paired
difference to each other policy and the DBGD interleaving win rate; ``--out``
then gets ``results.json`` and ``drn_*.png``.

Offline: ``--replay FILE.jsonl`` runs Li et al.'s replay evaluator of each
(learning) policy over a Feedback log; ``--ips FILE.jsonl`` trains each policy
on the log's head and estimates the frozen policy's value on the rest with IPS,
SNIPS and doubly robust estimators. Both use the logged slates' top position
(see :mod:`services.evaluation.replay`), so the log must come from a uniformly
random logger (select it with ``--logging-policy`` if the log mixes policies).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from services.evaluation.estimators import Estimate
from services.evaluation.online import POLICY_NAMES, make_policy, simulate
from services.evaluation.replay import (
    LoggedEvent,
    frozen_policy_estimates,
    read_feedback_log,
    replay,
    top_slot_events,
)
from services.evaluation.verdict import BASELINE
from services.evaluation.verdict import report as verdict_report
from services.simulator.world import SCENARIOS, WorldConfig

#: Policies only the online evaluation can run (DRN learns from interleaved slates).
ONLINE_ONLY = ("drn",)
CHOICES = (*POLICY_NAMES, *ONLINE_ONLY)


def _policy_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one policy")
    if unknown := [n for n in names if n not in CHOICES]:
        raise argparse.ArgumentTypeError(
            f"unknown policies {unknown}; choose from {','.join(CHOICES)}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError("a policy is listed twice")
    return names


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``evaluate`` options to ``parser``."""
    parser.add_argument(
        "--policies",
        type=_policy_list,
        default=["linucb", "ts_beta", "random"],
        help=f"comma-separated, from {','.join(CHOICES)} (default: linucb,ts_beta,random)",
    )
    parser.add_argument("--steps", type=_positive_int, default=20_000, help="online requests")
    parser.add_argument("--seed", type=int, default=0, help="world and policy seed")
    parser.add_argument(
        "--seeds",
        type=_positive_int,
        default=1,
        help="online: repeat over this many seeds from --seed on, report mean +- sd",
    )
    parser.add_argument("--scenario", choices=SCENARIOS, default="linear", help="click model")
    parser.add_argument(
        "--window", type=_positive_int, help="CTR window in requests (default: steps / 50)"
    )
    parser.add_argument("--out", type=Path, help="directory for results.json and PNG plots")
    offline = parser.add_mutually_exclusive_group()
    offline.add_argument(
        "--replay", type=Path, metavar="FILE.jsonl", help="replay-evaluate on a Feedback log"
    )
    offline.add_argument(
        "--ips", type=Path, metavar="FILE.jsonl", help="IPS/SNIPS/DR-evaluate on a Feedback log"
    )
    parser.add_argument(
        "--logging-policy", help="use only slates served by this policy (offline modes)"
    )
    parser.add_argument(
        "--train-fraction",
        type=float,
        default=0.5,
        help="share of the log the --ips policies learn from before being frozen (default 0.5)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the evaluation ``args`` describe; 0 on success, 2 on bad input."""
    try:
        if args.replay or args.ips:
            report = _offline(args)
        else:
            report = _online(args)
    except (OSError, ValueError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out / 'results.json'}")
    return 0


def _online(args: argparse.Namespace) -> dict[str, Any]:
    if args.seeds > 1 or any(name in ONLINE_ONLY for name in args.policies):
        return _online_seeds(args)
    config = WorldConfig(scenario=args.scenario)
    policies = {
        name: make_policy(
            name,
            context_dim=config.context_dim,
            item_dim=config.item_dim,
            seed=args.seed,
        )
        for name in args.policies
    }
    result = simulate(policies, config=config, steps=args.steps, seed=args.seed)
    window = args.window or max(1, args.steps // 50)
    regret = result.cumulative_regret()
    expected = result.expected_ctr()
    print(f"{args.scenario} world, seed {args.seed}, {args.steps} requests")
    print(f"{'policy':<15} {'ctr':>8} {'exp. ctr':>9} {'regret':>10}")
    for name, value in result.ctr().items():
        print(f"{name:<15} {value:8.4f} {expected[name]:9.4f} {regret[name][-1]:10.1f}")
    print(f"{'best slate':<15} {'':>8} {result.best_ctr():9.4f}")
    if BASELINE in result.policies:
        shown = result.steps * result.slate_size
        counts = {p: (float(result.clicks[i].sum()), shown) for i, p in enumerate(result.policies)}
        print("\n".join(verdict_report(counts)))
    if args.out:
        from services.evaluation.plots import plot_online  # matplotlib start-up cost: only --out

        for path in plot_online(result, args.out, window=window):
            print(f"wrote {path}")
    return result.summary(window)


def _online_seeds(args: argparse.Namespace) -> dict[str, Any]:
    from services.evaluation.drn import compare  # torch start-up cost: only DRN or --seeds runs

    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"{args.scenario} world, seeds {seeds}, {args.steps} requests each")
    report = compare(
        policies=args.policies,
        scenarios=[args.scenario],
        seeds=seeds,
        steps=args.steps,
        window=args.window or max(1, args.steps // 50),
        progress=True,
    )
    body = report["scenarios"][args.scenario]
    summary = body["summary"]
    print(f"{'policy':<15} {'ctr 2nd half':>17} {'nDCG 2nd half':>15} {'regret':>16}")
    for name, stats in summary["policies"].items():
        ctr, ndcg, regret = (
            stats[k] for k in ("ctr_second_half", "ndcg_second_half", "cumulative_regret")
        )
        print(
            f"{name:<15} {ctr['mean']:8.4f} +- {ctr['sd']:.4f} {ndcg['mean']:7.4f} +- "
            f"{ndcg['sd']:.4f} {regret['mean']:8.1f} +- {regret['sd']:.1f}"
        )
    for pair, diff in summary.get("differences", {}).items():
        low, high = diff["ci95"]
        print(
            f"{pair}: CTR {diff['mean']:+.4f} +- {diff['sd']:.4f} (95% CI {low:+.4f}, {high:+.4f})"
        )
    if "dbgd_win_rate_second_half" in body:
        rate = body["dbgd_win_rate_second_half"]
        low, high = rate["ci95"]
        print(f"DBGD: W~ wins {rate['rate']:.3f} of decided slates (95% CI {low:.3f}, {high:.3f})")
    if args.out:
        from services.evaluation.drn import plot_comparison  # torch start-up cost, as above

        for path in plot_comparison(report, args.out):
            print(f"wrote {path}")
    return report


def _offline(args: argparse.Namespace) -> dict[str, Any]:
    if online_only := [name for name in args.policies if name in ONLINE_ONLY]:
        raise ValueError(f"{online_only} can only be evaluated online")
    path: Path = args.replay or args.ips
    slates = read_feedback_log(path)
    events = top_slot_events(slates, logging_policy=args.logging_policy)
    if not events:
        raise ValueError(f"{path}: no slates of two or more items to evaluate on")
    context_dim, item_dim = _widths(events)
    print(f"{path}: {len(slates)} slates, {len(events)} usable")
    report: dict[str, Any] = {"log": str(path), "slates": len(slates), "events": len(events)}
    results: dict[str, Any] = {}
    for name in args.policies:
        policy = make_policy(name, context_dim=context_dim, item_dim=item_dim, seed=args.seed)
        if args.replay:
            outcome = replay(policy, events)
            print(f"{name:<15} replay {_format(outcome.estimate)}  matched {outcome.matched}")
            results[name] = {"replay": outcome.estimate.as_dict(), "matched": outcome.matched}
        else:
            estimates = frozen_policy_estimates(policy, events, train_fraction=args.train_fraction)
            for kind, estimate in estimates.items():
                print(f"{name:<15} {kind:<6} {_format(estimate)}")
            results[name] = {kind: e.as_dict() for kind, e in estimates.items()}
    report["policies"] = results
    return report


def _widths(events: list[LoggedEvent]) -> tuple[int, int]:
    contexts = {len(e.context) for e in events}
    features = {e.item_features.shape[1] for e in events}
    if len(contexts) != 1 or len(features) != 1:
        raise ValueError(
            f"the log mixes context widths {sorted(contexts)} or item feature widths "
            f"{sorted(features)}; the learners need one of each"
        )
    return contexts.pop(), features.pop()


def _format(estimate: Estimate) -> str:
    return (
        f"{estimate.value:.4f} +- {estimate.stderr:.4f} "
        f"[{estimate.ci_low:.4f}, {estimate.ci_high:.4f}] n={estimate.n}"
    )
