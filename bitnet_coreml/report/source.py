"""The report's source check: the sha256 of the given source (hashed in a thread) against the package's record."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class SourceHash:
    """The source's sha256 as the converter records it (``convert.source_sha256``), computed in a thread.

    hashlib releases the GIL while it hashes, so reading an 800 MB source overlaps the executor and
    ONNX Runtime instead of adding to the report's time. ``model`` (the loaded source) names an ONNX
    file's external data without parsing the file again; the thread reads it first, and the caller may
    change the graph once :meth:`graph_read` returns (``run_ort`` does).
    """

    def __init__(self, source: str | os.PathLike[str], model: Any = None) -> None:
        import threading

        self._value: str | None = None
        self._error: BaseException | None = None
        self._graph_read = threading.Event()
        self._thread = threading.Thread(target=self._hash, args=(source, model), name="report-sha256", daemon=True)
        self._thread.start()

    def _hash(self, source: str | os.PathLike[str], model: Any) -> None:
        from bitnet_coreml.convert import external_data_files, source_sha256

        try:
            p = Path(source)
            external = external_data_files(p, model) if model is not None and p.is_file() else None
            self._graph_read.set()
            self._value = source_sha256(source, external=external)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by result()
            self._error = e
        finally:
            self._graph_read.set()

    def graph_read(self) -> None:
        """Return once the thread is done with the loaded model (it then reads only files)."""
        self._graph_read.wait()

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


def source_check(recorded: str | None, source: str | None, actual: str | None, notes: list[str]) -> dict[str, Any]:
    """The summary's source check: the sha256 the package records against the given source's."""
    if source is None or actual is None:
        return {"sha256": None, "matches": None, "verdict": "no source given"}
    if not recorded:
        return {"sha256": actual, "matches": None, "verdict": "the package records no source hash"}
    if actual != recorded:
        notes.append(f"{source} is not the file this package was converted from (sha256 {actual} differs from the "
                     f"package's {recorded})")
        return {"sha256": actual, "matches": False, "verdict": "differs: not the file the package was made from"}
    return {"sha256": actual, "matches": True, "verdict": "matches the package's record"}
