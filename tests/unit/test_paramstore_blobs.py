"""What the parameter store relies on without a Redis: blob verification and retention settings."""

from __future__ import annotations

import hashlib
import struct

import msgspec
import numpy as np
import pytest
import redis

from contracts.params import MAGIC, ParamError, decode_params, encode_params, verify_params
from services.paramstore import ParamStore, ParamStoreSettings


def test_verify_params_returns_the_header_with_the_checksum_that_names_the_blob() -> None:
    blob = encode_params("m", 3, {"x": np.arange(5.0)}, meta={"learner": "linucb"})
    header = verify_params(blob)
    assert header["model"] == "m" and header["meta"] == {"learner": "linucb"}
    assert header["sha256"] == decode_params(blob).checksum
    assert len(header["sha256"]) == 64
    # The same content is the same checksum; other content is another one.
    same = encode_params("m", 3, {"x": np.arange(5.0)}, created_at=1.0)
    assert verify_params(same)["sha256"] == verify_params(bytes(same))["sha256"]
    other = encode_params("m", 3, {"x": np.arange(6.0)}, created_at=1.0)
    assert verify_params(other)["sha256"] != verify_params(same)["sha256"]
    corrupt = bytearray(blob)
    corrupt[-1] ^= 0x01
    with pytest.raises(ParamError, match="checksum mismatch"):
        verify_params(bytes(corrupt))


def _signed(header: dict[str, object], payload: bytes) -> bytes:
    """A blob with a valid checksum over whatever header it is given."""
    digest = hashlib.sha256(msgspec.json.encode(header, order="sorted") + payload).hexdigest()
    head = msgspec.json.encode({**header, "sha256": digest}, order="sorted")
    return MAGIC + struct.pack("<I", len(head)) + head + payload


def test_verify_params_refuses_arrays_that_do_not_fit_the_payload() -> None:
    header: dict[str, object] = {
        "format": 1,
        "model": "m",
        "version": 0,
        "created_at": 1.0,
        "offsets": {},
        "meta": {},
        "arrays": [{"name": "x", "dtype": "<f8", "shape": [4], "offset": 0, "nbytes": 32}],
    }
    payload = np.arange(4.0).tobytes()
    assert verify_params(_signed(header, payload))["model"] == "m"
    with pytest.raises(ParamError, match="do not fit the payload"):
        verify_params(_signed(header, payload[:16]))
    header["arrays"] = [{"name": "x", "dtype": "<f8", "shape": [5], "offset": 0, "nbytes": 32}]
    with pytest.raises(ParamError, match="do not fit the payload"):
        decode_params(_signed(header, payload))


def test_retention_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    client = redis.Redis()  # never connects: nothing here talks to Redis
    defaults = ParamStoreSettings()
    assert (defaults.keep_versions, defaults.keep_bytes, defaults.blob_ttl_s) == (
        10_000,
        256 * 1024 * 1024,
        1.0,
    )
    assert (defaults.keep_all_s, defaults.keep_recent_s, defaults.keep_age_s) == (5, 3600, 86400)
    store = ParamStore(client)
    assert (store.keep_versions, store.keep_bytes, store.blob_ttl_s) == (
        10_000,
        256 * 1024**2,
        1.0,
    )
    assert (store.keep_all_s, store.keep_recent_s, store.keep_age_s) == (5, 3600, 86400)
    monkeypatch.setenv("STREAMREC_PARAMS_KEEP_VERSIONS", "7")
    monkeypatch.setenv("STREAMREC_PARAMS_KEEP_BYTES", "1000")
    monkeypatch.setenv("STREAMREC_PARAMS_BLOB_TTL_S", "0.5")
    assert ParamStore(client).keep_versions == 7
    store = ParamStore(client, keep_versions=2)
    assert (store.keep_versions, store.keep_bytes, store.blob_ttl_s) == (2, 1000, 0.5)
    with pytest.raises(ValueError, match="keep_bytes must be an integer >= 1"):
        ParamStore(client, keep_bytes=0)
    monkeypatch.setenv("STREAMREC_PARAMS_KEEP_RECENT_S", "60")
    assert ParamStore(client, keep_age_s=120).keep_recent_s == 60
    with pytest.raises(ValueError, match="retention ages must rise"):
        ParamStore(client, keep_all_s=90)
    with pytest.raises(ValueError, match="keep_age_s must be a non-negative number"):
        ParamStore(client, keep_age_s=float("inf"))
