"""``streamrec export-log``: a range of the logged slates as Open Bandit Pipeline arrays
(``--format obp``, one ``.npz``) or Vowpal Wabbit DSJson (``--format dsjson``, one
JSON line per shown item).

The range and the joining of feedback to impressions are those of
``streamrec evaluate --from-kafka`` (:mod:`services.evaluation.kafka_log`,
:func:`services.evaluation.logged.decisions_from_log`), so an export holds
exactly the rounds that evaluation estimates on; the arrays and the lines are
described in :func:`~services.evaluation.logged.obp_arrays` and
:func:`~services.evaluation.logged.dsjson_lines`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from kafka.errors import KafkaError

from services.evaluation.kafka_log import add_range_arguments, read_from_args
from services.evaluation.logged import decisions_from_log, dsjson_lines, obp_arrays

FORMATS = ("obp", "dsjson")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``export-log`` options to ``parser``."""
    parser.add_argument(
        "--from-kafka",
        action="store_true",
        required=True,
        help="read the log from Kafka (the only source so far)",
    )
    add_range_arguments(parser)
    parser.add_argument("--format", choices=FORMATS, required=True, help="obp (.npz) or dsjson")
    parser.add_argument("--out", type=Path, required=True, help="file to write")
    parser.add_argument("--logging-policy", help="export only slates served by this policy")


def run(args: argparse.Namespace) -> int:
    """Export the logged slates of a range of the feedback topic; 0 on success, 2 on bad input."""
    try:
        try:
            log = read_from_args(args)
        except KafkaError as exc:
            raise ValueError(f"Kafka: {exc}") from None
        decisions, summary = decisions_from_log(
            log.impressions, log.feedback, logging_policy=args.logging_policy
        )
        for reason, count in sorted(summary.skipped.items()):
            print(f"left out {count} feedback records: {reason}")
        if not decisions:
            raise ValueError("no usable slates in the range")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.format == "obp":
            with args.out.open("wb") as file:
                np.savez(file, **obp_arrays(decisions))
        else:
            with args.out.open("w") as file:
                for line in dsjson_lines(decisions):
                    file.write(line + "\n")
    except (OSError, ValueError) as exc:
        print(f"export-log: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {summary.decisions} slates, {summary.rounds} shown items")
    return 0
