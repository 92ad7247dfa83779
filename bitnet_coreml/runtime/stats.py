"""Recovery statistics: per unit (and per ``execute_with_recovery`` operation) counts and latencies.

The collector (:class:`ErrorRecovery`) is cheap to update on every call and thread safe; a
:class:`RecoveryStats` is an immutable snapshot for reports and ``--json``.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any

import numpy as np

from bitnet_coreml.runtime.recovery import RecoveryAction, handle_error


@dataclasses.dataclass(frozen=True)
class UnitStats:
    """What happened on one unit (or one named operation)."""

    attempts: int
    successes: int
    failures: int
    failures_by_type: dict[str, int]
    fallbacks: int
    retries: int
    skips: int
    recent_errors: int
    latency_count: int
    latency_mean_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RecoveryStats:
    """A snapshot of every unit's and operation's statistics plus totals."""

    units: dict[str, UnitStats]
    operations: dict[str, UnitStats]
    requests: int
    answered: int
    exhausted: int
    rejected: int  # bad input: given up before or without blaming a unit
    total_fallbacks: int
    total_retries: int
    recent_errors: int
    recent_error_window_s: float

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d


class _Counter:
    __slots__ = ("attempts", "successes", "failures_by_type", "fallbacks", "retries", "skips",
                 "error_times", "latencies")

    def __init__(self, latency_window: int) -> None:
        self.attempts = 0
        self.successes = 0
        self.failures_by_type: collections.Counter[str] = collections.Counter()
        self.fallbacks = 0
        self.retries = 0
        self.skips = 0
        self.error_times: collections.deque[float] = collections.deque(maxlen=100_000)
        self.latencies: collections.deque[float] = collections.deque(maxlen=latency_window)

    def snapshot(self, now: float, window_s: float) -> UnitStats:
        recent = sum(1 for t in self.error_times if now - t <= window_s)
        lat = np.fromiter(self.latencies, dtype=np.float64)
        has = lat.size > 0
        return UnitStats(
            attempts=self.attempts,
            successes=self.successes,
            failures=sum(self.failures_by_type.values()),
            failures_by_type=dict(sorted(self.failures_by_type.items())),
            fallbacks=self.fallbacks,
            retries=self.retries,
            skips=self.skips,
            recent_errors=recent,
            latency_count=int(lat.size),
            latency_mean_s=float(lat.mean()) if has else None,
            latency_p50_s=float(np.percentile(lat, 50)) if has else None,
            latency_p95_s=float(np.percentile(lat, 95)) if has else None,
        )


class ErrorRecovery:
    """The seed's ``MPSErrorRecovery``: classifies errors and keeps the recovery statistics."""

    def __init__(self, *, recent_error_window_s: float = 60.0, latency_window: int = 1024,
                 clock: Any = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._window = float(recent_error_window_s)
        self._latency_window = int(latency_window)
        self._clock = clock
        self._units: dict[str, _Counter] = {}
        self._ops: dict[str, _Counter] = {}
        self._requests = 0
        self._answered = 0
        self._exhausted = 0
        self._rejected = 0

    # --- classification (pure; kept here because the seed puts it on the recovery manager) --------

    @staticmethod
    def handle_error(error: BaseException) -> RecoveryAction:
        return handle_error(error)

    # --- recording -----------------------------------------------------------------------------

    def _get(self, key: str, operation: bool) -> _Counter:
        table = self._ops if operation else self._units
        c = table.get(key)
        if c is None:
            c = table[key] = _Counter(self._latency_window)
        return c

    def record_request(self) -> None:
        with self._lock:
            self._requests += 1

    def record_outcome(self, answered: bool) -> None:
        with self._lock:
            if answered:
                self._answered += 1
            else:
                self._exhausted += 1

    def record_rejected(self) -> None:
        with self._lock:
            self._rejected += 1

    def record_attempt(self, key: str, *, operation: bool = False) -> None:
        with self._lock:
            self._get(key, operation).attempts += 1

    def record_success(self, key: str, latency_s: float, *, operation: bool = False) -> None:
        with self._lock:
            c = self._get(key, operation)
            c.successes += 1
            c.latencies.append(float(latency_s))

    def record_failure(self, key: str, error: BaseException, *, operation: bool = False) -> None:
        with self._lock:
            c = self._get(key, operation)
            c.failures_by_type[type(error).__name__] += 1
            c.error_times.append(self._clock())

    def record_retry(self, key: str, *, operation: bool = False) -> None:
        with self._lock:
            self._get(key, operation).retries += 1

    def record_fallback(self, key: str, *, operation: bool = False) -> None:
        with self._lock:
            self._get(key, operation).fallbacks += 1

    def record_skip(self, key: str) -> None:
        with self._lock:
            self._get(key, False).skips += 1

    # --- reading -------------------------------------------------------------------------------

    def get_recovery_stats(self) -> RecoveryStats:
        """A consistent snapshot of everything recorded so far."""
        with self._lock:
            now = self._clock()
            units = {k: c.snapshot(now, self._window) for k, c in self._units.items()}
            ops = {k: c.snapshot(now, self._window) for k, c in self._ops.items()}
            return RecoveryStats(
                units=units,
                operations=ops,
                requests=self._requests,
                answered=self._answered,
                exhausted=self._exhausted,
                rejected=self._rejected,
                total_fallbacks=sum(u.fallbacks for u in units.values()) + sum(o.fallbacks for o in ops.values()),
                total_retries=sum(u.retries for u in units.values()) + sum(o.retries for o in ops.values()),
                recent_errors=sum(u.recent_errors for u in units.values()) + sum(o.recent_errors for o in ops.values()),
                recent_error_window_s=self._window,
            )
