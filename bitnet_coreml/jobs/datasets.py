"""Streaming readers for batch-job datasets.

Three layouts are accepted (see ``docs/pipelines.md``):

* a folder of ``.npz`` files: one item per file, id = file name without ``.npz``;
* one ``.npz`` whose arrays share a leading batch dimension: item ``i`` is row ``i`` of every array;
* a ``.jsonl`` file: one JSON object per line, an optional ``"id"`` and one key per input holding
  a (nested) list of numbers.

A dataset is consumed as a stream of :class:`ItemRef`: small, picklable descriptions of where an
item lives, which the worker that predicts it loads with :func:`load_item`. So the process that
drives a job never holds more than the items in flight, whatever the dataset size. Rows of an
uncompressed ``.npz`` are read at their byte offset; compressed members cannot be seeked cheaply, so
their rows are decoded sequentially by the driver and travel inline.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitnet_coreml._files import (
    check_budget,
    load_npz,
    npz_headers,
    parse_json,
    read_npy_header,
    refuse_special,
)
from bitnet_coreml.errors import InputError

log = logging.getLogger(__name__)

KINDS = ("npz-folder", "npz-batch", "jsonl")
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class ItemRef:
    """Where one dataset item lives. ``locator`` is interpreted by :func:`load_item`."""

    id: str
    index: int
    locator: tuple[Any, ...]
    inline: dict[str, np.ndarray] | None = field(default=None, compare=False)


def safe_name(item_id: str) -> str:
    """A file name for an item id: unchanged when already safe, else sanitised plus a short hash."""
    if item_id and not _SAFE.search(item_id) and not item_id.startswith("."):
        return item_id
    import hashlib  # rare path

    digest = hashlib.sha256(item_id.encode()).hexdigest()[:10]
    return f"{_SAFE.sub('_', item_id).lstrip('.')[:80]}-{digest}"


class Dataset(ABC):
    """A dataset on disk; iterate :meth:`refs` to stream it."""

    kind: str = ""

    def __init__(self, path: Path) -> None:
        self.path = path

    @abstractmethod
    def __len__(self) -> int:
        """Number of items."""

    @abstractmethod
    def refs(self) -> Iterator[ItemRef]:
        """Stream the items' references in a stable order."""

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path.resolve()), "kind": self.kind, "items": len(self)}


class NpzFolder(Dataset):
    kind = "npz-folder"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        # Names only (not contents) are held; sorted so item order, and so output order, is stable.
        self._names = sorted(e.name for e in os.scandir(path) if e.name.endswith(".npz") and e.is_file())
        if not self._names:
            raise InputError(f"dataset {path}: folder has no .npz files; expected one .npz file per item")
        for name in self._names:  # headers only: a lying or pickled item is refused before the job starts
            npz_headers(path / name, "dataset item")

    def __len__(self) -> int:
        return len(self._names)

    def refs(self) -> Iterator[ItemRef]:
        for i, name in enumerate(self._names):
            yield ItemRef(name[: -len(".npz")], i, ("npz", str(self.path / name)))


@dataclass(frozen=True)
class _Column:
    name: str
    offset: int  # absolute file offset of row 0 (stored members only)
    dtype: str
    row_shape: tuple[int, ...]
    compressed: bool


class NpzBatch(Dataset):
    kind = "npz-batch"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        heads = npz_headers(path, "dataset", budget=False)  # declared shapes vs stored bytes, no pickles
        for name, (shape, dtype) in heads.items():
            row = math.prod(shape[1:]) * dtype.itemsize
            check_budget(row, f"dataset {path}: one row of array {name!r} (shape {list(shape[1:])})")
        try:
            self._columns, self._rows = _scan_npz(path)
        except (OSError, zipfile.BadZipFile, ValueError) as e:
            raise InputError(f"dataset {path}: not a readable .npz file ({e})") from e

    def __len__(self) -> int:
        return self._rows

    def refs(self) -> Iterator[ItemRef]:
        width = len(str(max(self._rows - 1, 0)))
        stored = tuple((c.name, c.offset, c.dtype, c.row_shape) for c in self._columns if not c.compressed)
        packed = [c for c in self._columns if c.compressed]
        with zipfile.ZipFile(self.path) as zf:
            streams = {c.name: zf.open(f"{c.name}.npy") for c in packed}
            try:
                for s in streams.values():
                    read_npy_header(s)
                for i in range(self._rows):
                    inline = None
                    if packed:
                        inline = {c.name: _read_row(streams[c.name], c) for c in packed}
                    yield ItemRef(f"{i:0{width}d}", i, ("npz-row", str(self.path), i, stored), inline)
            finally:
                for s in streams.values():
                    s.close()


def _read_row(f: Any, col: _Column) -> np.ndarray:
    dtype = np.dtype(col.dtype)
    n = int(np.prod(col.row_shape, dtype=np.int64)) * dtype.itemsize
    data = f.read(n)
    if len(data) != n:
        raise InputError(f"dataset: array '{col.name}' is truncated")
    return np.frombuffer(data, dtype=dtype).reshape(col.row_shape).copy()


def _scan_npz(path: Path) -> tuple[list[_Column], int]:
    columns: list[_Column] = []
    rows: int | None = None
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[: -len(".npy")]
            with zf.open(info) as f:
                shape, fortran, dtype = read_npy_header(f)
                header_len = f.tell()
            if dtype.hasobject:
                raise InputError(f"dataset {path}: array '{name}' holds Python objects; only numeric arrays are allowed")
            if not shape:
                raise InputError(f"dataset {path}: array '{name}' is a scalar; every array needs a leading batch dimension")
            if fortran:
                raise InputError(f"dataset {path}: array '{name}' is Fortran-ordered; save it C-ordered (np.ascontiguousarray)")
            if rows is None:
                rows = shape[0]
            elif shape[0] != rows:
                raise InputError(f"dataset {path}: array '{name}' has {shape[0]} rows but the others have {rows};"
                                 " every array needs the same leading batch dimension")
            offset = 0
            compressed = info.compress_type != zipfile.ZIP_STORED
            if not compressed:
                raw.seek(info.header_offset + 26)
                fname_len, extra_len = np.frombuffer(raw.read(4), dtype="<u2")
                offset = info.header_offset + 30 + int(fname_len) + int(extra_len) + header_len
            columns.append(_Column(name, offset, dtype.str, tuple(shape[1:]), compressed))
    if not columns or rows is None:
        raise InputError(f"dataset {path}: the .npz holds no arrays")
    return columns, rows


class JsonLines(Dataset):
    kind = "jsonl"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._count = 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):  # every line is parsed once now: a broken file is refused whole
                if line.strip():
                    obj = parse_json(line, f"{path}:{lineno}")
                    if not isinstance(obj, dict):
                        raise InputError(f"{path}:{lineno}: expected a JSON object of named arrays, found "
                                         f"{type(obj).__name__}")
                    self._count += 1
        if not self._count:
            raise InputError(f"dataset {path}: no items (empty .jsonl)")

    def __len__(self) -> int:
        return self._count

    def refs(self) -> Iterator[ItemRef]:
        width = len(str(max(self._count - 1, 0)))
        index = 0
        with open(self.path, "rb") as f:
            lineno = 0
            while True:
                offset = f.tell()
                line = f.readline()
                if not line:
                    break
                lineno += 1
                if not line.strip():
                    continue
                item_id = f"{index:0{width}d}"
                try:
                    obj = json.loads(line)
                    if isinstance(obj, dict) and "id" in obj:
                        item_id = str(obj["id"])
                except ValueError:
                    pass  # the worker re-parses and records the error against this item
                yield ItemRef(item_id, index, ("jsonl", str(self.path), offset, lineno))
                index += 1


def open_dataset(path: str | os.PathLike[str]) -> Dataset:
    """Open a dataset by its layout; raises :class:`InputError` naming what is accepted."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"dataset {p}: no such file or folder")
    refuse_special(p, "dataset")
    if p.is_dir():
        return NpzFolder(p)
    if p.suffix == ".npz":
        return NpzBatch(p)
    if p.suffix == ".jsonl":
        return JsonLines(p)
    raise InputError(f"dataset {p}: unknown layout '{p.suffix or p.name}'; expected a folder of .npz files,"
                     " one .npz with a leading batch dimension, or a .jsonl file")


def load_item(ref: ItemRef) -> dict[str, np.ndarray]:
    """The input arrays of one item (runs in the worker that predicts it)."""
    if ref.inline is not None and ref.locator[0] != "npz-row":
        return dict(ref.inline)
    kind = ref.locator[0]
    if kind == "npz":
        return load_npz(ref.locator[1], "dataset item")
    if kind == "npz-row":
        _, path, row, stored = ref.locator
        out: dict[str, np.ndarray] = dict(ref.inline or {})
        with open(path, "rb") as f:
            for name, offset, dtype_str, row_shape in stored:
                dtype = np.dtype(dtype_str)
                n = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
                f.seek(offset + row * n)
                data = f.read(n)
                if len(data) != n:
                    raise InputError(f"dataset {path}: row {row} of '{name}' is truncated")
                out[name] = np.frombuffer(data, dtype=dtype).reshape(row_shape).copy()
        return out
    if kind == "jsonl":
        _, path, offset, lineno = ref.locator
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        return _parse_json_item(line, path, lineno)
    raise InputError(f"item {ref.id}: unknown locator kind '{kind}'")


def _parse_json_item(line: bytes, path: str, lineno: int) -> dict[str, np.ndarray]:
    where = f"{path}:{lineno}"
    obj = parse_json(line, where)
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object of named arrays, found {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if key == "id":
            continue
        try:
            arr = np.asarray(value)
        except ValueError as e:
            raise InputError(f"{where}: input '{key}' is not a rectangular array ({e})") from e
        if arr.dtype.kind not in "biuf":
            raise InputError(f"{where}: input '{key}' must be numbers (a nested list), found dtype {arr.dtype}")
        out[key] = arr
    if not out:
        raise InputError(f"{where}: the item has no inputs (only an 'id')")
    return out
