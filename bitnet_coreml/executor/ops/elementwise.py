"""Elementwise unary and binary math, comparisons, logic, ``select``, ``cast`` and ``clip``.

Results are computed in fp32 (or the integer / bool type of the inputs) and rounded by the executor
to the op's declared dtype, which is how Core ML's CPU and ANE store them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitnet_coreml.executor.ops._util import erf
from bitnet_coreml.executor.registry import OpContext, register

_UNARY = {
    "abs": np.abs,
    "acos": np.arccos,
    "asin": np.arcsin,
    "atan": np.arctan,
    "atanh": np.arctanh,
    "ceil": np.ceil,
    "cos": np.cos,
    "cosh": np.cosh,
    "exp": np.exp,
    "exp2": np.exp2,
    "floor": np.floor,
    "round": np.round,  # MIL: round half to even (0.5 -> 0), as numpy
    "sign": np.sign,
    "sin": np.sin,
    "sinh": np.sinh,
    "sqrt": np.sqrt,
    "square": np.square,
    "tan": np.tan,
    "tanh": np.tanh,
    "logical_not": np.logical_not,
    "erf": erf,
}


def _make_unary(fn: Any) -> Any:
    def impl(ctx: OpContext, a: dict[str, Any]) -> Any:
        return fn(a["x"])

    return impl


for _name, _fn in _UNARY.items():
    _impl = _make_unary(_fn)
    _impl.__name__ = f"op_{_name}"
    register(_name)(_impl)


@register("identity")
def op_identity(ctx: OpContext, a: dict[str, Any]) -> Any:
    return a["x"]


@register("log")
def op_log(ctx: OpContext, a: dict[str, Any]) -> Any:
    return np.log(a["x"] + a.get("epsilon", 1e-45))


@register("rsqrt")
def op_rsqrt(ctx: OpContext, a: dict[str, Any]) -> Any:
    return 1.0 / np.sqrt(a["x"] + a.get("epsilon", 1e-12))


@register("inverse")
def op_inverse(ctx: OpContext, a: dict[str, Any]) -> Any:
    return 1.0 / (a["x"] + a.get("epsilon", 1e-4))


@register("threshold")
def op_threshold(ctx: OpContext, a: dict[str, Any]) -> Any:
    return np.maximum(a["x"], a["alpha"])


@register("clip")
def op_clip(ctx: OpContext, a: dict[str, Any]) -> Any:
    return np.minimum(np.maximum(a["x"], a["alpha"]), a["beta"])


@register("cast")
def op_cast(ctx: OpContext, a: dict[str, Any]) -> Any:
    # The conversion itself is the executor's rounding to the declared output dtype.
    x = a["x"]
    if ctx.out_dtypes[0] == np.dtype(np.bool_):
        return np.asarray(x) != 0
    return x


def _div(x: Any, y: Any) -> Any:
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind in "iub" and y.dtype.kind in "iub":
        # Integer real_div: Core ML computes in float and truncates toward zero when storing int.
        return np.trunc(np.true_divide(x, y))
    return np.true_divide(x, y)


def _pow(x: Any, y: Any) -> Any:
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind in "iu" and y.dtype.kind in "iu":
        return np.power(x.astype(np.float64), y.astype(np.float64))
    return np.power(x, y)


_BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "real_div": _div,
    "floor_div": np.floor_divide,
    "mod": np.mod,
    "pow": _pow,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "equal": np.equal,
    "not_equal": np.not_equal,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "less": np.less,
    "less_equal": np.less_equal,
    "logical_and": np.logical_and,
    "logical_or": np.logical_or,
    "logical_xor": np.logical_xor,
}


def _make_binary(fn: Any) -> Any:
    def impl(ctx: OpContext, a: dict[str, Any]) -> Any:
        return fn(a["x"], a["y"])

    return impl


for _name, _fn in _BINARY.items():
    _impl = _make_binary(_fn)
    _impl.__name__ = f"op_{_name}"
    register(_name)(_impl)


@register("select")
def op_select(ctx: OpContext, a: dict[str, Any]) -> Any:
    return np.where(np.asarray(a["cond"]).astype(bool), a["a"], a["b"])
