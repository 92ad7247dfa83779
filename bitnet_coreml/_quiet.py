"""Import coremltools without its "Failed to load _MLModelProxy" noise on non-macOS hosts.

coremltools logs (or prints) one line per missing native proxy when it is imported off macOS. Those
lines are noise for a user (PEERS.md: peers print them on every run), so every module of ours imports
coremltools through :func:`coremltools`, which filters exactly those lines and nothing else, whether
they reach stderr directly or through a logging handler (the CLI's guard installs one).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from types import ModuleType

_NOISE_PREFIXES = ("Failed to load _MLModel", "Failed to load _MLComputePlan", "Failed to load _MLCPU",
                   "Failed to load _MLGPU", "Failed to load _MLNeuralEngine", "Failed to load _MLModelAsset",
                   "Failed to load _MLCompute")


class _Hold(logging.Handler):
    """Keeps the records coremltools logs while it is imported, to drop the noise among them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def coremltools() -> ModuleType:
    """Return the ``coremltools`` module, importing it quietly the first time."""
    if "coremltools" in sys.modules:
        return sys.modules["coremltools"]
    buf = io.StringIO()
    held = _Hold()
    ct_log = logging.getLogger("coremltools")
    ct_log.addHandler(held)
    propagate, ct_log.propagate = ct_log.propagate, False
    try:
        with contextlib.redirect_stderr(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import coremltools as ct
    finally:
        ct_log.removeHandler(held)
        ct_log.propagate = propagate
    for line in buf.getvalue().splitlines():
        if line and not line.startswith(_NOISE_PREFIXES):
            sys.stderr.write(line + "\n")
    for record in held.records:
        if not record.getMessage().startswith(_NOISE_PREFIXES):
            logging.getLogger(record.name).handle(record)
    # coremltools logs per-pass progress at INFO/WARNING; the CLI has its own progress display.
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    return ct
