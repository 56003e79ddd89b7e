"""Sources and docs name only files and modules the repository contains.

Every ``*.py`` and ``*.md`` file is scanned for repo-relative paths (a path whose
first part is a top-level entry of the repository, such as ``docs/decisions.md``
or ``services/stack/command.py``, or a bare ``NAME.md``) and for dotted module
references (``services.catalog.store``, ``contracts.events.Click``). A path must
exist relative to the repository root or to the file that names it (a glob must
match something); a dotted reference must import, or name an attribute of a
module that does.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIPPED_DIRS = {
    ".git",
    ".venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".streamrec",
    "build",
    "runs",
}
#: Files the operator creates, named in docs/operations.md's instructions.
CREATED_BY_THE_OPERATOR = {"deploy/compose/.env", "deploy/prometheus/targets/"}
TOP_LEVEL = {entry.name for entry in ROOT.iterdir() if entry.name not in SKIPPED_DIRS}
PATH = re.compile(r"(?<![\w./$-])((?:[\w.*-]+/)+[\w.*-]*|[\w-]+\.md)(?![\w/{])")
DOTTED = re.compile(r"(?<![\w./])((?:services|contracts)(?:\.[A-Za-z_]\w*)+)(?![\w(])")


def _sources() -> Iterator[Path]:
    for path in sorted(ROOT.rglob("*")):
        relative = path.relative_to(ROOT)
        if path.suffix in (".py", ".md") and path.is_file():
            if not SKIPPED_DIRS.intersection(relative.parts) and not any(
                part.endswith(".egg-info") for part in relative.parts
            ):
                yield path


def path_references(text: str) -> Iterator[tuple[int, str]]:
    """(line, path) of every repo-relative path ``text`` names.

    >>> list(path_references("see docs/faults.md, RUN_DIR/stack.json and NOTES.md."))
    [(1, 'docs/faults.md'), (1, 'NOTES.md')]
    """
    for number, line in enumerate(text.splitlines(), 1):
        for match in PATH.finditer(line):
            reference = match.group(1).rstrip(".")
            if "/" not in reference or reference.split("/")[0] in TOP_LEVEL:
                yield number, reference


def _exists(reference: str, named_in: Path) -> bool:
    if reference in CREATED_BY_THE_OPERATOR:
        return True
    for base in (ROOT, named_in.parent):
        if "*" in reference:
            if any(base.glob(reference)):
                return True
        elif (base / reference).exists():
            return True
    return False


def _resolves(reference: str) -> bool:
    parts = reference.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target: ModuleType | object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


#: Files that name missing files on purpose: this one (examples) and the layer
#: check's tests (they write miniature projects under a temporary directory).
SYNTHETIC = {Path(__file__).resolve(), ROOT / "tests/unit/test_layers.py"}
SOURCES = [path for path in _sources() if path not in SYNTHETIC]


def test_the_scan_covers_the_repository() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in SOURCES}
    assert {"README.md", "docs/decisions.md", "services/cli.py", "tests/conftest.py"} <= names


def test_named_files_exist() -> None:
    missing = [
        f"{path.relative_to(ROOT)}:{line}: {reference}"
        for path in SOURCES
        for line, reference in path_references(path.read_text())
        if not _exists(reference, path)
    ]
    assert not missing, "files named but not in the repository:\n" + "\n".join(missing)


def test_named_modules_exist() -> None:
    unresolved = [
        f"{path.relative_to(ROOT)}:{number}: {match.group(1)}"
        for path in SOURCES
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for match in DOTTED.finditer(line)
        if not _resolves(match.group(1))
    ]
    assert not unresolved, "modules named but not in the repository:\n" + "\n".join(unresolved)


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("docs/nowhere.md", False),
        ("services/nowhere/*.py", False),
        ("contracts/schemas/*.json", True),
        ("README.md", True),
    ],
)
def test_existence_check(text: str, found: bool) -> None:
    [(_, reference)] = path_references(text)
    assert _exists(reference, ROOT / "README.md") is found
