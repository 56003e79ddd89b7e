"""Window features and the sequence encoding, on hand-made sequences (no I/O)."""

from __future__ import annotations

import math
import random

import pytest

from services.sequences.reader import DEFAULT_WINDOWS_S, window_features
from services.sequences.store import item_of, member, score_of, ts_of

NOW = 1_700_000_000.0
H = 3_600.0


def test_empty_sequence_has_zero_counts_and_no_recency():
    f = window_features([], NOW)
    assert f.windows_s == DEFAULT_WINDOWS_S
    assert f.counts == (0, 0, 0)
    assert f.recency_s is None
    assert (f.length, f.total) == (0, 0)


def test_counts_per_window_and_recency_from_the_latest_click():
    times = [NOW - 30 * H, NOW - 20 * H, NOW - 5 * H, NOW - 2 * H, NOW - 0.5 * H, NOW - 10]
    f = window_features(times, NOW)
    assert f.counts == (2, 4, 5)
    assert f.recency_s == pytest.approx(10.0)
    assert f.length == f.total == 6


def test_window_boundaries_are_inclusive_and_the_future_is_not_seen():
    times = [NOW - H, NOW - 6 * H, NOW - 24 * H, NOW, NOW + 1, NOW + 5 * H]
    f = window_features(times, NOW)
    assert f.counts == (2, 3, 4)
    assert f.recency_s == 0.0
    # The same clicks seen from an hour earlier: a point-in-time view.
    earlier = window_features(times, NOW - H)
    assert earlier.counts == (1, 2, 3)
    assert earlier.recency_s == pytest.approx(0.0)


def test_order_of_the_input_does_not_matter():
    rng = random.Random(3)
    times = [NOW - rng.uniform(0, 30 * H) for _ in range(50)]
    shuffled = times[:]
    rng.shuffle(shuffled)
    assert window_features(times, NOW) == window_features(shuffled, NOW)


def test_clicks_older_than_every_window_still_give_recency():
    f = window_features([NOW - 3 * 86_400.0, NOW - 2 * 86_400.0], NOW)
    assert f.counts == (0, 0, 0)
    assert f.recency_s == pytest.approx(2 * 86_400.0)


def test_only_future_clicks_mean_no_recency():
    f = window_features([NOW + 10, NOW + 20], NOW)
    assert f.counts == (0, 0, 0)
    assert f.recency_s is None
    assert f.length == 2


def test_custom_windows_and_stored_length_and_total():
    f = window_features([NOW - 50, NOW - 200], NOW, windows_s=(60, 300), length=7, total=40)
    assert f.windows_s == (60.0, 300.0)
    assert f.counts == (1, 2)
    assert (f.length, f.total) == (7, 40)


def test_matches_brute_force_on_random_sequences():
    rng = random.Random(11)
    windows = (90.0, 1_000.0, 7_200.0, 86_400.0)
    for _ in range(200):
        times = [NOW - rng.uniform(-500, 100_000) for _ in range(rng.randrange(0, 60))]
        now = NOW - rng.uniform(0, 2_000)
        f = window_features(times, now, windows_s=windows)
        expected = tuple(sum(1 for t in times if now - w <= t <= now) for w in windows)
        assert f.counts == expected
        past = [t for t in times if t <= now]
        assert f.recency_s == (now - max(past) if past else None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"now": math.nan}, "now must be finite"),
        ({"now": math.inf}, "now must be finite"),
        ({"windows_s": ()}, "windows_s must be non-empty positive seconds"),
        ({"windows_s": (60, 0)}, "windows_s must be non-empty positive seconds"),
        ({"windows_s": (60, math.nan)}, "windows_s must be non-empty positive seconds"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    args = {"now": NOW} | kwargs
    with pytest.raises(ValueError, match=message):
        window_features([NOW - 1], **args)


def test_non_finite_timestamps_are_refused():
    with pytest.raises(ValueError, match="NaN or infinite"):
        window_features([NOW - 1, math.nan], NOW)
    with pytest.raises(ValueError, match="NaN or infinite"):
        window_features([math.inf], NOW)


@pytest.mark.parametrize(
    ("item_id", "event_id"),
    [("i1", "e1"), ("12:ab", "3:x"), ("ü/ñ:{}", "é"), ("x" * 128, "y" * 128), (":", ":")],
)
def test_members_decode_to_their_item_for_any_ids(item_id, event_id):
    encoded = member(item_id, event_id)
    assert item_of(encoded) == item_id
    assert item_of(encoded.encode()) == item_id
    assert member(item_id, event_id) != member(item_id, event_id + "z")


def test_scores_keep_event_times_to_the_microsecond():
    rng = random.Random(5)
    for _ in range(1_000):
        ts = rng.uniform(946_684_800.0, 4_102_444_800.0)
        score = score_of(ts)
        assert isinstance(score, int)
        assert abs(ts_of(score) - ts) <= 1e-6
    assert score_of(1_700_000_000.000001) - score_of(1_700_000_000.0) == 1
