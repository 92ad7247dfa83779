"""Fuse RMSNorm and relu2 (squared ReLU) into ``bitnet_coreml`` ops.

RMSNorm, before (transformers' BitNetRMSNorm as exported; Cast nodes may sit anywhere)::

    v = ReduceMean(Pow(x, 2) | Mul(x, x), axes=[-1], keepdims=1)
    y = Mul(gamma, Mul(x, Reciprocal(Sqrt(Add(v, eps)))))     # or Div(x, Sqrt(...)), or Rsqrt forms
after: ``y = bitnet_coreml::RMSNorm(x, gamma, epsilon=eps)``.

relu2, before: ``r = Relu(x); y = Pow(r, 2)`` or ``Mul(r, r)``; after: ``y = bitnet_coreml::Relu2(x)``.

Knowing these ops lets the fp16-safety analysis rescale exactly (RMSNorm is scale invariant up to
eps) and the checker reason about relu2's range.
"""

from __future__ import annotations

import onnx_ir as ir

from bitnet_coreml.passes import _match as m
from bitnet_coreml.passes.fused import make_node
from bitnet_coreml.vocab import ONNX_DOMAINS


def _match_rms_core(v: ir.Value) -> tuple[ir.Value, float] | None:
    """``v = x / sqrt(mean(x^2) + eps)`` in any of its exported forms: return (x, eps)."""
    node = m.op(v, "Mul", "Div")
    if node is None:
        return None
    candidates: list[tuple[ir.Value | None, ir.Value | None]] = []
    if node.op_type == "Div":
        candidates.append((node.inputs[0], m.skip_casts(node.inputs[1])))
    else:
        for i in (0, 1):
            r = m.op(node.inputs[1 - i], "Reciprocal")
            if r is not None:
                candidates.append((node.inputs[i], m.skip_casts(r.inputs[0])))
    for x, denom in candidates:
        sq = m.op(denom, "Sqrt")
        if sq is None:
            continue
        add = m.op(sq.inputs[0], "Add")
        if add is None:
            continue
        for j in (0, 1):
            eps = m.scalar(add.inputs[j])
            mean = m.op(add.inputs[1 - j], "ReduceMean")
            if eps is None or mean is None or not m.keepdims(mean):
                continue
            sqr = m.op(mean.inputs[0], "Pow", "Mul")
            if sqr is None:
                continue
            if sqr.op_type == "Pow":
                if m.scalar(sqr.inputs[1]) != 2.0 or not m.same(sqr.inputs[0], x):
                    continue
            elif not (m.same(sqr.inputs[0], x) and m.same(sqr.inputs[1], x)):
                continue
            if not m.is_last_axis(m.reduce_axes(mean), m.rank(x)):
                continue
            assert x is not None
            return m.skip_casts(x) or x, eps
    return None


def fuse_rmsnorm(model: ir.Model) -> int:
    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type != "Mul" or node.domain not in ONNX_DOMAINS or node.graph is None:
            continue
        for i in (0, 1):
            gamma = node.inputs[i]
            g = m.const(gamma)
            if g is None or g.ndim != 1:
                continue
            other = node.inputs[1 - i]
            core = _match_rms_core(other) if other is not None else None
            if core is None:
                continue
            x, eps = core
            if x.shape is not None and len(x.shape) and isinstance(x.shape[-1], int) and x.shape[-1] != g.shape[0]:
                continue
            new = make_node(model, "RMSNorm", [x, gamma], {"epsilon": float(eps)}, name=f"{node.name or 'rms'}_rmsnorm")
            m.replace_output(graph, node, new, node.outputs[0])
            count += 1
            break
    return count


def fuse_relu2(model: ir.Model) -> int:
    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type not in ("Pow", "Mul") or node.domain not in ONNX_DOMAINS or node.graph is None:
            continue
        if node.op_type == "Pow":
            r = m.op(node.inputs[0], "Relu")
            if r is None or m.scalar(node.inputs[1]) != 2.0:
                continue
        else:
            r = m.op(node.inputs[0], "Relu")
            if r is None or not m.same(node.inputs[0], node.inputs[1]):
                continue
        new = make_node(model, "Relu2", [r.inputs[0]], {}, name=f"{node.name or 'relu2'}_relu2")
        m.replace_output(graph, node, new, node.outputs[0])
        count += 1
    return count
