"""Process-wide allocator settings: made by the program that owns the process, never by library code.

:func:`mmap_large_allocations` has glibc serve allocations of 1 MiB and more with ``mmap``, so freeing
them returns the memory to the OS. By default glibc raises its mmap threshold (up to 32 MiB) after
each large free, so the fp16 calibration's fp32 weight temporaries of 6-32 MiB then come from the
heap, where the outputs kept between them pin the pages: the 2B checkpoint's ONNX Runtime run ended
3 GB higher than it started (docs/benchmarks/hf.md: RSS after the run 4.8 GB -> 1.7 GB with it).

Why not inside ``lower/fp16.py`` (where it used to be) or a context manager: the setting is global to
the process, and glibc can neither report the current threshold nor turn its dynamic adjustment back
on once ``M_MMAP_THRESHOLD`` is set, so a library call could not undo it for an application that
imported us. The CLI sets it for the commands that run the source graph in ONNX Runtime
(``bitnet_coreml.cli.HEAP_BOUND_COMMANDS``); a Python program converting big checkpoints calls this
itself once, at start. No-op off glibc.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 1 << 20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def mmap_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process; False when not glibc / unavailable."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        log.debug("mallopt unavailable; the heap may keep freed memory")
        return False
