"""Reductions and selection: ReduceMean/Max/Min/Sum/Prod/L1/L2/SumSquare/LogSum/LogSumExp, ArgMax/ArgMin, TopK.

Axes are an attribute before opset 13 (ReduceSum) / 18 (the others) and an optional input after;
``noop_with_empty_axes`` (opset 13/18+) turns "no axes" into identity instead of "all axes".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from bitnet_coreml.lower.ops._common import (
    attr,
    const_input,
    int_list,
    is_const,
    mb,
    normalize_axis,
    np_dtype,
    rank_of,
    req,
    static_shape,
    unsupported,
)
from bitnet_coreml.lower.ops.activation import onnx_opset
from bitnet_coreml.lower.registry import LoweringContext, lowering


def _np_l1(a: np.ndarray, axis: Any, keepdims: bool) -> np.ndarray:
    return np.sum(np.abs(a), axis=axis, keepdims=keepdims)


def _np_l2(a: np.ndarray, axis: Any, keepdims: bool) -> np.ndarray:
    return np.sqrt(np.sum(np.square(a), axis=axis, keepdims=keepdims))


def _np_ss(a: np.ndarray, axis: Any, keepdims: bool) -> np.ndarray:
    return np.sum(np.square(a), axis=axis, keepdims=keepdims)


def _np_ls(a: np.ndarray, axis: Any, keepdims: bool) -> np.ndarray:
    return np.log(np.sum(a, axis=axis, keepdims=keepdims))


def _np_lse(a: np.ndarray, axis: Any, keepdims: bool) -> np.ndarray:
    mx = np.max(a, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(a - mx), axis=axis, keepdims=True)) + mx
    return out if keepdims else np.squeeze(out, axis=axis)


_REDUCE: dict[str, tuple[Callable[..., np.ndarray], str, int]] = {
    # op: (numpy fold, MIL op, opset from which axes are an input)
    "ReduceSum": (np.sum, "reduce_sum", 13),
    "ReduceMean": (np.mean, "reduce_mean", 18),
    "ReduceMax": (np.max, "reduce_max", 18),
    "ReduceMin": (np.min, "reduce_min", 18),
    "ReduceProd": (np.prod, "reduce_prod", 18),
    "ReduceL1": (_np_l1, "reduce_l1_norm", 18),
    "ReduceL2": (_np_l2, "reduce_l2_norm", 18),
    "ReduceSumSquare": (_np_ss, "reduce_sum_square", 18),
    "ReduceLogSum": (_np_ls, "reduce_log_sum", 18),
    "ReduceLogSumExp": (_np_lse, "reduce_log_sum_exp", 18),
}


def reduce_axes(ctx: LoweringContext, node: ir.Node, since: int, rank: int) -> list[int] | None:
    """The normalised axes, or None for "all axes"; [] means identity (noop_with_empty_axes)."""
    if onnx_opset(node) < since:
        a = attr(node, "axes", None)
        axes = None if a is None else [int(v) for v in a]
    else:
        c = const_input(ctx, node, 1)
        axes = None if c is None else int_list(node, c)
    if not axes:
        return [] if attr(node, "noop_with_empty_axes", 0) else None
    return sorted({normalize_axis(node, a, rank) for a in axes})


def _register(op_type: str, np_fn: Callable[..., np.ndarray], mil_op: str, since: int) -> None:
    def fn(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
        x = req(ctx, node, 0)
        r = rank_of(x)
        axes = reduce_axes(ctx, node, since, r)
        keep = bool(attr(node, "keepdims", 1))
        nm = ctx.name(node)
        if axes == []:
            return [x if is_const(x) else mb().identity(x=x, name=nm)]
        if is_const(x):
            a = np.asarray(x)
            ax = tuple(range(r)) if axes is None else tuple(axes)
            with np.errstate(all="ignore"):
                return [np.asarray(np_fn(a, axis=ax, keepdims=keep)).astype(a.dtype)]
        if 0 in static_shape(node, x):
            raise unsupported(node, "reducing an empty tensor; Core ML has no zero-size tensors")
        kwargs: dict[str, Any] = {"x": x, "keep_dims": keep, "name": nm}
        if axes is not None:
            kwargs["axes"] = axes
        if np_dtype(x) == np.bool_ and op_type in ("ReduceMax", "ReduceMin"):
            # any/all: reduce the 0/1 values as int32 (MIL reduces fp/int32 only), then back to bool.
            xi = mb().cast(x=x, dtype="int32", name=f"{nm}_i")
            r = getattr(mb(), mil_op)(**{**kwargs, "x": xi, "name": f"{nm}_r"})
            return [mb().cast(x=r, dtype="bool", name=nm)]
        if op_type == "ReduceL1" and np_dtype(x).kind in "iu":
            kwargs["x"] = mb().abs(x=x, name=f"{nm}_abs")
            return [mb().reduce_sum(**kwargs)]
        return [getattr(mb(), mil_op)(**kwargs)]

    fn.__name__ = f"lower_{op_type.lower()}"
    lowering(op_type, const_inputs=(1,))(fn)


for _op, (_np_fn, _mil, _since) in _REDUCE.items():
    _register(_op, _np_fn, _mil, _since)


def _arg(ctx: LoweringContext, node: ir.Node, largest: bool) -> Sequence[Any]:
    x = req(ctx, node, 0)
    r = rank_of(x)
    axis = normalize_axis(node, int(attr(node, "axis", 0)), r)
    keep = bool(attr(node, "keepdims", 1))
    last = bool(attr(node, "select_last_index", 0))
    if is_const(x):
        a = np.asarray(x)
        a2 = np.flip(a, axis) if last else a
        idx = (np.argmax if largest else np.argmin)(a2, axis=axis)
        if last:
            idx = a.shape[axis] - 1 - idx
        idx = idx.astype(np.int64)
        return [np.expand_dims(idx, axis) if keep else idx]
    nm = ctx.name(node)
    m = mb()
    op = m.reduce_argmax if largest else m.reduce_argmin
    if not last:
        return [op(x=x, axis=axis, keep_dims=keep, name=nm)]
    # Last index of the extreme value: arg over the reversed axis, mapped back.
    n = static_shape(node, x)[axis]
    rev = m.reverse(x=x, axes=[axis], name=f"{nm}_rev")
    i = op(x=rev, axis=axis, keep_dims=keep, name=f"{nm}_ri")
    return [m.sub(x=np.int32(n - 1), y=i, name=nm)]


@lowering("ArgMax")
def argmax(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return _arg(ctx, node, largest=True)


@lowering("ArgMin")
def argmin(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return _arg(ctx, node, largest=False)


@lowering("TopK", const_inputs=(1,))
def topk(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    k = int(np.asarray(ctx.const(node, 1)).reshape(-1)[0])
    r = rank_of(x)
    axis = normalize_axis(node, int(attr(node, "axis", -1)), r)
    largest = bool(attr(node, "largest", 1))
    if is_const(x):
        a = np.asarray(x)
        # Stable sort on the negated values keeps ONNX's tie rule (lower index first) for "largest".
        order = np.argsort(-a if largest else a, axis=axis, kind="stable")
        idx = np.take(order, np.arange(k), axis=axis)
        return [np.take_along_axis(a, idx, axis=axis), idx.astype(np.int64)]
    nm = ctx.name(node)
    vals, idx = mb().topk(x=x, k=k, axis=axis, ascending=not largest, name=nm)
    return [vals, idx]
