"""Elementwise arithmetic: Add/Sub/Mul/Div/Pow/Mod, Max/Min/Sum/Mean, unary math, Round, bit ops.

Every op folds in numpy when all its inputs are constants, with ONNX's semantics (integer Div
truncates toward zero, Mod follows ``fmod``, results keep the first input's dtype).

``Round`` is ONNX's round-half-to-even. MIL's ``round`` documents "0.5 rounds to 0" but Apple
says its tie rule is implementation-defined per backend (CPU/GPU/ANE may differ; WebNN issue #817),
and BitNet's activation quantisation depends on ties, so Round is built from ``floor`` and exact
comparisons instead (see :func:`round_half_even`).
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
    mil_array,
    np_dtype,
    req,
    to_var,
    unsupported,
)
from bitnet_coreml.lower.registry import LoweringContext, lowering


def _align(a: Any, b: Any) -> tuple[Any, Any]:
    """Give a constant operand the dtype of the Var operand (int64 constants meet int32 Vars)."""
    if is_const(a) and not is_const(b):
        a = as_dtype(a, np_dtype(b)) if np_dtype(b) != np.bool_ else mil_array(a)
    elif is_const(b) and not is_const(a):
        b = as_dtype(b, np_dtype(a)) if np_dtype(a) != np.bool_ else mil_array(b)
    return a, b


def _fold_binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], a: Any, b: Any) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    with np.errstate(all="ignore"):
        return np.asarray(fn(a, b)).astype(a.dtype)


def _div_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "iu":
        q = np.floor_divide(a, b)
        adjust = (np.remainder(a, b) != 0) & ((a < 0) ^ (b < 0))
        return q + adjust.astype(q.dtype)
    return np.divide(a, b)


def binary(ctx: LoweringContext, node: ir.Node, np_fn: Callable[..., Any], mil_op: str) -> Sequence[Any]:
    a, b = req(ctx, node, 0), req(ctx, node, 1)
    if is_const(a) and is_const(b):
        return [_fold_binary(np_fn, a, b)]
    a, b = _align(a, b)
    return [getattr(mb(), mil_op)(x=to_var(a), y=to_var(b), name=ctx.name(node))]


@lowering("Add")
def add(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return binary(ctx, node, np.add, "add")


@lowering("Sub")
def sub(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return binary(ctx, node, np.subtract, "sub")


@lowering("Mul")
def mul(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return binary(ctx, node, np.multiply, "mul")


def trunc_div_int(x: Any, y: Any, name: str) -> Any:
    """Integer division rounding toward zero (ONNX/C) from MIL's flooring ``floor_div``."""
    m = mb()
    q = m.floor_div(x=x, y=y, name=f"{name}_fdiv")
    r = m.sub(x=x, y=m.mul(x=q, y=y, name=f"{name}_qy"), name=f"{name}_rem")
    inexact = m.not_equal(x=r, y=np.int32(0), name=f"{name}_inexact")
    signs = m.logical_xor(
        x=m.less(x=x, y=np.int32(0), name=f"{name}_xneg"),
        y=m.less(x=y, y=np.int32(0), name=f"{name}_yneg"),
        name=f"{name}_signs",
    )
    adjust = m.cast(x=m.logical_and(x=inexact, y=signs, name=f"{name}_adj_b"), dtype="int32", name=f"{name}_adj")
    return m.add(x=q, y=adjust, name=name)


@lowering("Div")
def div(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    a, b = req(ctx, node, 0), req(ctx, node, 1)
    if is_const(a) and is_const(b):
        return [_fold_binary(_div_np, a, b)]
    a, b = _align(a, b)
    if np_dtype(a if not is_const(a) else b).kind in "iu":
        return [trunc_div_int(to_var(a), to_var(b), ctx.name(node))]
    return [mb().real_div(x=to_var(a), y=to_var(b), name=ctx.name(node))]


@lowering("Pow")
def pow_(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    a, b = req(ctx, node, 0), req(ctx, node, 1)
    if is_const(a) and is_const(b):
        return [_fold_binary(np.power, a, b)]
    nm = ctx.name(node)
    out_dt = np_dtype(a)
    if out_dt.kind in "iu" or np_dtype(b).kind in "iu":
        # MIL pow is float-only for mixed types: compute in fp32, return in the base's dtype.
        fa, fb = cast(a, np.float32, f"{nm}_xf"), cast(b, np.float32, f"{nm}_yf")
        if is_const(fb) and np.array_equal(fb, 2.0) and not is_const(fa):
            y = mb().mul(x=fa, y=fa, name=f"{nm}_f")
        else:
            y = mb().pow(x=to_var(fa), y=to_var(fb), name=f"{nm}_f")
        return [cast(y, out_dt, nm) if out_dt.kind in "iu" else _rename_cast(y, out_dt, nm)]
    if is_const(b) and np.asarray(b).size == 1 and float(np.asarray(b).reshape(-1)[0]) == 2.0:
        # x*x is exact and cheaper than pow on every compute unit.
        return [mb().mul(x=a, y=a, name=nm)]
    a, b = _align(a, b)
    return [mb().pow(x=to_var(a), y=to_var(b), name=nm)]


def _rename_cast(y: Any, dt: np.dtype, nm: str) -> Any:
    out = cast(y, dt, nm)
    return out if out is not y else mb().identity(x=y, name=nm)


def _trunc_float(x: Any, name: str) -> Any:
    m = mb()
    mag = m.floor(x=m.abs(x=x, name=f"{name}_abs"), name=f"{name}_floor")
    return m.mul(x=mag, y=m.sign(x=x, name=f"{name}_sign"), name=name)


@lowering("Mod")
def mod(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    fmod = int(attr(node, "fmod", 0))
    a, b = req(ctx, node, 0), req(ctx, node, 1)
    if is_const(a) and is_const(b):
        return [_fold_binary(np.fmod if fmod else np.mod, a, b)]
    a, b = _align(a, b)
    nm = ctx.name(node)
    x, y = to_var(a), to_var(b)
    m = mb()
    if not fmod:
        # Python/numpy modulo: the sign of the divisor, x - floor(x / y) * y.
        return [m.mod(x=x, y=y, name=nm)]
    # fmod: remainder with the sign of the dividend, x - trunc(x / y) * y.
    if np_dtype(x).kind in "iu":
        q = trunc_div_int(x, y, f"{nm}_q")
    else:
        q = _trunc_float(m.real_div(x=x, y=y, name=f"{nm}_div"), f"{nm}_q")
    return [m.sub(x=x, y=m.mul(x=q, y=y, name=f"{nm}_qy"), name=nm)]


def _variadic(ctx: LoweringContext, node: ir.Node, np_fn: Callable[..., Any], mil_op: str) -> Any:
    vals = [ctx.input(node, i) for i in range(len(node.inputs))]
    vals = [v for v in vals if v is not None]
    if not vals:
        raise unsupported(node, "needs at least one input")
    acc: Any = vals[0]
    if all(is_const(v) for v in vals):
        acc = np.asarray(acc)
        for v in vals[1:]:
            acc = _fold_binary(np_fn, acc, v)
        return acc, True
    nm = ctx.name(node)
    if len(vals) == 1:
        return mb().identity(x=to_var(acc), name=nm), False
    for i, v in enumerate(vals[1:], start=1):
        x, y = _align(acc, v)
        last = i == len(vals) - 1
        acc = getattr(mb(), mil_op)(x=to_var(x), y=to_var(y), name=nm if last else f"{nm}_{i}")
    return acc, False


@lowering("Max")
def max_(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return [_variadic(ctx, node, np.maximum, "maximum")[0]]


@lowering("Min")
def min_(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return [_variadic(ctx, node, np.minimum, "minimum")[0]]


@lowering("Sum")
def sum_(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return [_variadic(ctx, node, np.add, "add")[0]]


@lowering("Mean")
def mean(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    total, folded = _variadic(ctx, node, np.add, "add")
    n = sum(1 for i in range(len(node.inputs)) if ctx.input(node, i) is not None)
    if folded:
        return [(total / n).astype(total.dtype)]
    return [mb().real_div(x=total, y=np.asarray(n, dtype=np_dtype(total)), name=ctx.name(node) + "_mean")]


# --- unary ---------------------------------------------------------------------------------------


def unary(
    ctx: LoweringContext, node: ir.Node, np_fn: Callable[[np.ndarray], np.ndarray],
    build: Callable[[Any, str], Any],
) -> Sequence[Any]:
    x = req(ctx, node, 0)
    if is_const(x):
        with np.errstate(all="ignore"):
            return [np.asarray(np_fn(np.asarray(x))).astype(np.asarray(x).dtype)]
    return [build(x, ctx.name(node))]


def _simple(op: str) -> Callable[[Any, str], Any]:
    return lambda x, nm: getattr(mb(), op)(x=x, name=nm)


_SIMPLE_UNARY: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]] = {
    "Sqrt": (np.sqrt, "sqrt"),
    "Exp": (np.exp, "exp"),
    "Floor": (np.floor, "floor"),
    "Ceil": (np.ceil, "ceil"),
    "Sin": (np.sin, "sin"),
    "Cos": (np.cos, "cos"),
    "Tan": (np.tan, "tan"),
    "Asin": (np.arcsin, "asin"),
    "Acos": (np.arccos, "acos"),
    "Atan": (np.arctan, "atan"),
    "Sinh": (np.sinh, "sinh"),
    "Cosh": (np.cosh, "cosh"),
    "Atanh": (np.arctanh, "atanh"),
}


def _register_simple(op_type: str, np_fn: Callable[[np.ndarray], np.ndarray], mil_op: str) -> None:
    def fn(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
        x = req(ctx, node, 0)
        if not is_const(x) and np_dtype(x).kind != "f":
            raise unsupported(node, f"input dtype {np_dtype(x)} is not supported (allowed: float)")
        return unary(ctx, node, np_fn, _simple(mil_op))

    fn.__name__ = f"lower_{op_type.lower()}"
    lowering(op_type)(fn)


for _op, (_np_fn, _mil) in _SIMPLE_UNARY.items():
    _register_simple(_op, _np_fn, _mil)


def _erf_np(x: np.ndarray) -> np.ndarray:
    import math

    return np.vectorize(math.erf, otypes=[np.float64])(x)


@lowering("Erf")
def erf(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return unary(ctx, node, _erf_np, _simple("erf"))


@lowering("Log")
def log(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    # epsilon=0: MIL's default 1e-45 would turn log(0) = -inf into a finite -103.3.
    return unary(ctx, node, np.log, lambda x, nm: mb().log(x=x, epsilon=np.float32(0.0) if np_dtype(x) == np.float32
                                                            else np.float16(0.0), name=nm))


@lowering("Abs")
def abs_(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return unary(ctx, node, np.abs, _simple("abs"))


@lowering("Sign")
def sign(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return unary(ctx, node, np.sign, _simple("sign"))


@lowering("Neg")
def neg(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return unary(ctx, node, np.negative,
                 lambda x, nm: mb().mul(x=x, y=np.asarray(-1, dtype=np_dtype(x)), name=nm))


@lowering("Reciprocal")
def reciprocal(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    # real_div(1, x) rather than MIL ``inverse``, whose default epsilon (1e-4) changes the result.
    return unary(ctx, node, lambda a: 1.0 / a,
                 lambda x, nm: mb().real_div(x=np.asarray(1, dtype=np_dtype(x)), y=x, name=nm))


def round_half_even(x: Any, name: str) -> Any:
    """Round to nearest, ties to even, exact for every finite fp16/fp32 value.

    ``f = floor(x)`` and ``d = x - f`` are exact in binary floating point (d is the fractional part,
    in [0, 1)); round up when ``d > 0.5``, or when ``d == 0.5`` and ``f`` is odd. ``f`` odd is tested
    as ``f - 2*floor(f/2) == 1``, also exact (halving is exact). Large values (|x| >= 2**23 in fp32)
    are integers already: d = 0 and the result is x.
    """
    m = mb()
    dt = np_dtype(x)
    half, one, two = (np.asarray(v, dtype=dt) for v in (0.5, 1.0, 2.0))
    f = m.floor(x=x, name=f"{name}_floor")
    d = m.sub(x=x, y=f, name=f"{name}_frac")
    above = m.greater(x=d, y=half, name=f"{name}_above")
    tie = m.equal(x=d, y=half, name=f"{name}_tie")
    f_half = m.floor(x=m.mul(x=f, y=half, name=f"{name}_fh"), name=f"{name}_fhf")
    odd = m.equal(x=m.sub(x=f, y=m.mul(x=f_half, y=two, name=f"{name}_f2"), name=f"{name}_par"),
                  y=one, name=f"{name}_odd")
    up = m.logical_or(x=above, y=m.logical_and(x=tie, y=odd, name=f"{name}_tieodd"), name=f"{name}_up")
    return m.add(x=f, y=m.cast(x=up, dtype="fp16" if dt == np.float16 else "fp32", name=f"{name}_upf"),
                 name=name)


@lowering("Round")
def round_(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    # np.round is round-half-to-even, ONNX's rule.
    return unary(ctx, node, np.round, round_half_even)


# --- bit ops: constants only (Core ML has no bitwise ops) -----------------------------------------


NO_BITWISE = "it has no bitwise ops"


def _fold_only(op_type: str, fn: Callable[[LoweringContext, ir.Node], np.ndarray]) -> None:
    def lower(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
        vals = [ctx.input(node, i) for i in range(len(node.inputs))]
        if not all(v is None or is_const(v) for v in vals):
            raise unsupported(node, "Core ML has no bitwise ops; supported only when every input is a constant")
        return [fn(ctx, node)]

    lower.__name__ = f"lower_{op_type.lower()}"
    lowering(op_type, const_inputs=range(2), const_reason=NO_BITWISE)(lower)


def _bitshift(ctx: LoweringContext, node: ir.Node) -> np.ndarray:
    x, y = np.asarray(ctx.const(node, 0)), np.asarray(ctx.const(node, 1))
    direction = attr(node, "direction", "LEFT")
    out = np.left_shift(x, y) if direction == "LEFT" else np.right_shift(x, y)
    return out.astype(x.dtype)


_fold_only("BitShift", _bitshift)
_fold_only("BitwiseAnd", lambda c, n: np.bitwise_and(c.const(n, 0), c.const(n, 1)))
_fold_only("BitwiseOr", lambda c, n: np.bitwise_or(c.const(n, 0), c.const(n, 1)))
_fold_only("BitwiseXor", lambda c, n: np.bitwise_xor(c.const(n, 0), c.const(n, 1)))
_fold_only("BitwiseNot", lambda c, n: np.bitwise_not(c.const(n, 0)))


@lowering("Asinh")
def asinh(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    # MIL has no asinh: log(x + sqrt(x^2 + 1)).
    def build(x: Any, nm: str) -> Any:
        m = mb()
        one = np.asarray(1.0, np_dtype(x))
        r = m.sqrt(x=m.add(x=m.mul(x=x, y=x, name=f"{nm}_sq"), y=one, name=f"{nm}_p1"), name=f"{nm}_r")
        return m.log(x=m.add(x=x, y=r, name=f"{nm}_s"), name=nm)

    return unary(ctx, node, np.arcsinh, build)


@lowering("Acosh")
def acosh(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    # MIL has no acosh: log(x + sqrt(x^2 - 1)).
    def build(x: Any, nm: str) -> Any:
        m = mb()
        one = np.asarray(1.0, np_dtype(x))
        r = m.sqrt(x=m.sub(x=m.mul(x=x, y=x, name=f"{nm}_sq"), y=one, name=f"{nm}_m1"), name=f"{nm}_r")
        return m.log(x=m.add(x=x, y=r, name=f"{nm}_s"), name=nm)

    return unary(ctx, node, np.arccosh, build)


@lowering("Shrink")
def shrink(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    lambd, bias = float(attr(node, "lambd", 0.5)), float(attr(node, "bias", 0.0))

    def np_fn(a: np.ndarray) -> np.ndarray:
        return np.where(a < -lambd, a + bias, np.where(a > lambd, a - bias, 0))

    def build(x: Any, nm: str) -> Any:
        m = mb()
        dt = np_dtype(x)
        lo = m.less(x=x, y=np.asarray(-lambd).astype(dt), name=f"{nm}_lo")
        hi = m.greater(x=x, y=np.asarray(lambd).astype(dt), name=f"{nm}_hi")
        zero = np.asarray(0).astype(dt)
        up = m.select(cond=hi, a=m.sub(x=x, y=np.asarray(bias).astype(dt), name=f"{nm}_sb"), b=zero, name=f"{nm}_up")
        return m.select(cond=lo, a=m.add(x=x, y=np.asarray(bias).astype(dt), name=f"{nm}_ab"), b=up, name=nm)

    return unary(ctx, node, np_fn, build)
