"""Import coremltools without its "Failed to load _MLModelProxy" noise on non-macOS hosts.

coremltools prints one line per missing native proxy to stderr when it is imported off macOS. Those
lines are noise for a user (PEERS.md: peers print them on every run), so every module of ours imports
coremltools through :func:`coremltools`, which filters exactly those lines and nothing else.
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


def coremltools() -> ModuleType:
    """Return the ``coremltools`` module, importing it quietly the first time."""
    if "coremltools" in sys.modules:
        return sys.modules["coremltools"]
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import coremltools as ct  # noqa: PLC0415
    for line in buf.getvalue().splitlines():
        if line and not line.startswith(_NOISE_PREFIXES):
            sys.stderr.write(line + "\n")
    # coremltools logs per-pass progress at INFO/WARNING; the CLI has its own progress display.
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    return ct
