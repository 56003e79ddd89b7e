"""Every Prometheus metric declared in services/ follows one naming rule.

The rule: the declared name is the series name Prometheus scrapes, so a name in
docs/operations.md or deploy/ greps straight to its declaration. Concretely,
every name is a string literal ``streamrec_<area>_<what>[_<unit>]`` in snake
case; a Counter is declared with its ``_total`` suffix (prometheus_client would
append it anyway); a Gauge, Histogram or Summary never ends in ``_total``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METRIC_CLASSES = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
NAME = re.compile(r"streamrec_[a-z][a-z0-9]*(_[a-z0-9]+)+")


def _declarations() -> list[tuple[str, str, ast.expr | None]]:
    """(where, metric class, name argument) of every prometheus_client metric constructed."""
    found = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        imported = {
            alias.asname or alias.name: alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "prometheus_client"
            for alias in node.names
            if alias.name in METRIC_CLASSES
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id in imported:
                kind = imported[func.id]
            elif (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and func.value.id == "prometheus_client"
                and func.attr in METRIC_CLASSES
            ):
                kind = func.attr
            else:
                continue
            name = node.args[0] if node.args else None
            name = next((k.value for k in node.keywords if k.arg == "name"), name)
            found.append((f"{path.relative_to(ROOT)}:{node.lineno}", kind, name))
    return found


DECLARATIONS = _declarations()


def violation(kind: str, name: str) -> str | None:
    """Why ``name`` breaks the rule for a metric of class ``kind``, or None.

    >>> violation("Counter", "streamrec_gateway_requests_total") is None
    True
    >>> violation("Counter", "streamrec_index_swaps")
    'a Counter is declared with its _total suffix'
    >>> violation("Gauge", "streamrec_index_swaps_total")
    'only a Counter ends in _total'
    """
    if not NAME.fullmatch(name):
        return "not streamrec_<area>_<what>[_<unit>] in snake case"
    if kind == "Counter" and not name.endswith("_total"):
        return "a Counter is declared with its _total suffix"
    if kind != "Counter" and name.endswith("_total"):
        return "only a Counter ends in _total"
    return None


def test_the_scan_finds_the_declarations() -> None:
    kinds = {kind for _, kind, _ in DECLARATIONS}
    assert {"Counter", "Gauge", "Histogram"} <= kinds
    assert len(DECLARATIONS) >= 70


@pytest.mark.parametrize(("where", "kind", "name"), DECLARATIONS, ids=[d[0] for d in DECLARATIONS])
def test_metric_name_follows_the_rule(where: str, kind: str, name: ast.expr | None) -> None:
    assert isinstance(name, ast.Constant) and isinstance(name.value, str), (
        f"{where}: {kind} name must be a string literal"
    )
    assert violation(kind, name.value) is None, (
        f"{where}: {name.value}: {violation(kind, name.value)}"
    )


def test_names_are_unique() -> None:
    names = [name.value for _, _, name in DECLARATIONS if isinstance(name, ast.Constant)]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("kind", "name"),
    [("Counter", "streamrec_x_events"), ("Gauge", "streamrec_x_events_total"), ("Gauge", "x")],
)
def test_violations_are_caught(kind: str, name: str) -> None:
    assert violation(kind, name) is not None
