"""``streamrec models``: list, show, pin, unpin, roll back, export and import model versions.

streamrec models list [MODEL] [--json]
streamrec models show MODEL [VERSION] [--json]
streamrec models pin MODEL VERSION [--reason TEXT]
streamrec models unpin MODEL
streamrec models rollback MODEL [VERSION] [--reason TEXT]
streamrec models export MODEL [VERSION] FILE
streamrec models import FILE [--as NAME]

Every subcommand takes ``--redis URL`` and ``--namespace NS`` (default: the
``REDIS_*`` settings, :class:`~services.common.settings.RedisSettings`). Exit
status 2 for an unknown model or version, a refused file or other bad input, 1
when Redis cannot be reached. The same operations are
:class:`~services.paramstore.ParamStore`'s ``history``, ``version_parts``,
``pin``, ``unpin``, ``pin_of`` and ``rollback`` and :mod:`services.models.export`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import redis
from pydantic import SecretStr, ValidationError

from contracts.params import ParamError
from services.common.settings import RedisSettings
from services.models.export import (
    ModelFileError,
    describe_parts,
    export_model_file,
    publish_model_file,
    read_model_file,
)
from services.paramstore import ModelNotFound, ParamStore, Pin, VersionInfo


def _version(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a version is a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"a version is >= 1, got {number}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``models`` subcommands to ``parser``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--redis", metavar="URL", help="Redis URL (default: REDIS_URL)")
    common.add_argument("--namespace", help="key namespace (default: REDIS_NAMESPACE)")
    actions = parser.add_subparsers(dest="action", required=True)

    listing = actions.add_parser(
        "list", parents=[common], help="every model, or one model's retained versions"
    )
    listing.add_argument("model", nargs="?")
    listing.add_argument("--json", action="store_true", help="print JSON")

    show = actions.add_parser(
        "show", parents=[common], help="one version's parts, digests, offsets, headers"
    )
    show.add_argument("model")
    show.add_argument("version", nargs="?", type=_version, help="default: the version served")
    show.add_argument("--json", action="store_true", help="print JSON")

    pin = actions.add_parser("pin", parents=[common], help="serve VERSION until unpinned")
    pin.add_argument("model")
    pin.add_argument("version", type=_version)
    pin.add_argument("--reason", default="pinned by an operator", help="recorded with the pin")

    unpin = actions.add_parser("unpin", parents=[common], help="serve the newest version again")
    unpin.add_argument("model")

    rollback = actions.add_parser(
        "rollback",
        parents=[common],
        help="pin VERSION, by default the newest retained one older than the one served",
    )
    rollback.add_argument("model")
    rollback.add_argument("version", nargs="?", type=_version)
    rollback.add_argument("--reason", default="rolled back by an operator")

    export = actions.add_parser(
        "export", parents=[common], help="write a version to a safetensors file"
    )
    export.add_argument("model")
    export.add_argument("version", nargs="?", type=_version, help="default: the version served")
    export.add_argument("file", type=Path)

    load = actions.add_parser(
        "import", parents=[common], help="verify a model file and publish it as a new version"
    )
    load.add_argument("file", type=Path)
    load.add_argument("--as", dest="name", metavar="NAME", help="publish under this model name")


def run(args: argparse.Namespace) -> int:
    """List, show, pin, unpin, roll back, export or import model versions."""
    action: Callable[[ParamStore, argparse.Namespace], int] = _ACTIONS[args.action]
    try:
        with _store(args) as store:
            return action(store, args)
    except (ModelNotFound, ModelFileError, ParamError, ValueError, ValidationError, OSError) as exc:
        print(f"models {args.action}: {exc}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:
        print(f"models {args.action}: Redis: {exc}", file=sys.stderr)
        return 1


def _store(args: argparse.Namespace) -> ParamStore:
    overrides: dict[str, Any] = {}
    if args.redis:
        overrides["url"] = SecretStr(args.redis)
    if args.namespace is not None:
        overrides["namespace"] = args.namespace
    return ParamStore.from_settings(RedisSettings(**overrides))


def _known(store: ParamStore, model: str) -> int:
    """The model's newest version; ModelNotFound if it has none."""
    current = store.current_version(model)
    if current is None:
        raise ModelNotFound(model, "no such model in this namespace")
    return current


def _served(store: ParamStore, model: str) -> int | None:
    head = store.head(model)
    return None if head is None else head[0]


def _when(seconds: float) -> str:
    if not seconds:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 10)}Z"


def _size(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _pin_text(pin: Pin) -> str:
    return f"pinned v{pin.version} by {pin.by} at {_when(pin.at)}: {pin.reason}"


def _state(info: VersionInfo, pin: Pin | None, current: int, served: int | None) -> str:
    words = []
    if info.version == current:
        words.append("newest")
    if info.version == served:
        words.append("served")
    if info.pinned and pin is not None:
        words.append("guarded" if pin.by == "guard" else "pinned")
        words.append(f"({pin.by}: {pin.reason})")
    return " ".join(words)


def _offsets_text(offsets: dict[str, int]) -> str:
    return ",".join(f"{name}={offset}" for name, offset in offsets.items()) or "-"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _list(store: ParamStore, args: argparse.Namespace) -> int:
    if args.model is None:
        return _list_models(store, args)
    current = _known(store, args.model)
    history = store.history(args.model)
    pin = store.pin_of(args.model)
    served = _served(store, args.model)
    if args.json:
        out = {
            "model": args.model,
            "current": current,
            "served": served,
            "pin": None if pin is None else asdict(pin),
            "versions": [
                asdict(info) | {"state": _state(info, pin, current, served)} for info in history
            ],
        }
        print(json.dumps(out, indent=2))
        return 0
    rows = [["VERSION", "PUBLISHED (UTC)", "OFFSETS", "EVENTS", "SIZE", "STATE"]]
    for info in history:
        rows.append(
            [
                str(info.version),
                _when(info.published_at),
                _offsets_text(info.offsets),
                "-" if info.events is None else str(info.events),
                _size(info.size_bytes),
                _state(info, pin, current, served),
            ]
        )
    print(_table(rows))
    if pin is not None:
        print(f"{args.model}: {_pin_text(pin)}; newest is v{current}")
    return 0


def _list_models(store: ParamStore, args: argparse.Namespace) -> int:
    entries: list[dict[str, Any]] = []
    for model in store.models():
        pin = store.pin_of(model)
        entries.append(
            {
                "model": model,
                "current": store.current_version(model),
                "served": _served(store, model),
                "retained": len(store.versions(model)),
                "pin": None if pin is None else asdict(pin),
            }
        )
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        print("no models in this namespace")
        return 0
    rows = [["MODEL", "NEWEST", "SERVED", "RETAINED", "PIN"]]
    for entry in entries:
        pinned = entry["pin"]
        rows.append(
            [
                str(entry["model"]),
                str(entry["current"] or "-"),
                str(entry["served"] or "-"),
                str(entry["retained"]),
                "-"
                if pinned is None
                else f"v{pinned['version']} by {pinned['by']}: {pinned['reason']}",
            ]
        )
    print(_table(rows))
    return 0


def _show(store: ParamStore, args: argparse.Namespace) -> int:
    current = _known(store, args.model)
    served = _served(store, args.model)
    version = args.version or served or current
    info = next((i for i in store.history(args.model) if i.version == version), None)
    if info is None:
        raise ModelNotFound(args.model, f"version {version} is not retained")
    parts = store.version_parts(args.model, version)
    pin = store.pin_of(args.model)
    learner, hyperparameters = describe_parts(parts)
    out = {
        "model": args.model,
        "version": version,
        "learner": learner,
        "hyperparameters": hyperparameters,
        "state": _state(info, pin, current, served),
        "published_at": info.published_at,
        "size_bytes": info.size_bytes,
        "events": info.events,
        "offsets": info.offsets,
        "pin": None if pin is None else asdict(pin),
        "parts": {
            name: {
                "sha256": params.checksum,
                "created_at": params.created_at,
                "offsets": {
                    t: {str(p): o for p, o in ps.items()} for t, ps in params.offsets.items()
                },
                "meta": params.meta,
                "arrays": {
                    array_name: {"dtype": array.dtype.str, "shape": list(array.shape)}
                    for array_name, array in params.arrays.items()
                },
            }
            for name, params in parts.items()
        },
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"model      {args.model}")
    print(f"version    {version}  {out['state']}".rstrip())
    if learner is not None:
        settings = ", ".join(f"{k}={v}" for k, v in hyperparameters.items())
        print(f"learner    {learner}" + (f" ({settings})" if settings else ""))
    print(f"published  {_when(info.published_at)}")
    print(f"size       {_size(info.size_bytes)}")
    print(f"events     {'-' if info.events is None else info.events}")
    print(f"offsets    {_offsets_text(info.offsets)}")
    if pin is not None:
        print(f"pin        {_pin_text(pin)}")
    for name, part in out["parts"].items():
        print(f"part {name}")
        print(f"  sha256   {part['sha256']}")
        print(f"  created  {_when(part['created_at'])}")
        print(f"  meta     {json.dumps(part['meta'], sort_keys=True)}")
        for array_name, spec in part["arrays"].items():
            print(f"  array    {array_name} {spec['dtype']} {tuple(spec['shape'])}")
    return 0


def _pin(store: ParamStore, args: argparse.Namespace) -> int:
    current = _known(store, args.model)
    pin = store.pin(args.model, args.version, reason=args.reason)
    print(f"{args.model}: {_pin_text(pin)}; newest is v{current}")
    return 0


def _unpin(store: ParamStore, args: argparse.Namespace) -> int:
    _known(store, args.model)
    pin = store.unpin(args.model)
    newest = store.current_version(args.model)
    if pin is None:
        print(f"{args.model}: not pinned; serving the newest version v{newest}")
    else:
        print(f"{args.model}: unpinned v{pin.version} ({pin.by}: {pin.reason}); serving v{newest}")
    return 0


def _rollback(store: ParamStore, args: argparse.Namespace) -> int:
    current = _known(store, args.model)
    pin = store.rollback(args.model, args.version, reason=args.reason)
    print(f"{args.model}: rolled back, {_pin_text(pin)}; newest is v{current}")
    return 0


def _export(store: ParamStore, args: argparse.Namespace) -> int:
    _known(store, args.model)
    file = export_model_file(store, args.model, args.file, args.version)
    print(
        f"exported {args.model} v{file.source_version} ({', '.join(file.parts)}; "
        f"{_size(args.file.stat().st_size)}) to {args.file}"
    )
    return 0


def _import(store: ParamStore, args: argparse.Namespace) -> int:
    try:
        file = read_model_file(args.file.read_bytes())
    except ModelFileError as exc:
        raise ModelFileError(f"refused {args.file}: {exc}") from None
    target = args.name or file.model
    version = publish_model_file(store, file, model=target)
    note = ""
    pin = store.pin_of(target)
    if pin is not None:
        note = f"; {target} stays pinned at v{pin.version} (unpin or pin v{version} to serve it)"
    print(
        f"imported {file.model} v{file.source_version} from {args.file} as {target} "
        f"v{version} ({', '.join(file.parts)}){note}"
    )
    return 0


_ACTIONS: dict[str, Callable[[ParamStore, argparse.Namespace], int]] = {
    "list": _list,
    "show": _show,
    "pin": _pin,
    "unpin": _unpin,
    "rollback": _rollback,
    "export": _export,
    "import": _import,
}
