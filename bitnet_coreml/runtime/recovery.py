"""The seed's error taxonomy mapped to recovery actions, plus exception classification and backoff.

Everything here is pure: :func:`handle_error` looks an error's class up in :data:`RECOVERY_TABLE`,
:func:`classify_exception` turns a foreign exception (what Core ML or numpy raised) into the project's
taxonomy, and :func:`backoff_delay` computes the wait before a retry. The predictor decides *how often*
an action may repeat (``FallbackStrategy.max_retry_attempts``); this module only decides *which* action.
"""

from __future__ import annotations

import enum
import errno

from bitnet_coreml.errors import (
    ANEUnavailableError,
    BitnetCoremlError,
    CapabilityMismatchError,
    DeviceInitError,
    ExhaustedError,
    InputError,
    InternalError,
    ModelError,
    OperationError,
    PlatformUnavailableError,
    ResourceMemoryError,
    RuntimeFailure,
    ThermalError,
    TimeoutFailure,
    is_bug,
)


class RecoveryAction(str, enum.Enum):
    """What to do after an error (the seed's recovery strategies)."""

    RETRY = "retry"  # same unit again, after an exponential backoff delay
    FALLBACK = "fallback"  # give up on this unit, try the next one in the chain
    REDUCE_MEMORY = "reduce_memory"  # free memory (unload other units), lower the batch size, retry
    WAIT_THERMAL = "wait_thermal"  # wait for the thermal state to settle, then retry
    GIVE_UP = "give_up"  # no unit can help (bad input, every unit exhausted)


# Ordered most specific first: the first class the error is an instance of wins, so a subclass
# (TimeoutFailure) can have a different action than its base (OperationError).
RECOVERY_TABLE: tuple[tuple[type[BaseException], RecoveryAction, str], ...] = (
    (InputError, RecoveryAction.GIVE_UP, "bad input fails the same way on every unit"),
    (InternalError, RecoveryAction.GIVE_UP, "a bug in this program: retrying or another unit cannot fix it"),
    (ExhaustedError, RecoveryAction.GIVE_UP, "every unit already failed"),
    (PlatformUnavailableError, RecoveryAction.FALLBACK, "the platform lacks this unit; retrying cannot help"),
    (ANEUnavailableError, RecoveryAction.FALLBACK, "no usable Neural Engine; the GPU or CPU can run the model"),
    (CapabilityMismatchError, RecoveryAction.FALLBACK, "this unit cannot run the model; a later unit may"),
    (DeviceInitError, RecoveryAction.FALLBACK, "loading for this unit failed; a reload rarely differs"),
    (TimeoutFailure, RecoveryAction.FALLBACK, "a hung unit would hang again and cost another timeout"),
    (ResourceMemoryError, RecoveryAction.REDUCE_MEMORY, "freeing memory or a smaller batch may fit"),
    (ThermalError, RecoveryAction.WAIT_THERMAL, "the device recovers when it cools down"),
    (ModelError, RecoveryAction.FALLBACK, "the unit compiled or computed the model wrongly"),
    (OperationError, RecoveryAction.RETRY, "a transient failure on a healthy unit"),
    (RuntimeFailure, RecoveryAction.FALLBACK, "an unclassified runtime failure: move on"),
    (BitnetCoremlError, RecoveryAction.GIVE_UP, "a project error outside the runtime taxonomy"),
)


def handle_error(error: BaseException) -> RecoveryAction:
    """The recovery action for ``error`` (foreign exceptions are classified first)."""
    if not isinstance(error, BitnetCoremlError):
        error = classify_exception(error)
    for cls, action, _why in RECOVERY_TABLE:
        if isinstance(error, cls):
            return action
    return RecoveryAction.GIVE_UP  # unreachable: BitnetCoremlError is the table's last row


def recovery_reason(error: BaseException) -> str:
    """Why :func:`handle_error` chose its action, for reports."""
    if not isinstance(error, BitnetCoremlError):
        error = classify_exception(error)
    for cls, _action, why in RECOVERY_TABLE:
        if isinstance(error, cls):
            return why
    return "unclassified"


# Where the foreign exceptions a unit may legitimately raise come from (see is_foreign_failure).
_FOREIGN_MODULES = ("onnxruntime.",)  # ORT's pybind error classes (Fail, RuntimeException, EPFail, ...)
_FOREIGN_TYPES: tuple[type[BaseException], ...] = (RuntimeError, OSError, MemoryError, TimeoutError)


def is_foreign_failure(exc: BaseException) -> bool:
    """True for the failures a device or library reports, which recovery may retry or fall back on.

    Known foreign failures: Core ML / coremltools (a bare ``Exception`` or a ``RuntimeError`` from the
    native proxy), ONNX Runtime (its ``onnxruntime.capi`` error classes), the OS (``OSError``,
    ``MemoryError``, ``TimeoutError``). Everything else (``TypeError``, ``KeyError``,
    ``AssertionError``, an unknown exception class, ... and ``NotImplementedError`` /
    ``RecursionError`` although they are ``RuntimeError`` s) is a bug in this program.
    """
    if isinstance(exc, BitnetCoremlError) or is_bug(exc):
        return False
    if type(exc) is Exception or isinstance(exc, _FOREIGN_TYPES):
        return True
    return type(exc).__module__.startswith(_FOREIGN_MODULES)


def classify_exception(exc: BaseException, *, context: str = "") -> BitnetCoremlError:
    """Map an exception raised by Core ML, ONNX Runtime or the OS onto the project's runtime taxonomy.

    Project errors pass through unchanged. Anything that is not a known foreign failure
    (:func:`is_foreign_failure`: ``TypeError``, ``KeyError``, an unknown class, ...) is a bug and
    becomes an :class:`InternalError`, which is never retried nor handed to another unit; it keeps
    the original exception as its cause (``--debug`` prints the traceback). The message keeps the
    original type and text so a report still shows what the library said.
    """
    if isinstance(exc, BitnetCoremlError):
        return exc
    if not is_foreign_failure(exc):
        return InternalError(context or "the predictor", exc)
    where = f"{context}: " if context else ""
    text = f"{where}{type(exc).__name__}: {' '.join(str(exc).split()) or '(no message)'}"
    low = str(exc).lower()
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return ResourceMemoryError(text)
    if isinstance(exc, TimeoutError):
        return TimeoutFailure(text)
    if "only supported on macos" in low or "not supported on this platform" in low:
        return PlatformUnavailableError(text)
    if "thermal" in low:
        return ThermalError(text)
    if "out of memory" in low or "insufficient memory" in low or "failed to allocate" in low:
        return ResourceMemoryError(text)
    if "compil" in low or "anec" in low or "espresso" in low:
        return ModelError(text)
    return OperationError(text)


def backoff_delay(retry_index: int, *, base_s: float, factor: float, cap_s: float) -> float:
    """Delay before retry number ``retry_index`` (0-based): ``min(base * factor**i, cap)``."""
    if retry_index < 0:
        raise ValueError(f"retry_index must be >= 0, got {retry_index}")
    return float(min(base_s * factor**retry_index, cap_s))
