"""Control records: what services append to their own input topics besides events.

A control record carries the header ``streamrec-control`` and is validated like
an event: a consumer honours it only on a topic where it expects one, and only
if it decodes (a watermark of 1e300 would close every window for good).

>>> decode_watermark(encode_watermark(1.7e9)).watermark
1700000000.0
>>> decode_watermark(b'{"watermark": 1e300}')
Traceback (most recent call last):
...
contracts.events.EventError: invalid: Expected `float` <= 4102444800.0 - at `$.watermark`
"""

from __future__ import annotations

import msgspec

from contracts.events import EventError, Timestamp


class Watermark(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The joiner's idle marker: its topic is complete up to this event time."""

    watermark: Timestamp


_decoder = msgspec.json.Decoder(Watermark)
_encoder = msgspec.json.Encoder()


def encode_watermark(event_time: float) -> bytes:
    return _encoder.encode(Watermark(watermark=event_time))


def decode_watermark(raw: bytes) -> Watermark:
    """Decode and validate a watermark control record; raises :class:`EventError`."""
    try:
        return _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise EventError(f"invalid: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise EventError(f"malformed: {exc}") from None
