"""The command line's docstring names only commands, flags and services it has."""

from __future__ import annotations

import argparse
import re

import services.cli
from services.apps import SERVICES
from services.cli import build_parser

USAGE = [line for line in (services.cli.__doc__ or "").splitlines() if line.strip()][1:]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    [commands] = [
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    return dict(commands.choices)


def test_docstring_commands_and_flags_are_the_parsers() -> None:
    subparsers = _subparsers()
    commands: list[str] = []
    documented: set[str] = set()
    for line in USAGE:
        if line.startswith("streamrec "):
            # "streamrec down | status [...]" documents two commands with the same flags.
            commands = re.findall(r"(?:^streamrec|\|) ([a-z][a-z-]*)", line)
        assert commands, line
        for flag in re.findall(r"--[a-z][a-z-]*", line):
            documented.add(flag)
            for command in commands:
                assert flag in subparsers[command]._option_string_actions, f"{command} {flag}"
    named = {c for line in USAGE for c in re.findall(r"(?:^streamrec|\|) ([a-z][a-z-]*)", line)}
    assert named == set(subparsers)
    assert "--simulate" in documented


def test_docstring_names_every_service() -> None:
    [run] = [line for line in USAGE if line.startswith("streamrec run ")]
    assert set(re.findall(r"[a-z]+", run.split("(")[1])) == set(SERVICES)


def test_up_keeps_its_flags() -> None:
    args = build_parser().parse_args(
        ["up", "--simulate", "--duration", "5", "--rate", "50", "--services", "gateway,joiner"]
    )
    assert (args.simulate, args.duration, args.rate, args.services) == (
        True,
        5.0,
        50.0,
        "gateway,joiner",
    )
