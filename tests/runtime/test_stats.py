"""Recovery statistics: counts, failure types, recent-error window and latency percentiles (hand-computed)."""

from __future__ import annotations

import pytest

from bitnet_coreml import errors as E
from bitnet_coreml.runtime import ErrorRecovery, RecoveryAction


class Clock:
    """A settable clock: the window test needs controlled time, not sleeps."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_counts_and_failure_types() -> None:
    rec = ErrorRecovery(clock=Clock())
    for _ in range(3):
        rec.record_attempt("ane")
    rec.record_failure("ane", E.OperationError("x"))
    rec.record_retry("ane")
    rec.record_failure("ane", E.OperationError("x"))
    rec.record_failure("ane", E.TimeoutFailure("x"))
    rec.record_fallback("ane")
    rec.record_skip("gpu")
    rec.record_attempt("reference")
    rec.record_success("reference", 0.5)
    rec.record_request()
    rec.record_outcome(True)
    s = rec.get_recovery_stats()
    ane = s.units["ane"]
    assert (ane.attempts, ane.successes, ane.failures, ane.retries, ane.fallbacks) == (3, 0, 3, 1, 1)
    assert ane.failures_by_type == {"OperationError": 2, "TimeoutFailure": 1}
    assert s.units["gpu"].skips == 1 and s.units["gpu"].attempts == 0
    assert s.units["reference"].latency_mean_s == pytest.approx(0.5)
    assert (s.requests, s.answered, s.exhausted, s.rejected, s.total_fallbacks, s.total_retries) == (1, 1, 0, 0, 1, 1)
    assert s.to_dict()["units"]["ane"]["failures_by_type"]["TimeoutFailure"] == 1


def test_recent_errors_window() -> None:
    clock = Clock()
    rec = ErrorRecovery(recent_error_window_s=10.0, clock=clock)
    rec.record_failure("cpu", E.OperationError("a"))  # t=1000
    clock.t = 1005.0
    rec.record_failure("cpu", E.OperationError("b"))  # t=1005
    clock.t = 1012.0  # first error is 12 s old, second 7 s
    s = rec.get_recovery_stats()
    assert s.units["cpu"].recent_errors == 1
    assert s.units["cpu"].failures == 2
    clock.t = 1016.0
    assert rec.get_recovery_stats().recent_errors == 0


def test_latency_percentiles() -> None:
    rec = ErrorRecovery(latency_window=1000)
    for i in range(1, 101):  # 1..100 ms
        rec.record_success("reference", i / 1000)
    u = rec.get_recovery_stats().units["reference"]
    # mean of 1..100 = 50.5; linear-interpolated p50 = 50.5, p95 = 95.05 (rank 0.95*99 = 94.05 -> 95 + 0.05)
    assert u.latency_count == 100
    assert u.latency_mean_s == pytest.approx(0.0505)
    assert u.latency_p50_s == pytest.approx(0.0505)
    assert u.latency_p95_s == pytest.approx(0.09505)


def test_latency_window_keeps_the_most_recent() -> None:
    rec = ErrorRecovery(latency_window=3)
    for v in (10.0, 1.0, 2.0, 3.0):
        rec.record_success("gpu", v)
    u = rec.get_recovery_stats().units["gpu"]
    assert u.latency_count == 3 and u.latency_mean_s == pytest.approx(2.0) and u.successes == 4


def test_operations_are_separate_from_units() -> None:
    rec = ErrorRecovery()
    rec.record_attempt("gemm", operation=True)
    rec.record_failure("gemm", E.OperationError("x"), operation=True)
    s = rec.get_recovery_stats()
    assert "gemm" in s.operations and "gemm" not in s.units
    assert s.recent_errors == 1


def test_handle_error_on_the_manager() -> None:
    assert ErrorRecovery.handle_error(E.ThermalError("x")) is RecoveryAction.WAIT_THERMAL
