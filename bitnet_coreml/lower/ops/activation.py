"""Activations: Relu, Sigmoid, Tanh, Softmax/LogSoftmax, Clip, (P|Leaky|Thresholded)Relu, Elu, Selu, Gelu,
HardSigmoid, HardSwish, Softplus, Softsign, Mish."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from bitnet_coreml.lower.ops._common import (
    as_dtype,
    attr,
    is_const,
    mb,
    normalize_axis,
    np_dtype,
    rank_of,
    req,
    static_shape,
    to_var,
    unsupported,
)
from bitnet_coreml.lower.registry import LoweringContext, lowering
from bitnet_coreml.vocab import onnx_opset as default_opset


def onnx_opset(node: ir.Node) -> int:
    """The default-domain opset the node was written for (decides attribute-vs-input forms)."""
    if node.version is not None:
        return int(node.version)
    g = node.graph
    if g is not None:
        v = default_opset(g.opset_imports)
        if v is not None:
            return int(v)
    return 21


def _float_var(node: ir.Node, x: Any) -> Any:
    x = to_var(x)
    if np_dtype(x).kind != "f":
        raise unsupported(node, f"input dtype {np_dtype(x)} is not supported (allowed: float16, float32)")
    return x


def _f(x: Any, v: float) -> np.ndarray:
    return np.asarray(v, dtype=np_dtype(x))


def _act(op_type: str, build: Callable[[ir.Node, Any, str], Any]) -> None:
    def fn(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
        x = _float_var(node, req(ctx, node, 0))
        return [build(node, x, ctx.name(node))]

    fn.__name__ = f"lower_{op_type.lower()}"
    lowering(op_type)(fn)


_act("Sigmoid", lambda n, x, nm: mb().sigmoid(x=x, name=nm))
_act("Tanh", lambda n, x, nm: mb().tanh(x=x, name=nm))
_act("Softsign", lambda n, x, nm: mb().softsign(x=x, name=nm))
_act("Softplus", lambda n, x, nm: mb().softplus(x=x, name=nm))
_act("LeakyRelu", lambda n, x, nm: mb().leaky_relu(x=x, alpha=_f(x, attr(n, "alpha", 0.01)), name=nm))
_act("Elu", lambda n, x, nm: mb().elu(x=x, alpha=_f(x, attr(n, "alpha", 1.0)), name=nm))
# ThresholdedRelu is strict (x > alpha); MIL's thresholded_relu keeps x == alpha, so use select.
_act("ThresholdedRelu", lambda n, x, nm: mb().select(
    cond=mb().greater(x=x, y=_f(x, attr(n, "alpha", 1.0)), name=f"{nm}_gt"), a=x, b=_f(x, 0.0), name=nm))
_act("HardSigmoid", lambda n, x, nm: mb().sigmoid_hard(
    x=x, alpha=_f(x, attr(n, "alpha", 0.2)), beta=_f(x, attr(n, "beta", 0.5)), name=nm))


@lowering("Relu")
def relu(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    if is_const(x):
        return [np.maximum(x, 0).astype(np.asarray(x).dtype)]
    x = to_var(x)
    if np_dtype(x).kind != "f":
        return [mb().maximum(x=x, y=np.asarray(0, dtype=np_dtype(x)), name=ctx.name(node))]
    return [mb().relu(x=x, name=ctx.name(node))]


@lowering("HardSwish")
def hardswish(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = _float_var(node, req(ctx, node, 0))
    nm = ctx.name(node)
    hs = mb().sigmoid_hard(x=x, alpha=_f(x, 1.0 / 6.0), beta=_f(x, 0.5), name=f"{nm}_hs")
    return [mb().mul(x=x, y=hs, name=nm)]


@lowering("Selu")
def selu(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = _float_var(node, req(ctx, node, 0))
    nm = ctx.name(node)
    alpha = attr(node, "alpha", 1.67326319217681884765625)
    gamma = attr(node, "gamma", 1.05070102214813232421875)
    e = mb().elu(x=x, alpha=_f(x, alpha), name=f"{nm}_elu")
    return [mb().mul(x=e, y=_f(x, gamma), name=nm)]


@lowering("Gelu")
def gelu(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = _float_var(node, req(ctx, node, 0))
    approx = attr(node, "approximate", "none")
    mode = {"none": "EXACT", "tanh": "TANH_APPROXIMATION"}.get(approx)
    if mode is None:
        raise unsupported(node, f"approximate={approx!r} (allowed: 'none', 'tanh')")
    return [mb().gelu(x=x, mode=mode, name=ctx.name(node))]


def _softmax_like(ctx: LoweringContext, node: ir.Node, log: bool) -> Sequence[Any]:
    x = _float_var(node, req(ctx, node, 0))
    nm = ctx.name(node)
    r = rank_of(x)
    legacy = onnx_opset(node) < 13
    axis = normalize_axis(node, int(attr(node, "axis", 1 if legacy else -1)), r)
    m = mb()
    if legacy and axis != r - 1:
        # Opset < 13 treats the input as 2-D [prod(shape[:axis]), prod(shape[axis:])].
        shape = static_shape(node, x)
        flat = m.reshape(x=x, shape=np.array([int(np.prod(shape[:axis])), -1], np.int32), name=f"{nm}_2d")
        y = _softmax_last(flat, f"{nm}_sm", log, axis=-1)
        return [m.reshape(x=y, shape=np.array(shape, np.int32), name=nm)]
    return [_softmax_last(x, nm, log, axis=axis)]


def _softmax_last(x: Any, nm: str, log: bool, axis: int) -> Any:
    m = mb()
    if not log:
        return m.softmax(x=x, axis=axis, name=nm)
    # log_softmax = (x - max) - log(sum(exp(x - max))), the stable form.
    mx = m.reduce_max(x=x, axes=[axis], keep_dims=True, name=f"{nm}_max")
    shifted = m.sub(x=x, y=mx, name=f"{nm}_shift")
    lse = m.reduce_log_sum_exp(x=shifted, axes=[axis], keep_dims=True, name=f"{nm}_lse")
    return m.sub(x=shifted, y=lse, name=nm)


@lowering("Softmax")
def softmax(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return _softmax_like(ctx, node, log=False)


@lowering("LogSoftmax")
def log_softmax(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return _softmax_like(ctx, node, log=True)


@lowering("Clip")
def clip(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    if onnx_opset(node) < 11:
        lo: Any = attr(node, "min", None)
        hi: Any = attr(node, "max", None)
    else:
        lo, hi = ctx.input(node, 1), ctx.input(node, 2)
    dt = np_dtype(x)
    if is_const(x) and (lo is None or is_const(lo)) and (hi is None or is_const(hi)):
        out = np.asarray(x)
        if lo is not None:
            out = np.maximum(out, np.asarray(lo, dtype=dt))
        if hi is not None:
            out = np.minimum(out, np.asarray(hi, dtype=dt))
        return [out.astype(dt)]
    nm = ctx.name(node)
    m = mb()
    y = to_var(x)
    if lo is None and hi is None:
        return [m.identity(x=y, name=nm)]
    # maximum/minimum rather than MIL clip: clip needs both bounds constant and float, ONNX allows
    # either bound alone, computed bounds and integer inputs. ONNX applies min first, then max.
    if lo is not None:
        lo_v = as_dtype(lo, np_dtype(y)) if is_const(lo) else lo
        y = m.maximum(x=y, y=lo_v, name=nm if hi is None else f"{nm}_lo")
    if hi is not None:
        hi_v = as_dtype(hi, np_dtype(y)) if is_const(hi) else hi
        y = m.minimum(x=y, y=hi_v, name=nm)
    return [y]


@lowering("PRelu")
def prelu(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = _float_var(node, req(ctx, node, 0))
    slope = req(ctx, node, 1)
    nm = ctx.name(node)
    m = mb()
    # select(x < 0, x * slope, x): the slope broadcasts the ONNX way (MIL prelu wants one per channel).
    sl = np.asarray(slope).astype(np_dtype(x)) if is_const(slope) else slope
    neg = m.mul(x=x, y=sl, name=f"{nm}_neg")
    return [m.select(cond=m.less(x=x, y=_f(x, 0.0), name=f"{nm}_lt"), a=neg, b=x, name=nm)]


@lowering("Mish")
def mish(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = _float_var(node, req(ctx, node, 0))
    nm = ctx.name(node)
    m = mb()
    sp = m.softplus(x=x, name=f"{nm}_sp")
    return [m.mul(x=x, y=m.tanh(x=sp, name=f"{nm}_t"), name=nm)]


@lowering("Swish")
def swish(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = _float_var(node, req(ctx, node, 0))
    nm = ctx.name(node)
    alpha = float(attr(node, "alpha", 1.0))
    m = mb()
    ax = x if alpha == 1.0 else m.mul(x=x, y=_f(x, alpha), name=f"{nm}_ax")
    return [m.mul(x=x, y=m.sigmoid(x=ax, name=f"{nm}_sig"), name=nm)]


@lowering("Celu")
def celu(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    # max(0, x) + min(0, alpha * (exp(x / alpha) - 1)) == elu(x / alpha) * alpha for x < 0, x otherwise.
    x = _float_var(node, req(ctx, node, 0))
    nm = ctx.name(node)
    alpha = float(attr(node, "alpha", 1.0))
    m = mb()
    e = m.elu(x=m.mul(x=x, y=_f(x, 1.0 / alpha), name=f"{nm}_xa"), alpha=_f(x, 1.0), name=f"{nm}_elu")
    return [m.mul(x=e, y=_f(x, alpha), name=nm)]


@lowering("Hardmax")
def hardmax(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = _float_var(node, req(ctx, node, 0))
    nm = ctx.name(node)
    shape = static_shape(node, x)
    axis = normalize_axis(node, int(attr(node, "axis", -1)), len(shape))
    m = mb()
    # One-hot of the first maximum along the axis: compare an iota with reduce_argmax.
    idx = m.reduce_argmax(x=x, axis=axis, keep_dims=True, name=f"{nm}_arg")
    iota_shape = [1] * len(shape)
    iota_shape[axis] = shape[axis]
    iota = np.arange(shape[axis], dtype=np.int32).reshape(iota_shape)
    hot = m.equal(x=iota, y=idx, name=f"{nm}_eq")
    return [m.cast(x=hot, dtype="fp16" if np_dtype(x) == np.float16 else "fp32", name=nm)]
