"""The layer check (scripts/check_layers.py) finds what it must, and main has none of it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_layers", ROOT / "scripts/check_layers.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


check_layers = _load_checker()


@pytest.fixture
def tree(tmp_path: Path):
    """A miniature project: write(path, source) adds a module."""

    def write(relative: str, source: str = "") -> None:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(tmp_path).parents:
            if str(parent) != ".":
                (tmp_path / parent / "__init__.py").touch()
        path.write_text(source)

    write("contracts/events.py")
    write("services/common/runtime.py", "from contracts.events import *\n")
    write("services/bandits/linucb.py", "from services.common.runtime import *\n")
    write("services/paramstore/store.py", "from services.common import runtime\n")
    write("services/serving/api.py", "from services.bandits import linucb\n")
    write("services/stack/command.py", "from services.serving.api import *\n")
    write.root = tmp_path
    return write


def test_a_tree_that_keeps_to_its_layers_passes(tree) -> None:
    assert check_layers.violations(tree.root) == []


def test_an_upward_import_is_reported_with_its_place(tree) -> None:
    tree("services/bandits/linucb.py", "from services.serving import api\n")
    assert check_layers.violations(tree.root) == [
        "services/bandits/linucb.py:1: services.bandits.linucb imports "
        "services.serving.api from a higher layer",
        # serving.api imports linucb: going up closed a cycle.
        "import cycle among: services.bandits.linucb, services.serving.api",
    ]


def test_an_import_across_a_layer_is_reported(tree) -> None:
    tree("services/paramstore/store.py", "import services.bandits.linucb\n")
    assert check_layers.violations(tree.root) == [
        "services/paramstore/store.py:1: services.paramstore.store imports "
        "services.bandits.linucb across its layer"
    ]


def test_a_cycle_inside_one_component_is_reported(tree) -> None:
    tree("services/bandits/base.py", "from services.bandits.linucb import *\n")
    tree("services/bandits/linucb.py", "from services.bandits.base import *\n")
    assert check_layers.violations(tree.root) == [
        "import cycle among: services.bandits.base, services.bandits.linucb"
    ]


def test_an_import_in_a_function_needs_its_reason_on_the_line(tree) -> None:
    tree(
        "services/stack/command.py",
        "def run():\n"
        "    from services.serving import api\n"
        "    from services.bandits import linucb  # start-up cost: only `run` needs it\n",
    )
    assert check_layers.violations(tree.root) == [
        "services/stack/command.py:2: services.stack.command imports services.serving.api "
        "inside a function without a reason (# comment) on the line"
    ]


def test_a_module_in_no_layer_is_an_error_that_says_where_to_add_it(tree) -> None:
    tree("services/newthing/core.py", "from contracts import events\n")
    with pytest.raises(ValueError, match="services.newthing.core is in no layer"):
        check_layers.violations(tree.root)
