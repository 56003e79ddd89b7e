"""Fixed-capacity replay buffer of DRN transitions, as preallocated numpy arrays.

A transition is one shown item: the state it was shown in, its action
features, the reward it earned, and — for DRN's future-reward term — the
user's next state with the candidate actions of that next request (at most
``max_next_actions`` of them; pass the best ones first). A transition without
a next request is terminal (``done``): its target is the reward alone.

The oldest transitions are overwritten once ``capacity`` is reached. The
arrays are allocated with ``np.zeros`` up front, so memory pages are only
committed as the buffer fills.

>>> import numpy as np
>>> buffer = ReplayBuffer(100, state_dim=3, action_dim=2, max_next_actions=4)
>>> buffer.extend(np.zeros((5, 3)), np.ones((5, 2)), np.arange(5.0),
...               next_states=np.zeros((5, 3)), next_actions=[np.ones((2, 2))] * 5)
>>> len(buffer), buffer.sample(8, np.random.default_rng(0)).next_actions.shape
(5, (8, 4, 2))
>>> len(ReplayBuffer.from_arrays(buffer.arrays()))
5
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

_ARRAY_NAMES = ("state", "action", "reward", "next_state", "next_actions", "next_count", "meta")


@dataclass(frozen=True, slots=True)
class TransitionBatch:
    """A batch of transitions; ``next_actions[i, :next_counts[i]]`` are valid rows."""

    states: np.ndarray  # (b, state_dim) float32
    actions: np.ndarray  # (b, action_dim) float32
    rewards: np.ndarray  # (b,) float32
    next_states: np.ndarray  # (b, state_dim) float32, zeros where done
    next_actions: np.ndarray  # (b, max_next_actions, action_dim) float32
    next_counts: np.ndarray  # (b,) int64
    done: np.ndarray  # (b,) bool: no next request, the target is the reward alone

    def __len__(self) -> int:
        return int(self.rewards.shape[0])


class ReplayBuffer:
    """Ring buffer of transitions with uniform sampling.

    Args:
        capacity: maximum number of transitions kept.
        state_dim: width of a state vector.
        action_dim: width of an action row.
        max_next_actions: how many next-request candidates a transition keeps.
    """

    def __init__(
        self, capacity: int, state_dim: int, action_dim: int, *, max_next_actions: int = 8
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if state_dim < 1 or action_dim < 1:
            raise ValueError(
                f"state_dim and action_dim must be >= 1, got {state_dim} and {action_dim}"
            )
        if max_next_actions < 0:
            raise ValueError(f"max_next_actions must be >= 0, got {max_next_actions}")
        self.capacity = int(capacity)
        self.state_dim = int(state_dim)
        self.action_dim = int(action_dim)
        self.max_next_actions = int(max_next_actions)
        self._state = np.zeros((capacity, state_dim), dtype=np.float32)
        self._action = np.zeros((capacity, action_dim), dtype=np.float32)
        self._reward = np.zeros(capacity, dtype=np.float32)
        self._next_state = np.zeros((capacity, state_dim), dtype=np.float32)
        self._next_actions = np.zeros((capacity, max_next_actions, action_dim), dtype=np.float32)
        self._next_count = np.zeros(capacity, dtype=np.int64)
        self._cursor = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def _rows(self, values: ArrayLike, n: int | None, width: int, what: str) -> np.ndarray:
        array = np.asarray(values, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != width or (n is not None and array.shape[0] != n):
            raise ValueError(
                f"{what} must have shape ({'n' if n is None else n}, {width}), got {array.shape}"
            )
        if not np.isfinite(array).all():
            raise ValueError(f"{what} contain NaN or infinite values")
        return array

    def extend(
        self,
        states: ArrayLike,
        actions: ArrayLike,
        rewards: ArrayLike,
        *,
        next_states: ArrayLike | None = None,
        next_actions: Sequence[ArrayLike | None] | None = None,
    ) -> None:
        """Append ``n`` transitions, overwriting the oldest when full.

        ``next_actions[i]`` is row i's next-request candidate actions
        ``(m_i, action_dim)`` (only the first ``max_next_actions`` are kept),
        or ``None``/empty for a terminal transition. ``next_states`` is needed
        whenever any ``next_actions`` are given.
        """
        state_rows = self._rows(states, None, self.state_dim, "states")
        n = state_rows.shape[0]
        action_rows = self._rows(actions, n, self.action_dim, "actions")
        reward_values = np.asarray(rewards, dtype=np.float32).reshape(-1)
        if reward_values.shape != (n,):
            raise ValueError(f"rewards must have shape ({n},), got {reward_values.shape}")
        if not np.isfinite(reward_values).all():
            raise ValueError("rewards contain NaN or infinite values")
        next_state_rows = np.zeros((n, self.state_dim), dtype=np.float32)
        next_action_rows = np.zeros((n, self.max_next_actions, self.action_dim), dtype=np.float32)
        next_counts = np.zeros(n, dtype=np.int64)
        if next_actions is not None:
            if len(next_actions) != n:
                raise ValueError(f"next_actions must have {n} entries, got {len(next_actions)}")
            if next_states is None:
                raise ValueError("next_states are required when next_actions are given")
            next_state_rows = self._rows(next_states, n, self.state_dim, "next_states")
            for i, candidates in enumerate(next_actions):
                if candidates is None:
                    continue
                rows = np.asarray(candidates, dtype=np.float32)
                if rows.size == 0:
                    continue
                rows = self._rows(rows, None, self.action_dim, f"next_actions[{i}]")
                kept = rows[: self.max_next_actions]
                next_action_rows[i, : len(kept)] = kept
                next_counts[i] = len(kept)
            next_state_rows[next_counts == 0] = 0.0
        # Only the newest `capacity` rows can survive a batch larger than the buffer.
        start = max(0, n - self.capacity)
        index = (self._cursor + start + np.arange(n - start)) % self.capacity
        self._state[index] = state_rows[start:]
        self._action[index] = action_rows[start:]
        self._reward[index] = reward_values[start:]
        self._next_state[index] = next_state_rows[start:]
        self._next_actions[index] = next_action_rows[start:]
        self._next_count[index] = next_counts[start:]
        self._cursor = (self._cursor + n) % self.capacity
        self._size = min(self.capacity, self._size + n)

    def _batch(self, index: np.ndarray) -> TransitionBatch:
        counts = self._next_count[index]
        return TransitionBatch(
            states=self._state[index],
            actions=self._action[index],
            rewards=self._reward[index],
            next_states=self._next_state[index],
            next_actions=self._next_actions[index],
            next_counts=counts,
            done=counts == 0,
        )

    def sample(self, batch_size: int, rng: np.random.Generator) -> TransitionBatch:
        """``batch_size`` transitions drawn uniformly with replacement."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        return self._batch(rng.integers(0, self._size, size=batch_size))

    def transitions(self) -> TransitionBatch:
        """Every stored transition, in storage order (copies)."""
        return self._batch(np.arange(self._size))

    def arrays(self) -> dict[str, np.ndarray]:
        """The filled part of the buffer as named arrays, storage layout preserved.

        ``meta`` is ``[capacity, state_dim, action_dim, max_next_actions, cursor, size]``.
        """
        filled = slice(0, self._size)
        return {
            "state": self._state[filled].copy(),
            "action": self._action[filled].copy(),
            "reward": self._reward[filled].copy(),
            "next_state": self._next_state[filled].copy(),
            "next_actions": self._next_actions[filled].copy(),
            "next_count": self._next_count[filled].copy(),
            "meta": np.array(
                [
                    self.capacity,
                    self.state_dim,
                    self.action_dim,
                    self.max_next_actions,
                    self._cursor,
                    self._size,
                ],
                dtype=np.int64,
            ),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ReplayBuffer:
        """Rebuild a buffer from :meth:`arrays`; sampling continues identically."""
        missing = sorted(set(_ARRAY_NAMES) - set(arrays))
        if missing:
            raise ValueError(f"replay buffer arrays missing: {missing}")
        meta = np.asarray(arrays["meta"], dtype=np.int64)
        if meta.shape != (6,):
            raise ValueError(f"replay buffer meta must have 6 entries, got shape {meta.shape}")
        capacity, state_dim, action_dim, max_next, cursor, size = (int(v) for v in meta)
        buffer = cls(capacity, state_dim, action_dim, max_next_actions=max_next)
        if not 0 <= size <= capacity or not 0 <= cursor < capacity:
            raise ValueError(f"replay buffer meta is inconsistent: cursor {cursor}, size {size}")
        expected = {
            "state": (size, state_dim),
            "action": (size, action_dim),
            "reward": (size,),
            "next_state": (size, state_dim),
            "next_actions": (size, max_next, action_dim),
            "next_count": (size,),
        }
        for name, shape in expected.items():
            if np.shape(arrays[name]) != shape:
                raise ValueError(
                    f"replay buffer array {name!r}: shape {np.shape(arrays[name])}, "
                    f"expected {shape}"
                )
        counts = np.asarray(arrays["next_count"], dtype=np.int64)
        if ((counts < 0) | (counts > max_next)).any():
            raise ValueError(f"replay buffer next_count must lie in [0, {max_next}]")
        buffer._state[:size] = arrays["state"]
        buffer._action[:size] = arrays["action"]
        buffer._reward[:size] = arrays["reward"]
        buffer._next_state[:size] = arrays["next_state"]
        buffer._next_actions[:size] = arrays["next_actions"]
        buffer._next_count[:size] = counts
        buffer._cursor, buffer._size = cursor, size
        return buffer
