"""The error -> recovery-action table, exception classification and backoff, against hand-written expectations."""

from __future__ import annotations

import errno

import pytest

from bitnet_coreml import errors as E
from bitnet_coreml.runtime import (
    RecoveryAction,
    backoff_delay,
    classify_exception,
    handle_error,
    is_foreign_failure,
)

A = RecoveryAction

# (error, expected action), written from the taxonomy, not read from the code's table.
CASES = [
    (E.PlatformUnavailableError("x"), A.FALLBACK),
    (E.DeviceInitError("x"), A.FALLBACK),
    (E.ANEUnavailableError("x"), A.FALLBACK),
    (E.CapabilityMismatchError("x", ["m"]), A.FALLBACK),
    (E.OperationError("x"), A.RETRY),
    (E.TimeoutFailure("x"), A.FALLBACK),
    (E.ResourceMemoryError("x"), A.REDUCE_MEMORY),
    (E.ThermalError("x"), A.WAIT_THERMAL),
    (E.ModelError("x"), A.FALLBACK),
    (E.RuntimeFailure("x"), A.FALLBACK),
    (E.ExhaustedError("x"), A.GIVE_UP),
    (E.InputError("x"), A.GIVE_UP),
    (E.ModelLoadError("x"), A.GIVE_UP),
    (E.ConfigError("x"), A.GIVE_UP),
    (E.CheckFailedError("x"), A.GIVE_UP),
    (MemoryError(), A.REDUCE_MEMORY),
    (OSError(errno.ENOMEM, "Cannot allocate memory"), A.REDUCE_MEMORY),
    (TimeoutError(), A.FALLBACK),
    (Exception("Model prediction is only supported on macOS version 10.13 or later."), A.FALLBACK),
    (RuntimeError("ANECCompile() FAILED"), A.FALLBACK),
    (RuntimeError("device is in a serious thermal state"), A.WAIT_THERMAL),
    (RuntimeError("Failed to allocate 4 GB buffer"), A.REDUCE_MEMORY),
    (RuntimeError("boom"), A.RETRY),
    (ValueError("bad"), A.GIVE_UP),  # a bug: never retried
    (TypeError("bad"), A.GIVE_UP),
    (E.InternalError("x", KeyError("k")), A.GIVE_UP),
]


@pytest.mark.parametrize(("error", "expected"), CASES, ids=[f"{type(e).__name__}-{i}" for i, (e, _) in enumerate(CASES)])
def test_handle_error_table(error: BaseException, expected: RecoveryAction) -> None:
    assert handle_error(error) is expected


@pytest.mark.parametrize(("exc", "cls"), [
    (MemoryError("x"), E.ResourceMemoryError),
    (TimeoutError("x"), E.TimeoutFailure),
    (Exception("Model prediction is only supported on macOS"), E.PlatformUnavailableError),
    (RuntimeError("Error compiling model"), E.ModelError),
    (RuntimeError("boom"), E.OperationError),
])
def test_classify_exception_keeps_message(exc: BaseException, cls: type) -> None:
    err = classify_exception(exc, context="ane predict")
    assert type(err) is cls
    assert err.one_line().startswith(f"ane predict: {type(exc).__name__}: ")


def test_classify_bug_is_internal_error() -> None:
    err = classify_exception(KeyError("k"), context="reference predict")
    assert type(err) is E.InternalError
    assert err.one_line() == "internal error in reference predict: KeyError: 'k' (rerun with --debug for the traceback)"


class _SomeLibraryBug(Exception):
    """An exception class nobody declared as a device failure."""


@pytest.mark.parametrize("exc", [KeyError("k"), AssertionError(), AttributeError("a"), NotImplementedError("n"),
                                 RecursionError("r"), FloatingPointError("f"), _SomeLibraryBug("x")])
def test_anything_but_a_known_foreign_failure_is_a_bug(exc: BaseException) -> None:
    assert not is_foreign_failure(exc)
    assert type(classify_exception(exc, context="u")) is E.InternalError
    assert handle_error(exc) is A.GIVE_UP


def test_known_foreign_failures() -> None:
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    for exc in (Exception("Core ML"), RuntimeError("proxy"), OSError(5, "I/O error"), MemoryError(), TimeoutError(),
                Fail("ORT failed")):
        assert is_foreign_failure(exc), exc
        assert not isinstance(classify_exception(exc), E.InternalError)
    assert handle_error(Fail("[ONNXRuntimeError] : 1 : FAIL : boom")) is A.RETRY


def test_classify_passes_project_errors_through() -> None:
    e = E.ThermalError("hot")
    assert classify_exception(e) is e


@pytest.mark.parametrize(("i", "expected"), [(0, 0.1), (1, 0.3), (2, 0.9), (3, 1.0), (10, 1.0)])
def test_backoff_delay(i: int, expected: float) -> None:
    # base 0.1 s, factor 3, cap 1 s: 0.1, 0.3, 0.9, then capped
    assert backoff_delay(i, base_s=0.1, factor=3.0, cap_s=1.0) == pytest.approx(expected)


def test_backoff_delay_rejects_negative_index() -> None:
    with pytest.raises(ValueError):
        backoff_delay(-1, base_s=0.1, factor=2, cap_s=1)
