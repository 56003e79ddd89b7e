"""The ``streamrec`` command line.

streamrec up [--run-dir DIR] [--kafka HOST:PORT] [--redis URL] [--partitions N]
             [--services a,b,...] [--gateway-port PORT] [--no-console]
             [--simulate [--duration S] [--rate R] [--seed N]]
streamrec down | status [--run-dir DIR]
streamrec run NAME (gateway, joiner, bandits, sequences, embeddings, drn, guard, serving, console)
streamrec simulate [--gateway URL [--token T]] [--serving URL] [--rate R] [--duration S]
                   [--seed N] [--epsilon E]
streamrec evaluate [--policies a,b,... --steps N --seed N --seeds N --scenario S --window W
                    --out DIR] [--replay FILE | --ips FILE] [--logging-policy P]
                   [--train-fraction F]
streamrec evaluate --from-kafka [--policies linucb:alpha=0.5,model@7,...] [--since T --until T |
                   --from-offset O --to-offset O] [--logging-policy P] [--out DIR]
streamrec export-log --from-kafka [range options] --format obp|dsjson --out PATH
streamrec models list|show|pin|unpin|rollback|export|import ...  (see services/models/command.py)
streamrec topics                 (create the topics on the configured Kafka)
streamrec schemas [--check]      (write or check contracts/schemas/*.json)"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from contracts.jsonschema import check_schemas, write_schemas
from services.apps import SERVICES, available_services
from services.common.settings import KafkaSettings, TopicSettings
from services.common.topics import create_topics
from services.evaluation import command as evaluate_command
from services.evaluation import export as export_command
from services.models import command as models_command
from services.simulator import command as simulate_command
from services.stack import command as stack_command


def _load(target: str):  # type: ignore[no-untyped-def]
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _cmd_run(args: argparse.Namespace) -> int:
    if args.service not in available_services():
        print(
            f"unknown service {args.service!r}; available: {', '.join(available_services())}",
            file=sys.stderr,
        )
        return 2
    return int(_load(SERVICES[args.service])() or 0)


def _cmd_topics(args: argparse.Namespace) -> int:
    topics = TopicSettings()
    create_topics(KafkaSettings(), topics)
    print("topics ready:", ", ".join(sorted(topics.all())))
    return 0


def _cmd_schemas(args: argparse.Namespace) -> int:
    if args.check:
        stale = check_schemas()
        for name in stale:
            print(f"stale: contracts/schemas/{name}", file=sys.stderr)
        return 1 if stale else 0
    for path in write_schemas():
        print("wrote", path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamrec", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one service in the foreground")
    run.add_argument("service", help=f"one of: {', '.join(SERVICES)}")
    run.set_defaults(func=_cmd_run)

    topics = commands.add_parser("topics", help="create the topics on the configured Kafka")
    topics.set_defaults(func=_cmd_topics)

    schemas = commands.add_parser("schemas", help="write (or --check) the JSON Schema files")
    schemas.add_argument("--check", action="store_true", help="exit 1 if any file is stale")
    schemas.set_defaults(func=_cmd_schemas)

    for name, add, func in (
        ("up", stack_command.add_up_arguments, stack_command.up),
        ("down", stack_command.add_run_dir_argument, stack_command.down),
        ("status", stack_command.add_run_dir_argument, stack_command.status),
        ("simulate", simulate_command.add_arguments, simulate_command.run),
        ("evaluate", evaluate_command.add_arguments, evaluate_command.run),
        ("export-log", export_command.add_arguments, export_command.run),
        ("models", models_command.add_arguments, models_command.run),
    ):
        sub = commands.add_parser(name, help=(func.__doc__ or "").strip().split("\n")[0])
        add(sub)
        sub.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
