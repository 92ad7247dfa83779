"""Read an ``.mlpackage`` without writing into it and without following it outside itself.

coremltools' ``MLModel(path)`` opens a package through its C++ ``ModelPackage``, which rewrites
``Manifest.json`` on every open (a read-only or shared package breaks, and two readers race) and
follows the manifest's item paths wherever they point (``..``, absolute paths, symlinks). Every
reader in the project goes through :func:`read_package_spec` instead:

- ``Manifest.json`` is parsed as a bounded JSON document; every item path must be relative, free of
  ``..`` and resolve (symlinks included) inside the package's ``Data/`` folder;
- the root model's specification is parsed from its bytes (a corrupt one is refused naming the file);
- every weight the specification references (``blobFileValue``) must sit in a regular file inside the
  package, and its blob header (sentinel, size, data offset) must lie within that file, so a truncated
  ``weight.bin`` is refused here, before any weight is read.

:func:`package_spec_version` reads only the specification version (the protobuf's first field) of a
package (its manifest validated) or a bare ``.mlmodel``: the host checks need no more.

A command reads one package several times (``verify`` / ``report``: its metadata, then the executor,
then each compute unit's run): :func:`read_package_spec` parses and checks a package's specification
once and hands the same :class:`PackageSpec` to every later reader while the package's model files are
unchanged on disk (their inode, size and modification time; the manifest is validated on every call).
The specification it returns is shared: readers must not modify it.

Nothing is ever written.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitnet_coreml._files import inside, load_json, read_bytes, regular_file
from bitnet_coreml.errors import ModelLoadError

MANIFEST = "Manifest.json"
MAX_SPEC_BYTES = 1 << 31  # protobuf's own 2 GB message limit
_BLOB_SENTINEL = 0xDEADBEEF
_BLOB_HEADER = struct.Struct("<IIQQ")  # sentinel, MIL dtype, size in bytes, data offset (of a 64-byte record)
_MODEL_PATH = "@model_path/"
_PARSED_KEEP = 8  # packages whose parsed specification is kept (a command reads one or two)
_PARSED: OrderedDict[tuple[str, tuple[int, ...]], PackageSpec] = OrderedDict()
_PARSED_LOCK = threading.Lock()


@dataclass(frozen=True)
class PackageSpec:
    """A package's parsed specification and where its files are."""

    path: Path
    spec: Any  # coremltools.proto.Model_pb2.Model
    spec_file: Path
    weights_dir: Path


def _item_path(pkg: Path, data: Path, entry: object, manifest: Path) -> Path:
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise ModelLoadError(f"{manifest}: item {entry!r} has no 'path' string")
    rel = entry["path"]
    where = f"{manifest}: item path {rel!r}"
    if not rel or "\x00" in rel or os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise ModelLoadError(f"{where} is empty or absolute; items must be relative paths inside {pkg.name}/Data")
    if ".." in Path(rel.replace("\\", "/")).parts:
        raise ModelLoadError(f"{where} contains '..'; items must stay inside {pkg.name}/Data")
    return inside(data, data / rel, f"{where}", error=ModelLoadError)


def root_spec_path(path: str | os.PathLike[str]) -> Path:
    """The root model specification file of the package ``path``, its manifest validated (nothing parsed else)."""
    pkg = Path(path)
    if not pkg.exists():
        raise ModelLoadError(f"package {pkg} does not exist; give the path of a .mlpackage directory")
    manifest = pkg / MANIFEST
    if not pkg.is_dir() or not manifest.exists():
        raise ModelLoadError(f"package {pkg} is not an .mlpackage (no {MANIFEST}); give a package written by convert")
    inside(pkg, manifest, MANIFEST, error=ModelLoadError)
    doc = load_json(manifest, "package manifest", error=ModelLoadError)
    items = doc.get("itemInfoEntries") if isinstance(doc, dict) else None
    root_id = doc.get("rootModelIdentifier") if isinstance(doc, dict) else None
    if not isinstance(items, dict) or not isinstance(root_id, str) or root_id not in items:
        raise ModelLoadError(f"{manifest}: expected itemInfoEntries and a rootModelIdentifier naming one of them")
    data = pkg / "Data"
    paths = {k: _item_path(pkg, data, v, manifest) for k, v in items.items()}
    return paths[root_id]


def _model_file(package: Path) -> Path:
    if package.is_file():
        return package  # a bare .mlmodel
    return root_spec_path(package)  # manifest validated: its paths stay inside the package


def package_spec_version(package: str | os.PathLike[str]) -> int:
    """The Core ML specification version of a ``.mlpackage`` (or ``.mlmodel``): protobuf field 1 (varint)."""
    f = _model_file(Path(package))
    try:
        with open(f, "rb") as fh:
            head = fh.read(16)
    except OSError as e:
        raise ModelLoadError(f"{f}: cannot read the model spec: {e}") from e
    if not head or head[0] != 0x08:  # field 1, wire type 0
        raise ModelLoadError(f"{f}: does not start with a Core ML specificationVersion field")
    value, shift = 0, 0
    for b in head[1:]:
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value
        shift += 7
    raise ModelLoadError(f"{f}: truncated specificationVersion")


def _files_stamp(model_dir: Path) -> tuple[int, ...]:
    """Changes when a file under ``model_dir`` (the specification, the weight files) is replaced, rewritten,
    resized or swapped for a link."""
    out: list[int] = []
    for f in sorted(model_dir.rglob("*")):
        for st in (f.lstat(), f.stat()) if f.exists() else (f.lstat(),):
            out += (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
    return tuple(out)


def read_package_spec(path: str | os.PathLike[str]) -> PackageSpec:
    """Parse ``path``'s manifest and specification, validating every path and weight reference (read-only).

    Parsed once per package while its files are unchanged (the module docstring); the manifest is
    validated on every call."""
    pkg = Path(path)
    spec_file = root_spec_path(pkg)
    key = (f"{pkg.resolve()}\0{spec_file.resolve()}", _files_stamp(spec_file.parent))
    with _PARSED_LOCK:
        hit = _PARSED.get(key)
        if hit is not None:
            _PARSED.move_to_end(key)
            return hit if hit.path == pkg else PackageSpec(pkg, hit.spec, spec_file, spec_file.parent / "weights")
    parsed = _parse_package_spec(pkg, spec_file)
    with _PARSED_LOCK:
        _PARSED[key] = parsed
        while len(_PARSED) > _PARSED_KEEP:
            _PARSED.popitem(last=False)
    return parsed


def _parse_package_spec(pkg: Path, spec_file: Path) -> PackageSpec:
    from bitnet_coreml._quiet import coremltools

    coremltools()  # importing coremltools.proto runs coremltools/__init__: its off-macOS noise filtered
    from coremltools.proto import Model_pb2
    from google.protobuf.message import DecodeError

    raw = read_bytes(spec_file, "Core ML model specification", limit=MAX_SPEC_BYTES, error=ModelLoadError)
    try:
        spec = Model_pb2.Model.FromString(raw)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{spec_file}: not a Core ML model specification ({' '.join(str(e).split())[:200]})") from None
    model_dir = spec_file.parent
    weights = model_dir / "weights"
    check_blob_references(spec, model_dir, pkg)
    return PackageSpec(pkg, spec, spec_file, weights)


def _blob_values(spec: Any) -> list[Any]:
    """Every ``blobFileValue`` in the specification (an iterative walk: no recursion limit to hit)."""
    found = []
    stack = [spec]
    while stack:
        msg = stack.pop()
        for fd, value in msg.ListFields():
            if fd.message_type is None:
                continue
            if fd.name == "blobFileValue":
                found.append(value)
            elif hasattr(value, "ListFields"):
                stack.append(value)
            elif hasattr(value, "values"):  # a map field
                stack.extend(v for v in value.values() if hasattr(v, "ListFields"))
            else:  # a repeated message field
                stack.extend(value)
    return found


def check_blob_references(spec: Any, model_dir: Path, pkg: Path) -> None:
    """Each weight's blob record (and its data) must lie inside a regular weight file inside the package."""
    by_file: dict[str, set[int]] = {}
    for blob in _blob_values(spec):
        by_file.setdefault(str(blob.fileName), set()).add(int(blob.offset))
    for name, offsets in by_file.items():
        rel = name[len(_MODEL_PATH):] if name.startswith(_MODEL_PATH) else name
        if os.path.isabs(rel) or ".." in Path(rel).parts:
            raise ModelLoadError(f"{pkg}: weight file {name!r} is outside the package; refused")
        f = inside(pkg, model_dir / rel, f"weight file {name!r}", error=ModelLoadError)
        size = regular_file(f, "weight file", error=ModelLoadError).st_size
        with open(f, "rb") as fh:
            for off in sorted(offsets):
                _check_record(fh, f, off, size)


def read_blob(f: Path, off: int) -> np.ndarray:
    """The data bytes (uint8) of the weight record at offset ``off`` of weight file ``f`` (header checked)."""
    size = regular_file(f, "weight file", error=ModelLoadError).st_size
    with open(f, "rb") as fh:
        nbytes, data_off = _check_record(fh, f, off, size)
        out = np.empty(nbytes, dtype=np.uint8)
        fh.seek(data_off)
        if fh.readinto(out.data) != nbytes:
            raise ModelLoadError(f"{f}: weight at offset {off} is shorter than its record says (truncated package?)")
    return out


def _check_record(fh: Any, f: Path, off: int, size: int) -> tuple[int, int]:
    """Validate the record at ``off``; returns ``(data bytes, data offset)``."""
    if off + _BLOB_HEADER.size > size:
        raise ModelLoadError(f"{f}: weight record at offset {off} is past the end of the {size}-byte file "
                             "(truncated package?)")
    fh.seek(off)
    sentinel, _dtype, nbytes, data_off = _BLOB_HEADER.unpack(fh.read(_BLOB_HEADER.size))
    if sentinel != _BLOB_SENTINEL:
        raise ModelLoadError(f"{f}: no weight record at offset {off} (corrupt package)")
    if data_off + nbytes > size:
        raise ModelLoadError(f"{f}: weight at offset {off} needs bytes {data_off}..{data_off + nbytes} but the file "
                             f"has {size} (truncated package?)")
    return int(nbytes), int(data_off)
