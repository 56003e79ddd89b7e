"""Every shape that crosses a process boundary in streamrec.

Events (:mod:`contracts.events`), topic definitions (:mod:`contracts.topics`), the
Redis key layout (:mod:`contracts.keys`) and the parameter encoding
(:mod:`contracts.params`) live here so that producers, services and readers agree
by construction.
"""

from __future__ import annotations

from contracts.events import (
    SCHEMA_VERSION,
    Click,
    EventError,
    Feedback,
    Impression,
    SlateItem,
    decode_click,
    decode_feedback,
    decode_impression,
    encode,
)
from contracts.keys import KeySpace
from contracts.params import ParamError, ParamSet, decode_params, encode_params
from contracts.topics import TOPICS, TopicSpec

__all__ = [
    "SCHEMA_VERSION",
    "TOPICS",
    "Click",
    "EventError",
    "Feedback",
    "Impression",
    "KeySpace",
    "ParamError",
    "ParamSet",
    "SlateItem",
    "TopicSpec",
    "decode_click",
    "decode_feedback",
    "decode_impression",
    "decode_params",
    "encode",
    "encode_params",
]
