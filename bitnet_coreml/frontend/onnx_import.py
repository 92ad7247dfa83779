"""Load an ``.onnx`` file (embedded or external data, > 2 GB included) into an onnx-ir model, safely.

Only this module (and the checkpoint importer) touches ONNX protobufs. Loading never reads outside
the model's folder: every external-data ``location`` is checked *before* any tensor is touched
(absolute paths, ``..`` components and symlinks that resolve outside the folder are refused: the
path-traversal CVE class of ONNX external data), and offsets/lengths are checked against the file.
Tensors stay lazy (onnx-ir memory-maps external data), so loading costs little beyond the protobuf.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from bitnet_coreml.errors import ModelLoadError
from bitnet_coreml.frontend._mmap_proto import WireError, load_proto_mmap
from bitnet_coreml.frontend.validate import validate_graph

log = logging.getLogger(__name__)

_ELEM_SIZE = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT32: 4,
    onnx.TensorProto.UINT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.BOOL: 1,
}


def _read_proto(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected an .onnx file (or a Hugging Face checkpoint folder with config.json)")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path}: file is empty, expected an ONNX model")
    try:
        proto = load_proto_mmap(path)
    except (DecodeError, WireError) as e:
        raise ModelLoadError(f"{path}: not a valid ONNX protobuf (truncated or corrupt file: {e})") from e
    except (ValueError, RuntimeError, OSError) as e:
        raise ModelLoadError(f"{path}: cannot read ONNX model: {' '.join(str(e).split())}") from e
    if not proto.HasField("graph") or (len(proto.graph.node) == 0 and len(proto.graph.output) == 0):
        raise ModelLoadError(f"{path}: not an ONNX model (no graph found); the file may be corrupt or not ONNX")
    return proto


def _iter_tensors(graph: onnx.GraphProto):  # type: ignore[no-untyped-def]
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_tensors(g)


def check_external_data(proto: onnx.ModelProto, model_path: Path) -> int:
    """Refuse external data that escapes the model's folder, is missing, or is shorter than declared.

    Returns the number of external tensors found. Nothing is read: only paths and sizes are checked.
    """
    base = model_path.parent.resolve()
    count = 0
    for t in _iter_tensors(proto.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        count += 1
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        where = f"{model_path}: initializer {t.name!r}: external data location {loc!r}"
        if not loc:
            raise ModelLoadError(f"{where}: empty; expected a file name relative to the model's folder")
        if os.path.isabs(loc) or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":"):
            raise ModelLoadError(f"{where} is absolute; only paths inside the model's folder are allowed")
        parts = Path(loc.replace("\\", "/")).parts
        if ".." in parts:
            raise ModelLoadError(f"{where} contains '..'; only paths inside the model's folder are allowed")
        target = (base / loc).resolve()
        if target != base and base not in target.parents:
            raise ModelLoadError(f"{where} resolves outside the model's folder ({target}, through a symlink); refused")
        if not target.is_file():
            raise ModelLoadError(f"{where}: external data file not found next to the model")
        fsize = target.stat().st_size
        offset = int(info.get("offset", "0") or 0)
        numel = 1
        for d in t.dims:
            numel *= int(d)
        expected = numel * _ELEM_SIZE.get(t.data_type, 0)
        length = int(info["length"]) if info.get("length") else expected
        if offset < 0 or length < 0 or offset + length > fsize:
            raise ModelLoadError(
                f"{where}: needs bytes {offset}..{offset + length} but the file has {fsize} bytes (truncated external data?)"
            )
        if expected and length != expected:
            raise ModelLoadError(f"{where}: length {length} bytes does not match shape {list(t.dims)} ({expected} bytes)")
    return count


def load_onnx(path: str | os.PathLike[str]) -> ir.Model:
    """Load and validate an ONNX model; tensors stay lazy (external data is memory-mapped)."""
    p = Path(path)
    proto = _read_proto(p)
    n_external = check_external_data(proto, p)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:  # onnx-ir raises a variety of errors on malformed protos
        raise ModelLoadError(f"{p}: malformed ONNX graph: {' '.join(str(e).split())}") from e
    del proto
    if n_external:
        ir.external_data.set_base_dir(model.graph, str(p.parent))
    validate_graph(model, str(p))
    log.debug("loaded %s (%d external tensors)", p, n_external)
    return model
