"""Feature hashing (contracts.features): the documented scheme, collisions, signs, impressions."""

from __future__ import annotations

import hashlib

import msgspec
import numpy as np
import pytest

from contracts.events import EventError, Impression, SlateItem, decode_impression, encode
from contracts.features import (
    SEED,
    FeaturedImpression,
    NamedFeatures,
    decode_featured_impression,
    feature_tokens,
    hash_features,
    resolve_impression,
    token_hash,
)

TS = 1.7e9


def reference(token: str, dim: int) -> tuple[int, int]:
    """The scheme as docs/decisions.md writes it, independently of the module's code."""
    message = b"streamrec-fh-v1\x00" + token.encode("utf-8")
    digest = hashlib.blake2b(message, digest_size=64).digest()
    return int.from_bytes(digest[:8], "little") % dim, (-1 if digest[8] & 1 else 1)


def test_the_documented_test_vectors():
    assert SEED == b"streamrec-fh-v1\x00"
    assert hashlib.blake2b(SEED + b"country=de").hexdigest().startswith("59c8f5948972c737be")
    assert token_hash("country=de") == (4019307127686678617, 1)
    vector = hash_features({"age": 2.5, "premium": True, "tags": ["a", "b"]}, 16).vector
    assert {int(i): float(vector[i]) for i in vector.nonzero()[0]} == {
        6: 1.0,
        7: 1.0,
        10: 1.0,
        13: -2.5,
    }


def test_tokens_combine_names_and_values_as_documented():
    features = {"country": "de", "premium": False, "age": 3, "score": -0.5, "t": ["x", "y"]}
    tokens = list(feature_tokens(features))
    assert tokens == [
        ("country=de", 1.0),
        ("premium=false", 1.0),
        ("age", 3.0),
        ("score", -0.5),
        ("t=x", 1.0),
        ("t=y", 1.0),
    ]


@pytest.mark.parametrize("dim", [1, 7, 9, 64, 1000])
def test_every_token_lands_where_the_reference_puts_it_with_its_sign(dim):
    rng = np.random.default_rng(dim)
    for n in range(50):
        name = f"f{rng.integers(1000)}"
        value = f"v{n}"
        index, sign = reference(f"{name}={value}", dim)
        expected = np.zeros(dim)
        expected[index] = sign
        np.testing.assert_array_equal(hash_features({name: value}, dim).vector, expected)
        index, sign = reference(name, dim)
        assert hash_features({name: 4.0}, dim).vector[index] == sign * 4.0


def test_hashing_is_deterministic_and_order_independent():
    features = {"a": "x", "b": 2, "c": ["p", "q", "r"], "d": True}
    first = hash_features(features, 32)
    reordered = hash_features(dict(reversed(list(features.items()))), 32)
    np.testing.assert_array_equal(first.vector, reordered.vector)
    assert (first.tokens, first.collisions) == (reordered.tokens, reordered.collisions)
    token_hash.cache_clear()
    np.testing.assert_array_equal(hash_features(features, 32).vector, first.vector)


def test_signs_are_both_signs_and_roughly_balanced():
    signs = [token_hash(f"user_tag=t{n}")[1] for n in range(2000)]
    assert set(signs) == {-1, 1}
    assert 0.45 < signs.count(1) / len(signs) < 0.55


def test_signed_hashing_lets_colliding_tokens_cancel():
    # In one bucket, two tokens of opposite signs cancel, of the same sign add up.
    tokens = [f"k=v{n}" for n in range(200)]
    opposite = next(
        (a, b)
        for a in tokens
        for b in tokens
        if reference(a, 1)[1] == 1 and reference(b, 1)[1] == -1
    )
    vector = hash_features({"k": [opposite[0].split("=")[1], opposite[1].split("=")[1]]}, 1)
    assert vector.vector.tolist() == [0.0]


def test_collisions_count_distinct_tokens_sharing_a_bucket():
    # dim 1: every distinct token after the first collides.
    hashed = hash_features({"a": "x", "b": "y", "c": ["p", "q", "p"]}, 1)
    assert hashed.tokens == 4
    assert hashed.collisions == 3
    # A repeated list element is one token (no collision with itself) that adds twice.
    hashed = hash_features({"c": ["p", "p"]}, 1_000_000)
    assert (hashed.tokens, hashed.collisions) == (1, 0)
    assert np.abs(hashed.vector).sum() == 2.0
    # Found by search: two tokens in one of 16 buckets.
    assert hash_features({"device": "ios", "tags": ["b"]}, 16).collisions == 1


def test_booleans_are_categories_not_numbers():
    as_bool = hash_features({"premium": True}, 1024).vector
    as_number = hash_features({"premium": 1}, 1024).vector
    assert not np.array_equal(as_bool, as_number)


def test_bad_values_and_dims_are_refused():
    with pytest.raises(ValueError, match="finite"):
        hash_features({"x": float("nan")}, 4)
    with pytest.raises(ValueError, match="string list"):
        hash_features({"x": [1, 2]}, 4)
    with pytest.raises(ValueError, match="dim"):
        hash_features({"x": "y"}, 0)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"a=b": "c"}', "matching regex"),
        (b'{"": 1}', "matching regex"),
        (b'{"a": 1e300}', "<= 1000000.0"),
        (b'{"a": {"nested": 1}}', "Expected"),
        (b'{"a": [1, 2]}', "Expected `str`"),
        (b'{"a": null}', "Expected"),
    ],
)
def test_named_features_are_typed_and_bounded(raw, reason):
    with pytest.raises(msgspec.ValidationError, match=reason):
        msgspec.json.decode(raw, type=NamedFeatures)


def impression(**fields) -> dict:
    return {
        "request_id": "r1",
        "user_id": "u1",
        "ts": TS,
        "policy": "linucb",
        "slate": [{"item_id": "i1", "position": 0, "propensity": 0.5}],
    } | fields


def test_a_posted_impression_with_features_becomes_one_with_the_hashed_context():
    features = {"country": "de", "tags": ["a", "b"], "age": 30}
    posted = decode_featured_impression(msgspec.json.encode(impression(features=features)))
    resolved, hashed = resolve_impression(posted, 9)
    assert type(resolved) is Impression
    assert resolved.context == hash_features(features, 9).vector.tolist()
    assert hashed is not None and hashed.tokens == 4
    # What the gateway produces decodes as a plain impression, features gone.
    assert decode_impression(encode(resolved)) == resolved


def test_a_posted_impression_without_features_is_unchanged():
    raw = msgspec.json.encode(impression(context=[1.0, 2.0]))
    resolved, hashed = resolve_impression(decode_featured_impression(raw), 9)
    assert hashed is None
    assert resolved == decode_impression(raw)


def test_context_and_features_together_are_refused():
    posted = decode_featured_impression(
        msgspec.json.encode(impression(context=[1.0], features={"a": "b"}))
    )
    with pytest.raises(EventError, match="mutually exclusive"):
        resolve_impression(posted, 9)
    assert isinstance(posted, FeaturedImpression)


def test_old_impressions_decode_with_the_new_fields_defaulted():
    old = impression()
    decoded = decode_impression(msgspec.json.encode(old))
    assert decoded.candidate_source == "retrieved"
    assert decoded.candidates == [] and decoded.excluded == []
    new = Impression(
        request_id="r2",
        user_id="u",
        ts=TS,
        policy="random",
        slate=[SlateItem(item_id="i1", position=0, propensity=1.0)],
        candidate_source="client",
        candidates=["i1", "i2"],
        excluded=["i3"],
    )
    assert decode_impression(encode(new)) == new
    with pytest.raises(EventError, match="candidate_source"):
        decode_impression(msgspec.json.encode(impression(candidate_source="elsewhere")))
