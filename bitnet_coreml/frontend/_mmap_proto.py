"""Parse an ``.onnx`` file without copying its embedded weights.

``onnx.load`` reads the whole file and copies every tensor's ``raw_data`` into the parsed message:
about twice the file size in memory before a single weight is used. Here the protobuf wire format
is walked over a memory map instead: every large initializer's ``raw_data`` is replaced by an
external-data reference *into the .onnx file itself* (location = the file's own name, offset =
where the bytes sit), and only the small remainder (nodes, shapes, small tensors) is parsed. onnx-ir
then memory-maps those tensors lazily, like any external data.

Only ``ModelProto.graph.initializer[*].raw_data`` is rewritten (what exporters write for weights);
anything else is kept byte for byte.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import onnx

_GRAPH = 7  # ModelProto.graph
_INITIALIZER = 5  # GraphProto.initializer
_RAW_DATA = 9  # TensorProto.raw_data
_EXTERNAL_DATA = 13  # TensorProto.external_data (StringStringEntryProto)
_DATA_LOCATION = 14  # TensorProto.data_location
MIN_EXTERNAL_BYTES = 1024


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: memoryview | bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def _enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _enc_varint((field << 3) | wire)


def _ld(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _enc_varint(len(payload)) + payload


def _fields(buf: memoryview, start: int, end: int):  # type: ignore[no-untyped-def]
    """Yield (field, wire, field_start, value_start, value_end) for each field in buf[start:end]."""
    pos = start
    while pos < end:
        fstart = pos
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos2 = _varint(buf, pos, end)
            yield field, wire, fstart, pos, pos2
            pos = pos2
        elif wire == 1:
            yield field, wire, fstart, pos, pos + 8
            pos += 8
        elif wire == 2:
            n, vstart = _varint(buf, pos, end)
            if vstart + n > end:
                raise WireError("truncated length-delimited field")
            yield field, wire, fstart, vstart, vstart + n
            pos = vstart + n
        elif wire == 5:
            yield field, wire, fstart, pos, pos + 4
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wire}")
        if pos > end:
            raise WireError("field runs past the end of its message")


def _rewrite_tensor(buf: memoryview, start: int, end: int, location: str) -> bytes:
    raw: tuple[int, int] | None = None
    for field, wire, _, vs, ve in _fields(buf, start, end):
        if field == _RAW_DATA and wire == 2:
            raw = (vs, ve)
        elif field in (_EXTERNAL_DATA, _DATA_LOCATION):
            return bytes(buf[start:end])  # already external: keep as is
    if raw is None or raw[1] - raw[0] < MIN_EXTERNAL_BYTES:
        return bytes(buf[start:end])
    out = bytearray()
    for field, _, fs, _, ve in _fields(buf, start, end):
        if field != _RAW_DATA:
            out += buf[fs:ve]
    for k, v in (("location", location), ("offset", str(raw[0])), ("length", str(raw[1] - raw[0]))):
        out += _ld(_EXTERNAL_DATA, _ld(1, k.encode()) + _ld(2, v.encode()))
    out += _key(_DATA_LOCATION, 0) + _enc_varint(onnx.TensorProto.EXTERNAL)
    return bytes(out)


def load_proto_mmap(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Parse ``path`` with large embedded initializers turned into references into the file itself."""
    p = Path(path)
    location = p.name
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            size = len(buf)
            out = bytearray()
            for field, wire, fs, vs, ve in _fields(buf, 0, size):
                if field != _GRAPH or wire != 2:
                    out += buf[fs:ve]
                    continue
                graph = bytearray()
                for gfield, gwire, gfs, gvs, gve in _fields(buf, vs, ve):
                    if gfield == _INITIALIZER and gwire == 2:
                        graph += _ld(_INITIALIZER, _rewrite_tensor(buf, gvs, gve, location))
                    else:
                        graph += buf[gfs:gve]
                out += _ld(_GRAPH, bytes(graph))
            proto = onnx.ModelProto()
            proto.ParseFromString(bytes(out))
            return proto
        finally:
            buf.release()
