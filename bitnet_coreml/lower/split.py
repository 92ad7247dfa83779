"""ANE rewrite: split any constant weight dimension over 16384 into chunks (lm_head, vocabulary embedding).

The ANE rejects tensors with a dimension over 16384 (ANEMLL splits its 128256-wide LM head into
8 parts; ONNX Runtime's Core ML EP refuses such inputs). This pass rewrites, on the onnx-ir graph
and before lowering, so ONNX Runtime can still check the result against the original:

* ``MatMul(X, W[K, N])`` with ``N > limit`` -> ``Concat([MatMul(X, W[:, a:b]) ...], axis=-1)``
* ``Gather(E[V, D], ids, axis=0)`` with ``V > limit`` -> the sum over row chunks ``E[a:b]`` of
  ``Where(ids in [a, b), Gather(E[a:b], clip(ids - a, 0, b-a-1)), 0)``: exactly one chunk holds each
  id, so the sum adds only zeros to the selected row and is exact.

Chunks have equal size ``ceil(N / ceil(N / limit))`` (the last one may be smaller).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import onnx_ir as ir

log = logging.getLogger(__name__)

ANE_DIM_LIMIT = 16384


def _dims(shape: Any) -> list[int] | None:
    """The dims of ``shape`` as ints, or None when unknown or symbolic."""
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return [int(d) for d in shape]


def _chunks(n: int, limit: int) -> list[tuple[int, int]]:
    parts = math.ceil(n / limit)
    size = math.ceil(n / parts)
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def _const(graph: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    v = ir.Value(name=name, const_value=ir.tensor(arr, name=name))
    v.shape = ir.Shape(list(arr.shape))
    v.dtype = ir.DataType.from_numpy(arr.dtype)
    graph.register_initializer(v)
    return v


def _out(node: ir.Node, dtype: ir.DataType | None, shape: list[int] | None) -> ir.Value:
    o = node.outputs[0]
    if dtype is not None:
        o.dtype = dtype
    if shape is not None:
        o.shape = ir.Shape(shape)
    return o


def _replace(graph: ir.Graph, old: ir.Node, new_out: ir.Value) -> None:
    y = old.outputs[0]
    ir.convenience.replace_all_uses_with(y, new_out, replace_graph_outputs=True)
    name = y.name
    y.name = f"{name}.unsplit" if name else None
    new_out.name = name
    big = old.inputs[1] if old.op_type == "MatMul" else old.inputs[0]
    graph.remove(old, safe=True)
    # Drop the unsplit table unless something else (a tied lm_head) still uses it.
    if big is not None and big.name and big.name in graph.initializers and not big.uses() \
            and big not in graph.outputs:
        del graph.initializers[big.name]


def _split_matmul(graph: ir.Graph, node: ir.Node, w: np.ndarray, limit: int) -> str:
    x = node.inputs[0]
    assert x is not None
    y = node.outputs[0]
    base = node.name or "matmul"
    ydims = _dims(y.shape)
    lead = ydims[:-1] if ydims is not None else None
    outs = []
    new_nodes = []
    for i, (a, b) in enumerate(_chunks(w.shape[1], limit)):
        wc = _const(graph, f"{base}.w{i}", np.ascontiguousarray(w[:, a:b]))
        mm = ir.node("MatMul", [x, wc], name=f"{base}.part{i}")
        outs.append(_out(mm, y.dtype, None if lead is None else [*lead, b - a]))
        new_nodes.append(mm)
    cat = ir.node("Concat", outs, attributes={"axis": -1}, name=f"{base}.concat")
    new_nodes.append(cat)
    graph.insert_before(node, new_nodes)
    _out(cat, y.dtype, ydims)
    _replace(graph, node, cat.outputs[0])
    return f"{base}: MatMul weight [{w.shape[0]}, {w.shape[1]}] split into {len(outs)} chunks + Concat"


def _split_gather(graph: ir.Graph, node: ir.Node, e: np.ndarray, limit: int, opset: int) -> str:
    ids = node.inputs[1]
    assert ids is not None
    y = node.outputs[0]
    base = node.name or "gather"
    idt = ids.dtype.numpy() if ids.dtype is not None else np.dtype(np.int64)
    out_shape = _dims(y.shape)
    new_nodes: list[ir.Node] = []
    acc: ir.Value | None = None
    if opset >= 13:
        axes = _const(graph, f"{base}.axes", np.array([-1], np.int64))
    zero = _const(graph, f"{base}.zero", np.zeros((), e.dtype))
    parts = _chunks(e.shape[0], limit)
    for i, (a, b) in enumerate(parts):
        ec = _const(graph, f"{base}.e{i}", e[a:b])
        start = _const(graph, f"{base}.start{i}", np.array(a, idt))
        lo = _const(graph, f"{base}.lo{i}", np.array(0, idt))
        hi = _const(graph, f"{base}.hi{i}", np.array(b - a - 1, idt))
        sub = ir.node("Sub", [ids, start], name=f"{base}.local{i}")
        clip = ir.node("Clip", [sub.outputs[0], lo, hi], name=f"{base}.clip{i}")
        eq = ir.node("Equal", [clip.outputs[0], sub.outputs[0]], name=f"{base}.inrange{i}")
        gat = ir.node("Gather", [ec, clip.outputs[0]], attributes={"axis": 0}, name=f"{base}.part{i}")
        if opset >= 13:
            uns = ir.node("Unsqueeze", [eq.outputs[0], axes], name=f"{base}.mask{i}")
        else:
            uns = ir.node("Unsqueeze", [eq.outputs[0]], attributes={"axes": [-1]}, name=f"{base}.mask{i}")
        whr = ir.node("Where", [uns.outputs[0], gat.outputs[0], zero], name=f"{base}.select{i}")
        for n_, dt in ((sub, ids.dtype), (clip, ids.dtype), (eq, ir.DataType.BOOL)):
            _out(n_, dt, _dims(ids.shape))
        _out(gat, y.dtype, out_shape)
        _out(whr, y.dtype, out_shape)
        new_nodes += [sub, clip, eq, gat, uns, whr]
        if acc is None:
            acc = whr.outputs[0]
        else:
            add = ir.node("Add", [acc, whr.outputs[0]], name=f"{base}.sum{i}")
            _out(add, y.dtype, out_shape)
            new_nodes.append(add)
            acc = add.outputs[0]
    assert acc is not None
    graph.insert_before(node, new_nodes)
    _replace(graph, node, acc)
    return f"{base}: Gather table [{e.shape[0]}, {e.shape[1]}] split into {len(parts)} chunks"


def split_large_dims(model: ir.Model, limit: int = ANE_DIM_LIMIT) -> list[str]:
    """Rewrite ``model`` in place (see the module docstring); returns one note per rewritten node."""
    if limit <= 0:
        return []
    graph = model.graph
    opset = model.opset_imports.get("", 18)
    notes = []
    for node in list(graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "MatMul" and len(node.inputs) == 2:
            w = node.inputs[1]
            wshape = _dims(w.const_value.shape) if w is not None and w.const_value is not None else None
            if w is not None and w.const_value is not None and wshape is not None and len(wshape) == 2 \
                    and wshape[1] > limit:
                notes.append(_split_matmul(graph, node, w.const_value.numpy(), limit))
        elif node.op_type == "Gather":
            data = node.inputs[0]
            axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
            dshape = _dims(data.const_value.shape) if data is not None and data.const_value is not None else None
            if data is not None and data.const_value is not None and axis == 0 and dshape is not None \
                    and len(dshape) == 2 and dshape[0] > limit:
                notes.append(_split_gather(graph, node, data.const_value.numpy(), limit, opset))
    for n in notes:
        log.info("split: %s", n)
    return notes
