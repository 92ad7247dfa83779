"""The one guard every CLI command runs under: no traceback, one line, a documented exit code.

Project errors (:class:`~bitnet_coreml.errors.BitnetCoremlError`) are printed as ``error: <one line>``
with their exit code. Foreign exceptions should have been classified where the library was called
(the input at fault: exit 2 naming the file/node/tensor; the runtime: exit 3); what still reaches
the guard is classified here only when the class says enough by itself (out of memory; an OS error
naming a file), and anything else is a bug: exit 3 with ``internal error in <stage>: <type>:
<message> (rerun with --debug for the traceback)``. ``--debug`` (or ``BITNET_COREML_DEBUG=1``) prints
the traceback as well.

Library warnings (Python ``warnings`` and ``logging`` records) are held while the command runs: a
failing command prints exactly one line, a successful one prints each warning afterwards as one
``warning:`` line. With ``--json`` a failure also prints ``{"error", "exit_code", "message"}`` on stdout.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from bitnet_coreml.errors import (
    BitnetCoremlError,
    InputError,
    InternalError,
    ResourceMemoryError,
    RuntimeFailure,
    set_stage,
    stage_of,
)

T = TypeVar("T")

DEBUG_ENV = "BITNET_COREML_DEBUG"
MAX_MESSAGE = 2000  # characters of one error line (a hostile value's repr can be megabytes)

# OS errors that say the path the user gave is unusable (exit 2); any other OSError is the runtime's.
_INPUT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ELOOP,
                 errno.ENAMETOOLONG, errno.ENXIO, errno.EROFS, errno.EEXIST, errno.ENOTEMPTY}


def debug_enabled(flag: bool = False) -> bool:
    """``--debug`` or ``BITNET_COREML_DEBUG`` set to anything but empty/0/false."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def classify(exc: BaseException, where: str) -> BitnetCoremlError:
    """The project error to report for ``exc`` raised while running ``where`` (a command name)."""
    if isinstance(exc, BitnetCoremlError):
        return exc
    stage = stage_of(exc, where)
    text = " ".join(str(exc).split()) or "(no message)"
    if isinstance(exc, MemoryError):
        return ResourceMemoryError(f"out of memory in {stage} ({type(exc).__name__}: {text}); "
                                   "free memory or use a smaller model/input")
    if isinstance(exc, OSError) and exc.errno is not None:
        name = exc.filename if exc.filename is not None else ""
        reason = exc.strerror or text
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return RuntimeFailure(f"{name or stage}: {reason}; free disk space and rerun")
        if exc.errno in _INPUT_ERRNOS and name:
            return InputError(f"{name}: {reason}")
        return RuntimeFailure(f"{stage}: {type(exc).__name__}: {name + ': ' if name else ''}{reason}")
    return InternalError(stage, exc)


class _HeldWarnings(logging.Handler):
    """Collects warning records and ``warnings.warn`` calls while a command runs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a library's malformed log call must not become the error
            msg = str(record.msg)
        self.lines.append(f"warning: {record.name}: {' '.join(msg.split())}")

    def show_warning(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     file: Any = None, line: str | None = None) -> None:
        self.lines.append(f"warning: {category.__name__}: {' '.join(str(message).split())}")


def _truncate(line: str) -> str:
    return line if len(line) <= MAX_MESSAGE else line[:MAX_MESSAGE] + "... (message truncated)"


def run_guarded(fn: Callable[[], T], *, where: str, debug: bool, as_json: bool) -> T:
    """Run ``fn``; on failure print one line (and JSON when asked) and ``sys.exit`` with the exit code.

    ``SystemExit`` and click's own control-flow exceptions pass through unchanged.
    """
    import click

    root = logging.getLogger()
    held = _HeldWarnings()
    set_stage(None)
    if debug:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("bitnet_coreml").setLevel(logging.DEBUG)
    else:
        root.addHandler(held)
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = held.show_warning
            result = fn()
    except (SystemExit, click.exceptions.Exit) as e:
        code = e.code if isinstance(e, SystemExit) else e.exit_code
        root.removeHandler(held)
        if code in (None, 0):  # a command that failed through sys.exit already printed its one line
            _flush(held)
        raise
    except (KeyboardInterrupt, click.exceptions.Abort, click.ClickException):
        raise  # click prints its own usage errors and "Aborted!"
    except BaseException as e:  # noqa: BLE001  # the one place every exception is turned into a line
        err = classify(e, where)
        if debug:
            traceback.print_exception(e)
            if sys.version_info < (3, 11):  # 3.10's traceback does not print PEP 678 notes
                seen: BaseException | None = e
                while seen is not None:
                    for note in getattr(seen, "__notes__", ()):
                        sys.stderr.write(f"{note}\n")
                    seen = seen.__cause__ or seen.__context__
        line = _truncate(f"error: {err.one_line()}")
        if as_json:
            from bitnet_coreml._json import dump_json

            sys.stdout.write(dump_json({"error": type(err).__name__, "exit_code": err.exit_code,
                                        "message": _truncate(err.one_line())}) + "\n")
            sys.stdout.flush()
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        sys.exit(err.exit_code)
    finally:
        root.removeHandler(held)
    _flush(held)
    return result


def _flush(held: _HeldWarnings) -> None:
    seen: set[str] = set()
    for line in held.lines:
        if line not in seen:
            seen.add(line)
            sys.stderr.write(_truncate(line) + "\n")
    held.lines.clear()
