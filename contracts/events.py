"""Event types on the wire: Impression, Click, Reward and Feedback.

Events are JSON objects validated on decode. Decoding never raises anything but
:class:`EventError`, whose ``reason`` is what a dead-letter record or an HTTP 400
carries.

>>> raw = b'{"event_id": "c1", "user_id": "u1", "item_id": "i9", "ts": 1.7e9}'
>>> decode_click(raw).item_id
'i9'
>>> decode_click(b'{"event_id": "", "user_id": "u1", "item_id": "i9", "ts": 1.7e9}')
Traceback (most recent call last):
...
contracts.events.EventError: invalid: Expected `str` of length >= 1 - at `$.event_id`
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar, cast

import msgspec

from contracts.errors import StreamrecError

SCHEMA_VERSION: Literal[1] = 1
#: An impression may log up to MAX_CANDIDATES scored and MAX_EXCLUDED excluded ids
#: of up to 128 characters each, so messages may be this large.
MAX_MESSAGE_BYTES = 512 * 1024
MAX_SLATE = 100
#: The most candidates one request may score (and one impression log).
MAX_CANDIDATES = 1000
#: The most ids one request may exclude (and one impression log).
MAX_EXCLUDED = 1000
MAX_FEATURES = 1024
#: Events may arrive late, but not from further in the future than this.
MAX_FUTURE_SKEW_S = 3600.0

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
PolicyName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
#: Event time in seconds since the Unix epoch, between 2000-01-01 and 2100-01-01.
Timestamp = Annotated[float, msgspec.Meta(ge=946_684_800.0, le=4_102_444_800.0)]
#: A finite feature value; the bounds reject inf and NaN.
Feature = Annotated[float, msgspec.Meta(ge=-1e9, le=1e9)]
Features = Annotated[list[Feature], msgspec.Meta(max_length=MAX_FEATURES)]
Position = Annotated[int, msgspec.Meta(ge=0, lt=MAX_SLATE)]
Propensity = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Version = Annotated[int, msgspec.Meta(ge=0)]
#: Which ranker placed an item in an interleaved slate (DRN's exploit W or explore W~).
Team = Literal["exploit", "explore"]
#: What kind of signal a reward is (``click``, ``purchase``, ``dwell`` ...).
RewardKind = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
#: A reward, graded: 0 (nothing) to 1 (the best outcome).
RewardValue = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
#: The most reward kinds one feedback reports.
MAX_REWARD_KINDS = 32
#: The signals combined into one reward: kind -> value.
Signals = Annotated[dict[RewardKind, RewardValue], msgspec.Meta(max_length=MAX_REWARD_KINDS)]
#: Where a slate's candidates came from: serving's retrieval or the client's request.
CandidateSource = Literal["retrieved", "client"]


class EventError(StreamrecError, ValueError):
    """An event that cannot be accepted; ``reason`` says why in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SlateItem(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One item of a served slate."""

    item_id: Id
    position: Position
    #: Probability that the serving policy showed this item in this slate.
    propensity: Propensity
    team: Team | None = None
    #: Optional item features the policy scored with (e.g. for hybrid LinUCB).
    features: Features = []


class Impression(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One served slate. Its id is ``request_id``."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: Id
    user_id: Id
    ts: Timestamp
    policy: PolicyName
    model_version: Version = 0
    slate: Annotated[list[SlateItem], msgspec.Meta(min_length=1, max_length=MAX_SLATE)]
    #: Request/user context features the policy scored with.
    context: Features = []
    #: Where the scored candidates came from (older impressions: ``retrieved``).
    candidate_source: CandidateSource = "retrieved"
    #: The candidate set the policy scored, so offline evaluation can replay the
    #: decision (empty in impressions logged before it was recorded).
    candidates: Annotated[list[Id], msgspec.Meta(max_length=MAX_CANDIDATES)] = []
    #: Ids the request excluded from the candidates.
    excluded: Annotated[list[Id], msgspec.Meta(max_length=MAX_EXCLUDED)] = []

    def __post_init__(self) -> None:
        ids = {item.item_id for item in self.slate}
        if len(ids) != len(self.slate):
            raise ValueError("slate has duplicate item_id")
        if len({item.position for item in self.slate}) != len(self.slate):
            raise ValueError("slate has duplicate position")


class Click(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A user clicked an item, usually one shown in the impression ``request_id``."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: Id
    user_id: Id
    item_id: Id
    ts: Timestamp
    request_id: Id | None = None
    position: Position | None = None


class Reward(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A graded signal about an item shown in the impression ``request_id``.

    A purchase, a dwell time or a rating, scaled by the producer to ``value`` in
    [0, 1]. The joiner combines every signal on a shown item that arrives within
    the attribution window (clicks count as kind ``click``, value 1) by the
    configured rule into the item's feedback reward.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: Id
    user_id: Id
    request_id: Id
    item_id: Id
    kind: RewardKind
    value: RewardValue
    ts: Timestamp


class Feedback(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One (impression, shown item) with its reward, emitted when attribution closes.

    ``feedback_id`` is deterministic (:func:`feedback_id`), so a re-emitted
    feedback is recognisable as the same one.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    feedback_id: Annotated[str, msgspec.Meta(min_length=3, max_length=257)]
    request_id: Id
    user_id: Id
    item_id: Id
    #: Event time of the impression.
    ts: Timestamp
    #: The combined reward in [0, 1] (older feedback: 0 or 1, clicked or not).
    reward: RewardValue
    clicked_at: Timestamp | None = None
    position: Position
    propensity: Propensity
    policy: PolicyName
    model_version: Version = 0
    team: Team | None = None
    context: Features = []
    item_features: Features = []
    #: The signals combined into ``reward``: kind -> the largest value of that kind
    #: within the window (empty when none came, and in older feedback).
    signals: Signals = {}

    @property
    def clicked(self) -> bool:
        """Whether the item was clicked: a ``click`` signal, or in older feedback
        (without signals) reward 1."""
        return "click" in self.signals or (not self.signals and self.reward >= 1.0)


def feedback_id(request_id: str, item_id: str) -> str:
    """The deterministic id of the feedback for ``item_id`` shown in ``request_id``."""
    return f"{request_id}/{item_id}"


Event = Impression | Click | Reward | Feedback
E = TypeVar("E", Impression, Click, Reward, Feedback)
T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoders = {cls: msgspec.json.Decoder(cls) for cls in (Impression, Click, Reward, Feedback)}


def encode(event: Event) -> bytes:
    """Serialize an event to its JSON wire form."""
    return _encoder.encode(event)


def decode_json(decoder: msgspec.json.Decoder[T], raw: bytes) -> T:
    """Decode untrusted JSON with ``decoder``; raises only :class:`EventError`.

    Every decoder of request bodies and records goes through here, so that no
    input can escape as anything but a reasoned 400 or dead letter:
    ``invalid: …`` for JSON that does not fit the type, ``malformed: …`` for
    input that is not JSON at all, including invalid UTF-8 inside a string
    (msgspec raises :class:`UnicodeDecodeError` there) and nesting too deep to
    decode: msgspec recurses once per level and raises :class:`RecursionError`
    at the interpreter's limit, which ``[[[[…`` reaches in a few kilobytes.

    >>> decode_json(msgspec.json.Decoder(), b"[" * 100_000)
    Traceback (most recent call last):
    ...
    contracts.events.EventError: malformed: JSON nested too deeply
    """
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise EventError(f"invalid: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise EventError(f"malformed: {exc}") from None
    except RecursionError:
        raise EventError("malformed: JSON nested too deeply") from None


def _decode(cls: type[E], raw: bytes) -> E:
    if len(raw) > MAX_MESSAGE_BYTES:
        raise EventError(f"too large: {len(raw)} bytes > {MAX_MESSAGE_BYTES}")
    return cast(E, decode_json(_decoders[cls], raw))


def decode_impression(raw: bytes) -> Impression:
    """Decode and validate one Impression; raises :class:`EventError`."""
    return _decode(Impression, raw)


def decode_click(raw: bytes) -> Click:
    """Decode and validate one Click; raises :class:`EventError`."""
    return _decode(Click, raw)


def decode_reward(raw: bytes) -> Reward:
    """Decode and validate one Reward; raises :class:`EventError`."""
    return _decode(Reward, raw)


def decode_feedback(raw: bytes) -> Feedback:
    """Decode and validate one Feedback; raises :class:`EventError`."""
    return _decode(Feedback, raw)


DECODERS = {
    "impression": decode_impression,
    "click": decode_click,
    "reward": decode_reward,
    "feedback": decode_feedback,
}


def check_clock(ts: float, now: float, max_future_s: float = MAX_FUTURE_SKEW_S) -> None:
    """Reject an event time further than ``max_future_s`` ahead of ``now``."""
    if ts > now + max_future_s:
        raise EventError(f"invalid: ts {ts:.3f} is {ts - now:.0f} s in the future")


_raw_list = msgspec.json.Decoder(list[msgspec.Raw])


def split_batch(body: bytes) -> list[bytes]:
    """Split an HTTP body holding one event or a JSON array of events into raw events.

    Only the outer array is parsed here; each element is validated on its own so
    that a bad element is reported by its index.

    >>> split_batch(b'[{"a": 1}, {"b": 2}]')
    [b'{"a": 1}', b'{"b": 2}']
    """
    if not body.lstrip().startswith(b"["):
        return [body]
    return [bytes(raw) for raw in decode_json(_raw_list, body)]
