"""The dueling Q-network of DRN: Q(s, a) = V(s) + A(s, a).

DRN (Zheng et al., WWW 2018, §4.2) splits the Q-function in two streams: the
value V(s) sees only the user and context features (the state), the advantage
A(s, a) sees everything — user, context, item and user-item features. The
network scores a batch of candidate rows, each ``concat(state, action)``; the
value stream reads the first ``state_dim`` columns of a row.

Unlike the Atari dueling network (Wang et al. 2016), the advantage is not
centred on its mean over actions: DRN scores open candidate sets whose size
and content change per request, and centring would make an item's score depend
on which other items happen to be candidates.

Parameters travel as an ordered dict of named float32 numpy arrays, never as
pickles: :meth:`DuelingQNetwork.weights` and :meth:`DuelingQNetwork.load_weights`
round-trip exactly.

>>> import numpy as np
>>> net = DuelingQNetwork(3, 2, hidden=(4,), seed=0)
>>> rows = np.ones((5, 5), dtype=np.float32)
>>> net.score(rows).shape
(5,)
>>> twin = DuelingQNetwork(3, 2, hidden=(4,), seed=1)
>>> twin.load_weights(net.weights())
>>> bool(np.array_equal(twin.score(rows), net.score(rows)))
True
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn


def _stream(in_dim: int, hidden: Sequence[int]) -> nn.Sequential:
    """An MLP ``in_dim -> hidden... -> 1`` with ReLU between layers."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width = in_dim
    for i, h in enumerate(hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(width, h)
        layers[f"relu{i}"] = nn.ReLU()
        width = h
    layers["out"] = nn.Linear(width, 1)
    return nn.Sequential(layers)


class DuelingQNetwork(nn.Module):
    """Dueling Q-network scoring candidate rows ``concat(state, action)``.

    Args:
        state_dim: width of the state part (user + context features).
        action_dim: width of the action part (item + user-item features).
        hidden: hidden layer widths, used by both streams.
        seed: seeds the initialisation; the same seed gives bit-identical
            weights on every platform (drawn with numpy, not torch's global RNG).

    Parameter names are ``value.fc1.weight`` … ``value.out.bias`` for V and
    ``advantage.fc1.weight`` … ``advantage.out.bias`` for A.
    """

    def __init__(
        self,
        state_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (64, 32),
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if state_dim < 1 or action_dim < 1:
            raise ValueError(
                f"state_dim and action_dim must be >= 1, got {state_dim} and {action_dim}"
            )
        hidden = tuple(int(h) for h in hidden)
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden must be a non-empty tuple of positive widths, got {hidden}")
        self.state_dim = int(state_dim)
        self.action_dim = int(action_dim)
        self.hidden = hidden
        self.value = _stream(self.state_dim, hidden)
        self.advantage = _stream(self.state_dim + self.action_dim, hidden)
        self._initialise(np.random.default_rng(seed))

    @property
    def input_dim(self) -> int:
        """Width of one candidate row: ``state_dim + action_dim``."""
        return self.state_dim + self.action_dim

    def _initialise(self, rng: np.random.Generator) -> None:
        # Same bound as torch's default Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        # for weights and biases alike; biases must be non-zero because DBGD
        # perturbs each parameter in proportion to its own value.
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    bound = 1.0 / np.sqrt(module.in_features)
                    for param in (module.weight, module.bias):
                        draw = rng.uniform(-bound, bound, size=tuple(param.shape))
                        param.copy_(torch.from_numpy(draw.astype(np.float32)))

    def decompose(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """V(s) and A(s, a) for a batch of rows ``(n, input_dim)``, each ``(n,)``."""
        value = self.value(rows[:, : self.state_dim]).squeeze(-1)
        advantage = self.advantage(rows).squeeze(-1)
        return value, advantage

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Q(s, a) = V(s) + A(s, a) for a batch of rows ``(n, input_dim)``, shape ``(n,)``."""
        value, advantage = self.decompose(rows)
        return value + advantage

    def rows_tensor(self, X: np.ndarray) -> torch.Tensor:
        """Validate candidate rows ``(n, input_dim)`` and wrap them as a float32 tensor."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.input_dim:
            raise ValueError(
                f"candidate rows must have shape (n, {self.input_dim}) "
                f"(state_dim {self.state_dim} + action_dim {self.action_dim}), got {X.shape}"
            )
        if not np.isfinite(X).all():
            raise ValueError("candidate rows contain NaN or infinite values")
        return torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))

    def score(self, X: np.ndarray) -> np.ndarray:
        """Q-values of candidate rows ``(n, input_dim)`` as a float32 array ``(n,)``."""
        rows = self.rows_tensor(X)
        with torch.inference_mode():
            return self(rows).numpy().copy()

    def weights(self) -> dict[str, np.ndarray]:
        """All parameters as an ordered dict of named float32 arrays (copies)."""
        return {name: p.detach().numpy().copy() for name, p in self.named_parameters()}

    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace every parameter with ``weights`` (as produced by :meth:`weights`).

        Raises:
            ValueError: on missing or unexpected names, a shape mismatch, a
                non-floating dtype, or a non-finite value; nothing is changed then.
        """
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(weights))
        unexpected = sorted(set(weights) - set(params))
        if missing or unexpected:
            raise ValueError(f"weight names differ: missing {missing}, unexpected {unexpected}")
        arrays = {}
        for name, param in params.items():
            array = np.asarray(weights[name])
            if array.shape != tuple(param.shape):
                raise ValueError(
                    f"weight {name!r}: shape {array.shape}, expected {tuple(param.shape)}"
                )
            if not np.issubdtype(array.dtype, np.floating):
                raise ValueError(f"weight {name!r}: dtype {array.dtype} is not floating point")
            if not np.isfinite(array).all():
                raise ValueError(f"weight {name!r} contains NaN or infinite values")
            arrays[name] = np.ascontiguousarray(array, dtype=np.float32)
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(torch.from_numpy(arrays[name]))
