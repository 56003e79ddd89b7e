"""The portable model file without a server: layout, exactness, and refusal of a changed file."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from contracts.params import ParamSet, decode_params, encode_params
from services.bandits import LinUCB, learner_from_params
from services.models import (
    FORMAT,
    FORMAT_VERSION,
    ModelFileError,
    encode_model_file,
    read_model_file,
)
from services.paramstore import combine_parts

_LEN = struct.Struct("<Q")


def odd_arrays() -> dict[str, np.ndarray]:
    """One array of each allowed dtype, including a scalar, an empty and a nested name."""
    rng = np.random.default_rng(3)
    return {
        "w/layer.0.weight": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=5),
        "count": np.array(7, dtype=np.int64),
        "ids": np.arange(4, dtype=np.int32),
        "empty": np.zeros((0, 3)),
        "raw": np.frombuffer(b"\x00\xffab", dtype=np.uint8),
        "mask": np.array([True, False, True]),
    }


def blobs_of_two_parts() -> dict[str, bytes]:
    return {
        "p0": encode_params(
            "m",
            0,
            odd_arrays(),
            offsets={"feedback": {0: 42}},
            meta={"learner": "custom", "partition": 0, "nested": {"x": [1, 2.5]}},
            created_at=1700000000.123456,
        ),
        "p1": encode_params(
            "m",
            3,
            {"b": np.arange(2.0)},
            offsets={"feedback": {1: 17}, "clicks": {1: 5}},
            meta={"learner": "custom", "partition": 1},
            created_at=1700000001.5,
        ),
    }


def file_of(blobs: dict[str, bytes], model: str = "m", version: int = 9) -> bytes:
    return encode_model_file(model, version, {p: decode_params(b) for p, b in blobs.items()})


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The safetensors header (parsed) and the data section of a file."""
    (length,) = _LEN.unpack_from(data)
    return json.loads(data[_LEN.size : _LEN.size + length]), data[_LEN.size + length :]


def join(table: dict[str, Any], payload: bytes) -> bytes:
    head = json.dumps(table).encode()
    return _LEN.pack(len(head)) + head + payload


def with_header(data: bytes, change: Callable[[dict[str, Any]], None], *, reseal: bool) -> bytes:
    """The file with its streamrec header changed; ``reseal`` recomputes header_sha256."""
    table, payload = split(data)
    header = json.loads(table["__metadata__"]["header"])
    change(header)
    text = json.dumps(header, sort_keys=True)
    table["__metadata__"]["header"] = text
    if reseal:
        table["__metadata__"]["header_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return join(table, payload)


def test_round_trip_rebuilds_every_blob_byte_for_byte() -> None:
    blobs = blobs_of_two_parts()
    read = read_model_file(file_of(blobs))
    assert read.model == "m" and read.source_version == 9 and read.parts == ["p0", "p1"]
    assert read.blobs == blobs
    assert read.header["offsets"] == {"clicks:1": 5, "feedback:0": 42, "feedback:1": 17}


def test_any_safetensors_reader_sees_the_arrays_and_the_header(tmp_path: Path) -> None:
    blobs = blobs_of_two_parts()
    path = tmp_path / "m.safetensors"
    path.write_bytes(file_of(blobs))
    with safe_open(str(path), framework="numpy") as reader:
        metadata = reader.metadata()
        names = set(reader.keys())
        weight = reader.get_tensor("p0/w/layer.0.weight")
    assert names == {f"p0/{name}" for name in odd_arrays()} | {"p1/b"}
    np.testing.assert_array_equal(weight, odd_arrays()["w/layer.0.weight"])
    assert metadata["format"] == FORMAT
    text = metadata["header"]
    assert hashlib.sha256(text.encode()).hexdigest() == metadata["header_sha256"]
    header = json.loads(text)
    assert header["format_version"] == FORMAT_VERSION
    assert header["model"] == "m" and header["source_version"] == 9
    part = header["parts"]["p0"]
    assert part["sha256"] == decode_params(blobs["p0"]).checksum
    assert part["header"]["meta"]["nested"] == {"x": [1, 2.5]}
    assert part["header"]["offsets"] == {"feedback": {"0": 42}}
    assert part["header"]["arrays"][0] == {
        "name": "w/layer.0.weight",
        "dtype": "<f4",
        "shape": [3, 4],
    }
    _, payload = split(path.read_bytes())
    assert hashlib.sha256(payload).hexdigest() == header["tensors_sha256"]


def linucb_parts(seed: int) -> dict[str, ParamSet]:
    rng = np.random.default_rng(seed)
    parts = {}
    for partition in (0, 1):
        learner = LinUCB(dim=4, alpha=0.7, seed=0)
        items = rng.integers(0, 20, size=200)
        learner.update(items, rng.normal(size=(200, 4)), rng.random(200))
        parts[f"p{partition}"] = decode_params(
            encode_params(
                "linucb",
                0,
                learner.state(),
                offsets={"feedback": {partition: 200}},
                meta={"learner": "linucb", "partition": partition, "policy": "linucb"},
            )
        )
    return parts


def scores(parts: dict[str, ParamSet]) -> np.ndarray:
    header, arrays = combine_parts("linucb", 1, parts, combine=LinUCB.merge)
    learner = learner_from_params(1, header, arrays)
    contexts = np.random.default_rng(99).normal(size=(25, 4))
    return learner.score(np.arange(25), contexts)


def test_a_multi_part_bandit_scores_identically_after_the_round_trip() -> None:
    parts = linucb_parts(1)
    data = encode_model_file("linucb", 5, parts)
    read = read_model_file(data)
    assert read.header["learner"] == "linucb"
    assert read.header["hyperparameters"] == {"dim": 4, "alpha": 0.7, "ridge": 1.0}
    again = {part: decode_params(blob) for part, blob in read.blobs.items()}
    for name, params in parts.items():
        assert again[name].checksum == params.checksum
        for array, value in params.arrays.items():
            assert again[name].arrays[array].tobytes() == value.tobytes()
    assert np.array_equal(scores(again), scores(parts))


def test_exporting_twice_gives_the_same_header_and_tensor_data() -> None:
    parts = {p: decode_params(b) for p, b in blobs_of_two_parts().items()}
    first = encode_model_file("m", 1, parts, exported_at=5.0)
    second = encode_model_file("m", 1, parts, exported_at=5.0)
    # safetensors writes the metadata map in no fixed order; its content is fixed.
    assert split(first) == split(second)


@pytest.mark.parametrize("where", [0, 1, -1])
def test_a_flipped_tensor_byte_is_refused(where: int) -> None:
    data = bytearray(file_of(blobs_of_two_parts()))
    (length,) = _LEN.unpack_from(data)
    start = _LEN.size + length
    index = [start, start + (len(data) - start) // 2, len(data) - 1][where]
    data[index] ^= 0x01
    with pytest.raises(ModelFileError, match="tensor checksum mismatch"):
        read_model_file(bytes(data))


def test_changed_tensors_with_a_resealed_header_are_refused_by_the_part_checksum() -> None:
    data = file_of(blobs_of_two_parts())
    table, payload = split(data)
    spec = table["p1/b"]
    begin, end = spec["data_offsets"]
    changed = bytearray(payload)
    changed[begin:end] = np.array([0.0, 2.0]).tobytes()

    def reseal(header: dict[str, Any]) -> None:
        header["tensors_sha256"] = hashlib.sha256(bytes(changed)).hexdigest()

    forged = with_header(join(table, bytes(changed)), reseal, reseal=True)
    with pytest.raises(ModelFileError, match="part 'p1' does not match its sha256"):
        read_model_file(forged)


def test_an_edited_header_is_refused() -> None:
    data = file_of(blobs_of_two_parts())

    def edit(header: dict[str, Any]) -> None:
        header["parts"]["p0"]["header"]["meta"]["partition"] = 5

    with pytest.raises(ModelFileError, match="header checksum mismatch"):
        read_model_file(with_header(data, edit, reseal=False))
    with pytest.raises(ModelFileError, match="part 'p0' does not match its sha256"):
        read_model_file(with_header(data, edit, reseal=True))


def test_edited_offsets_or_model_name_in_a_resealed_header_are_refused() -> None:
    data = file_of(blobs_of_two_parts())

    def offsets(header: dict[str, Any]) -> None:
        header["parts"]["p1"]["header"]["offsets"]["feedback"]["1"] = 18

    def shape(header: dict[str, Any]) -> None:
        header["parts"]["p1"]["header"]["arrays"][0]["shape"] = [1, 2]

    with pytest.raises(ModelFileError, match="part 'p1' does not match"):
        read_model_file(with_header(data, offsets, reseal=True))
    with pytest.raises(ModelFileError, match="header says"):
        read_model_file(with_header(data, shape, reseal=True))


def test_an_edited_safetensors_table_is_refused() -> None:
    data = file_of(blobs_of_two_parts())
    table, payload = split(data)
    table["p0/ids"]["dtype"] = "U8"
    table["p0/ids"]["shape"] = [16]
    with pytest.raises(ModelFileError, match="header says <i4"):
        read_model_file(join(table, payload))


def test_an_extra_tensor_is_refused() -> None:
    parts = {p: decode_params(b) for p, b in blobs_of_two_parts().items()}
    data = encode_model_file("m", 1, parts)
    table, _ = split(data)
    tensors = load_tensors(data) | {"p1/smuggled": np.zeros(2)}
    forged = save_tensors(tensors, metadata=table["__metadata__"])
    _, payload = split(forged)

    def reseal(header: dict[str, Any]) -> None:
        header["tensors_sha256"] = hashlib.sha256(payload).hexdigest()

    with pytest.raises(ModelFileError, match="belong to no part"):
        read_model_file(with_header(forged, reseal, reseal=True))


@pytest.mark.parametrize("keep", [0, 5, 8, 40, "header", "half", -1])
def test_a_truncated_file_is_refused(keep: int | str) -> None:
    data = file_of(blobs_of_two_parts())
    (length,) = _LEN.unpack_from(data)
    named = {"header": _LEN.size + length, "half": len(data) // 2}
    cut = named[keep] if isinstance(keep, str) else keep
    with pytest.raises(ModelFileError):
        read_model_file(data[:cut])


def test_files_of_another_format_are_refused() -> None:
    with pytest.raises(ModelFileError, match="not a streamrec model file"):
        read_model_file(save_tensors({"x": np.zeros(3)}))
    with pytest.raises(ModelFileError, match="not a streamrec model file"):
        read_model_file(save_tensors({"x": np.zeros(3)}, metadata={"format": "pt"}))
    with pytest.raises(ModelFileError):
        read_model_file(b"SRPARAM1" + bytes(64))
    with pytest.raises(ModelFileError, match="header is not JSON"):
        read_model_file(_LEN.pack(4) + b"\xff\xfe{}")
    with pytest.raises(ModelFileError):
        read_model_file(encode_params("m", 0, {"x": np.zeros(2)}))


def test_a_newer_format_version_is_refused() -> None:
    data = file_of(blobs_of_two_parts())

    def newer(header: dict[str, Any]) -> None:
        header["format_version"] = FORMAT_VERSION + 1

    with pytest.raises(ModelFileError, match="unsupported model file version"):
        read_model_file(with_header(data, newer, reseal=True))


def test_a_resealed_header_missing_fields_is_a_clear_error() -> None:
    data = file_of(blobs_of_two_parts())

    def drop(header: dict[str, Any]) -> None:
        del header["parts"]["p0"]["header"]["meta"]

    with pytest.raises(ModelFileError, match="malformed model file header"):
        read_model_file(with_header(data, drop, reseal=True))


def test_nothing_to_export_is_an_error() -> None:
    with pytest.raises(ModelFileError, match="no parts"):
        encode_model_file("m", 1, {})
