"""DRN's settings (``STREAMREC_DRN_*``) and the feature layout, learner and trainer they build.

The DRN service trains with them and the serving DRN policy scores with the
same feature layout (it reads the same settings).
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.drn.features import FeatureLayout
from services.drn.learner import DRNLearner
from services.drn.trainer import DRNTrainer


class DRNSettings(BaseSettings):
    """DRN service settings (``STREAMREC_DRN_*``).

    The feature layout fields must match what the serving DRN policy scores
    with (it reads the same settings); defaults fit the simulator's world.
    """

    model_config = SettingsConfigDict(env_prefix="STREAMREC_DRN_", env_file=".env", extra="ignore")

    group: str = "drn"
    """``STREAMREC_DRN_GROUP``: consumer group and checkpoint namespace."""
    model: str = "drn"
    """``STREAMREC_DRN_MODEL``: ParamStore model name W and W̃ are published under."""
    policy: str = "drn"
    """``STREAMREC_DRN_POLICY``: learn from the feedback of slates this policy served."""
    embedding_dim: int = Field(8, ge=1)
    """``STREAMREC_DRN_EMBEDDING_DIM``: item embedding width of the feature layout."""
    n_context: int = Field(9, ge=0)
    """``STREAMREC_DRN_N_CONTEXT``: request context floats in the state."""
    windows_s: tuple[float, ...] = (3_600.0, 21_600.0, 86_400.0)
    """``STREAMREC_DRN_WINDOWS_S``: JSON list of look-back windows (user history, popularity)."""
    interest_columns: int = Field(8, ge=0)
    """``STREAMREC_DRN_INTEREST_COLUMNS``: leading context columns that are the user's
    interest vector in item space (serving only; the simulator's context starts with it)."""
    hidden: tuple[int, ...] = (64, 32)
    """``STREAMREC_DRN_HIDDEN``: JSON list of hidden widths of both network streams."""
    gamma: float = Field(0.4, ge=0.0, lt=1.0)
    """``STREAMREC_DRN_GAMMA``: discount of the future-reward term; 0 = click-only model."""
    alpha: float = Field(0.1, ge=0.0)
    """``STREAMREC_DRN_ALPHA``: DBGD exploration radius, ΔW = α · U(−1, 1) · W."""
    eta: float = Field(0.05, gt=0.0, le=1.0)
    """``STREAMREC_DRN_ETA``: DBGD step towards a winning W̃."""
    lr: float = Field(1e-3, gt=0.0)
    """``STREAMREC_DRN_LR``: Adam learning rate of the major update."""
    batch_size: int = Field(64, ge=1)
    """``STREAMREC_DRN_BATCH_SIZE``: transitions per gradient step."""
    buffer_capacity: int = Field(20_000, ge=1)
    """``STREAMREC_DRN_BUFFER_CAPACITY``: replay buffer size (checkpointed in full)."""
    max_next_actions: int = Field(5, ge=0)
    """``STREAMREC_DRN_MAX_NEXT_ACTIONS``: next-slate items kept per transition."""
    target_sync: int = Field(100, ge=1)
    """``STREAMREC_DRN_TARGET_SYNC``: gradient steps between target-network copies."""
    return_weight: float = 0.5
    """``STREAMREC_DRN_RETURN_WEIGHT``: β in reward = click + β · return."""
    return_window_s: float = Field(1_800.0, ge=0.0)
    """``STREAMREC_DRN_RETURN_WINDOW_S``: a user served again within this long 'returned'."""
    verdict_window: int = Field(20, ge=1)
    """``STREAMREC_DRN_VERDICT_WINDOW``: decided slates per DBGD verdict."""
    major_interval_s: float = Field(600.0, ge=0.0)
    """``STREAMREC_DRN_MAJOR_INTERVAL_S``: T_R, event time between major updates; 0 = never."""
    major_steps: int = Field(100, ge=1)
    """``STREAMREC_DRN_MAJOR_STEPS``: gradient steps per major update."""
    major_min_transitions: int = Field(256, ge=1)
    """``STREAMREC_DRN_MAJOR_MIN_TRANSITIONS``: no major update on a smaller buffer."""
    drift_detection: bool = True
    """``STREAMREC_DRN_DRIFT_DETECTION``: also run a major update when ADWIN flags the CTR."""
    drift_delta: float = Field(0.002, gt=0.0, lt=1.0)
    """``STREAMREC_DRN_DRIFT_DELTA``: ADWIN's confidence parameter."""
    publish_interval_s: float = Field(1.0, gt=0.0)
    """``STREAMREC_DRN_PUBLISH_INTERVAL_S``: checkpoint (and publish if W̃ changed) this often."""
    seed: int = 0
    """``STREAMREC_DRN_SEED``: seeds initialisation, DBGD draws and replay sampling."""

    def layout(self) -> FeatureLayout:
        """The feature layout the learner is built for."""
        return FeatureLayout(
            embedding_dim=self.embedding_dim, windows_s=self.windows_s, n_context=self.n_context
        )

    def learner(self) -> DRNLearner:
        """A fresh learner with these settings."""
        layout = self.layout()
        return DRNLearner(
            layout.state_dim,
            layout.action_dim,
            hidden=self.hidden,
            gamma=self.gamma,
            alpha=self.alpha,
            eta=self.eta,
            lr=self.lr,
            batch_size=self.batch_size,
            buffer_capacity=self.buffer_capacity,
            max_next_actions=self.max_next_actions,
            target_sync=self.target_sync,
            return_weight=self.return_weight,
            seed=self.seed,
        )

    def trainer(self, learner: DRNLearner | None = None) -> DRNTrainer:
        """A trainer around ``learner`` (default: a fresh one) with these settings."""
        return DRNTrainer(
            learner or self.learner(),
            verdict_window=self.verdict_window,
            return_window_s=self.return_window_s,
            major_interval_s=self.major_interval_s,
            major_steps=self.major_steps,
            major_min_transitions=self.major_min_transitions,
            drift_delta=self.drift_delta if self.drift_detection else None,
        )
