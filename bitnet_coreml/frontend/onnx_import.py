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

from bitnet_coreml._files import inside, regular_file
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
    size = regular_file(path, "ONNX model", error=ModelLoadError).st_size
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


def _iter_node_tensors(nodes):  # type: ignore[no-untyped-def]
    for node in nodes:
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


def _iter_tensors(graph: onnx.GraphProto):  # type: ignore[no-untyped-def]
    yield from graph.initializer
    yield from _iter_node_tensors(graph.node)


def _iter_model_tensors(proto: onnx.ModelProto):  # type: ignore[no-untyped-def]
    """Every tensor of the model: initializers and constants of the graph, its subgraphs and its functions."""
    yield from _iter_tensors(proto.graph)
    for fn in proto.functions:
        yield from _iter_node_tensors(fn.node)


def _int_entry(info: dict[str, str], key: str, where: str) -> int | None:
    raw = info.get(key)
    if raw is None or raw == "":
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 20:
        raise ModelLoadError(f"{where}: {key} {raw!r} is not a non-negative integer")
    return int(raw)


def _numel(t: onnx.TensorProto, where: str) -> int:
    n = 1
    for d in t.dims:
        if d < 0:
            raise ModelLoadError(f"{where}: negative dimension in shape {list(t.dims)}; dimensions must be >= 0")
        n *= int(d)
    return n


_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def check_tensors(proto: onnx.ModelProto, model_path: Path) -> None:
    """Refuse tensors whose declared shape and stored data disagree, negative dims, string or duplicate weights.

    Checked on the parsed protobuf before onnx-ir or any pass sees a tensor (nothing is read from
    external data here: its ranges are checked by :func:`check_external_data`).
    """
    seen: set[str] = set()
    for t in proto.graph.initializer:
        where = f"{model_path}: initializer {t.name!r}"
        if t.name in seen:
            raise ModelLoadError(f"{where} is defined twice; initializer names must be unique")
        seen.add(t.name)
        if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            kind = "string" if t.data_type == onnx.TensorProto.STRING else "undefined"
            raise ModelLoadError(f"{where} has {kind} data type; weights must be numeric tensors")
    for t in _iter_model_tensors(proto):
        where = f"{model_path}: tensor {t.name!r}"
        numel = _numel(t, where)
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        size = _ELEM_SIZE.get(t.data_type)
        if t.HasField("raw_data") and size is not None:
            if len(t.raw_data) != numel * size:
                raise ModelLoadError(f"{where}: raw data holds {len(t.raw_data)} bytes but shape {list(t.dims)} "
                                     f"needs {numel * size}")
            continue
        stored = sum(len(getattr(t, f)) for f in _TYPED_FIELDS)
        if stored and t.data_type not in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) and stored != numel:
            raise ModelLoadError(f"{where}: holds {stored} values but shape {list(t.dims)} needs {numel}")


def check_functions(proto: onnx.ModelProto, model_path: Path) -> None:
    """Refuse model-local functions that call themselves, directly or through others (inlining would not end)."""
    defined = {(f.domain, f.name, f.overload): f for f in proto.functions}
    by_name = {(f.domain, f.name): key for key, f in defined.items()}

    def calls(fn: onnx.FunctionProto) -> list[tuple[str, str, str]]:
        out = []
        for n in fn.node:
            key = (n.domain, n.op_type, n.overload)
            if key in defined:
                out.append(key)
            elif (n.domain, n.op_type) in by_name:
                out.append(by_name[(n.domain, n.op_type)])
        return out

    state: dict[tuple[str, str, str], int] = {}  # 1 = on the current path, 2 = done
    for root in defined:
        if state.get(root):
            continue
        stack: list[tuple[tuple[str, str, str], list[tuple[str, str, str]]]] = [(root, calls(defined[root]))]
        state[root] = 1
        while stack:
            key, todo = stack[-1]
            if not todo:
                state[key] = 2
                stack.pop()
                continue
            nxt = todo.pop()
            if state.get(nxt) == 1:
                path = [k for k, _ in stack] + [nxt]
                start = path.index(nxt)
                chain = " -> ".join(f"{d}::{n}" for d, n, _ in path[start:])
                raise ModelLoadError(f"{model_path}: model-local function {nxt[0]}::{nxt[1]!r} is recursive ({chain}); "
                                     "ONNX functions cannot call themselves")
            if not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, calls(defined[nxt])))


def check_shapes(proto: onnx.ModelProto, model_path: Path) -> None:
    """ONNX's own strict shape and type inference: a graph whose shapes contradict each other is refused here,
    naming the node, instead of failing inside a pass or ONNX Runtime later. No tensor data is read."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)  # small: large weights are references into the file by now
    for out in probe.graph.output:
        out.ClearField("type")  # the graph's own consistency is checked, not its declared output types
    try:
        onnx.shape_inference.infer_shapes(probe, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as e:
        raise ModelLoadError(f"{model_path}: invalid graph: {' '.join(str(e).split())[:500]}") from None
    except Exception as e:  # noqa: BLE001  # ONNX cannot check this graph (e.g. an op newer than onnx): not a refusal
        log.debug("strict shape inference of %s skipped: %s: %s", model_path, type(e).__name__, e)


def check_external_data(proto: onnx.ModelProto, model_path: Path) -> int:
    """Refuse external data that escapes the model's folder, is missing, or is shorter than declared.

    Returns the number of external tensors found. Nothing is read: only paths and sizes are checked.
    """
    base = model_path.parent.resolve()
    count = 0
    for t in _iter_model_tensors(proto):
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
        if "\x00" in loc:
            raise ModelLoadError(f"{where} contains a NUL byte; refused")
        target = inside(base, base / loc, f"external data of initializer {t.name!r}", error=ModelLoadError)
        if not target.exists():
            raise ModelLoadError(f"{where}: external data file not found next to the model")
        fsize = regular_file(target, "external data file", error=ModelLoadError).st_size
        offset = _int_entry(info, "offset", where) or 0
        numel = _numel(t, where)
        expected = numel * _ELEM_SIZE.get(t.data_type, 0)
        length = _int_entry(info, "length", where)
        length = expected if length is None else length
        if offset + length > fsize:
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
    check_tensors(proto, p)
    check_functions(proto, p)
    n_external = check_external_data(proto, p)
    check_shapes(proto, p)
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
