"""Item ids on the wire are strings; learners index arms by int64 labels.

:func:`item_label` is the one mapping, used by serving, the learners' services
and evaluation, so an arm means the same item everywhere.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import numpy as np

# Ids that are not of the form "i<n>" are hashed into [2**62, 2**63), so they can
# never collide with the small non-negative label of an "i<n>" id.
_HASHED_LABEL_BASE = 1 << 62


@functools.lru_cache(maxsize=1 << 18)
def item_label(item_id: str) -> int:
    """The int64 arm label of an item id, stable across processes (memoised: serving
    labels every candidate of every request).

    Ids ``"i<n>"`` map to ``n``; any other id maps to a 62-bit blake2b hash
    offset by ``2**62``.

    >>> item_label("i42")
    42
    >>> item_label("sku-9") >= 2**62
    True
    """
    digits = item_id[1:]
    if item_id.startswith("i") and digits.isdigit() and digits.isascii() and len(digits) < 18:
        return int(digits)
    digest = hashlib.blake2b(item_id.encode(), digest_size=8).digest()
    return _HASHED_LABEL_BASE | (int.from_bytes(digest, "little") & (_HASHED_LABEL_BASE - 1))


def item_labels(item_ids: Sequence[str]) -> np.ndarray:
    """:func:`item_label` of each id, as an int64 array."""
    return np.fromiter((item_label(i) for i in item_ids), dtype=np.int64, count=len(item_ids))
