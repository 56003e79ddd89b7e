"""DRN learner: a dueling double DQN explored with Dueling Bandit Gradient Descent.

After Zheng et al., "DRN: A Deep Reinforcement Learning Framework for News
Recommendation" (WWW 2018). :class:`DRNLearner` keeps

- W, the current network, which serving ranks with (:meth:`DRNLearner.score`);
- W̃ = W + ΔW, the exploration network drawn by DBGD
  (:meth:`DRNLearner.score_explore`); serving interleaves the two rankings;
- a target network for double-DQN targets;
- the replay buffer of feedback.

Two updates, as in the paper: the **minor update** (:meth:`DRNLearner.minor_update`)
takes the interleaving verdict of a slate — if W̃ won, W ← W + η·ΔW — and draws
a fresh W̃; the **major update** (:meth:`DRNLearner.major_update`) trains W on
the replay buffer towards

    y = r + γ · Q(s', argmax_a' Q(s', a'; W); W⁻)

where the online network W picks the best next candidate and the target
network W⁻ evaluates it (double DQN, van Hasselt et al. 2016). The reward is
the click plus ``return_weight`` times the user-return signal where known;
γ = 0 gives the click-only model.

Every redraw of W̃ bumps :attr:`DRNLearner.explore_version`. Serving should log
the version a slate was interleaved with and pass it back to
:meth:`DRNLearner.minor_update`, which ignores verdicts about a W̃ that has
since been replaced — its ΔW would point somewhere else.

The learner knows nothing of Kafka or Redis: arrays in, arrays out. State is
exported as named numpy arrays (:meth:`DRNLearner.state`), Adam's moments
included, so a restored learner trains on exactly as the original would.

>>> import numpy as np
>>> learner = DRNLearner(4, 3, hidden=(8,), batch_size=4, buffer_capacity=32, seed=7)
>>> X = np.random.default_rng(0).normal(size=(5, 7))
>>> learner.score(X).shape, learner.score(["a", "b", "c", "d", "e"], X).shape
((5,), (5,))
>>> learner.minor_update("explore")
True
>>> learner.observe(X[:, :4], X[:, 4:], np.ones(5))
>>> loss = learner.major_update(3)
>>> twin = DRNLearner.from_state(learner.state(include_buffer=True))
>>> bool(np.array_equal(twin.score_explore(X), learner.score_explore(X)))
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from services.drn.dbgd import perturb, step_towards
from services.drn.interleaving import EXPLOIT, EXPLORE
from services.drn.network import DuelingQNetwork
from services.drn.replay_buffer import ReplayBuffer, TransitionBatch

_NETWORKS = ("online", "explore", "delta", "target")
_COUNTERS = (
    "minor_updates",
    "explore_wins",
    "exploit_wins",
    "ties",
    "stale_verdicts",
    "gradient_steps",
    "explore_version",
)
_MASK64 = (1 << 64) - 1


def _rng_to_array(rng: np.random.Generator) -> np.ndarray:
    """A PCG64 generator's full state as six int64 words (the param store has no uint64)."""
    state = rng.bit_generator.state
    if state["bit_generator"] != "PCG64":
        raise ValueError(f"only PCG64 generators can be exported, got {state['bit_generator']}")
    inner = state["state"]
    words = [
        inner["state"] >> 64,
        inner["state"] & _MASK64,
        inner["inc"] >> 64,
        inner["inc"] & _MASK64,
        state["has_uint32"],
        state["uinteger"],
    ]
    return np.array(words, dtype=np.uint64).view(np.int64)


def _rng_from_array(words: np.ndarray) -> np.random.Generator:
    values = [int(v) for v in np.asarray(words, dtype=np.int64).view(np.uint64)]
    if len(values) != 6:
        raise ValueError(f"rng state must have 6 words, got {len(values)}")
    bit_generator = np.random.PCG64()
    bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": (values[0] << 64) | values[1], "inc": (values[2] << 64) | values[3]},
        "has_uint32": values[4],
        "uinteger": values[5],
    }
    return np.random.Generator(bit_generator)


class DRNLearner:
    """Dueling double DQN with DBGD exploration; see the module docstring.

    Args:
        state_dim: width of the state (user + context) part of a row.
        action_dim: width of the action (item + user-item) part of a row.
        hidden: hidden widths of both network streams.
        gamma: discount of the future-reward term, in [0, 1); 0 = click-only.
        alpha: DBGD exploration radius, ΔW = α · U(−1, 1) ⊙ W; 0 = no exploration.
        eta: DBGD step size towards a winning W̃, in (0, 1].
        lr: Adam learning rate of the major update.
        batch_size: transitions per gradient step.
        buffer_capacity: replay buffer size.
        max_next_actions: next-request candidates kept per transition.
        target_sync: gradient steps between copies of W into the target network.
        return_weight: β in reward = click + β · return signal.
        seed: seeds initialisation, DBGD draws and replay sampling.
    """

    def __init__(
        self,
        state_dim: int,
        action_dim: int,
        *,
        hidden: Sequence[int] = (64, 32),
        gamma: float = 0.4,
        alpha: float = 0.1,
        eta: float = 0.05,
        lr: float = 1e-3,
        batch_size: int = 64,
        buffer_capacity: int = 50_000,
        max_next_actions: int = 8,
        target_sync: int = 100,
        return_weight: float = 0.5,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma must lie in [0, 1), got {gamma}")
        if not np.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
        if not 0.0 < eta <= 1.0:
            raise ValueError(f"eta must lie in (0, 1], got {eta}")
        if not np.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if target_sync < 1:
            raise ValueError(f"target_sync must be >= 1, got {target_sync}")
        if not np.isfinite(return_weight):
            raise ValueError(f"return_weight must be finite, got {return_weight}")
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.eta = float(eta)
        self.lr = float(lr)
        self.batch_size = int(batch_size)
        self.target_sync = int(target_sync)
        self.return_weight = float(return_weight)
        self._rng = np.random.default_rng(seed)
        init_seed = int(self._rng.integers(2**63))
        self._online = DuelingQNetwork(state_dim, action_dim, hidden, seed=init_seed)
        self._explore = DuelingQNetwork(state_dim, action_dim, hidden, seed=init_seed)
        self._target = DuelingQNetwork(state_dim, action_dim, hidden, seed=init_seed)
        self._buffer = ReplayBuffer(
            buffer_capacity, state_dim, action_dim, max_next_actions=max_next_actions
        )
        self._optimizer = torch.optim.Adam(self._online.parameters(), lr=self.lr)
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._delta: dict[str, np.ndarray] = {}
        self._redraw_explore()

    # -- dimensions and metrics ------------------------------------------------

    @property
    def state_dim(self) -> int:
        return self._online.state_dim

    @property
    def action_dim(self) -> int:
        return self._online.action_dim

    @property
    def hidden(self) -> tuple[int, ...]:
        return self._online.hidden

    @property
    def explore_version(self) -> int:
        """Bumped every time W̃ is redrawn; log it with each interleaved slate."""
        return self._counters["explore_version"]

    @property
    def counters(self) -> dict[str, int]:
        """Minor-update verdicts, stale verdicts, gradient steps and the W̃ version."""
        return dict(self._counters)

    @property
    def explore_win_rate(self) -> float:
        """Share of decided (non-tie) verdicts that W̃ won; NaN before the first."""
        decided = self._counters["explore_wins"] + self._counters["exploit_wins"]
        return self._counters["explore_wins"] / decided if decided else float("nan")

    @property
    def buffer(self) -> ReplayBuffer:
        """The replay buffer (for its size and for :meth:`td_loss` on chosen batches)."""
        return self._buffer

    # -- scoring ------------------------------------------------------------------

    def _rows(self, items_or_X: Any, X: ArrayLike | None) -> np.ndarray:
        if X is None:
            return np.asarray(items_or_X)
        rows = np.asarray(X)
        if len(items_or_X) != rows.shape[0]:
            raise ValueError(f"{len(items_or_X)} items but {rows.shape[0]} candidate rows")
        return rows

    def score(self, items_or_X: Any, X: ArrayLike | None = None) -> np.ndarray:
        """Q-values under W of candidate rows ``concat(state, action)`` ``(n, state+action)``.

        Call as ``score(X)`` or, like the bandit learners, ``score(items, X)``;
        the item ids are only checked against the number of rows.
        """
        return self._online.score(self._rows(items_or_X, X))

    def score_explore(self, items_or_X: Any, X: ArrayLike | None = None) -> np.ndarray:
        """Q-values under the exploration network W̃; same call forms as :meth:`score`."""
        return self._explore.score(self._rows(items_or_X, X))

    # -- published weights --------------------------------------------------------

    def weights(self) -> dict[str, np.ndarray]:
        """W as named float32 arrays, for publishing."""
        return self._online.weights()

    def explore_weights(self) -> dict[str, np.ndarray]:
        """W̃ as named float32 arrays, for publishing."""
        return self._explore.weights()

    def exploration_delta(self) -> dict[str, np.ndarray]:
        """ΔW of the current W̃ = W + ΔW (copies)."""
        return {name: d.copy() for name, d in self._delta.items()}

    # -- minor update (DBGD) --------------------------------------------------------

    def _redraw_explore(self, current: dict[str, np.ndarray] | None = None) -> None:
        """Draw a fresh W̃ around W (``current`` = W's weights when the caller has them)."""
        weights = self._online.weights() if current is None else current
        explore, self._delta = perturb(weights, self.alpha, self._rng)
        self._explore.load_weights(explore)
        self._counters["explore_version"] += 1

    def minor_update(self, winner: str, *, explore_version: int | None = None) -> bool:
        """Apply one interleaving verdict; returns whether it was applied.

        ``"explore"`` moves W ← W + η·ΔW; ``"exploit"`` and ``"tie"`` leave W
        bit-identical. Either way a fresh W̃ is drawn around W. A verdict about
        an older W̃ (``explore_version`` given and not current) is counted as
        stale and changes nothing.
        """
        if winner not in (EXPLOIT, EXPLORE, "tie"):
            raise ValueError(f"winner must be 'exploit', 'explore' or 'tie', got {winner!r}")
        if explore_version is not None and explore_version != self.explore_version:
            self._counters["stale_verdicts"] += 1
            return False
        self._counters["minor_updates"] += 1
        moved = None
        if winner == EXPLORE:
            self._counters["explore_wins"] += 1
            moved = step_towards(self._online.weights(), self._delta, self.eta)
            self._online.load_weights(moved)
        elif winner == EXPLOIT:
            self._counters["exploit_wins"] += 1
        else:
            self._counters["ties"] += 1
        self._redraw_explore(moved)
        return True

    # -- feedback and major update ------------------------------------------------

    def observe(
        self,
        states: ArrayLike,
        actions: ArrayLike,
        clicks: ArrayLike,
        *,
        returns: ArrayLike | None = None,
        next_states: ArrayLike | None = None,
        next_actions: Sequence[ArrayLike | None] | None = None,
    ) -> None:
        """Add ``n`` shown items' feedback to the replay buffer.

        Reward = ``clicks + return_weight · returns`` (``returns`` is the
        user-return signal, e.g. 1 if the user came back soon; omitted = 0).
        ``next_states``/``next_actions`` describe the user's next request (see
        :meth:`ReplayBuffer.extend`); without them a transition is terminal.
        """
        click_values = np.asarray(clicks, dtype=np.float64).reshape(-1)
        rewards = click_values.copy()
        if returns is not None:
            return_values = np.asarray(returns, dtype=np.float64).reshape(-1)
            if return_values.shape != click_values.shape:
                raise ValueError(
                    f"returns must have shape {click_values.shape}, got {return_values.shape}"
                )
            rewards += self.return_weight * return_values
        self._buffer.extend(
            states, actions, rewards, next_states=next_states, next_actions=next_actions
        )

    def _target_values(self, batch: TransitionBatch) -> torch.Tensor:
        targets = torch.from_numpy(batch.rewards.copy())
        live = ~batch.done
        if self.gamma == 0.0 or not live.any():
            return targets
        counts = batch.next_counts[live]
        width = int(counts.max())
        next_actions = batch.next_actions[live, :width]
        next_states = np.repeat(batch.next_states[live, None, :], width, axis=1)
        rows = torch.from_numpy(
            np.concatenate([next_states, next_actions], axis=2).reshape(-1, self._online.input_dim)
        )
        valid = torch.from_numpy(np.arange(width)[None, :] < counts[:, None])
        with torch.no_grad():
            chooser = self._online(rows).view(-1, width).masked_fill(~valid, float("-inf"))
            evaluated = self._target(rows).view(-1, width)
        best = chooser.argmax(dim=1, keepdim=True)
        future = evaluated.gather(1, best).squeeze(1)
        targets[torch.from_numpy(live)] += future * self.gamma
        return targets

    def targets(self, batch: TransitionBatch) -> np.ndarray:
        """Double-DQN targets ``(b,)`` of a batch; equal to the rewards when γ = 0."""
        return self._target_values(batch).numpy()

    def _loss(self, batch: TransitionBatch) -> torch.Tensor:
        rows = torch.from_numpy(np.hstack([batch.states, batch.actions]))
        return torch.nn.functional.mse_loss(self._online(rows), self._target_values(batch))

    def td_loss(self, batch: TransitionBatch | None = None) -> float:
        """Mean squared TD error of W on ``batch`` (default: the whole buffer); no update."""
        if batch is None:
            if len(self._buffer) == 0:
                raise ValueError("the replay buffer is empty")
            batch = self._buffer.transitions()
        with torch.no_grad():
            return float(self._loss(batch))

    def major_update(self, n_steps: int) -> float:
        """``n_steps`` double-DQN gradient steps on replay samples; returns the mean TD loss.

        The target network copies W every ``target_sync`` steps (counted over
        the learner's life). W̃ is redrawn around the retrained W afterwards.
        """
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        if len(self._buffer) == 0:
            raise ValueError("the replay buffer is empty; observe feedback first")
        total = 0.0
        for _ in range(n_steps):
            loss = self._loss(self._buffer.sample(self.batch_size, self._rng))
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self._online.parameters(), max_norm=10.0)
            self._optimizer.step()
            total += float(loss.detach())
            self._counters["gradient_steps"] += 1
            if self._counters["gradient_steps"] % self.target_sync == 0:
                self._target.load_weights(self._online.weights())
        self._redraw_explore()
        return total / n_steps

    # -- state ----------------------------------------------------------------------

    def state(self, *, include_buffer: bool = False) -> dict[str, np.ndarray]:
        """Everything needed to resume, as named arrays (Adam's moments included).

        Names: ``online/…``, ``explore/…``, ``delta/…``, ``target/…`` (network
        parameters), ``config/dims``, ``config/hidden``, ``config/rates``,
        ``counters``, ``rng``, ``adam/<parameter>/{step,exp_avg,exp_avg_sq}`` once a
        major update has run and, with ``include_buffer``, ``buffer/…``.
        """
        networks = {
            "online": self._online.weights(),
            "explore": self._explore.weights(),
            "delta": self.exploration_delta(),
            "target": self._target.weights(),
        }
        out = {
            f"{prefix}/{name}": array
            for prefix, weights in networks.items()
            for name, array in weights.items()
        }
        out["config/dims"] = np.array(
            [
                self.state_dim,
                self.action_dim,
                self.batch_size,
                self._buffer.capacity,
                self._buffer.max_next_actions,
                self.target_sync,
            ],
            dtype=np.int64,
        )
        out["config/hidden"] = np.array(self.hidden, dtype=np.int64)
        out["config/rates"] = np.array(
            [self.gamma, self.alpha, self.eta, self.lr, self.return_weight], dtype=np.float64
        )
        out["counters"] = np.array([self._counters[k] for k in _COUNTERS], dtype=np.int64)
        out["rng"] = _rng_to_array(self._rng)
        out.update(self._adam_arrays())
        if include_buffer:
            out.update({f"buffer/{k}": v for k, v in self._buffer.arrays().items()})
        return out

    def _adam_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for name, param in self._online.named_parameters():
            moments = self._optimizer.state.get(param)
            if not moments:
                continue
            out[f"adam/{name}/step"] = np.array([float(moments["step"])], dtype=np.float64)
            out[f"adam/{name}/exp_avg"] = moments["exp_avg"].detach().numpy().copy()
            out[f"adam/{name}/exp_avg_sq"] = moments["exp_avg_sq"].detach().numpy().copy()
        return out

    def _load_adam(self, state: Mapping[str, np.ndarray]) -> None:
        for name, param in self._online.named_parameters():
            prefix = f"adam/{name}/"
            if f"{prefix}step" not in state:
                continue
            moments = {}
            for key in ("exp_avg", "exp_avg_sq"):
                array = np.asarray(state[f"{prefix}{key}"], dtype=np.float32)
                if array.shape != tuple(param.shape):
                    raise ValueError(
                        f"DRN state {prefix}{key}: shape {array.shape}, expected "
                        f"{tuple(param.shape)}"
                    )
                moments[key] = torch.from_numpy(array.copy())
            step = float(np.asarray(state[f"{prefix}step"]).reshape(-1)[0])
            self._optimizer.state[param] = {"step": torch.tensor(step), **moments}

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray]) -> DRNLearner:
        """Rebuild a learner from :meth:`state`; W, W̃, target, counters and RNG are exact."""
        required = ("config/dims", "config/hidden", "config/rates", "counters", "rng")
        missing = sorted(set(required) - set(state))
        if missing:
            raise ValueError(f"DRN state is missing arrays: {missing}")
        dims = np.asarray(state["config/dims"], dtype=np.int64)
        rates = np.asarray(state["config/rates"], dtype=np.float64)
        counters = np.asarray(state["counters"], dtype=np.int64)
        if dims.shape != (6,) or rates.shape != (5,) or counters.shape != (len(_COUNTERS),):
            raise ValueError(
                f"DRN state has malformed config/counters: dims {dims.shape} (want (6,)), "
                f"rates {rates.shape} (want (5,)), counters {counters.shape} "
                f"(want ({len(_COUNTERS)},))"
            )
        state_dim, action_dim, batch_size, capacity, max_next, target_sync = (int(v) for v in dims)
        gamma, alpha, eta, lr, return_weight = (float(v) for v in rates)
        learner = cls(
            state_dim,
            action_dim,
            hidden=tuple(int(h) for h in np.asarray(state["config/hidden"]).reshape(-1)),
            gamma=gamma,
            alpha=alpha,
            eta=eta,
            lr=lr,
            batch_size=batch_size,
            buffer_capacity=capacity,
            max_next_actions=max_next,
            target_sync=target_sync,
            return_weight=return_weight,
            seed=0,
        )
        groups: dict[str, dict[str, np.ndarray]] = {prefix: {} for prefix in _NETWORKS}
        for key, array in state.items():
            prefix, _, name = key.partition("/")
            if prefix in groups:
                groups[prefix][name] = array
        learner._online.load_weights(groups["online"])
        learner._explore.load_weights(groups["explore"])
        learner._target.load_weights(groups["target"])
        expected = learner._online.weights()
        delta = groups["delta"]
        mismatched = sorted(
            set(expected) ^ set(delta)
            | {k for k in set(expected) & set(delta) if np.shape(delta[k]) != expected[k].shape}
        )
        if mismatched:
            raise ValueError(f"DRN state 'delta/' arrays do not match the network: {mismatched}")
        learner._delta = {k: np.asarray(delta[k], dtype=np.float32).copy() for k in expected}
        learner._counters = dict(zip(_COUNTERS, (int(c) for c in counters), strict=True))
        learner._rng = _rng_from_array(state["rng"])
        learner._load_adam(state)
        buffer = {k.partition("/")[2]: v for k, v in state.items() if k.startswith("buffer/")}
        if buffer:
            restored = ReplayBuffer.from_arrays(buffer)
            layout = (
                restored.capacity,
                restored.state_dim,
                restored.action_dim,
                restored.max_next_actions,
            )
            if layout != (capacity, state_dim, action_dim, max_next):
                raise ValueError(
                    f"DRN state buffer layout {layout} does not match the learner's "
                    f"{(capacity, state_dim, action_dim, max_next)} "
                    "(capacity, state_dim, action_dim, max_next_actions)"
                )
            learner._buffer = restored
        return learner
