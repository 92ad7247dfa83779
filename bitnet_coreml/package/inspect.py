"""What is inside an ``.mlpackage``: I/O, functions, states, metadata, weight bytes by kind, target.

Read from the package's spec alone (``package.reader.read_package_spec``, read-only, every OS) and the
weight file's blob headers; nothing is executed and no weight is decoded. Functions and states come
from the spec generically, so a multi-function or stateful package is described like any other.
"""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path
from typing import Any

# A weight blob in weight.bin starts with this header (coremltools' MIL blob storage format):
# uint32 sentinel 0xDEADBEEF, uint32 data type, uint64 size in bytes, uint64 data offset, padding.
_BLOB_HEADER = struct.Struct("<IIQQ")
_BLOB_SENTINEL = 0xDEADBEEF


def is_package(path: str | Path) -> bool:
    """True for an ``.mlpackage`` directory (what ``inspect`` describes without converting)."""
    p = Path(path)
    return p.is_dir() and (p.suffix == ".mlpackage" or (p / "Manifest.json").is_file())


def _feature(feat: Any, enum: Any) -> dict[str, Any]:
    kind = feat.type.WhichOneof("Type")
    d: dict[str, Any] = {"name": feat.name, "kind": kind}
    arr = None
    if kind == "multiArrayType":
        arr = feat.type.multiArrayType
    elif kind == "stateType":
        arr = feat.type.stateType.arrayType
    if arr is not None:
        d["dtype"] = enum.Name(arr.dataType).lower()
        d["shape"] = [int(x) for x in arr.shape]
        shapes = [[int(x) for x in s.shape] for s in arr.enumeratedShapes.shapes]
        if shapes:
            d["enumerated_shapes"] = shapes
        ranges = [[int(r.lowerBound), int(r.upperBound)] for r in arr.shapeRange.sizeRanges]
        if ranges:
            d["shape_ranges"] = ranges
    if feat.shortDescription:
        d["description"] = feat.shortDescription
    return d


def _describe_io(desc: Any, enum: Any) -> dict[str, Any]:
    return {"inputs": [_feature(f, enum) for f in desc.input],
            "outputs": [_feature(f, enum) for f in desc.output],
            "states": [_feature(f, enum) for f in desc.state]}


def _blob_offsets(program: Any) -> list[tuple[str, int]]:
    """(op type, blob offset) of every weight the program reads from weight.bin."""
    found: list[tuple[str, int]] = []

    def values(op: Any) -> list[Any]:
        vals = list(op.attributes.values())
        for arg in op.inputs.values():
            vals += [b.value for b in arg.arguments if b.WhichOneof("binding") == "value"]
        return vals

    def walk(block: Any) -> None:
        for op in block.operations:
            for v in values(op):
                if v.WhichOneof("value") == "blobFileValue":
                    found.append((op.type, int(v.blobFileValue.offset)))
            for inner in op.blocks:
                walk(inner)

    for fn in program.functions.values():
        for block in fn.block_specializations.values():
            walk(block)
    return found


def _weights_by_kind(package: Path, program: Any) -> dict[str, int]:
    weight_file = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    if not weight_file.is_file():
        return {}
    kinds: Counter[str] = Counter()
    with open(weight_file, "rb") as f:
        for op_type, offset in sorted(set(_blob_offsets(program)), key=lambda t: t[1]):
            f.seek(offset)
            head = f.read(_BLOB_HEADER.size)
            if len(head) < _BLOB_HEADER.size:
                continue
            sentinel, _dtype, size, _data = _BLOB_HEADER.unpack(head)
            if sentinel == _BLOB_SENTINEL:
                kinds[op_type] += size
    return dict(sorted(kinds.items()))


def inspect_package(path: str | Path) -> dict[str, Any]:
    """A JSON-ready description of the package at ``path``; :class:`ModelLoadError` if unreadable."""
    from bitnet_coreml._quiet import coremltools
    from bitnet_coreml.package.reader import read_package_spec
    from bitnet_coreml.vocab import os_name_for_spec

    p = Path(path)
    ct = coremltools()
    spec = read_package_spec(p).spec  # read-only and contained (MLModel(path) rewrites Manifest.json)
    enum = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType
    desc = spec.description
    meta = {str(k): str(v) for k, v in sorted(desc.metadata.userDefined.items())}
    doc: dict[str, Any] = {
        "package": str(p),
        "model_type": spec.WhichOneof("Type"),
        "spec_version": int(spec.specificationVersion),
        "deployment_target": meta.get("bitnet_coreml.deployment_target") or os_name_for_spec(
            int(spec.specificationVersion)),
        "description": desc.metadata.shortDescription,
        **_describe_io(desc, enum),
        "functions": [{"name": fn.name, **_describe_io(fn, enum)} for fn in desc.functions],
        "default_function": desc.defaultFunctionName or None,
        "metadata": meta,
    }
    files = {q.relative_to(p).as_posix(): q.stat().st_size for q in sorted(p.rglob("*")) if q.is_file()}
    doc["package_bytes"] = sum(files.values())
    doc["weight_bytes"] = sum(v for k, v in files.items() if "/weights/" in f"/{k}")
    doc["weight_bytes_by_kind"] = _weights_by_kind(p, spec.mlProgram) if doc["model_type"] == "mlProgram" else {}
    if doc["model_type"] == "mlProgram":
        doc["program_functions"] = sorted(spec.mlProgram.functions)
    return doc
