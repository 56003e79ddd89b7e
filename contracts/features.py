"""Named request features hashed into the learners' dense context (feature hashing).

Serving (``POST /v1/rank``) and the gateway (an impression posted with
``features``) both turn named sparse/categorical features into the dense
``context`` vector the bandits learn from with :func:`hash_features`, so what
serving scored and what the learners train on are the same numbers.

The hash, so that any language can reproduce it:

1. **tokens**: each feature ``name: value`` becomes weighted tokens:

   - a string: token ``name=value``, weight 1;
   - a boolean: token ``name=true`` or ``name=false``, weight 1;
   - a number (integer or float): token ``name``, weight the number;
   - a list of strings: token ``name=tag`` for each element, weight 1 each.

   Names match ``[A-Za-z0-9_.:-]{1,64}`` (no ``=``, so ``name=value`` is
   unambiguous). Tokens are UTF-8 encoded.
2. **hash**: ``h = BLAKE2b-512(SEED + token)``, the unkeyed 64-byte BLAKE2b
   digest (Python ``hashlib.blake2b``, OpenSSL/Node ``blake2b512``, Go
   ``blake2b.Sum512``) of the seed bytes :data:`SEED` (``b"streamrec-fh-v1\\x00"``,
   16 bytes) followed by the token.
3. **bucket and sign**: ``index = uint64_le(h[0:8]) mod dim``; ``sign = -1`` if
   ``h[8] & 1`` else ``+1`` (signed hashing: colliding tokens cancel in
   expectation instead of adding up).
4. **vector**: ``x = zeros(dim)``; ``x[index] += sign * weight`` for every token
   (a repeated list element adds twice).

A *collision* is a distinct token whose bucket another distinct token of the same
request already uses: ``collisions = distinct tokens - distinct buckets``.

Test vectors (``h`` of ``country=de`` starts ``59c8f5948972c737be``):

>>> token_hash("country=de")
(4019307127686678617, 1)
>>> hash_features({"country": "de"}, 16).vector.nonzero()[0].tolist()
[9]
>>> hashed = hash_features({"age": 2.5, "premium": True, "tags": ["a", "b"]}, 16)
>>> {int(i): float(hashed.vector[i]) for i in hashed.vector.nonzero()[0]}
{6: 1.0, 7: 1.0, 10: 1.0, 13: -2.5}
>>> hash_features({"device": "ios", "tags": ["b"]}, 16).collisions
1
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated

import msgspec
import numpy as np

from contracts.events import MAX_MESSAGE_BYTES, EventError, Impression, decode_json

#: Prepended to every token before hashing (version 1 of the scheme).
SEED = b"streamrec-fh-v1\x00"
MAX_NAMED_FEATURES = 128
MAX_TAGS = 64
#: Numeric feature values are bounded so that a hashed vector stays within
#: the bounds of :data:`contracts.events.Feature`.
MAX_NUMERIC = 1e6

FeatureName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
Tag = Annotated[str, msgspec.Meta(max_length=128)]
FeatureValue = (
    Tag
    | bool
    | Annotated[int, msgspec.Meta(ge=-int(MAX_NUMERIC), le=int(MAX_NUMERIC))]
    | Annotated[float, msgspec.Meta(ge=-MAX_NUMERIC, le=MAX_NUMERIC)]
    | Annotated[list[Tag], msgspec.Meta(max_length=MAX_TAGS)]
)
#: ``{name: str | int | float | bool | [str]}``, as requests and impressions carry them.
NamedFeatures = Annotated[
    dict[FeatureName, FeatureValue], msgspec.Meta(max_length=MAX_NAMED_FEATURES)
]


@dataclass(frozen=True, slots=True)
class HashedFeatures:
    """A hashed feature vector and what went into it."""

    vector: np.ndarray
    #: Distinct tokens hashed.
    tokens: int
    #: Distinct tokens that landed in a bucket another token already used.
    collisions: int


@lru_cache(maxsize=1 << 16)
def token_hash(token: str) -> tuple[int, int]:
    """``(uint64 of the digest's first 8 bytes, sign)`` of one token (see the module doc)."""
    digest = hashlib.blake2b(SEED + token.encode()).digest()
    return int.from_bytes(digest[:8], "little"), -1 if digest[8] & 1 else 1


def feature_tokens(features: Mapping[str, object]) -> Iterator[tuple[str, float]]:
    """The weighted tokens of named features; raises ``ValueError`` for a value of another type."""
    for name, value in features.items():
        if isinstance(value, bool):
            yield f"{name}={'true' if value else 'false'}", 1.0
        elif isinstance(value, str):
            yield f"{name}={value}", 1.0
        elif isinstance(value, int | float):
            weight = float(value)
            if not math.isfinite(weight):
                raise ValueError(f"feature {name!r} is not finite")
            yield name, weight
        elif isinstance(value, Sequence) and all(isinstance(tag, str) for tag in value):
            for tag in value:
                yield f"{name}={tag}", 1.0
        else:
            raise ValueError(f"feature {name!r} must be a string, number, boolean or string list")


def hash_features(features: Mapping[str, object], dim: int) -> HashedFeatures:
    """Hash named features into a ``dim``-vector (the scheme in the module doc)."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    vector = np.zeros(dim)
    buckets: dict[str, int] = {}
    for token, weight in feature_tokens(features):
        value, sign = token_hash(token)
        index = value % dim
        buckets[token] = index
        vector[index] += sign * weight
    return HashedFeatures(vector, len(buckets), len(buckets) - len(set(buckets.values())))


class FeaturedImpression(Impression, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An impression as a client may post it to the gateway: with named ``features``
    instead of a dense ``context`` (:func:`resolve_impression` hashes them)."""

    features: NamedFeatures | None = None


_featured = msgspec.json.Decoder(FeaturedImpression)
_IMPRESSION_FIELDS = Impression.__struct_fields__


def resolve_impression(
    event: FeaturedImpression, dim: int
) -> tuple[Impression, HashedFeatures | None]:
    """The plain :class:`Impression` of a posted one, ``features`` hashed into its context.

    Raises :class:`EventError` when both ``context`` and ``features`` are given.
    """
    fields = {name: getattr(event, name) for name in _IMPRESSION_FIELDS}
    if event.features is None:
        return Impression(**fields), None
    if event.context:
        raise EventError("invalid: context and features are mutually exclusive")
    hashed = hash_features(event.features, dim)
    fields["context"] = hashed.vector.tolist()
    return Impression(**fields), hashed


def decode_featured_impression(raw: bytes) -> FeaturedImpression:
    """Decode and validate a posted impression that may carry ``features``."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise EventError(f"too large: {len(raw)} bytes > {MAX_MESSAGE_BYTES}")
    return decode_json(_featured, raw)
