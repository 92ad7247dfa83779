"""Fuse BitLinear layers: activation absmax quantisation + ternary MatMul/Gemm + scale.

Before (one of the shapes transformers exports, after constant folding)::

    m  = Clip(ReduceMax(Abs(x), axes=[-1], keepdims=1), min=eps)    # or Max(., eps)
    s  = Div(127, m)
    q  = Clip(Round(Mul(x, s)), -128, 127)  # or Min(Max(., -128), 127): the unoptimised export
    xd = Div(q, s)                       # dequantised form (AutoBitLinear) ...
    y  = MatMul(xd, Wt) * weight_scale   # Wt constant with values {-a, 0, a}
    # ... or quantised form (packed BitLinear):  y = MatMul(Cast(q), Wt) / Mul(s, weight_scale)

After::

    y = bitnet_coreml::BitLinear(x, W_codes int8 [N, K], Alpha)    # Alpha = a * weight_scale (or / it)

The rewrite is exact by construction: the fused op's function body computes the same arithmetic.
Layers whose weight is ternary but whose activation chain does not match are left alone (and
reported), so nothing is fused on a guess.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from bitnet_coreml.passes import _match as m
from bitnet_coreml.passes.fused import make_node
from bitnet_coreml.passes.ternary import Ternary, detect_ternary
from bitnet_coreml.vocab import ONNX_DOMAINS

log = logging.getLogger(__name__)


@dataclass
class ActQuant:
    x: ir.Value
    s: ir.Value
    qp: float
    qn: float
    eps: float
    dequantized: bool


@dataclass
class BitLinearReport:
    fused: int = 0
    ternary_unfused: list[str] = field(default_factory=list)


def _match_scale(s: ir.Value) -> tuple[ir.Value, float, float] | None:
    """``s = qp / max(max|x|, eps)``: return (x, qp, eps)."""
    d = m.op(s, "Div", "Mul")
    if d is None:
        return None
    qp: float | None = None
    mx: ir.Value | None = None
    if d.op_type == "Div":
        qp, mx = m.scalar(d.inputs[0]), d.inputs[1]
    else:  # Mul(Reciprocal(m), qp), either order
        for i in (0, 1):
            r = m.op(d.inputs[i], "Reciprocal")
            c = m.scalar(d.inputs[1 - i])
            if r is not None and c is not None:
                qp, mx = c, r.inputs[0]
    if qp is None or mx is None:
        return None
    clip = m.op(mx, "Clip", "Max")
    if clip is None:
        return None
    if clip.op_type == "Clip":
        eps = m.scalar(clip.inputs[1]) if len(clip.inputs) > 1 else None
        if len(clip.inputs) > 2 and clip.inputs[2] is not None:
            return None
        inner = clip.inputs[0]
    else:
        a, b = clip.inputs[0], clip.inputs[1]
        eps = m.scalar(b)
        inner = a
        if eps is None:
            eps, inner = m.scalar(a), b
    if eps is None:
        return None
    red = m.op(inner, "ReduceMax")
    if red is None or not m.keepdims(red):
        return None
    ab = m.op(red.inputs[0], "Abs")
    if ab is None:
        return None
    x = ab.inputs[0]
    if x is None or not m.is_last_axis(m.reduce_axes(red), m.rank(x)):
        return None
    return x, qp, eps


def match_act_quant(a_in: ir.Value) -> ActQuant | None:
    """Match the absmax activation quantisation that feeds a BitLinear matmul."""
    a = m.skip_casts(a_in)
    p = m.producer(a)
    dequantized = False
    q: ir.Value | None = a
    s_expected: ir.Value | None = None
    if p is not None and p.op_type == "Div":
        q, s_expected, dequantized = p.inputs[0], p.inputs[1], True
    elif p is not None and p.op_type == "Mul":
        for i in (0, 1):
            r = m.op(p.inputs[1 - i], "Reciprocal")
            if r is not None:
                q, s_expected, dequantized = p.inputs[i], r.inputs[0], True
    clamped = m.clamp(q)
    if clamped is None:
        return None
    rounded, qn, qp_c = clamped
    rnd = m.op(rounded, "Round")
    if rnd is None:
        return None
    mul = m.op(rnd.inputs[0], "Mul")
    if mul is None:
        return None
    for i in (0, 1):
        x, s = mul.inputs[i], mul.inputs[1 - i]
        got = _match_scale(s) if s is not None else None
        if got is None or not m.same(got[0], x):
            continue
        _, qp, eps = got
        if qp != qp_c or qn != -qp - 1:
            return None
        if dequantized and not m.same(s_expected, s):
            return None
        x0 = m.skip_casts(x) or x
        if x0 is None or s is None:
            return None
        return ActQuant(x=x0, s=s, qp=qp, qn=qn, eps=eps, dequantized=dequantized)
    return None


def _release(v: ir.Value | None) -> None:
    """Unmap a memory-mapped weight once read: its pages otherwise stay in our RSS until exit.
    onnx-ir maps it again on the next access, so this is always safe."""
    t = v.const_value if v is not None else None
    if isinstance(t, ir.ExternalTensor):
        t.release()


def _weight(node: ir.Node) -> tuple[ir.Value, Ternary, float] | None:
    """The ternary constant weight of a MatMul/Gemm: (activation input, ternary, extra multiplier)."""
    try:
        return _weight_inner(node)
    finally:
        if len(node.inputs) > 1:
            _release(node.inputs[1])


def _weight_inner(node: ir.Node) -> tuple[ir.Value, Ternary, float] | None:
    if node.op_type == "MatMul":
        w = m.const(node.inputs[1])
        if w is None or w.ndim != 2:
            return None
        t = detect_ternary(w, out_axis=1)
        x = node.inputs[0]
        return (x, t, 1.0) if t is not None and x is not None else None
    if node.op_type == "Gemm":
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            return None
        attrs = node.attributes
        if "transA" in attrs and attrs["transA"].as_int():
            return None
        w = m.const(node.inputs[1])
        if w is None:
            return None
        trans_b = attrs["transB"].as_int() if "transB" in attrs else 0
        t = detect_ternary(w, out_axis=0 if trans_b else 1)
        alpha = attrs["alpha"].as_float() if "alpha" in attrs else 1.0
        x = node.inputs[0]
        return (x, t, alpha) if t is not None and x is not None else None
    return None


def _channel_factor(c: np.ndarray, n_out: int) -> np.ndarray | None:
    """A constant that broadcasts over the output channels only: scalar or [..., N] with leading 1s."""
    if c.size == 1:
        return c.reshape(()).astype(np.float64)
    if c.shape[-1] == n_out and c.size == n_out:
        return c.reshape(n_out).astype(np.float64)
    return None


def fuse_bitlinear(model: ir.Model) -> BitLinearReport:
    graph = model.graph
    report = BitLinearReport()
    for node in list(graph):
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ONNX_DOMAINS:
            continue
        got = _weight(node)
        if got is None:
            continue
        act, tern, gemm_alpha = got
        aq = match_act_quant(act)
        n_out = tern.codes.shape[0]
        if aq is None:
            report.ternary_unfused.append(node.name or "?")
            continue
        alpha: np.ndarray = np.asarray(tern.scale, dtype=np.float64) * gemm_alpha
        need_inv_s = not aq.dequantized
        convention = "multiply"
        y = node.outputs[0]
        last = node
        while True:
            uses = list(y.uses())
            if len(uses) != 1 or y in graph.outputs:
                break
            user = uses[0].node
            if user.op_type not in ("Mul", "Div") or user.domain not in ONNX_DOMAINS:
                break
            idx, other = m.other_input(user, y)
            if user.op_type == "Div" and idx != 0:
                break
            c = m.const(other)
            f = _channel_factor(c, n_out) if c is not None else None
            if f is not None:
                alpha = alpha * f if user.op_type == "Mul" else alpha / f
                convention = "divide" if user.op_type == "Div" else convention
            elif user.op_type == "Div" and need_inv_s and m.same(other, aq.s):
                need_inv_s = False
            elif user.op_type == "Div" and need_inv_s and (pm := m.op(other, "Mul")) is not None:
                a0, a1 = pm.inputs[0], pm.inputs[1]
                s_side, c_side = (a0, a1) if m.same(a0, aq.s) else (a1, a0)
                if not m.same(s_side, aq.s):
                    break
                cc = m.const(c_side)
                f2 = _channel_factor(cc, n_out) if cc is not None else None
                if f2 is None:
                    break
                alpha = alpha / f2
                need_inv_s = False
                convention = "divide"
            else:
                break
            y, last = user.outputs[0], user
        if need_inv_s:
            report.ternary_unfused.append(node.name or "?")
            continue
        base = node.name or f"bitlinear_{report.fused}"
        # ir.val takes dtype and shape from the tensor: a value without them becomes an untyped graph
        # input wherever an initializer is fed as an input (fp16 calibration feeds the large ones).
        w_val = ir.val(f"{base}.codes", const_value=ir.tensor(tern.codes, name=f"{base}.codes"))
        a_arr = np.asarray(alpha, dtype=np.float32)
        a_val = ir.val(f"{base}.alpha", const_value=ir.tensor(a_arr, name=f"{base}.alpha"))
        graph.register_initializer(w_val)
        graph.register_initializer(a_val)
        bl = make_node(model, "BitLinear", [aq.x, w_val, a_val],
                       {"act_bits": int(round(np.log2(aq.qp + 1))) + 1, "act_eps": float(aq.eps),
                        "convention": convention},
                       name=f"{base}_bitlinear")
        m.replace_output(graph, node, bl, y)
        report.fused += 1
        del last
    return report
