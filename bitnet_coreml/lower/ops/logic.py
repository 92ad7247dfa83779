"""Comparisons and boolean logic: Equal, Less(OrEqual), Greater(OrEqual), Not, And, Or, Xor, Where,
IsNaN, IsInf.

Core ML compares fp16/fp32/int32 only, so bool operands of Equal are compared as int32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from bitnet_coreml.lower.ops._common import (
    as_dtype,
    attr,
    cast,
    is_const,
    mb,
    np_dtype,
    req,
    shape_of,
    to_var,
    unsupported,
)
from bitnet_coreml.lower.registry import LoweringContext, lowering

_COMPARE: dict[str, tuple[Callable[[Any, Any], Any], str]] = {
    "Equal": (np.equal, "equal"),
    "Less": (np.less, "less"),
    "LessOrEqual": (np.less_equal, "less_equal"),
    "Greater": (np.greater, "greater"),
    "GreaterOrEqual": (np.greater_equal, "greater_equal"),
}


def _operands(ctx: LoweringContext, node: ir.Node, name: str) -> tuple[Any, Any]:
    """Both operands as MIL-ready values of one dtype (bool compared as int32)."""
    a, b = req(ctx, node, 0), req(ctx, node, 1)
    if np_dtype(a) == np.bool_:
        a, b = cast(a, np.int32, f"{name}_xi"), cast(b, np.int32, f"{name}_yi")
    if is_const(a):
        a = as_dtype(a, np_dtype(b))
    if is_const(b):
        b = as_dtype(b, np_dtype(a))
    return a, b


def _register_compare(op_type: str, np_fn: Callable[[Any, Any], Any], mil_op: str) -> None:
    def fn(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
        a, b = req(ctx, node, 0), req(ctx, node, 1)
        if is_const(a) and is_const(b):
            return [np.asarray(np_fn(np.asarray(a), np.asarray(b)))]
        nm = ctx.name(node)
        x, y = _operands(ctx, node, nm)
        return [getattr(mb(), mil_op)(x=x, y=y, name=nm)]

    fn.__name__ = f"lower_{op_type.lower()}"
    lowering(op_type)(fn)


for _op, (_np_fn, _mil) in _COMPARE.items():
    _register_compare(_op, _np_fn, _mil)


def _bool_var(node: ir.Node, v: Any, name: str) -> Any:
    if np_dtype(v) != np.bool_:
        raise unsupported(node, f"input dtype {np_dtype(v)} is not bool")
    return to_var(v, name) if is_const(v) else v


def _register_logical(op_type: str, np_fn: Callable[[Any, Any], Any], mil_op: str) -> None:
    def fn(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
        a, b = req(ctx, node, 0), req(ctx, node, 1)
        if is_const(a) and is_const(b):
            return [np.asarray(np_fn(np.asarray(a), np.asarray(b)))]
        nm = ctx.name(node)
        return [getattr(mb(), mil_op)(x=_bool_var(node, a, f"{nm}_x"), y=_bool_var(node, b, f"{nm}_y"), name=nm)]

    fn.__name__ = f"lower_{op_type.lower()}"
    lowering(op_type)(fn)


_register_logical("And", np.logical_and, "logical_and")
_register_logical("Or", np.logical_or, "logical_or")
_register_logical("Xor", np.logical_xor, "logical_xor")


@lowering("Not")
def not_(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    if is_const(x):
        return [np.logical_not(np.asarray(x))]
    return [mb().logical_not(x=_bool_var(node, x, ""), name=ctx.name(node))]


@lowering("Where")
def where(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    c, a, b = (req(ctx, node, i) for i in range(3))
    if is_const(c) and is_const(a) and is_const(b):
        return [np.where(np.asarray(c), np.asarray(a), np.asarray(b))]
    nm = ctx.name(node)
    dt = np_dtype(a if not is_const(a) else b) if not (is_const(a) and is_const(b)) else np.asarray(a).dtype
    a = as_dtype(a, dt) if is_const(a) else a
    b = as_dtype(b, dt) if is_const(b) else b
    if is_const(a) and is_const(b):
        # MIL select takes its output shape from a/b, not from cond: give `a` the broadcast shape.
        out_shape = np.broadcast_shapes(tuple(shape_of(c)), np.shape(a), np.shape(b))
        a = np.array(np.broadcast_to(a, out_shape))
    cond = _bool_var(node, c, f"{nm}_cond")
    return [mb().select(cond=cond, a=to_var(a, f"{nm}_a"), b=to_var(b, f"{nm}_b"), name=nm)]


@lowering("IsNaN")
def isnan(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    if is_const(x):
        return [np.isnan(np.asarray(x))]
    # NaN is the only value unequal to itself.
    return [mb().not_equal(x=x, y=x, name=ctx.name(node))]


@lowering("IsInf")
def isinf(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    pos, neg = bool(attr(node, "detect_positive", 1)), bool(attr(node, "detect_negative", 1))
    if is_const(x):
        a = np.asarray(x)
        return [(np.isposinf(a) & pos) | (np.isneginf(a) & neg)]
    nm = ctx.name(node)
    m = mb()
    dt = np_dtype(x)
    if pos and neg:
        return [m.equal(x=m.abs(x=x, name=f"{nm}_abs"), y=np.asarray(np.inf, dt), name=nm)]
    if pos:
        return [m.equal(x=x, y=np.asarray(np.inf, dt), name=nm)]
    if neg:
        return [m.equal(x=x, y=np.asarray(-np.inf, dt), name=nm)]
    # Neither sign detected: all false (x == x and x != x is false even for NaN).
    return [m.logical_and(x=m.equal(x=x, y=x, name=f"{nm}_a"), y=m.not_equal(x=x, y=x, name=f"{nm}_b"), name=nm)]
