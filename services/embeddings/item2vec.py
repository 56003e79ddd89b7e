"""Item2Vec: skip-gram with negative sampling over click sequences, learned incrementally.

Items clicked near each other in a user's sequence get similar vectors (Barkan &
Koenigstein, 2016, after word2vec). Training is streaming: every call to
:meth:`Item2Vec.learn_sequences` takes one batch of sequences, grows the
vocabulary for item ids it has not seen (new rows; learned rows are kept), adds
the batch's clicks to the item counts and takes SGD steps on the batch's
(center, context) pairs. Negatives are drawn from the unigram distribution of
the counts seen so far, raised to 0.75.

The gradients of the SGNS loss are written out in closed form and applied with
``index_add_`` to the touched rows only, so a step costs O(pairs · dim)
whatever the vocabulary size, and the tables can be reallocated when they grow
without any optimizer state to carry over.

Item ids come from whoever sends clicks, so ``max_items`` bounds the vocabulary:
when a batch leaves more than ``max_items`` items, the least recently seen are
forgotten (an item is seen when it appears in a sequence), rows and counts
alike, down to ``max_items - max_items // 16``; the slack makes a steady trickle
of new items pay for one compaction of the tables per sixteenth of the cap, not
one per batch. A forgotten item that comes back starts from a fresh row.
:meth:`Item2Vec.drain_evicted` names the forgotten ids, so that whatever else is
kept per item (popularity, the published index) can forget them too.

>>> import torch; torch.set_num_threads(1)
>>> model = Item2Vec(dim=8, window=2, seed=0)
>>> loss = model.learn_sequences([["a", "b", "c"], ["b", "c", "d"]])
>>> round(loss, 2) > 0, len(model)
(True, 4)
>>> ids, vectors = model.vectors(normalize=True)
>>> ids, vectors.shape, vectors.dtype
(['a', 'b', 'c', 'd'], (4, 8), dtype('float32'))
>>> vectors, known = model.vector(["b", "zzz"])
>>> known.tolist(), float(abs(vectors[1]).sum())
([True, False], 0.0)
>>> clone = Item2Vec.from_state(model.state())
>>> bool((clone.vectors()[1] == model.vectors()[1]).all())
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

#: Exponent applied to item counts for the negative-sampling distribution (word2vec's 3/4).
UNIGRAM_POWER = 0.75

_INT_HYPERPARAMETERS = ("dim", "window", "negatives", "batch_size")
_STATE_ARRAYS = ("in_vectors", "out_vectors", "counts", "item_id_bytes", "item_id_offsets")
#: Optional in a state (older states lack it): the clock tick each item was last seen at.
_LAST_SEEN = "last_seen"
#: Over ``max_items``, the vocabulary is cut to ``max_items - max_items // _EVICTION_DIVISOR``.
_EVICTION_DIVISOR = 16


class Item2Vec:
    """Item embeddings learned online from click sequences with skip-gram negative sampling.

    Args:
        dim: embedding dimension.
        window: how many positions either side of a click count as its context.
        negatives: negative samples per (center, context) pair.
        lr: SGD step size. It stays constant: a stream has no last epoch to anneal towards.
        batch_size: (center, context) pairs per SGD step; a batch of sequences is cut
            into shuffled steps of this size so that a popular item's accumulated
            update within one step stays bounded.
        seed: seeds the generator for row initialisation, shuffling and negatives.
        max_items: most items kept after each batch (the least recently seen are
            forgotten, see the module doc); None keeps every item. A setting, not
            part of the state.
    """

    def __init__(
        self,
        *,
        dim: int = 32,
        window: int = 5,
        negatives: int = 5,
        lr: float = 0.025,
        batch_size: int = 1024,
        seed: int | None = None,
        max_items: int | None = None,
    ) -> None:
        for name, value in (("dim", dim), ("window", window), ("batch_size", batch_size)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if int(negatives) != negatives or negatives < 0:
            raise ValueError(f"negatives must be a non-negative integer, got {negatives!r}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if max_items is not None and (int(max_items) != max_items or max_items < 1):
            raise ValueError(f"max_items must be a positive integer or None, got {max_items!r}")
        self.max_items = None if max_items is None else int(max_items)
        self.dim = int(dim)
        self.window = int(window)
        self.negatives = int(negatives)
        self.lr = float(lr)
        self.batch_size = int(batch_size)
        self._rng = np.random.default_rng(seed)
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        # Tables are allocated with spare capacity and doubled when full; rows past
        # len(self) are unused.
        self._in = torch.zeros((0, self.dim), dtype=torch.float32)
        self._out = torch.zeros((0, self.dim), dtype=torch.float32)
        self._counts = np.zeros(0, dtype=np.int64)
        # Clock tick (items seen so far) at each row's last sighting; orders eviction.
        self._last_seen = np.zeros(0, dtype=np.int64)
        self._clock = 0
        self._evicted: list[str] = []

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def item_ids(self) -> list[str]:
        """Known item ids, in row order (the order in which they were first seen)."""
        return list(self._ids)

    def learn_sequences(self, sequences: Sequence[Sequence[str]]) -> float:
        """Learn from one batch of click sequences; returns the mean SGNS loss per pair.

        An item is never paired with itself (repeat clicks within ``window``).
        Returns ``nan`` when the batch holds no pair (all sequences shorter than
        two clicks). With ``max_items``, items are forgotten after the batch is
        learned (the batch's items are the most recent, so they go last).
        """
        if isinstance(sequences, str):
            raise ValueError("sequences must be a list of lists of item ids, got a str")
        for sequence in sequences:
            if isinstance(sequence, str):
                raise ValueError("each sequence must be a list of item ids, got a str")
        encoded = [self._encode_growing(sequence) for sequence in sequences]
        if encoded:
            rows = np.concatenate(encoded)
            np.add.at(self._counts, rows, 1)
            ticks = np.arange(self._clock + 1, self._clock + len(rows) + 1, dtype=np.int64)
            np.maximum.at(self._last_seen, rows, ticks)
            self._clock += len(rows)
        loss = self._learn(encoded)
        self._trim()
        return loss

    def _trim(self) -> None:
        """Forget the least recently seen items if there are more than ``max_items``."""
        if self.max_items is not None and len(self) > self.max_items:
            keep = self.max_items - self.max_items // _EVICTION_DIVISOR
            self._evict(len(self) - keep)

    def drain_evicted(self) -> list[str]:
        """Ids forgotten since the last call, oldest sighting first."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def _learn(self, encoded: list[np.ndarray]) -> float:
        centers, contexts = self._pairs(encoded)
        if len(centers) == 0:
            return float("nan")
        order = self._rng.permutation(len(centers))
        centers, contexts = centers[order], contexts[order]
        cumulative = np.cumsum(self._counts[: len(self)].astype(np.float64) ** UNIGRAM_POWER)
        total = 0.0
        for start in range(0, len(centers), self.batch_size):
            stop = start + self.batch_size
            total += self._step(centers[start:stop], contexts[start:stop], cumulative)
        return total / len(centers)

    def vectors(self, *, normalize: bool = False) -> tuple[list[str], np.ndarray]:
        """All item ids and their vectors, ``float32 (n, dim)``, optionally L2-normalised."""
        table = self._in[: len(self)].numpy().copy()
        return self.item_ids, _normalized(table) if normalize else table

    def vector(
        self, item_ids: Sequence[str], *, normalize: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Vectors for ``item_ids`` and a boolean mask of the known ones.

        Unknown ids get a zero row and ``False`` in the mask.
        """
        if isinstance(item_ids, str):
            raise ValueError("item_ids must be a list of item ids, got a str")
        rows = np.array([self._index.get(item, -1) for item in item_ids], dtype=np.int64)
        known = rows >= 0
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        if known.any():
            out[known] = self._in[torch.from_numpy(rows[known])].numpy()
        return (_normalized(out) if normalize else out), known

    def state(self) -> dict[str, np.ndarray]:
        """The whole learner as named numeric arrays (no object dtype, no pickle).

        Holds both tables, the counts, the item ids (UTF-8 bytes plus offsets),
        when each item was last seen, the hyperparameters and the generator
        state, so that :meth:`from_state` continues exactly where this learner
        stands (``max_items`` is a setting, given again to :meth:`from_state`).
        """
        encoded = [item.encode("utf-8") for item in self._ids]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(raw) for raw in encoded], dtype=np.int64)
        n = len(self)
        state = {
            "in_vectors": self._in[:n].numpy().copy(),
            "out_vectors": self._out[:n].numpy().copy(),
            "counts": self._counts[:n].copy(),
            _LAST_SEEN: self._last_seen[:n].copy(),
            "item_id_bytes": np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(),
            "item_id_offsets": offsets,
            "lr": np.array(self.lr, dtype=np.float64),
            "rng_state": _rng_words(self._rng),
        }
        for name in _INT_HYPERPARAMETERS:
            state[name] = np.array(getattr(self, name), dtype=np.int64)
        return state

    @classmethod
    def from_state(
        cls, state: Mapping[str, np.ndarray], *, max_items: int | None = None
    ) -> Item2Vec:
        """Rebuild a learner from :meth:`state`; raises ``ValueError`` on malformed state.

        A state without ``last_seen`` (written before it was kept) counts its rows'
        order, the order of first sightings, as the order of last ones. A state
        with more than ``max_items`` items is cut down at once
        (:meth:`drain_evicted` names what went).
        """
        missing = [
            k for k in (*_STATE_ARRAYS, *_INT_HYPERPARAMETERS, "lr", "rng_state") if k not in state
        ]
        if missing:
            raise ValueError(f"Item2Vec state is missing arrays: {missing}")
        ints = {name: int(np.asarray(state[name])) for name in _INT_HYPERPARAMETERS}
        model = cls(**ints, lr=float(np.asarray(state["lr"])), max_items=max_items)
        raw = np.asarray(state["item_id_bytes"], dtype=np.uint8).tobytes()
        offsets = np.asarray(state["item_id_offsets"], dtype=np.int64)
        n = len(offsets) - 1
        if n < 0 or offsets[0] != 0 or offsets[-1] != len(raw) or (np.diff(offsets) < 0).any():
            raise ValueError("item_id_offsets do not describe item_id_bytes")
        ids = [raw[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n)]
        if len(set(ids)) != n:
            raise ValueError("item ids in the state are not unique")
        for name in ("in_vectors", "out_vectors"):
            if np.shape(state[name]) != (n, model.dim):
                raise ValueError(
                    f"{name} has shape {np.shape(state[name])}, expected ({n}, {model.dim})"
                )
        if np.shape(state["counts"]) != (n,):
            raise ValueError(f"counts has shape {np.shape(state['counts'])}, expected ({n},)")
        if _LAST_SEEN in state:
            if np.shape(state[_LAST_SEEN]) != (n,):
                raise ValueError(
                    f"last_seen has shape {np.shape(state[_LAST_SEEN])}, expected ({n},)"
                )
            last_seen = np.array(state[_LAST_SEEN], dtype=np.int64)
        else:
            last_seen = np.arange(1, n + 1, dtype=np.int64)
        model._ids = ids
        model._index = {item: row for row, item in enumerate(ids)}
        model._in = torch.from_numpy(np.array(state["in_vectors"], dtype=np.float32))
        model._out = torch.from_numpy(np.array(state["out_vectors"], dtype=np.float32))
        model._counts = np.array(state["counts"], dtype=np.int64)
        model._last_seen = last_seen
        model._clock = int(last_seen.max()) if n else 0
        _set_rng_words(model._rng, np.asarray(state["rng_state"]))
        model._trim()
        return model

    def _encode_growing(self, sequence: Sequence[str]) -> np.ndarray:
        rows = np.empty(len(sequence), dtype=np.int64)
        for position, item in enumerate(sequence):
            row = self._index.get(item)
            if row is None:
                row = self._add(item)
            rows[position] = row
        return rows

    def _evict(self, count: int) -> None:
        """Forget the ``count`` least recently seen items, keeping the others' row order."""
        n = len(self)
        gone = np.argsort(self._last_seen[:n], kind="stable")[:count]
        kept = np.ones(n, dtype=bool)
        kept[gone] = False
        rows = torch.from_numpy(np.flatnonzero(kept))
        m = len(rows)
        self._evicted += [self._ids[row] for row in gone.tolist()]
        self._ids = [item for item, keep in zip(self._ids, kept.tolist(), strict=True) if keep]
        self._index = {item: row for row, item in enumerate(self._ids)}
        for table in (self._in, self._out):
            table[:m] = table[rows]
            table[m:n] = 0.0  # a new item's output row starts at zero
        self._counts[:m] = self._counts[:n][kept]
        self._counts[m:n] = 0
        self._last_seen[:m] = self._last_seen[:n][kept]
        self._last_seen[m:n] = 0

    def _add(self, item: str) -> int:
        row = len(self._ids)
        if row == self._in.shape[0]:
            self._grow(max(64, 2 * row))
        # word2vec's initialisation: small uniform input rows, zero output rows.
        init = self._rng.uniform(-0.5 / self.dim, 0.5 / self.dim, self.dim).astype(np.float32)
        self._in[row] = torch.from_numpy(init)
        self._ids.append(item)
        self._index[item] = row
        return row

    def _grow(self, capacity: int) -> None:
        n = len(self._ids)
        grown_in = torch.zeros((capacity, self.dim), dtype=torch.float32)
        grown_out = torch.zeros((capacity, self.dim), dtype=torch.float32)
        grown_in[:n] = self._in[:n]
        grown_out[:n] = self._out[:n]
        self._in, self._out = grown_in, grown_out
        counts = np.zeros(capacity, dtype=np.int64)
        counts[:n] = self._counts[:n]
        self._counts = counts
        last_seen = np.zeros(capacity, dtype=np.int64)
        last_seen[:n] = self._last_seen[:n]
        self._last_seen = last_seen

    def _pairs(self, encoded: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        centers: list[np.ndarray] = []
        contexts: list[np.ndarray] = []
        for rows in encoded:
            for offset in range(1, min(self.window, len(rows) - 1) + 1):
                left, right = rows[:-offset], rows[offset:]
                centers += [left, right]
                contexts += [right, left]
        if not centers:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        center, context = np.concatenate(centers), np.concatenate(contexts)
        distinct = center != context
        return center[distinct], context[distinct]

    def _step(self, centers: np.ndarray, contexts: np.ndarray, cumulative: np.ndarray) -> float:
        """One SGD step on a minibatch of pairs; returns the summed loss."""
        c = torch.from_numpy(centers)
        o = torch.from_numpy(contexts)
        u = self._in[c]  # (B, d)
        v = self._out[o]  # (B, d)
        positive = (u * v).sum(dim=1)
        # d(-log σ(x))/dx = σ(x) - 1
        g_positive = torch.sigmoid(positive) - 1.0
        grad_u = g_positive[:, None] * v
        grad_v = g_positive[:, None] * u
        loss = -torch.nn.functional.logsigmoid(positive).sum()
        if self.negatives:
            draws = self._rng.random((len(centers), self.negatives)) * cumulative[-1]
            rows = np.searchsorted(cumulative, draws, side="right")
            # A draw can round up to the total; clamp it onto the last row.
            negative_rows = torch.from_numpy(np.minimum(rows, len(cumulative) - 1))
            n = self._out[negative_rows]  # (B, K, d)
            negative = torch.einsum("bkd,bd->bk", n, u)
            # d(-log σ(-x))/dx = σ(x)
            g_negative = torch.sigmoid(negative)
            grad_u += torch.einsum("bk,bkd->bd", g_negative, n)
            grad_n = g_negative[:, :, None] * u[:, None, :]
            loss -= torch.nn.functional.logsigmoid(-negative).sum()
            self._out.index_add_(
                0, negative_rows.reshape(-1), grad_n.reshape(-1, self.dim), alpha=-self.lr
            )
        self._out.index_add_(0, o, grad_v, alpha=-self.lr)
        self._in.index_add_(0, c, grad_u, alpha=-self.lr)
        return float(loss)


def _normalized(table: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(table, axis=1, keepdims=True)
    return (table / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _rng_words(rng: np.random.Generator) -> np.ndarray:
    """PCG64 state as int64 words: 128-bit state and increment in 32-bit pieces, then the cache."""
    raw = rng.bit_generator.state
    if raw["bit_generator"] != "PCG64":
        raise ValueError(f"only PCG64 generators can be exported, got {raw['bit_generator']}")
    words = [(raw["state"][k] >> (32 * i)) & 0xFFFFFFFF for k in ("state", "inc") for i in range(4)]
    return np.array([*words, raw["has_uint32"], raw["uinteger"]], dtype=np.int64)


def _set_rng_words(rng: np.random.Generator, words: np.ndarray) -> None:
    if words.shape != (10,):
        raise ValueError(f"rng_state has shape {words.shape}, expected (10,)")
    value = [int(w) for w in words]
    state = sum(value[i] << (32 * i) for i in range(4))
    inc = sum(value[4 + i] << (32 * i) for i in range(4))
    rng.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": state, "inc": inc},
        "has_uint32": value[8],
        "uinteger": value[9],
    }
