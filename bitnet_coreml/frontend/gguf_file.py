"""A ``.gguf`` file, opened safely: a bounded structural scan that is also the parser.

``gguf.GGUFReader`` trusts the file: an array whose count is 2**60 makes it loop (and allocate)
once per announced element even past the end of the file, and a tensor offset beyond the file
gives a short memory map that fails only when read. It is also slow on real vocabularies: it makes
two numpy arrays per string, 57 s for the 128256 tokens and merges of a Llama-3-style vocabulary
(``bench/bench_gguf_2b.py``). So :func:`scan` parses the header itself, with every length and count
checked against the bytes that remain (and against fixed limits) *before* it is used, in time and
memory proportional to the header's real size (3 s for that vocabulary), and checks what the
reader does not: each tensor's type is known (gguf's ``GGMLQuantizationType`` / ``GGML_QUANT_SIZES``),
its dimensions are positive and few, its first dimension is a multiple of the type's block size,
its offset is aligned, and its bytes lie inside the file without overlapping another tensor. The
layout is the GGUF spec's (gguf's ``GGUFReader`` reads the same fields); the tests check that both
parsers agree on the fixtures and use ``GGUFReader``'s tensor data as the oracle.

Every refusal is a :class:`ModelLoadError` (exit 2) naming the file, the key or tensor and the
value, in one line.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import struct
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
)

from bitnet_coreml.errors import ModelLoadError

# Limits of the scan (a real model is far below every one of them).
MAX_KV = 1 << 16            # metadata entries (llama.cpp files carry ~40)
MAX_TENSORS = 1 << 16       # a 70B model has ~700
MAX_KEY = 1 << 16           # bytes of a key or tensor name
MAX_STRING = 64 << 20       # bytes of one string value (an embedded tokenizer.json is ~10 MB)
MAX_ARRAY = 1 << 24         # elements of one array (vocabularies, merges)
MAX_DIMS = 4                # GGML_MAX_DIMS
MAX_ELEMENTS = 1 << 40      # of one tensor
_SCALARS: dict[int, str] = {  # GGUFValueType -> struct format
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor as the header describes it; ``shape`` is numpy order (the reverse of ggml's ``ne``)."""

    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return self.type.name

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    """Reads little-endian values from a memory map, refusing any read past ``end``."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos, self.end = buf, path, 0, len(buf)

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {what}; not a valid GGUF file (truncated or corrupt?)")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes but the file ends at {self.end}")

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize("<" + fmt)
        self.need(size, what)
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        n = self.scalar("Q", f"length of {what}")
        if n > limit:
            raise self.fail(f"{what} is {n} bytes long (limit {limit})")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from e

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype != GGUFValueType.ARRAY:
            raise self.fail(f"{what} has value type {vtype}; known: {', '.join(t.name for t in GGUFValueType)}")
        if depth >= 2:
            raise self.fail(f"{what} nests arrays deeper than 2 levels")
        itype = self.scalar("I", f"element type of {what}")
        count = self.scalar("Q", f"length of {what}")
        if count > MAX_ARRAY:
            raise self.fail(f"{what} has {count} elements (limit {MAX_ARRAY})")
        if itype in _SCALARS:
            size = struct.calcsize("<" + _SCALARS[itype])
            self.need(count * size, what)
            arr = np.frombuffer(self.buf, dtype=_NP_SCALARS[itype], count=count, offset=self.pos).copy()
            self.pos += count * size
            return arr
        # strings and arrays: each element takes at least 8 bytes, so the count is bounded by the file
        self.need(count * 8, what)
        if itype == GGUFValueType.STRING:
            return self._strings(count, what)
        return [self.value(itype, f"{what}[{i}]", depth + 1) for i in range(count)]

    def _strings(self, count: int, what: str) -> StringArray:
        """``count`` length-prefixed UTF-8 strings (a vocabulary), checked now and kept as the file's bytes with
        offsets (:class:`StringArray`): 128k tokens as Python strings would hold ~25 MB through a conversion."""
        buf, pos, end, first = self.buf, self.pos, self.end, self.pos
        starts, lengths = array("q"), array("q")
        unpack = struct.Struct("<Q").unpack_from
        for i in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.need(8, f"length of {what}[{i}]")
            (n,) = unpack(buf, pos)
            if n > MAX_STRING or pos + 8 + n > end:
                self.pos = pos
                self.string(f"{what}[{i}]")  # raises with the precise message
            starts.append(pos + 8 - first)
            lengths.append(n)
            pos += 8 + n
        region = np.frombuffer(buf, np.uint8, pos - first, first).copy()
        st = np.frombuffer(starts, np.int64)
        for k in range(1, 9):  # the length prefixes become ASCII: each string is UTF-8 exactly when the whole is
            region[st - k] = 0x0A
        try:
            region.tobytes().decode("utf-8")
        except UnicodeDecodeError as e:
            bad = int(np.searchsorted(st, e.start, side="right")) - 1
            self.pos = first + int(st[bad]) - 8
            self.string(f"{what}[{bad}]")  # raises with the precise message
        self.pos = pos
        return StringArray(buf[first:pos], st.copy(), st + np.frombuffer(lengths, np.int64))


class StringArray(Sequence[str]):
    """A metadata array of strings kept as bytes: string ``i`` is ``data[starts[i]:ends[i]]`` (UTF-8, checked by
    the scan), decoded on access."""

    def __init__(self, data: bytes, starts: np.ndarray, ends: np.ndarray) -> None:
        self.data, self.starts, self.ends = data, starts, ends

    def __len__(self) -> int:
        return int(self.ends.shape[0])

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        i %= n
        return self.data[int(self.starts[i]):int(self.ends[i])].decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        data = self.data
        for a, b in zip(self.starts.tolist(), self.ends.tolist(), strict=True):
            yield data[a:b].decode("utf-8")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (list, tuple, StringArray)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def count_bytes(self, byte: int) -> np.ndarray:
        """How often ``byte`` (an ASCII code) occurs in each string (vectorised: for format checks)."""
        hits = np.concatenate([[0], np.cumsum(np.frombuffer(self.data, np.uint8) == byte)])
        return hits[self.ends] - hits[self.starts]


_NP_SCALARS: dict[int, np.dtype[Any]] = {
    GGUFValueType.UINT8: np.dtype("<u1"), GGUFValueType.INT8: np.dtype("<i1"), GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"), GGUFValueType.UINT32: np.dtype("<u4"), GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"), GGUFValueType.BOOL: np.dtype("?"), GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"), GGUFValueType.FLOAT64: np.dtype("<f8"),
}


@dataclass(frozen=True)
class GGUFLayout:
    """What the scan found: metadata (name -> Python value / numpy array / list) and the tensor table."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    alignment: int
    data_offset: int


def _tensor_info(cur: _Cursor, i: int) -> tuple[str, int, tuple[int, ...], int]:
    name = cur.string(f"name of tensor #{i}", MAX_KEY)
    nd = cur.scalar("I", f"dimension count of tensor {name!r}")
    if not 1 <= nd <= MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {nd} dimensions (allowed 1..{MAX_DIMS})")
    ne = tuple(cur.scalar("Q", f"dimension of tensor {name!r}") for _ in range(nd))
    raw_type = cur.scalar("I", f"type of tensor {name!r}")
    offset = cur.scalar("Q", f"offset of tensor {name!r}")
    return name, raw_type, ne, offset


# The last scans, by path: (file size, header length, the header's SHA-256, layout). A command reads a
# file's header more than once (the importer, the tokenizer for the package); a cached layout is reused
# only when the file still has that size and its header those bytes, so a rewritten file is scanned again.
_SCANNED: dict[Path, tuple[int, int, bytes, GGUFLayout]] = {}
_SCANNED_KEEP = 2


def scan(path: str | os.PathLike[str]) -> GGUFLayout:
    """Validate the structure of the GGUF file ``path`` and return its metadata and tensor table.

    The layout is shared between calls on an unchanged file: treat it as read-only."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size < 24:
            raise ModelLoadError(f"{p}: {size} bytes; too short for a GGUF header (24 bytes)")
        key = p  # as given: the layout names the file as the caller spelled it
        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            hit = _SCANNED.get(key)
            if hit is not None and hit[0] == len(buf) and _digest(buf, hit[1]) == hit[2]:
                return hit[3]
            layout = _scan(buf, p)
            _SCANNED.pop(key, None)
            while len(_SCANNED) >= _SCANNED_KEEP:
                del _SCANNED[next(iter(_SCANNED))]
            _SCANNED[key] = (len(buf), layout.data_offset, _digest(buf, layout.data_offset), layout)
            return layout
    except OSError as e:
        raise ModelLoadError(f"{p}: cannot read ({e.strerror or e})") from e


def _digest(buf: mmap.mmap, n: int) -> bytes:
    """SHA-256 of the first ``n`` bytes of the mapped file (no copy: a 128k-token header is ~7 MB)."""
    with memoryview(buf) as view:
        return hashlib.sha256(view[:n]).digest()


def _scan(buf: mmap.mmap, p: Path) -> GGUFLayout:
    cur = _Cursor(buf, p)
    if cur.scalar("I", "magic") != GGUF_MAGIC:
        raise ModelLoadError(f"{p}: does not start with the GGUF magic 'GGUF'; not a GGUF file")
    version = cur.scalar("I", "version")
    if version not in (2, 3):
        raise ModelLoadError(f"{p}: GGUF version {version}; supported: 2, 3 (a big-endian file reads as a huge "
                             "version number: only little-endian files are supported)")
    n_tensors = cur.scalar("Q", "tensor count")
    n_kv = cur.scalar("Q", "metadata count")
    if n_tensors > MAX_TENSORS:
        raise cur.fail(f"header announces {n_tensors} tensors (limit {MAX_TENSORS})")
    if n_kv > MAX_KV:
        raise cur.fail(f"header announces {n_kv} metadata entries (limit {MAX_KV})")
    meta: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}", MAX_KEY)
        vtype = cur.scalar("I", f"value type of {key!r}")
        if key in meta:
            raise cur.fail(f"metadata key {key!r} appears twice")
        meta[key] = cur.value(vtype, f"metadata {key!r}")
    raw = [_tensor_info(cur, i) for i in range(n_tensors)]
    alignment = meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 \
            or alignment & (alignment - 1) or alignment > (1 << 20):
        raise cur.fail(f"general.alignment = {alignment!r}; expected a power of two up to 1 MiB")
    data_offset = -(-cur.pos // alignment) * alignment
    tensors: dict[str, GGUFTensorInfo] = {}
    spans = []
    for name, raw_type, ne, offset in raw:
        tensors[name] = info = _check_tensor(cur, name, raw_type, ne, offset, alignment, data_offset, tensors)
        spans.append((info.offset, info.offset + info.nbytes, name))
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
        if start_b < end_a:
            raise cur.fail(f"tensors {a!r} and {b!r} overlap in the file")
    return GGUFLayout(p, version, meta, tensors, alignment, data_offset)


def _check_tensor(cur: _Cursor, name: str, raw_type: int, ne: tuple[int, ...], offset: int, alignment: int,
                  data_offset: int, seen: dict[str, GGUFTensorInfo]) -> GGUFTensorInfo:
    if name in seen:
        raise cur.fail(f"tensor {name!r} appears twice")
    try:
        qtype = GGMLQuantizationType(raw_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name!r} has unknown type {raw_type}") from None
    numel = 1
    for d in ne:
        if not 1 <= d <= MAX_ELEMENTS:
            raise cur.fail(f"tensor {name!r} has dimension {d} (allowed 1..{MAX_ELEMENTS})")
        numel *= d
    if numel > MAX_ELEMENTS:
        raise cur.fail(f"tensor {name!r} has {numel} elements (limit {MAX_ELEMENTS})")
    if ne[0] % block:
        raise cur.fail(f"tensor {name!r} ({qtype.name}) has rows of {ne[0]} values, not a multiple of the "
                       f"type's block of {block}")
    if offset % alignment:
        raise cur.fail(f"tensor {name!r} starts at data offset {offset}, not a multiple of the alignment {alignment}")
    nbytes = numel // block * type_size
    start = data_offset + offset
    if start + nbytes > cur.end:
        raise cur.fail(f"tensor {name!r} ({qtype.name}{list(ne)}) spans bytes {start}..{start + nbytes} but the file "
                       f"ends at {cur.end}")
    return GGUFTensorInfo(name, qtype, tuple(int(d) for d in reversed(ne)), start, nbytes)


class GGUFFile:
    """A scanned GGUF file; tensor data is memory-mapped on demand (a range at a time)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.layout = scan(self.path)

    @property
    def metadata(self) -> dict[str, Any]:
        return self.layout.metadata

    @property
    def tensors(self) -> dict[str, GGUFTensorInfo]:
        return self.layout.tensors

    def blocks(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """A block-typed tensor's bytes as uint8 ``[rows, blocks per row, block bytes]`` (memory-mapped)."""
        info = self.tensors[name]
        block, type_size = GGML_QUANT_SIZES[info.type]
        n_rows = info.numel // info.shape[-1]
        per_row = info.shape[-1] // block
        r0, r1 = rows or (0, n_rows)
        start = info.offset + r0 * per_row * type_size
        count = (r1 - r0) * per_row * type_size
        mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=start, shape=(count,))
        return mm.view(np.ndarray).reshape(r1 - r0, per_row, type_size)

    def rows(self, name: str, dtype: np.dtype[Any], rows: tuple[int, int] | None = None) -> np.ndarray:
        """A float tensor (F32/F16/BF16) as a read-only memory map in numpy shape, or rows ``[r0, r1)`` of it."""
        info = self.tensors[name]
        shape = info.shape
        row_elems = info.numel // shape[0]
        r0, r1 = rows or (0, shape[0])
        mm = np.memmap(self.path, dtype=dtype, mode="r", offset=info.offset + r0 * row_elems * dtype.itemsize,
                       shape=(r1 - r0, *shape[1:]))
        return mm.view(np.ndarray)

