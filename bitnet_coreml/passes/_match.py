"""Small helpers for matching subgraphs on onnx-ir values (producers, constants, casts)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bitnet_coreml.vocab import ONNX_DOMAINS

_TRANSPARENT = {"Cast", "Identity", "CastLike"}


def producer(v: ir.Value | None) -> ir.Node | None:
    return None if v is None else v.producer()


def const(v: ir.Value | None) -> np.ndarray | None:
    """The constant value of ``v`` (an initializer, a folded value or a Constant node's output)."""
    if v is None:
        return None
    if v.const_value is not None:
        return v.const_value.numpy()
    p = v.producer()
    if p is not None and p.op_type == "Constant" and p.domain in ONNX_DOMAINS:
        for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
            if key in p.attributes:
                attr = p.attributes[key]
                if key == "value":
                    return attr.as_tensor().numpy()
                return np.asarray(attr.value)
    return None


def scalar(v: ir.Value | None) -> float | None:
    c = const(v)
    if c is None or c.size != 1:
        return None
    return float(c.reshape(()))


def skip_casts(v: ir.Value | None) -> ir.Value | None:
    """Walk back through Cast/Identity nodes (dtype changes only)."""
    while v is not None:
        p = v.producer()
        if p is None or p.op_type not in _TRANSPARENT:
            return v
        v = p.inputs[0]
    return v


def same(a: ir.Value | None, b: ir.Value | None) -> bool:
    return a is not None and b is not None and skip_casts(a) is skip_casts(b)


def op(v: ir.Value | None, *types: str) -> ir.Node | None:
    """The producer of ``v`` (after casts) if it is one of ``types`` in the default domain."""
    p = producer(skip_casts(v))
    if p is not None and p.op_type in types and p.domain in ONNX_DOMAINS:
        return p
    return None


def clamp(v: ir.Value | None) -> tuple[ir.Value, float, float] | None:
    """``v = clip(x, lo, hi)`` with constant bounds: ``Clip(x, lo, hi)``, or the ``Min(Max(x, lo), hi)`` /
    ``Max(Min(x, hi), lo)`` that torch's exporter emits for ``clamp`` before its optimizer folds it."""
    c = op(v, "Clip")
    if c is not None:
        if len(c.inputs) < 3 or c.inputs[0] is None:
            return None
        lo, hi = scalar(c.inputs[1]), scalar(c.inputs[2])
        return (c.inputs[0], lo, hi) if lo is not None and hi is not None and lo <= hi else None
    bounds: dict[str, float] = {}
    x = v
    for _ in range(2):
        n = op(x, "Min", "Max")
        if n is None or len(n.inputs) != 2 or n.op_type in bounds:
            return None
        for i in (0, 1):
            b = scalar(n.inputs[1 - i])
            if b is not None and n.inputs[i] is not None and const(n.inputs[i]) is None:
                bounds[n.op_type], x = b, n.inputs[i]
                break
        else:
            return None
    lo, hi = bounds["Max"], bounds["Min"]
    return (x, lo, hi) if x is not None and lo <= hi else None


def reduce_axes(node: ir.Node) -> list[int] | None:
    """Axes of a Reduce* node (attribute before opset 18, input from 18)."""
    if "axes" in node.attributes:
        return list(node.attributes["axes"].as_ints())
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        c = const(node.inputs[1])
        return None if c is None else [int(x) for x in c.reshape(-1)]
    return None


def is_last_axis(axes: list[int] | None, rank: int | None) -> bool:
    if axes is None or len(axes) != 1:
        return False
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


def keepdims(node: ir.Node) -> bool:
    return node.attributes["keepdims"].as_int() == 1 if "keepdims" in node.attributes else True


def rank(v: ir.Value | None) -> int | None:
    if v is None or v.shape is None:
        return None
    return len(v.shape)


def other_input(node: ir.Node, v: ir.Value) -> tuple[int, ir.Value | None]:
    """For a binary node that consumes ``v``, the index of ``v`` and the other input."""
    i = 0 if node.inputs[0] is v else 1
    return i, node.inputs[1 - i]


def replace_output(graph: ir.Graph, anchor: ir.Node, new: ir.Node, y: ir.Value) -> None:
    """Insert ``new`` before ``anchor`` and let its output take over every use (and the name) of ``y``."""
    out = new.outputs[0]
    out.type, out.shape = y.type, y.shape
    graph.insert_before(anchor, new)
    ir.convenience.replace_all_uses_with(y, out, replace_graph_outputs=True)
    old = y.name
    y.name = f"{old}.unfused" if old else None
    out.name = old
