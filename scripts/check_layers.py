"""Fail on an import that goes up the layers, across a layer, or round a cycle.

The layers (docs/architecture.md, "Layers"), lowest first; a module may import
its own component and anything in a lower layer, nothing else::

    contracts ← common ← libraries ← apps ← tools

Components of one layer are independent of each other (a learner does not import
a store, one app does not import another). The tools are ordered among
themselves (the simulator is used by evaluation, both by the stack, all by the
CLI; the model tools sit between evaluation and the stack). Each project import
inside a function body must give its reason in a comment on its line (an
optional dependency, start-up cost), or it is reported too: imports at the top
of a module are what a reader sees.

Run: ``python scripts/check_layers.py`` (``make lint`` does); exit status 1 on a
violation, with one line per violation.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("contracts", "services")

#: (layer, components): a module belongs to the component with the longest prefix.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("contracts", ("contracts",)),
    ("common", ("services", "services.common")),
    (
        "libraries",
        (
            "services.bandits",
            "services.drn",
            "services.embeddings",
            "services.paramstore",
            "services.sequences",
            "services.index",
            "services.catalog",
            "services.joiner",
            "services.gateway.sdk",
            "services.guard",
        ),
    ),
    (
        "apps",
        (
            "services.bandits.service",
            "services.drn.service",
            "services.embeddings.service",
            "services.joiner.service",
            "services.sequences.service",
            "services.guard.service",
            "services.gateway",
            "services.serving",
            "services.console",
            "services.apps",
        ),
    ),
    ("simulator", ("services.simulator",)),
    ("evaluation", ("services.evaluation",)),
    ("models", ("services.models",)),
    ("stack", ("services.stack",)),
    ("cli", ("services.cli",)),
)

_COMPONENTS = {
    component: rank for rank, (_, components) in enumerate(LAYERS) for component in components
}


@dataclass(frozen=True)
class Import:
    module: str
    target: str
    line: int
    in_function: bool
    reason: bool


def component(module: str) -> str:
    """The component a module belongs to: the longest matching prefix (``services``
    itself is its ``__init__`` only: each subpackage must be listed)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in _COMPONENTS and (prefix != "services" or module == prefix):
            return prefix
    raise ValueError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path) -> Iterator[Import]:
    """The project imports of one file, with whether each sits inside a function."""
    module = module_name(path, root)
    source = path.read_text()
    lines = source.splitlines()
    is_package = path.name == "__init__.py"

    def walk(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                for target in _targets(child, module, is_package, root):
                    if target.split(".")[0] in PACKAGES:
                        reason = "#" in lines[child.lineno - 1]
                        yield Import(module, target, child.lineno, in_function, reason)
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            yield from walk(child, nested)

    yield from walk(ast.parse(source, str(path)), False)


def _targets(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, root: Path
) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    # `from package import submodule` imports the submodule.
    return [
        f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}", root) else base
        for alias in node.names
    ]


def _is_module(name: str, root: Path) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def violations(root: Path = ROOT) -> list[str]:
    """Every violation in the packages under ``root``, one line each."""
    found: dict[str, None] = {}  # ordered, one line per import statement
    graph: dict[str, set[str]] = {}
    files = sorted(path for package in PACKAGES for path in (root / package).rglob("*.py"))
    for path in files:
        for imp in imports(path, root):
            where = f"{path.relative_to(root)}:{imp.line}"
            graph.setdefault(imp.module, set()).add(imp.target)
            source, target = component(imp.module), component(imp.target)
            if source != target:
                if _COMPONENTS[target] > _COMPONENTS[source]:
                    found[f"{where}: {imp.module} imports {imp.target} from a higher layer"] = None
                elif _COMPONENTS[target] == _COMPONENTS[source] and not _within(source, target):
                    found[f"{where}: {imp.module} imports {imp.target} across its layer"] = None
            if imp.in_function and not imp.reason:
                found[
                    f"{where}: {imp.module} imports {imp.target} inside a function "
                    "without a reason (# comment) on the line"
                ] = None
    found.update({f"import cycle among: {', '.join(group)}": None for group in cycles(graph)})
    return list(found)


def _within(source: str, target: str) -> bool:
    """Whether one component lies inside the other (services.serving → services)."""
    return source.startswith(target + ".") or target.startswith(source + ".")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other round a cycle (Tarjan's SCCs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def main() -> int:
    found = violations()
    for line in found:
        print(line)
    print(f"{len(found)} layer violation(s)" if found else "layers: ok", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
