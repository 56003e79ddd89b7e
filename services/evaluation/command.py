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

From Kafka: ``--from-kafka`` reads a range of the feedback topic and the
impressions it refers to (:mod:`services.evaluation.kafka_log`) and estimates
each policy's reward per shown item with IPS, SNIPS, doubly robust and replay
(:mod:`services.evaluation.logged`). Policies are learners with hyperparameters
(``linucb:alpha=0.5``), trained on the range's first ``--train-fraction`` of
slates, or saved versions from the parameter store (``model@version``),
evaluated as saved. Prints a table; ``--out DIR`` gets ``results.json`` and
``estimates.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kafka.errors import KafkaError

from contracts.errors import StreamrecError
from services.bandits import learner_class, learner_from_params
from services.common.clients import REDIS_ERRORS
from services.common.settings import RedisSettings
from services.evaluation.estimators import Estimate
from services.evaluation.kafka_log import add_range_arguments, read_from_args
from services.evaluation.logged import (
    ESTIMATORS,
    OffPolicyResult,
    decisions_from_log,
    evaluate_policies,
    parse_policy_spec,
)
from services.evaluation.online import POLICY_NAMES, LearnerPolicy, make_policy, simulate
from services.evaluation.replay import (
    LoggedEvent,
    frozen_policy_estimates,
    read_feedback_log,
    replay,
    top_slot_events,
)
from services.evaluation.verdict import BASELINE
from services.evaluation.verdict import report as verdict_report
from services.paramstore import ParamStore, combine_parts
from services.simulator.world import SCENARIOS, WorldConfig

#: Policies only the online evaluation can run (DRN learns from interleaved slates).
ONLINE_ONLY = ("drn",)
CHOICES = (*POLICY_NAMES, *ONLINE_ONLY)


def _policy_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one policy")
    bases = [n.partition(":")[0] for n in names if "@" not in n]
    if unknown := [n for n in bases if n not in CHOICES]:
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
    offline.add_argument(
        "--from-kafka",
        action="store_true",
        help="IPS/SNIPS/DR/replay-evaluate on a range of the feedback topic; policies may be "
        "learner:key=value:... or model@version",
    )
    add_range_arguments(parser)
    parser.add_argument(
        "--redis", metavar="URL", help="parameter store for model@version (default: REDIS_URL)"
    )
    parser.add_argument(
        "--logging-policy", help="use only slates served by this policy (offline modes)"
    )
    parser.add_argument(
        "--train-fraction",
        type=float,
        default=0.5,
        help="share of the log the --ips / --from-kafka learners learn from before being frozen "
        "(default 0.5)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the evaluation ``args`` describe; 0 on success, 2 on bad input."""
    try:
        if args.from_kafka:
            report = _from_kafka(args)
        elif specs := [n for n in args.policies if ":" in n or "@" in n]:
            raise ValueError(f"{specs}: hyperparameters and model versions need --from-kafka")
        elif args.replay or args.ips:
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


def _from_kafka(args: argparse.Namespace) -> dict[str, Any]:
    if online_only := [name for name in args.policies if name in ONLINE_ONLY]:
        raise ValueError(f"{online_only} can only be evaluated online")
    for spec in args.policies:
        if "@" not in spec:
            parse_policy_spec(spec)
    try:
        log = read_from_args(args)
    except KafkaError as exc:
        raise ValueError(f"Kafka: {exc}") from None
    decisions, summary = decisions_from_log(
        log.impressions, log.feedback, logging_policy=args.logging_policy
    )
    print(
        f"{summary.feedback_records} feedback records, {len(log.impressions)} impressions: "
        f"{summary.decisions} slates ({summary.rounds} shown items) usable"
    )
    for reason, count in sorted(summary.skipped.items()):
        print(f"  left out {count} feedback records: {reason}")
    for topic, count in sorted(log.invalid.items()):
        print(f"  {count} records of {topic!r} did not decode")
    if not decisions:
        raise ValueError("no usable slates in the range")
    frozen = {spec: _model_policy(spec, args) for spec in args.policies if "@" in spec}
    result = evaluate_policies(
        args.policies,
        decisions,
        train_fraction=args.train_fraction,
        seed=args.seed,
        frozen=frozen,
    )
    _print_table(result)
    report: dict[str, Any] = {
        "source": "kafka",
        "ranges": log.ranges,
        "invalid_records": log.invalid,
        "log": summary.as_dict(),
        "logging_policy": args.logging_policy,
        "train_fraction": args.train_fraction,
        "training_slates": len(result.training),
        "evaluation_slates": len(result.evaluation),
        "evaluation_rounds": int(result.rounds.reward.size),
        "uniform_logging": result.rounds.uniform,
        "policies": {
            p.spec: {k: (e.as_dict() if e else None) for k, e in p.estimates.items()}
            for p in result.policies
        },
    }
    if args.out:
        from services.evaluation.plots import plot_estimates  # matplotlib: only with --out

        path = plot_estimates(
            {p.spec: p.estimates for p in result.policies},
            args.out / "estimates.png",
            title=f"{len(result.evaluation)} logged slates, 95% CI",
        )
        print(f"wrote {path}")
    return report


def _print_table(result: OffPolicyResult) -> None:
    print(
        f"trained on {len(result.training)} slates, evaluated on {len(result.evaluation)} "
        f"({result.rounds.reward.size} shown items); reward per shown item, 95% CI"
    )
    print(
        f"{'policy':<24} {'estimator':<9} {'value':>8} {'stderr':>8} {'ci low':>8} {'ci high':>8}"
    )
    for policy in result.policies:
        for kind in ESTIMATORS:
            e = policy.estimates[kind]
            if e is None:
                why = "logger not uniform" if kind == "replay" else "target shows no logged item"
                print(f"{policy.spec:<24} {kind:<9} {'-':>8}  ({why})")
            else:
                print(
                    f"{policy.spec:<24} {kind:<9} {e.value:8.4f} {e.stderr:8.4f} "
                    f"{e.ci_low:8.4f} {e.ci_high:8.4f}"
                )


def _model_policy(spec: str, args: argparse.Namespace) -> LearnerPolicy:
    """The bandit learner of a saved version ``model@version`` from the parameter store."""
    model, _, raw = spec.partition("@")
    try:
        version = int(raw)
    except ValueError:
        raise ValueError(f"{spec!r}: expected model@version with an integer version") from None
    settings = RedisSettings(**({"url": args.redis} if args.redis else {}))
    store = ParamStore.from_settings(settings)
    try:
        parts = store.version_parts(model, version)
        names = {str(part.meta.get("learner")) for part in parts.values()}
        if len(names) != 1:
            raise ValueError(f"{spec!r}: parts name learners {sorted(names)}")
        header, arrays = combine_parts(
            model, version, parts, combine=learner_class(names.pop()).merge
        )
        return LearnerPolicy(learner_from_params(version, header, arrays, seed=args.seed))
    except (StreamrecError, *REDIS_ERRORS) as exc:
        raise ValueError(f"{spec!r}: {exc}") from None
    finally:
        store.close()


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
