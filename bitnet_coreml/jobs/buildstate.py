"""The incremental-build manifest of a pipeline's output folder (``.bitnet-coreml-build.json``).

Each built package is recorded under ``"<model>@<target>"`` with the *input hash* it was built from:
sha256 over the content of the source (every file of a checkpoint folder, or the ONNX file plus
the external-data files it references), the calibration and verify-input files, the canonical JSON
of the pipeline entry for that target, and the converter version (bitnet-coreml and coremltools).
A later run skips the entry when the input hash is unchanged, the package exists and its content
hash still equals the recorded one; anything else rebuilds it. Content hashes, not timestamps,
decide: a fresh clone (new mtimes) skips, an edited byte rebuilds. File hashes are cached by
(size, mtime) so an unchanged multi-GB source is not re-read on every run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bitnet_coreml import __version__
from bitnet_coreml.jobs._io import atomic_write_json, sha256_tree
from bitnet_coreml.jobs.spec import ModelEntry, Target

log = logging.getLogger(__name__)

MANIFEST_NAME = ".bitnet-coreml-build.json"
FORMAT_VERSION = 1


def converter_version() -> str:
    try:
        ct = metadata.version("coremltools")
    except metadata.PackageNotFoundError:  # pragma: no cover - a hard dependency
        ct = "unknown"
    return f"bitnet-coreml {__version__}; coremltools {ct}"


@dataclass(frozen=True)
class BuildRecord:
    input_hash: str
    package: str  # file name inside the output folder
    package_hash: str
    status: str
    report: str
    seconds: float
    converter: str


class BuildState:
    """Load, query and update the manifest; every update is written atomically at once."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / MANIFEST_NAME
        self.entries: dict[str, BuildRecord] = {}
        self.stat_cache: dict[str, Any] = {}
        self._external: dict[str, Any] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if data.get("format") == FORMAT_VERSION:
                    self.entries = {k: BuildRecord(**v) for k, v in data.get("entries", {}).items()}
                    self.stat_cache = data.get("stat_cache", {})
                    self._external = data.get("external_data", {})
            except (ValueError, TypeError) as e:
                # A damaged manifest only costs a rebuild; it must not stop the build.
                log.warning("%s: unreadable build manifest (%s); rebuilding everything", self.path, e)

    def save(self) -> None:
        atomic_write_json(self.path, {
            "format": FORMAT_VERSION,
            "entries": {k: asdict(v) for k, v in sorted(self.entries.items())},
            "stat_cache": self.stat_cache,
            "external_data": self._external,
        })

    def input_hash(self, entry: ModelEntry, target: Target, base: Path) -> str:
        h = hashlib.sha256()
        h.update(converter_version().encode() + b"\n")
        h.update(json.dumps(entry.canonical(target, base), sort_keys=True).encode() + b"\n")
        for path in self.input_files(entry):
            h.update(path.name.encode() + b"\0" + sha256_tree(path, self.stat_cache).encode() + b"\n")
        return h.hexdigest()

    def input_files(self, entry: ModelEntry) -> list[Path]:
        files = [entry.source]
        if entry.source.is_file() and entry.source.suffix.lower() == ".onnx":
            files += self._external_data(entry.source)
        for extra in (entry.calibration, entry.verify.inputs, *entry.capabilities):
            if extra is not None:
                files.append(extra)
        return files

    def _external_data(self, onnx_path: Path) -> list[Path]:
        """External-data files an ONNX file references (cached by the file's size and mtime)."""
        st = onnx_path.stat()
        key = str(onnx_path.resolve())
        hit = self._external.get(key)
        if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
            names = hit["files"]
        else:
            from bitnet_coreml.convert import external_data_files  # only when the source changed

            names = [str(f.relative_to(onnx_path.parent)) for f in external_data_files(onnx_path, must_exist=False)]
            self._external[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "files": names}
        return [onnx_path.parent / n for n in names if (onnx_path.parent / n).exists()]

    def up_to_date(self, key: str, input_hash: str, package: Path) -> bool:
        rec = self.entries.get(key)
        if rec is None or rec.status != "ok" or rec.input_hash != input_hash or not package.exists():
            return False
        return sha256_tree(package, self.stat_cache) == rec.package_hash
