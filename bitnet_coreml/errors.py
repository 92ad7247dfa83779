"""The project's error types and the exit codes the CLI maps them to.

Every message names the file / node / op / value at fault, gives the actual and the allowed
value, and says what to do next. Anything that is *not* a :class:`BitnetCoremlError` reaching the
CLI is a bug: the CLI's guard (``bitnet_coreml._guard``) reports it as one :class:`InternalError` line
naming the stage it happened in (:func:`stage`), and shows the traceback only with ``--debug``.

Exit codes (documented in the README):

* 0: success
* 1: a check or parity test failed (:class:`CheckFailedError`, :class:`ParityError`)
* 2: bad input or usage (:class:`InputError` and subclasses)
* 3: runtime failure after every fallback was exhausted (:class:`RuntimeFailure` and subclasses)

The runtime taxonomy (platform unavailable, device initialisation, ANE unavailable, capability
mismatch, operation failure, memory, thermal, model) follows the seed document; each class names the
recovery action the predictor takes by default (see ``bitnet_coreml.runtime.recovery.handle_error``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_RUNTIME = 3


class BitnetCoremlError(Exception):
    """Base class of every error the project raises on purpose."""

    exit_code: int = EXIT_RUNTIME

    def one_line(self) -> str:
        """The message as one line, for the CLI."""
        return " ".join(str(self).split())


STAGE_ATTR = "_bitnet_coreml_stage"
_CURRENT_STAGE: contextvars.ContextVar[str | None] = contextvars.ContextVar("bitnet_coreml_stage", default=None)


def set_stage(name: str | None) -> None:
    """Record the stage a long function has entered (its progress steps), for :func:`stage_of`."""
    _CURRENT_STAGE.set(name)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Name the pipeline stage (``import``, ``lower``, ...) of any foreign exception raised inside.

    The innermost stage wins; the CLI's guard uses it for ``internal error in <stage>: ...``.
    """
    try:
        yield
    except Exception as e:
        if not isinstance(e, BitnetCoremlError) and getattr(e, STAGE_ATTR, None) is None:
            with contextlib.suppress(AttributeError, TypeError):
                setattr(e, STAGE_ATTR, name)
        raise


def stage_of(exc: BaseException, default: str) -> str:
    """The stage recorded on ``exc`` by :func:`stage`, else the last :func:`set_stage`, else ``default``."""
    return str(getattr(exc, STAGE_ATTR, None) or _CURRENT_STAGE.get() or default)


# Exception classes that mean our code is wrong, not the device or the input: never retried, never
# reported as a device failure (the predictor gives up at once; the CLI says "internal error").
BUG_TYPES: tuple[type[BaseException], ...] = (
    TypeError, AttributeError, NameError, LookupError, AssertionError, NotImplementedError, ValueError,
    ZeroDivisionError, RecursionError, ImportError,
)


def is_bug(exc: BaseException) -> bool:
    """True if ``exc`` is a programming error (see :data:`BUG_TYPES`), not a device or input failure."""
    return isinstance(exc, BUG_TYPES) and not isinstance(exc, BitnetCoremlError)


class InternalError(BitnetCoremlError):
    """A bug: an exception the project did not expect. Exit 3; never retried; ``--debug`` shows the traceback."""

    exit_code = EXIT_RUNTIME

    def __init__(self, where: str, exc: BaseException) -> None:
        text = " ".join(str(exc).split()) or "(no message)"
        super().__init__(f"internal error in {where}: {type(exc).__name__}: {text} "
                         "(rerun with --debug for the traceback)")
        self.original = exc


# --- bad input (exit 2) --------------------------------------------------------------------------


class InputError(BitnetCoremlError):
    """The user gave us something we cannot use: a bad file, value, option or model."""

    exit_code = EXIT_BAD_INPUT


class ModelLoadError(InputError):
    """A model file (ONNX, checkpoint or package) is missing, unreadable, corrupt or unsafe."""


class UnsupportedOpError(InputError):
    """The graph contains ops the converter cannot lower; lists all of them at once."""


class ConfigError(InputError):
    """A pipeline, capability or strategy file has an unknown key or a bad value."""


# --- check / parity failures (exit 1) -----------------------------------------------------------


class CheckFailedError(BitnetCoremlError):
    """The pre-conversion check found violations for the requested target."""

    exit_code = EXIT_CHECK_FAILED


class ParityError(BitnetCoremlError):
    """A converted package does not match its source within the thresholds."""

    exit_code = EXIT_CHECK_FAILED


# --- runtime taxonomy (exit 3), from the seed ---------------------------------------------------


class RuntimeFailure(BitnetCoremlError):
    """A prediction or device operation failed; base of the seed's runtime taxonomy."""

    exit_code = EXIT_RUNTIME


class PlatformUnavailableError(RuntimeFailure):
    """The platform cannot run this compute unit at all (e.g. Core ML off macOS)."""


class DeviceInitError(RuntimeFailure):
    """A compute unit exists but could not be initialised (model load / compile for that unit failed)."""


class ANEUnavailableError(RuntimeFailure):
    """The Apple Neural Engine is absent or not accessible."""


class CapabilityMismatchError(RuntimeFailure):
    """The device does not meet the operation's requirements; ``mismatches`` lists every one."""

    def __init__(self, message: str, mismatches: list[str] | None = None) -> None:
        super().__init__(message)
        self.mismatches = list(mismatches or [])


class OperationError(RuntimeFailure):
    """An operation (a prediction) failed on a unit that was otherwise healthy."""


class ResourceMemoryError(RuntimeFailure):
    """Not enough memory for the operation."""


class ThermalError(RuntimeFailure):
    """The device is too hot (thermal state serious / critical)."""


class ModelError(RuntimeFailure):
    """The model could not be compiled or loaded for execution, or produced invalid output."""


class TimeoutFailure(OperationError):
    """A unit did not answer within its timeout."""


class ExhaustedError(RuntimeFailure):
    """Every unit in the fallback chain failed; ``attempts`` records what each one said."""

    def __init__(self, message: str, attempts: list[dict[str, object]] | None = None) -> None:
        super().__init__(message)
        self.attempts = list(attempts or [])
