"""One loaded package shared by the executors of its functions (multifunction packages).

The functions of a stateful package (``prefill``, ``decode``) hold the same weights: the package
stores each once and their ops point at the same offset of ``weight.bin``. :class:`SharedPackage`
reads the MIL program once for all executors of a package and records, per function, which blob
entry every constant comes from (``blob_keys``); the compiler then keys constants and everything it
folds from them at load (the dense weights decoded from 2-bit LUTs, transposed weights ...) by those
entries, so a second function reuses the first one's arrays instead of decoding them again.

Executors of the same package path (unchanged on disk) get the same :class:`SharedPackage` while any
of them is alive (a weak cache), so ``ReferenceExecutor(pkg, function_name="prefill")`` and
``ReferenceExecutor(pkg, function_name="decode")`` share memory without knowing of each other.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Any

ConstKey = tuple[Any, ...]

__all__ = ["SharedPackage", "shared_package", "blob_keys"]


class SharedPackage:
    """A loaded program plus the constants its functions' executors have already computed."""

    def __init__(self, program: Any, default_function: str | None, where: str,
                 keys: dict[str, dict[str, ConstKey]] | None = None, *, blobs: Any = None) -> None:
        self.program = program
        self.blobs = blobs  # executor.blobs.LazyBlobs: weights still in the package file, or None
        self.default_function = default_function
        self.where = where
        self.keys = keys or {}  # function -> MIL name (const output / "op:param") -> blob key
        self._values: dict[bool, dict[ConstKey, Any]] = {False: {}, True: {}}
        self.lock = threading.Lock()

    def values(self, fp32: bool) -> dict[ConstKey, Any]:
        """Computed constants by key, for executors of precision mode ``fp32``."""
        return self._values[fp32]


def blob_keys(spec: Any) -> dict[str, dict[str, ConstKey]]:
    """Per function of an ML Program spec: MIL name -> ``("blob", file, offset)`` of every weight.

    A ``const`` op is named by its output; a blob-valued input of any other op (the indices and LUT
    of a ``constexpr_lut_to_dense``) by ``"<op name>:<parameter>"``.
    """
    out: dict[str, dict[str, ConstKey]] = {}
    for fname, func in spec.mlProgram.functions.items():
        keys: dict[str, ConstKey] = {}
        for block in func.block_specializations.values():
            for op in block.operations:
                val = op.attributes.get("val") if op.type == "const" else None
                if val is not None and val.HasField("blobFileValue"):
                    keys[op.outputs[0].name] = ("blob", val.blobFileValue.fileName, int(val.blobFileValue.offset))
                for param, arg in op.inputs.items():
                    for b in arg.arguments:
                        if b.WhichOneof("binding") == "value" and b.value.HasField("blobFileValue"):
                            fv = b.value.blobFileValue
                            keys[f"{op.outputs[0].name}:{param}"] = ("blob", fv.fileName, int(fv.offset))
        out[fname] = keys
    return out


_CACHE: weakref.WeakValueDictionary[tuple[str, tuple[int, ...]], SharedPackage] = weakref.WeakValueDictionary()
_CACHE_LOCK = threading.Lock()


def _stamp(path: Path) -> tuple[int, ...]:
    """Changes whenever the package's model or weights are rewritten. (Not Manifest.json: coremltools
    rewrites it each time it opens a package.)"""
    files = sorted((path / "Data").rglob("*"))
    return tuple(int(v) for f in files if f.is_file() for v in (f.stat().st_mtime_ns, f.stat().st_size, f.stat().st_ino))


def shared_package(path: str | Path, load: Any) -> SharedPackage:
    """The :class:`SharedPackage` of the package at ``path`` (``load(path) -> SharedPackage`` on a miss)."""
    p = Path(path).resolve()
    key = (str(p), _stamp(p))
    with _CACHE_LOCK:
        pkg = _CACHE.get(key)
        if pkg is None:
            pkg = load(path)
            _CACHE[key] = pkg
        return pkg
