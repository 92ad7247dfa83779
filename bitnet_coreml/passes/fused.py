"""The fused ops of the ``bitnet_coreml`` domain, as model-local ONNX functions.

Each fused op the passes create (``BitLinear``, ``RMSNorm``, ``Relu2``), and the ``KVCacheUpdate`` of
stateful graphs, is also defined as a function in the model, so ONNX Runtime still runs a rewritten model and every pass can be tested
against the original graph. Semantics are in ``docs/ARCHITECTURE.md``; the function bodies below
are the executable definition.

ONNX Runtime does not resolve attribute references inside a function's ``Constant`` nodes, so
each distinct set of attribute values gets its own function *overload* with the values baked into
the body (e.g. ``BitLinear`` overload ``b8_e1e-05``). The node's attributes stay the source of
truth; the overload only tells ONNX Runtime which body to inline. Use :func:`make_node` to create
fused nodes: it adds the matching function to the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir

from bitnet_coreml.vocab import DOMAIN, onnx_opset  # DOMAIN re-exported: passes.DOMAIN is public

FUNCTION_OPSET = 18  # bodies use ReduceMax/ReduceMean with axes as an input (opset 18) ...
# ... except in a model of an older opset (the TorchScript exporter's 17): ONNX Runtime checks the
# inlined body against the model's opset, so there the bodies are written for it (axes attribute).
FUSED_OPS = ("BitLinear", "RMSNorm", "Relu2")
# Ops of stateful graphs (frontend/hf_stateful.py); not produced by the passes.
STATE_OPS = ("KVCacheUpdate",)
_ATTRS = {"BitLinear": ["act_bits", "act_eps", "convention"], "RMSNorm": ["epsilon"], "Relu2": [],
          "KVCacheUpdate": []}


def _f32(x: float) -> float:
    return float(np.float32(x))


def _c(name: str, value: float) -> onnx.NodeProto:
    return oh.make_node("Constant", [], [name], value_float=_f32(value))


def _axes() -> onnx.NodeProto:
    return oh.make_node("Constant", [], ["axes"], value=oh.make_tensor("axes", onnx.TensorProto.INT64, [1], [-1]))


def _reduce(op: str, x: str, y: str, opset: int) -> list[onnx.NodeProto]:
    """``op`` over the last axis, keepdims: axes as an input from opset 18, as an attribute before."""
    if opset >= 18:
        return [_axes(), oh.make_node(op, [x, "axes"], [y], keepdims=1)]
    return [oh.make_node(op, [x], [y], axes=[-1], keepdims=1)]


def bitlinear_body(act_bits: int, act_eps: float, opset: int = FUNCTION_OPSET) -> list[onnx.NodeProto]:
    """``Y = ((round-clip(X * sx) @ W^T) / sx) * Alpha`` (``sx = Qp / max(max|X|, eps)``), or with
    ``act_bits = 0`` (weight-only ternary: no activation quantisation) ``Y = (X @ W^T) * Alpha``."""
    n = oh.make_node
    if act_bits == 0:
        return [
            n("CastLike", ["W", "X"], ["wf"]),
            n("Transpose", ["wf"], ["wt"], perm=[1, 0]),
            n("MatMul", ["X", "wt"], ["y0"]),
            n("CastLike", ["Alpha", "X"], ["alpha"]),
            n("Mul", ["y0", "alpha"], ["Y"]),
        ]
    qp = 2.0 ** (act_bits - 1) - 1
    qn = -(2.0 ** (act_bits - 1))
    return [
        _c("qp_f", qp), _c("qn_f", qn), _c("eps", act_eps),
        n("CastLike", ["qp_f", "X"], ["qp"]),
        n("CastLike", ["qn_f", "X"], ["qn"]),
        n("CastLike", ["eps", "X"], ["eps_x"]),
        n("Abs", ["X"], ["ax"]),
        *_reduce("ReduceMax", "ax", "mx", opset),
        n("Max", ["mx", "eps_x"], ["m"]),
        n("Div", ["qp", "m"], ["sx"]),
        n("Mul", ["X", "sx"], ["xs"]),
        n("Round", ["xs"], ["xr"]),
        n("Clip", ["xr", "qn", "qp"], ["xq"]),
        n("CastLike", ["W", "X"], ["wf"]),
        n("Transpose", ["wf"], ["wt"], perm=[1, 0]),
        n("MatMul", ["xq", "wt"], ["y0"]),
        n("Div", ["y0", "sx"], ["y1"]),
        n("CastLike", ["Alpha", "X"], ["alpha"]),
        n("Mul", ["y1", "alpha"], ["Y"]),
    ]


def rmsnorm_body(epsilon: float, opset: int = FUNCTION_OPSET) -> list[onnx.NodeProto]:
    n = oh.make_node
    return [
        _c("eps", epsilon),
        n("CastLike", ["eps", "X"], ["eps_x"]),
        n("Mul", ["X", "X"], ["x2"]),
        *_reduce("ReduceMean", "x2", "ms", opset),
        n("Add", ["ms", "eps_x"], ["v"]),
        n("Sqrt", ["v"], ["d"]),
        n("Div", ["X", "d"], ["xn"]),
        n("CastLike", ["Gamma", "X"], ["g"]),
        n("Mul", ["xn", "g"], ["Y"]),
    ]


def relu2_body() -> list[onnx.NodeProto]:
    return [oh.make_node("Relu", ["X"], ["r"]), oh.make_node("Mul", ["r", "r"], ["Y"])]


def kv_cache_update_body() -> list[onnx.NodeProto]:
    """``Y = Cache`` with ``Cache[:, :, p:p+S, :] = New`` (``S = New.shape[2]``, ``p = Position[0]``),
    in ``New``'s dtype: the cache holds ``Cache``'s dtype (fp16), so ``New`` is rounded to it."""
    n = oh.make_node
    i64 = onnx.TensorProto.INT64

    def c(name: str, vals: list[int], dims: list[int]) -> onnx.NodeProto:
        return n("Constant", [], [name], value=oh.make_tensor(name, i64, dims, vals))

    return [
        c("two", [2], [1]), c("three", [3], [1]), c("zero", [0], []), c("one", [1], []),
        c("shape4", [1, 1, -1, 1], [4]),
        n("Shape", ["New"], ["shp"]),
        n("Slice", ["shp", "two", "three"], ["s1"]),
        n("Squeeze", ["s1"], ["s"]),
        n("Range", ["zero", "s", "one"], ["r"]),
        n("Cast", ["Position"], ["p"], to=i64),
        n("Add", ["r", "p"], ["rows"]),
        n("Reshape", ["rows", "shape4"], ["rows4"]),
        n("Expand", ["rows4", "shp"], ["idx"]),
        n("CastLike", ["New", "Cache"], ["nw"]),
        n("ScatterElements", ["Cache", "idx", "nw"], ["upd"], axis=2),
        n("CastLike", ["upd", "New"], ["Y"]),
    ]


def overload_name(op_type: str, attrs: dict[str, object]) -> str:
    if op_type == "BitLinear":
        return f"b{int(attrs['act_bits'])}_e{_f32(float(attrs['act_eps'])):.6g}"  # type: ignore[call-overload,arg-type]
    if op_type == "RMSNorm":
        return f"e{_f32(float(attrs['epsilon'])):.6g}"  # type: ignore[arg-type]
    return ""


def function_proto(op_type: str, attrs: dict[str, object], model_opset: int = FUNCTION_OPSET) -> onnx.FunctionProto:
    """The function (overload) defining ``op_type`` with these attribute values, for a model of ``model_opset``."""
    opset = min(FUNCTION_OPSET, model_opset)
    if op_type == "BitLinear":
        body = bitlinear_body(int(attrs["act_bits"]), float(attrs["act_eps"]), opset)  # type: ignore[call-overload,arg-type]
        ins = ["X", "W", "Alpha"]
    elif op_type == "RMSNorm":
        body = rmsnorm_body(float(attrs["epsilon"]), opset)  # type: ignore[arg-type]
        ins = ["X", "Gamma"]
    elif op_type == "Relu2":
        body = relu2_body()
        ins = ["X"]
    elif op_type == "KVCacheUpdate":
        body = kv_cache_update_body()
        ins = ["Cache", "New", "Position"]
    else:
        raise KeyError(f"unknown fused op {op_type!r}; known: {', '.join(FUSED_OPS + STATE_OPS)}")
    f = oh.make_function(DOMAIN, op_type, ins, ["Y"], body, [oh.make_opsetid("", opset)],
                         attributes=_ATTRS[op_type])
    f.overload = overload_name(op_type, attrs)
    return f


def ensure_function(model: ir.Model, op_type: str, attrs: dict[str, object]) -> str:
    """Add the function overload for ``op_type``/``attrs`` to ``model`` if missing; return the overload."""
    overload = overload_name(op_type, attrs)
    key = (DOMAIN, op_type, overload)
    if key not in model.functions:
        opset = onnx_opset(model.opset_imports, FUNCTION_OPSET)
        model.functions[key] = ir.serde.deserialize_function(function_proto(op_type, attrs, opset))
    model.opset_imports.setdefault(DOMAIN, 1)
    return overload


def make_node(model: ir.Model, op_type: str, inputs: Sequence[ir.Value | None], attrs: dict[str, object],
              name: str | None = None) -> ir.Node:
    """Create a fused node (not yet inserted in a graph) and register its function in ``model``."""
    overload = ensure_function(model, op_type, attrs)
    return ir.node(op_type, inputs=list(inputs), attributes=attrs, domain=DOMAIN, version=1, name=name,  # type: ignore[arg-type]
                   overload=overload)


def bitlinear_attrs(node: ir.Node) -> tuple[int, float, str]:
    """(act_bits, act_eps, convention) of a BitLinear node."""
    a = node.attributes
    return (a["act_bits"].as_int(), a["act_eps"].as_float(),
            a["convention"].as_string() if "convention" in a else "multiply")
