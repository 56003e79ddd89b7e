"""Parameter encoding: a JSON header plus raw little-endian arrays. Never pickle.

A blob is ``MAGIC | u32 header length | header JSON | array bytes``. The header
names the model, version, each array's dtype/shape/offset, the Kafka offsets the
parameters reflect, and a sha256 over the header (without the checksum itself)
and the array bytes, so any flipped byte is detected on read.

>>> import numpy as np
>>> blob = encode_params("linucb", 7, {"b": np.arange(3.0)}, offsets={"feedback": {0: 42}})
>>> p = decode_params(blob)
>>> p.version, p.arrays["b"].tolist(), p.offsets
(7, [0.0, 1.0, 2.0], {'feedback': {0: 42}})
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from contracts.errors import StreamrecError

MAGIC = b"SRPARAM1"
_LEN = struct.Struct("<I")
#: dtypes a parameter array may have, by their little-endian numpy code.
DTYPES = {"<f4", "<f8", "<i4", "<i8", "|u1", "|b1"}


class ParamError(StreamrecError, ValueError):
    """A parameter blob that is malformed, of an unknown format, or fails its checksum."""


@dataclass(frozen=True, slots=True)
class ParamSet:
    """Decoded parameters: named arrays plus the header that describes them."""

    model: str
    version: int
    arrays: dict[str, np.ndarray]
    #: topic -> partition -> next offset to consume, as of these parameters.
    offsets: dict[str, dict[int, int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    #: The blob's sha256 (hex). It covers every byte that matters, so it also names
    #: the blob: the parameter store keeps blobs under it (content addressing).
    checksum: str = ""


def _canonical(header: Mapping[str, Any]) -> bytes:
    return msgspec.json.encode(header, order="sorted")


def encode_params(
    model: str,
    version: int,
    arrays: Mapping[str, np.ndarray],
    *,
    offsets: Mapping[str, Mapping[int, int]] | None = None,
    meta: Mapping[str, Any] | None = None,
    created_at: float | None = None,
) -> bytes:
    """Encode named arrays and their header into one self-checking blob."""
    specs = []
    chunks = []
    position = 0
    for name, array in arrays.items():
        array = np.asarray(array)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        code = dtype.str
        if code not in DTYPES:
            raise ParamError(f"array {name!r}: dtype {array.dtype} is not one of {sorted(DTYPES)}")
        data = np.ascontiguousarray(array, dtype=dtype).tobytes()
        specs.append(
            {
                "name": name,
                "dtype": code,
                "shape": list(array.shape),
                "offset": position,
                "nbytes": len(data),
            }
        )
        chunks.append(data)
        position += len(data)
    payload = b"".join(chunks)
    header: dict[str, Any] = {
        "format": 1,
        "model": model,
        "version": int(version),
        "created_at": time.time() if created_at is None else created_at,
        "offsets": {
            t: {str(p): int(o) for p, o in parts.items()} for t, parts in (offsets or {}).items()
        },
        "meta": dict(meta or {}),
        "arrays": specs,
    }
    header["sha256"] = hashlib.sha256(_canonical(header) + payload).hexdigest()
    head = _canonical(header)
    return MAGIC + _LEN.pack(len(head)) + head + payload


def verify_params(blob: bytes) -> dict[str, Any]:
    """Check a blob from :func:`encode_params` without copying its arrays; return its header.

    Checks the magic, the header, the sha256 and that every array's dtype is
    allowed and its bytes lie inside the payload, so that a blob that passes also
    decodes. The header returned includes its ``sha256``. Publishers call this
    to validate what they store; :func:`decode_params` calls it before building arrays.
    Raises :class:`ParamError`.
    """
    header, _ = _verified(blob)
    return header


def decode_params(blob: bytes) -> ParamSet:
    """Decode and verify a blob from :func:`encode_params`; raises :class:`ParamError`."""
    header, payload = _verified(blob)
    arrays = {}
    for spec in header["arrays"]:
        chunk = payload[spec["offset"] : spec["offset"] + spec["nbytes"]]
        arrays[spec["name"]] = (
            np.frombuffer(chunk, dtype=spec["dtype"]).reshape(spec["shape"]).copy()
        )
    return ParamSet(
        model=header["model"],
        version=header["version"],
        arrays=arrays,
        offsets={
            t: {int(p): o for p, o in parts.items()} for t, parts in header["offsets"].items()
        },
        meta=header["meta"],
        created_at=header["created_at"],
        checksum=header["sha256"],
    )


def _verified(blob: bytes) -> tuple[dict[str, Any], memoryview]:
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + _LEN.size:
        raise ParamError("not a streamrec parameter blob (bad magic)")
    (head_len,) = _LEN.unpack_from(blob, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    try:
        header = msgspec.json.decode(blob[start : start + head_len])
    except msgspec.DecodeError as exc:
        raise ParamError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != 1:
        raise ParamError("unknown parameter format")
    payload = memoryview(blob)[start + head_len :]
    expected = header.pop("sha256", None)
    # Hashed in two steps: joining header and payload first would copy the whole payload.
    digest = hashlib.sha256(_canonical(header))
    digest.update(payload)
    if expected != digest.hexdigest():
        raise ParamError(f"checksum mismatch for {header.get('model')} v{header.get('version')}")
    for spec in header["arrays"]:
        if spec["dtype"] not in DTYPES:
            raise ParamError(f"array {spec['name']!r}: dtype {spec['dtype']} not allowed")
        size = int(np.prod(spec["shape"], dtype=np.int64)) * np.dtype(spec["dtype"]).itemsize
        if size != spec["nbytes"] or not 0 <= spec["offset"] <= len(payload) - size:
            raise ParamError(f"array {spec['name']!r}: shape and bytes do not fit the payload")
    header["sha256"] = expected
    return header, payload
