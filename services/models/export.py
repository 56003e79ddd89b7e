"""A model version as one portable safetensors file, and back into a parameter store.

The file (docs/decisions.md §19) holds one tensor per array of each part, named
``<part>/<array>``, and three ``__metadata__`` entries: ``format``
(``"streamrec-model"``), ``header`` (JSON text: model, source version, learner and
hyperparameters, and each part's original :mod:`contracts.params` header and blob
sha256, plus a sha256 of the tensor data section) and ``header_sha256`` (of the
header's UTF-8 bytes). Any safetensors reader gets the arrays; streamrec's
:func:`read_model_file` also checks every checksum and rebuilds each part's blob
with :func:`~contracts.params.encode_params`, which must reproduce the original
blob's sha256 exactly, so an imported version holds the very arrays, offsets and
meta that were exported and scores exactly as the original did.

>>> import numpy as np
>>> from contracts.params import decode_params, encode_params
>>> part = decode_params(encode_params("m", 0, {"b": np.arange(3.0)}, created_at=1.0))
>>> data = encode_model_file("m", 4, {"main": part})
>>> read = read_model_file(data)
>>> read.model, read.source_version, sorted(read.blobs)
('m', 4, ['main'])
>>> decode_params(read.blobs["main"]).checksum == part.checksum
True
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from contracts.errors import StreamrecError
from contracts.params import ParamError, ParamSet, decode_params, encode_params, verify_params
from services.bandits.factory import LEARNERS
from services.paramstore import ParamStore

#: ``__metadata__["format"]`` of a streamrec model file.
FORMAT = "streamrec-model"
#: ``format_version`` in the header; a reader refuses versions it does not know.
FORMAT_VERSION = 1

_LEN = struct.Struct("<Q")


class ModelFileError(StreamrecError, ValueError):
    """A model file that is malformed, tampered with or of another format, or an import
    the target model cannot take; nothing was published."""


@dataclass(frozen=True)
class ModelFile:
    """A verified model file: what it says, and each part's blob rebuilt exactly."""

    model: str
    """The model the version was exported from."""
    source_version: int
    """Its version in the store it was exported from."""
    header: dict[str, Any]
    """The whole file header (see docs/decisions.md §19)."""
    blobs: dict[str, bytes]
    """Part name → the part's blob, byte for byte the one that was exported."""

    @property
    def parts(self) -> list[str]:
        return sorted(self.blobs)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def describe_parts(parts: Mapping[str, ParamSet]) -> tuple[str | None, dict[str, Any]]:
    """The learner (or model kind) all parts name, and a bandit learner's hyperparameters.

    ``meta["learner"]`` names a bandit learner (its hyperparameters are arrays of
    its state), ``meta["kind"]`` another model (DRN's meta holds its settings).
    """
    names = {p.meta.get("learner", p.meta.get("kind")) for p in parts.values()}
    name = names.pop() if len(names) == 1 else None
    if not isinstance(name, str):
        return None, {}
    cls = LEARNERS.get(name)
    if cls is None:
        return name, {}
    first = parts[min(parts)]
    try:
        return name, cls.from_state(first.arrays).hyperparameters()
    except ValueError:
        return name, {}


def encode_model_file(
    model: str,
    version: int,
    parts: Mapping[str, ParamSet],
    *,
    exported_at: float | None = None,
) -> bytes:
    """The safetensors bytes of one version's decoded parts (as ``version_parts`` gives them)."""
    if not parts:
        raise ModelFileError(f"model {model!r} v{version} has no parts to export")
    tensors: dict[str, np.ndarray] = {}
    described: dict[str, Any] = {}
    union: dict[str, int] = {}
    for part, params in sorted(parts.items()):
        if "/" in part:
            raise ModelFileError(f"part name {part!r} may not contain '/'")
        specs = []
        for name, array in params.arrays.items():
            array = np.require(array, requirements="C")
            tensors[f"{part}/{name}"] = array
            specs.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape)})
        offsets = {
            topic: {str(p): int(o) for p, o in partitions.items()}
            for topic, partitions in params.offsets.items()
        }
        for topic, partitions in offsets.items():
            for partition, offset in partitions.items():
                key = f"{topic}:{partition}"
                union[key] = max(union.get(key, offset), offset)
        described[part] = {
            "sha256": params.checksum,
            "header": {
                "model": params.model,
                "version": params.version,
                "created_at": params.created_at,
                "offsets": offsets,
                "meta": params.meta,
                "arrays": specs,
            },
        }
    learner, hyperparameters = describe_parts(parts)
    # The data section does not depend on the metadata: save once to hash it.
    plain = save_tensors(tensors)
    (length,) = _LEN.unpack_from(plain)
    data_sha256 = hashlib.sha256(memoryview(plain)[_LEN.size + length :]).hexdigest()
    del plain
    header = {
        "format_version": FORMAT_VERSION,
        "model": model,
        "source_version": int(version),
        "exported_at": time.time() if exported_at is None else float(exported_at),
        "learner": learner,
        "hyperparameters": hyperparameters,
        "offsets": dict(sorted(union.items())),
        "parts": described,
        "tensors_sha256": data_sha256,
    }
    text = _canonical(header)
    metadata = {
        "format": FORMAT,
        "header": text,
        "header_sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    return save_tensors(tensors, metadata=metadata)


def read_model_file(data: bytes) -> ModelFile:
    """Check a model file from :func:`encode_model_file`; raises :class:`ModelFileError`.

    Checks, in order: the safetensors framing, the format, the header's sha256,
    the sha256 of the tensor data, that the tensors are exactly the arrays the
    part headers list (names, dtypes, shapes), and that each part's blob, rebuilt
    from its header and arrays, has the sha256 it was exported with.
    """
    data = bytes(data)
    if len(data) < _LEN.size:
        raise ModelFileError("not a model file: shorter than a safetensors header")
    (length,) = _LEN.unpack_from(data)
    if length > len(data) - _LEN.size:
        raise ModelFileError(
            f"truncated or not a safetensors file: header of {length} bytes, "
            f"file of {len(data)} bytes"
        )
    try:
        table = json.loads(data[_LEN.size : _LEN.size + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"not a safetensors file: header is not JSON ({exc})") from None
    metadata = table.get("__metadata__") if isinstance(table, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ModelFileError(f"not a streamrec model file (no __metadata__ format {FORMAT!r})")
    text = metadata.get("header")
    if not isinstance(text, str):
        raise ModelFileError("model file has no header")
    if hashlib.sha256(text.encode()).hexdigest() != metadata.get("header_sha256"):
        raise ModelFileError("header checksum mismatch: the file's header was changed")
    try:
        return _checked(json.loads(text), data, _LEN.size + length)
    except ModelFileError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ModelFileError(f"malformed model file header: {exc!r}") from None


def _checked(header: Any, data: bytes, start: int) -> ModelFile:
    if not isinstance(header, dict) or header.get("format_version") != FORMAT_VERSION:
        found = header.get("format_version") if isinstance(header, dict) else None
        raise ModelFileError(
            f"unsupported model file version {found!r} (this streamrec reads {FORMAT_VERSION})"
        )
    if hashlib.sha256(memoryview(data)[start:]).hexdigest() != header["tensors_sha256"]:
        raise ModelFileError("tensor checksum mismatch: the file's array data was changed")
    try:
        tensors = load_tensors(data)
    except SafetensorError as exc:
        raise ModelFileError(f"malformed safetensors data: {exc}") from None
    blobs = {}
    expected: set[str] = set()
    for part, described in sorted(header["parts"].items()):
        blobs[part] = _rebuild(part, described, tensors)
        expected.update(f"{part}/{spec['name']}" for spec in described["header"]["arrays"])
    if not blobs:
        raise ModelFileError("model file has no parts")
    if extra := sorted(set(tensors) - expected):
        raise ModelFileError(f"tensors {extra} belong to no part in the header")
    return ModelFile(
        model=str(header["model"]),
        source_version=int(header["source_version"]),
        header=header,
        blobs=blobs,
    )


def _rebuild(part: str, described: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> bytes:
    head = described["header"]
    arrays = {}
    for spec in head["arrays"]:
        name = f"{part}/{spec['name']}"
        if name not in tensors:
            raise ModelFileError(f"tensor {name!r} is missing")
        tensor = tensors[name]
        if tensor.dtype.str != spec["dtype"] or list(tensor.shape) != spec["shape"]:
            raise ModelFileError(
                f"tensor {name!r} is {tensor.dtype.str} {list(tensor.shape)}, "
                f"its header says {spec['dtype']} {spec['shape']}"
            )
        arrays[spec["name"]] = tensor
    try:
        blob = encode_params(
            head["model"],
            head["version"],
            arrays,
            offsets={
                topic: {int(p): int(o) for p, o in partitions.items()}
                for topic, partitions in head["offsets"].items()
            },
            meta=head["meta"],
            created_at=head["created_at"],
        )
    except ParamError as exc:
        raise ModelFileError(f"part {part!r}: {exc}") from None
    if verify_params(blob)["sha256"] != described["sha256"]:
        raise ModelFileError(f"part {part!r} does not match its sha256: it was changed")
    return blob


def _renamed(blob: bytes, model: str) -> bytes:
    """The blob with its header's model replaced, everything else as it was."""
    params = decode_params(blob)
    if params.model == model:
        return blob
    return encode_params(
        model,
        params.version,
        params.arrays,
        offsets=params.offsets,
        meta=params.meta,
        created_at=params.created_at,
    )


def export_model(store: ParamStore, model: str, version: int | None = None) -> bytes:
    """The model file of ``version`` of ``model``; by default the version served now.

    The version served is the pinned one while the model is pinned, else the
    newest. Raises :class:`~services.paramstore.ModelNotFound` if the model has
    no such (retained) version.
    """
    if version is None:
        version, parts = store.latest_parts(model)
    else:
        parts = store.version_parts(model, version)
    return encode_model_file(model, version, parts)


def publish_model_file(store: ParamStore, file: ModelFile, *, model: str | None = None) -> int:
    """Publish a verified file's parts as a version of ``model`` (default: the file's model).

    Returns the version that holds them: a new one, or the current one if it
    already holds exactly these blobs. A publish only replaces the parts it
    names, so a target model that has parts the file lacks is refused
    (:class:`ModelFileError`): the new version would mix the two. A pinned target
    keeps serving its pin until unpinned.
    """
    target = file.model if model is None else model
    current = store.current_version(target)
    if current is not None:
        extra = sorted(set(store.digests(target, current)) - set(file.blobs))
        if extra:
            raise ModelFileError(
                f"model {target!r} has parts {extra} that the file lacks; a version "
                "would mix the two: import under another name (--as)"
            )
    blobs = {part: _renamed(blob, target) for part, blob in file.blobs.items()}
    return store.publish(target, blobs)


def import_model(store: ParamStore, data: bytes, *, model: str | None = None) -> int:
    """Verify a model file and publish it (see :func:`publish_model_file`); the version.

    Raises :class:`ModelFileError` and publishes nothing if any check fails.
    """
    return publish_model_file(store, read_model_file(data), model=model)


def export_model_file(
    store: ParamStore, model: str, path: str | os.PathLike[str], version: int | None = None
) -> ModelFile:
    """Write the model file of a version to ``path`` (atomically); returns what it holds."""
    data = export_model(store, model, version)
    target = Path(path)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, target)
    return read_model_file(data)


def import_model_file(
    store: ParamStore, path: str | os.PathLike[str], *, model: str | None = None
) -> int:
    """Verify the model file at ``path`` and publish it; returns the version that holds it."""
    return import_model(store, Path(path).read_bytes(), model=model)
