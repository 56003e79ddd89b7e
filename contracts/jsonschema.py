"""JSON Schema files for non-Python producers, generated from the event types.

``streamrec schemas`` writes them to ``contracts/schemas/``; a test fails when a
committed file no longer matches the code (``streamrec schemas --check``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import msgspec

from contracts.events import Click, Feedback, Impression, Reward

SCHEMA_DIR = Path(__file__).parent / "schemas"
EVENTS = {"impression": Impression, "click": Click, "reward": Reward, "feedback": Feedback}


def render(name: str) -> bytes:
    """The schema document of one event type, as committed."""
    schema = _clean_descriptions(msgspec.json.schema(EVENTS[name]))
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://streamrec.dev/schemas/{name}.v1.json"
    return msgspec.json.format(msgspec.json.encode(schema, order="sorted"), indent=2) + b"\n"


def _clean_descriptions(node: Any) -> Any:
    """``node`` with every docstring-derived description dedented, as msgspec ≥ 0.23
    does itself, so the files do not depend on the installed msgspec version."""
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else _clean_descriptions(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_clean_descriptions(value) for value in node]
    return node


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in EVENTS:
        path = directory / f"{name}.v1.json"
        path.write_bytes(render(name))
        written.append(path)
    return written


def check_schemas(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of schema files that are missing or differ from the code."""
    stale = []
    for name in EVENTS:
        path = directory / f"{name}.v1.json"
        if not path.exists() or path.read_bytes() != render(name):
            stale.append(path.name)
    return stale
