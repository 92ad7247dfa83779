"""Packages converted once per test session, shared by every test file that asks for the same one.

A conversion of a bundled checkpoint takes seconds; several test folders need the same stateful and
stateless packages of it. :class:`PackageCache` (the ``converted`` fixture in ``tests/conftest.py``)
converts each distinct ``(source, ConvertOptions)`` once into a session temp folder and hands out its
path. Tests must not modify a cached package (copy it first).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bitnet_coreml.convert import ConvertOptions, convert


class PackageCache:
    """``get(source, **options)``: the package ``convert(source, ..., ConvertOptions(**options))`` writes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._done: dict[tuple[str, ConvertOptions], Path] = {}

    def get(self, source: str | os.PathLike[str], **options: Any) -> Path:
        opts = ConvertOptions(**options)
        key = (str(Path(source).resolve()), opts)
        if key not in self._done:
            out = self.root / f"{Path(source).stem}-{len(self._done)}.mlpackage"
            convert(source, out, opts)
            self._done[key] = out
        return self._done[key]
