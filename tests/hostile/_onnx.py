"""Crafted ONNX files for the hostile corpus: each builder writes one file into a folder and returns its path.

Built with ``onnx.helper`` (and raw protobuf bytes where helper refuses to build the lie), tiny and fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 18)]


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], *, inputs=None, outputs=None,  # type: ignore[no-untyped-def]
           functions=None, opsets=None) -> onnx.ModelProto:
    inputs = inputs if inputs is not None else [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    outputs = outputs if outputs is not None else [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=opsets or OPSET, functions=functions or [])
    m.ir_version = 9
    return m


def _save(m: onnx.ModelProto, folder: Path, name: str) -> Path:
    p = folder / name
    p.write_bytes(m.SerializeToString())
    return p


def matmul_model(w: onnx.TensorProto) -> onnx.ModelProto:
    return _model([helper.make_node("MatMul", ["x", w.name], ["y"], name="mm")], [w])


def valid(folder: Path) -> Path:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    return _save(matmul_model(w), folder, "valid.onnx")


def truncated(folder: Path, bundled: Path) -> Path:
    data = bundled.read_bytes()
    p = folder / "truncated.onnx"
    p.write_bytes(data[: len(data) // 2])
    return p


def garbage(folder: Path) -> Path:
    p = folder / "garbage.onnx"
    p.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    return p


def _raw_tensor(name: str, dims: list[int], raw: bytes, dtype: int = TensorProto.FLOAT) -> onnx.TensorProto:
    t = onnx.TensorProto()
    t.name, t.data_type = name, dtype
    t.dims.extend(dims)
    t.raw_data = raw
    return t


def negative_dims(folder: Path) -> Path:
    return _save(matmul_model(_raw_tensor("W", [-128, 4], b"\0" * 64)), folder, "negdims.onnx")


def absurd_dims(folder: Path) -> Path:
    return _save(matmul_model(_raw_tensor("W", [1 << 40, 1 << 30], b"\0" * 64)), folder, "absurd.onnx")


def raw_short(folder: Path) -> Path:
    return _save(matmul_model(_raw_tensor("W", [4, 4], b"\0" * 20)), folder, "rawshort.onnx")


def raw_long(folder: Path) -> Path:
    return _save(matmul_model(_raw_tensor("W", [4, 4], b"\0" * 200)), folder, "rawlong.onnx")


def string_weights(folder: Path) -> Path:
    w = helper.make_tensor("W", TensorProto.STRING, [4, 4], [b"a"] * 16)
    return _save(matmul_model(w), folder, "strings.onnx")


def empty_weights(folder: Path) -> Path:
    return _save(matmul_model(_raw_tensor("W", [0, 4], b"")), folder, "empty.onnx")


def duplicate_initializers(folder: Path) -> Path:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    w2 = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "W")
    m = matmul_model(w)
    m.graph.initializer.append(w2)
    return _save(m, folder, "dupinit.onnx")


def _external(name: str, dims: list[int], location: str, offset: str = "0", length: str | None = None) -> onnx.TensorProto:
    t = onnx.TensorProto()
    t.name, t.data_type = name, TensorProto.FLOAT
    t.dims.extend(dims)
    entries = [("location", location), ("offset", offset)]
    if length is not None:
        entries.append(("length", length))
    for k, v in entries:
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = TensorProto.EXTERNAL
    return t


def external(folder: Path, tag: str, location: str, *, offset: str = "0", length: str | None = "64",
             dims: list[int] | None = None) -> Path:
    (folder / "w.bin").write_bytes(np.eye(4, dtype=np.float32).tobytes())
    return _save(matmul_model(_external("W", dims or [4, 4], location, offset, length)), folder, f"ext_{tag}.onnx")


def external_symlink(folder: Path, secret: Path) -> Path:
    link = folder / "link.bin"
    if not link.exists():
        os.symlink(secret, link)
    return _save(matmul_model(_external("W", [4, 4], "link.bin", "0", "64")), folder, "ext_symlink.onnx")


def external_in_function_constant(folder: Path, secret: Path) -> Path:
    """A model-local function whose Constant names external data outside the folder."""
    t = _external("c", [4, 4], str(secret), "0", "64")
    fn = helper.make_function("custom", "F", ["a"], ["b"], [
        helper.make_node("Constant", [], ["c"], value=t),
        helper.make_node("MatMul", ["a", "c"], ["b"]),
    ], OPSET)
    m = _model([helper.make_node("F", ["x"], ["y"], domain="custom", name="f")], [], functions=[fn],
               opsets=[*OPSET, helper.make_opsetid("custom", 1)])
    return _save(m, folder, "fn_external.onnx")


def cycle(folder: Path) -> Path:
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="n1"), helper.make_node("Relu", ["a"], ["b"], name="n2"),
             helper.make_node("Identity", ["a"], ["y"], name="n3")]
    return _save(_model(nodes, []), folder, "cycle.onnx")


def recursive_function(folder: Path, mutual: bool) -> Path:
    if mutual:
        f = helper.make_function("custom", "F", ["a"], ["b"], [helper.make_node("G", ["a"], ["b"], domain="custom")],
                                 [*OPSET, helper.make_opsetid("custom", 1)])
        g = helper.make_function("custom", "G", ["a"], ["b"], [helper.make_node("F", ["a"], ["b"], domain="custom")],
                                 [*OPSET, helper.make_opsetid("custom", 1)])
        fns = [f, g]
    else:
        fns = [helper.make_function("custom", "F", ["a"], ["b"], [helper.make_node("F", ["a"], ["b"], domain="custom")],
                                    [*OPSET, helper.make_opsetid("custom", 1)])]
    m = _model([helper.make_node("F", ["x"], ["y"], domain="custom", name="f")], [], functions=fns,
               opsets=[*OPSET, helper.make_opsetid("custom", 1)])
    return _save(m, folder, "recfn_mutual.onnx" if mutual else "recfn.onnx")


def _ld(field: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (key, varint length, payload)."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)
    return varint((field << 3) | 2) + varint(len(payload)) + payload


def nested_subgraphs(folder: Path, depth: int = 400) -> Path:
    """``If`` inside ``If`` ``depth`` times, written as raw protobuf (protobuf itself refuses to build it)."""
    out_vi = helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 4]).SerializeToString()
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "leaf", [],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 4])]).SerializeToString()
    for i in range(depth):
        attr = helper.make_attribute("then_branch", helper.make_graph([], "e", [], [])).SerializeToString()
        attr = onnx.AttributeProto.FromString(attr)
        attr.ClearField("g")
        node = helper.make_node("If", ["c"], ["o"], name=f"if{i}").SerializeToString()
        # NodeProto.attribute = 5, AttributeProto.g = 6, GraphProto.node = 1 / name = 2 / output = 12
        node += _ld(5, attr.SerializeToString() + _ld(6, graph))
        graph = _ld(1, node) + _ld(2, f"b{i}".encode()) + _ld(12, out_vi)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])]
    top = _model([], [], inputs=inputs)
    top.graph.ClearField("output")
    model = top.SerializeToString()
    # ModelProto.graph = 7: the (empty-node) graph above followed by the nested one merges into one graph
    p = folder / "nested.onnx"
    p.write_bytes(model + _ld(7, graph))
    return p


def unknown_domain(folder: Path) -> Path:
    m = _model([helper.make_node("Frobnicate", ["x"], ["y"], domain="com.evil", name="frob")], [],
               opsets=[*OPSET, helper.make_opsetid("com.evil", 1)])
    return _save(m, folder, "unknown_domain.onnx")


def huge_input(folder: Path) -> Path:
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1 << 20, 1 << 20])]
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [], inputs=inputs)
    return _save(m, folder, "huge_input.onnx")


def negative_input(folder: Path) -> Path:
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, -5])]
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [], inputs=inputs)
    return _save(m, folder, "neg_input.onnx")


def constant_of_shape_bomb(folder: Path) -> Path:
    shape = numpy_helper.from_array(np.array([1 << 20, 1 << 20], dtype=np.int64), "shape")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], name="bomb",
                              value=numpy_helper.from_array(np.array([1.0], np.float32))),
             helper.make_node("ReduceSum", ["big"], ["s"], name="sum", keepdims=0),
             helper.make_node("Add", ["x", "s"], ["y"], name="add")]
    return _save(_model(nodes, [shape]), folder, "cos_bomb.onnx")


def tile_bomb(folder: Path) -> Path:
    reps = numpy_helper.from_array(np.array([1 << 20, 1 << 18], dtype=np.int64), "reps")
    nodes = [helper.make_node("Tile", ["x", "reps"], ["big"], name="tile_bomb"),
             helper.make_node("ReduceMax", ["big"], ["y"], name="max", keepdims=1)]
    return _save(_model(nodes, [reps]), folder, "tile_bomb.onnx")
