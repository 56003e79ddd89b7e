"""Hot reloading: follow the version a model serves and swap in what is built from it.

A background thread reads the version served (the pinned one while the model is
pinned, else the newest) and its digest (:meth:`ParamStore.head`, one small
script) every ``poll_interval_s``; the digest changes when a pin is set or lifted. When
either changes, the thread loads the version with
:meth:`ParamStore.latest`, builds the serving object from it off the request
path, and swaps one reference. :meth:`ParamWatcher.current` reads that
reference once, so callers never wait for a load and never see half a swap.

If Redis cannot be reached, a blob fails its checksum or the build fails, the
last good version keeps serving: the failure is logged once per streak and
shows in the metrics (``streamrec_params_reader_stale`` is 1,
``streamrec_params_reader_errors_total{reason}`` counts it). A version that
failed to load or build is not retried until a new one is published;
Redis errors are retried every poll. A version is loaded whenever its number or
digest differs from the one serving, even if its number is smaller, so a reader
follows a Redis that lost its data and started counting again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np
from prometheus_client import CollectorRegistry

from contracts.params import ParamError
from services.common.clients import REDIS_ERRORS
from services.paramstore.store import (
    Combiner,
    ModelNotFound,
    ParamStore,
    _check_name,
    param_metrics,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Builds the serving object from ``(version, header, arrays)``.
Builder = Callable[[int, dict[str, Any], dict[str, np.ndarray]], T]


def build_default(
    version: int, header: dict[str, Any], arrays: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(header, arrays)`` as loaded: the serving object when no ``build`` is given."""
    return header, arrays


class _Serving(NamedTuple, Generic[T]):
    version: int
    digest: str
    value: T
    created_at: float


class ParamWatcher(Generic[T]):
    """Serves the object built from a model's newest loadable version, reloaded in the background.

    Args:
        store: where the model is published.
        model: the model name.
        build: turns ``(version, header, arrays)`` into the serving object;
            default :func:`build_default`.
        combine: how several parts combine (see :func:`combine_parts`).
        poll_interval_s: seconds between version reads.
        registry: Prometheus registry for the reader series; ``None`` gives a
            private one (see :attr:`registry`). Watch each model once per registry.
    """

    def __init__(
        self,
        store: ParamStore,
        model: str,
        *,
        build: Builder[T] | None = None,
        combine: Combiner | None = None,
        poll_interval_s: float = 0.2,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if not (math.isfinite(poll_interval_s) and poll_interval_s > 0):
            raise ValueError(
                f"poll_interval_s must be a positive number of seconds, got {poll_interval_s!r}"
            )
        self.store = store
        self.model = _check_name("model", model)
        self.poll_interval_s = float(poll_interval_s)
        self._build: Builder[Any] = build if build is not None else build_default
        self._combine = combine
        self.registry = registry if registry is not None else CollectorRegistry()
        self._serving: _Serving[T] | None = None
        self._refused: tuple[int, str] | None = None
        self._failing: str | None = None
        self._last_error = ""
        # Serialises refreshes (the poller and explicit refresh() calls); current() never takes it.
        self._refresh_lock = threading.Lock()
        self._swapped = threading.Condition()
        self._stop = threading.Event()
        metrics = param_metrics(self.registry)
        self._version_gauge = metrics.reader_version.labels(model)
        self._stale_gauge = metrics.reader_stale.labels(model)
        self._errors = metrics.reader_errors
        metrics.reader_age.labels(model).set_function(self._age_seconds)
        self._stale_gauge.set(0)
        self._thread = threading.Thread(
            target=self._poll, name=f"param-watcher:{model}", daemon=True
        )
        self._thread.start()

    def current(self) -> tuple[int, T]:
        """``(version, object)`` now serving; :class:`ModelNotFound` before the first load."""
        serving = self._serving  # the one read of the shared reference
        if serving is None:
            raise ModelNotFound(self.model, self._not_ready())
        return serving.version, serving.value

    @property
    def version(self) -> int | None:
        """Version now serving, ``None`` before the first load."""
        serving = self._serving
        return None if serving is None else serving.version

    @property
    def stale(self) -> bool:
        """Whether the last refresh failed (an older version, or none, is serving)."""
        return self._failing is not None

    def wait_ready(self, timeout: float) -> tuple[int, T]:
        """Block until a first version serves and return it; :class:`ModelNotFound` on timeout."""
        with self._swapped:
            self._swapped.wait_for(lambda: self._serving is not None, timeout=timeout)
        return self.current()

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Block until ``version`` or a newer one serves; False on timeout."""
        with self._swapped:
            return self._swapped.wait_for(lambda: (self.version or 0) >= version, timeout=timeout)

    def refresh(self) -> bool:
        """Check the version once and swap in a new one; True if one was swapped in.

        The poller calls this every ``poll_interval_s``; callers may too.
        """
        with self._refresh_lock:
            try:
                head = self.store.head(self.model)
            except REDIS_ERRORS as exc:
                return self._failed("redis", exc)
            serving = self._serving
            if head is None:
                if serving is None:
                    self._recovered()  # nothing published yet: waiting is no failure
                    return False
                return self._failed("missing", "the version key is gone")
            if serving is not None and head == (serving.version, serving.digest):
                self._recovered()
                return False
            if head == self._refused:
                return False  # still stale; already counted and logged
            try:
                loaded, header, arrays = self.store.latest(self.model, combine=self._combine)
            except REDIS_ERRORS as exc:
                return self._failed("redis", exc)
            except ModelNotFound as exc:
                return self._failed("missing", exc)
            except ParamError as exc:
                self._refused = head
                return self._failed("corrupt", exc)
            try:
                value = self._build(loaded, header, arrays)
            except Exception as exc:
                self._refused = (loaded, header["digest"])
                return self._failed("build", exc)
            serving = _Serving(loaded, header["digest"], value, float(header["created_at"]))
            self._serving = serving  # the swap: one reference assignment
            self._refused = None
            self._version_gauge.set(loaded)
            self._recovered()
        with self._swapped:
            self._swapped.notify_all()
        log.info("params %s v%d serving (parts %s)", self.model, loaded, ", ".join(header["parts"]))
        return True

    def close(self, timeout: float | None = None) -> None:
        """Stop the poller (after any Redis call in flight). :meth:`current` keeps answering."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> ParamWatcher[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - logged; the background loop must outlive any one failure
                log.exception("param watcher for %s failed; retrying", self.model)
            self._stop.wait(self.poll_interval_s)

    def _failed(self, reason: str, error: object) -> bool:
        self._errors.labels(self.model, reason).inc()
        self._stale_gauge.set(1)
        self._last_error = f"{reason}: {error}"
        if self._failing is None:
            log.warning(
                "params %s: refresh failed (%s); serving v%s until it recovers",
                self.model,
                self._last_error,
                self.version,
            )
        self._failing = reason
        return False

    def _recovered(self) -> None:
        self._stale_gauge.set(0)
        if self._failing is not None:
            log.info("params %s: refresh recovered, serving v%s", self.model, self.version)
            self._failing = None

    def _not_ready(self) -> str:
        detail = "no version loaded yet"
        return f"{detail} (last failure: {self._last_error})" if self._last_error else detail

    def _age_seconds(self) -> float:
        serving = self._serving
        return math.nan if serving is None else time.time() - serving.created_at
