"""Contracts: validation limits, schema files in sync, parameter blobs that check themselves."""

from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest

from contracts.events import (
    MAX_MESSAGE_BYTES,
    Click,
    EventError,
    Impression,
    SlateItem,
    check_clock,
    decode_click,
    decode_feedback,
    decode_impression,
    decode_json,
    encode,
    split_batch,
)
from contracts.jsonschema import check_schemas, render
from contracts.keys import KeySpace
from contracts.params import ParamError, decode_params, encode_params

TS = 1.7e9


def impression(**overrides) -> dict:
    return {
        "request_id": "r1",
        "user_id": "u1",
        "ts": TS,
        "policy": "linucb",
        "slate": [{"item_id": "i1", "position": 0, "propensity": 0.5}],
    } | overrides


def reason(decode, payload) -> str:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    with pytest.raises(EventError) as error:
        decode(raw)
    return error.value.reason


def test_round_trip_fills_defaults():
    event = decode_impression(json.dumps(impression()).encode())
    assert event.schema_version == 1 and event.context == [] and event.slate[0].team is None
    assert decode_impression(encode(event)) == event


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (impression(request_id=""), "length >= 1"),
        (impression(user_id="u" * 129), "length <= 128"),
        (impression(slate=[]), "length >= 1"),
        (
            impression(
                slate=[
                    {"item_id": f"i{k}", "position": k % 100, "propensity": 0.1} for k in range(101)
                ]
            ),
            "length <= 100",
        ),
        (impression(context=[0.0] * 1025), "length <= 1024"),
        (impression(context=[1e300]), "<= 1000000000"),
        (impression(ts=1e3), ">= 946684800"),
        (impression(policy="Bad Policy"), "matching regex"),
        (impression(schema_version=2), "Invalid enum value 2"),
        (impression(extra=1), "unknown field"),
        (impression(slate=[{"item_id": "i1", "position": 0, "propensity": 0.0}]), "> 0.0"),
        (
            impression(
                slate=[
                    {"item_id": "i1", "position": 0, "propensity": 0.5},
                    {"item_id": "i1", "position": 1, "propensity": 0.5},
                ]
            ),
            "duplicate item_id",
        ),
    ],
)
def test_invalid_impressions_are_rejected_with_a_reason(payload, expected):
    assert expected.lower() in reason(decode_impression, payload).lower()


def test_oversize_and_malformed_messages():
    big = b'{"event_id": "' + b"x" * MAX_MESSAGE_BYTES + b'"}'
    assert reason(decode_click, big).startswith("too large")
    assert reason(decode_click, b'{"event_id": "c"').startswith("malformed")
    assert reason(decode_feedback, b"[]").startswith("invalid")


def test_future_timestamps_are_refused_relative_to_now():
    check_clock(TS + 10, now=TS)
    with pytest.raises(EventError, match="in the future"):
        check_clock(TS + 7200, now=TS)


def test_split_batch_keeps_each_element_raw():
    body = json.dumps([{"a": 1}, {"b": [2]}]).encode()
    assert [json.loads(raw) for raw in split_batch(body)] == [{"a": 1}, {"b": [2]}]
    assert split_batch(b'{"a": 1}') == [b'{"a": 1}']
    with pytest.raises(EventError):
        split_batch(b'[{"a": 1}')


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b"[" + b"[" * 100_000 + b"]" * 100_000 + b"]",
        b'[{"a": ' * 100_000,
        b'[{"event_id": "c1"}, ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"]",
    ],
    ids=["open-arrays", "closed-arrays", "open-objects", "closed-objects-in-second-event"],
)
def test_split_batch_refuses_deep_nesting_as_malformed(body):
    """msgspec recurses per level: before, these raised RecursionError (a 500 in the gateway)."""
    with pytest.raises(EventError, match="^malformed: JSON nested too deeply$"):
        split_batch(body)


def test_decode_json_turns_every_decoding_failure_into_an_event_error():
    typed, untyped = msgspec.json.Decoder(list[int]), msgspec.json.Decoder()
    assert decode_json(typed, b"[1, 2]") == [1, 2]
    for decoder, raw, prefix in [
        (untyped, b"[" * 100_000, "malformed: JSON nested too deeply"),
        (untyped, b'{"a": ' * 100_000, "malformed: JSON nested too deeply"),
        (untyped, b"[" * 100_000 + b"]" * 100_000, "malformed: JSON nested too deeply"),
        (typed, b"[1,", "malformed"),
        (typed, b'["a"]', "invalid"),
        (untyped, b'["\xff"]', "malformed"),
    ]:
        with pytest.raises(EventError) as error:
            decode_json(decoder, raw)
        assert error.value.reason.startswith(prefix), (raw[:20], error.value.reason)


def test_committed_schemas_match_the_code():
    assert check_schemas() == [], "run `make schemas` and commit contracts/schemas/"
    schema = json.loads(render("click"))
    assert schema["$defs"]["Click"]["properties"]["event_id"]["maxLength"] == 128


def test_param_blob_round_trip_and_checksum():
    arrays = {
        "gram": np.arange(8.0).reshape(2, 2, 2),
        "items": np.array([3, 9]),
        "w": np.ones(3, dtype=np.float32),
    }
    blob = encode_params("linucb", 4, arrays, offsets={"feedback": {2: 10}}, meta={"a": 1})
    params = decode_params(blob)
    assert params.offsets == {"feedback": {2: 10}} and params.meta == {"a": 1}
    for name, array in arrays.items():
        np.testing.assert_array_equal(params.arrays[name], array)
        assert params.arrays[name].dtype == array.dtype
    for position in (20, len(blob) // 2, len(blob) - 1):
        corrupt = bytearray(blob)
        corrupt[position] ^= 0x01
        with pytest.raises(ParamError):
            decode_params(bytes(corrupt))


def test_param_encoding_refuses_object_arrays():
    with pytest.raises(ParamError, match="dtype"):
        encode_params("m", 1, {"x": np.array(["a"], dtype=object)})


def test_keys_of_one_model_share_a_cluster_hash_tag():
    keys = KeySpace("sr")
    tagged = [
        keys.params_current("m"),
        keys.params_parts("m"),
        keys.params_manifest("m", 3),
        keys.params_blob("m", "p0", "x"),
    ]
    assert {key.split("{")[1].split("}")[0] for key in tagged} == {"m"}


def test_click_and_slate_item_are_plain_structs():
    click = Click(event_id="c", user_id="u", item_id="i", ts=TS)
    assert decode_click(encode(click)) == click
    item = SlateItem(item_id="i", position=0, propensity=1.0, team="explore")
    imp = Impression(request_id="r", user_id="u", ts=TS, policy="drn", slate=[item])
    assert decode_impression(encode(imp)).slate[0].team == "explore"


def test_invalid_utf8_inside_a_string_is_malformed_not_a_crash():
    raw = b'{"event_id": "\xff\xfe", "user_id": "u", "item_id": "i", "ts": 1.7e9}'
    assert reason(decode_click, raw).startswith("malformed")
