"""ANE rewrite: split any constant weight dimension over 16384 into chunks (lm_head, vocabulary embedding).

The ANE rejects tensors with a dimension over 16384 (ANEMLL splits its 128256-wide LM head into
8 parts; ONNX Runtime's Core ML EP refuses such inputs). This pass rewrites, on the onnx-ir graph
and before lowering, so ONNX Runtime can still check the result against the original:

* ``MatMul(X, W[K, N])`` with ``N > limit`` -> ``Concat([MatMul(X, W[:, a:b]) ...], axis=-1)``
* ``Gemm(A, B[N, K], transB=1)`` with ``N > limit`` (a Hugging Face lm_head) -> ``Concat`` of Gemms over
  row chunks of ``B``; a tied embedding shares those row chunks with the Gather below
* ``Gather(E[V, D], ids, axis=0)`` with ``V > limit`` -> the sum over row chunks ``E[a:b]`` of
  ``Where(ids in [a, b), Gather(E[a:b], clip(ids - a, 0, b-a-1)), 0)``: exactly one chunk holds each
  id, so the sum adds only zeros to the selected row and is exact.

Which nodes (MatMul, Gemm, Gather) and which chunks come from ``bitnet_coreml.check.split``
(``split_of`` / ``split_chunks``), the one rule the check's report and size estimate use too: chunks have
equal size ``ceil(N / ceil(N / limit))`` (the last one may be smaller). The limit is the capability
database's ``max_dimension`` (``bitnet_coreml.opsupport.max_dimension``) unless the caller gives one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from bitnet_coreml.check.split import attr_f, split_chunks, split_of
from bitnet_coreml.opsupport import max_dimension

log = logging.getLogger(__name__)


def _dims(shape: Any) -> list[int] | None:
    """The dims of ``shape`` as ints, or None when unknown or symbolic."""
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return [int(d) for d in shape]


def _chunks(n: int, limit: int) -> list[tuple[int, int]]:
    """``[a, b)`` ranges of the chunks ``bitnet_coreml.check.split.split_chunks`` defines (the one rule)."""
    bounds, a = [], 0
    for size in split_chunks(n, limit):
        bounds.append((a, a + size))
        a += size
    return bounds


class _RowChunks:
    """Row chunks ``T[a:b]`` of constant tables, shared between consumers of the same table.

    A tied embedding feeds both the token Gather and the lm_head Gemm(transB=1); both split it into
    the same row chunks, so each chunk is one initializer (one copy in the package), not two.
    """

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.cache: dict[tuple[int, int, int], ir.Value] = {}

    def get(self, table: ir.Value, arr: np.ndarray, a: int, b: int, base: str) -> ir.Value:
        key = (id(table), a, b)
        if key not in self.cache:
            self.cache[key] = _const(self.graph, f"{base}.rows{a}_{b}", arr[a:b])
        return self.cache[key]


def _const(graph: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    v = ir.val(name, const_value=ir.tensor(arr, name=name))
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
    big = old.inputs[0] if old.op_type == "Gather" else old.inputs[1]
    graph.remove(old, safe=True)
    # Drop the unsplit table unless something else (a tied lm_head) still uses it.
    if big is not None and big.name and big.name in graph.initializers and not big.uses() \
            and big not in graph.outputs:
        del graph.initializers[big.name]


def _concat_parts(graph: ir.Graph, node: ir.Node, n: int, limit: int,
                  part: Callable[[int, int, int], ir.Node]) -> int:
    """Replace ``node`` by ``Concat(part(i, a, b) for each [a, b) chunk of n, axis=-1)``; returns the chunk count."""
    y = node.outputs[0]
    base = node.name or node.op_type.lower()
    ydims = _dims(y.shape)
    outs, new_nodes = [], []
    for i, (a, b) in enumerate(_chunks(n, limit)):
        p = part(i, a, b)
        outs.append(_out(p, y.dtype, None if ydims is None else [*ydims[:-1], b - a]))
        new_nodes.append(p)
    cat = ir.node("Concat", outs, attributes={"axis": -1}, name=f"{base}.concat")
    new_nodes.append(cat)
    graph.insert_before(node, new_nodes)
    _out(cat, y.dtype, ydims)
    _replace(graph, node, cat.outputs[0])
    return len(outs)


def _split_matmul(graph: ir.Graph, node: ir.Node, w: np.ndarray, limit: int) -> str:
    x = node.inputs[0]
    assert x is not None
    base = node.name or "matmul"

    def part(i: int, a: int, b: int) -> ir.Node:
        wc = _const(graph, f"{base}.w{i}", np.ascontiguousarray(w[:, a:b]))
        return ir.node("MatMul", [x, wc], name=f"{base}.part{i}")

    n = _concat_parts(graph, node, w.shape[1], limit, part)
    return f"{base}: MatMul weight [{w.shape[0]}, {w.shape[1]}] split into {n} chunks + Concat"


def _split_gather(graph: ir.Graph, node: ir.Node, e: np.ndarray, limit: int, opset: int, rows: _RowChunks) -> str:
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
        assert node.inputs[0] is not None
        ec = rows.get(node.inputs[0], e, a, b, node.inputs[0].name or base)
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


def _split_gemm(graph: ir.Graph, node: ir.Node, w: np.ndarray, limit: int, rows: _RowChunks) -> str:
    """``Gemm(A, B[N, K], transB=1)`` with N > limit -> Concat of Gemms over row chunks of B (and of C)."""
    a_in, b_in = node.inputs[0], node.inputs[1]
    assert a_in is not None and b_in is not None
    c_in = node.inputs[2] if len(node.inputs) > 2 else None
    c = c_in.const_value.numpy() if c_in is not None and c_in.const_value is not None else None
    base = node.name or "gemm"
    beta = float(attr_f(node, "beta", 1.0))

    def part(i: int, a: int, b: int) -> ir.Node:
        ins = [a_in, rows.get(b_in, w, a, b, b_in.name or base)]
        if c is not None:
            ins.append(_const(graph, f"{base}.c{i}", np.ascontiguousarray(np.broadcast_to(c, (w.shape[0],))[a:b])))
        return ir.node("Gemm", ins, attributes={"transB": 1, "beta": beta}, name=f"{base}.part{i}")

    n = _concat_parts(graph, node, w.shape[0], limit, part)
    return f"{base}: Gemm weight [{w.shape[0]}, {w.shape[1]}] (transB) split into {n} row chunks + Concat"


def _table_key(table: ir.Value) -> Any:
    """The same key for one checkpoint tensor imported into several graphs of a model (a lazy
    ``CheckpointTensor``: its store's folder, tensor name and dtype); otherwise the value itself."""
    t = table.const_value
    folder = getattr(getattr(t, "store", None), "folder", None)
    name = getattr(t, "source_name", None)
    if folder is not None and name is not None and t is not None:
        return ("checkpoint", str(folder), name, str(t.dtype))
    return ("value", id(table))


def split_large_dims(model: ir.Model, limit: int | None = None, *,
                     tables: dict[Any, np.ndarray] | None = None) -> list[str]:
    """Rewrite ``model`` in place (see the module docstring); returns one note per rewritten node.

    ``limit``: the largest dimension kept whole (default: the capability database's ``max_dimension``;
    0 disables splitting). ``tables``: a cache of the tables read, which the splits of several
    graphs of one checkpoint (a stateful package's functions) share."""
    limit = max_dimension() if limit is None else limit
    if limit <= 0:
        return []
    graph = model.graph
    opset = model.opset_imports.get("", 18)
    notes = []
    rows = _RowChunks(graph)
    # a table read once (a tied embedding feeds the Gather and the lm_head; a lazy checkpoint tensor
    # converts on every read, ~0.6 s for a 32000 x 1024 bf16 embedding); the chunks are views of it
    arrays = tables if tables is not None else {}
    for node in list(graph):
        # exactly the splits the check reports as fixed by the converter
        info = split_of(node, limit)
        if info is None:
            continue
        table = node.inputs[info.input_index]
        assert table is not None and table.const_value is not None
        key = _table_key(table)
        arr = arrays.get(key)
        if arr is None:
            arr = arrays[key] = table.const_value.numpy()
        if info.op_type == "MatMul":
            notes.append(_split_matmul(graph, node, arr, limit))
        elif info.op_type == "Gemm":
            notes.append(_split_gemm(graph, node, arr, limit, rows))
        else:
            notes.append(_split_gather(graph, node, arr, limit, opset, rows))
    for n in notes:
        log.info("split: %s", n)
    return notes
