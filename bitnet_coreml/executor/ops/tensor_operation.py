"""Tensor builders and reorderings: fill, range_1d, shape, band_part, cumsum, one_hot, topk, argsort, non_zero."""

from __future__ import annotations

from typing import Any

import numpy as np

from bitnet_coreml.executor.ops._util import axis_of, int_list, scalar
from bitnet_coreml.executor.registry import OpContext, register


@register("fill")
def op_fill(ctx: OpContext, a: dict[str, Any]) -> Any:
    return np.full(int_list(a["shape"]), scalar(a.get("value", 0.0)))


@register("fill_like")
def op_fill_like(ctx: OpContext, a: dict[str, Any]) -> Any:
    return np.full(np.asarray(a["ref_tensor"]).shape, scalar(a.get("value", 0.0)))


@register("range_1d")
def op_range_1d(ctx: OpContext, a: dict[str, Any]) -> Any:
    return np.arange(scalar(a["start"]), scalar(a["end"]), scalar(a["step"]))


@register("shape")
def op_shape(ctx: OpContext, a: dict[str, Any]) -> Any:
    return np.asarray(np.asarray(a["x"]).shape, dtype=np.int32)


@register("band_part")
def op_band_part(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    lower = int(scalar(a.get("lower", -1)))
    upper = int(scalar(a.get("upper", -1)))
    m, n = x.shape[-2:]
    i = np.arange(m)[:, None]
    j = np.arange(n)[None, :]
    keep = np.ones((m, n), dtype=bool)
    if lower >= 0:
        keep &= (i - j) <= lower
    if upper >= 0:
        keep &= (j - i) <= upper
    return np.where(keep, x, np.zeros((), dtype=x.dtype))


@register("cumsum")
def op_cumsum(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    axis = axis_of(a.get("axis", 0), x.ndim)
    exclusive = bool(scalar(a.get("exclusive", False)))
    reverse = bool(scalar(a.get("reverse", False)))
    if reverse:
        x = np.flip(x, axis=axis)
    y = np.cumsum(x, axis=axis)
    if exclusive:
        y = y - x
    if reverse:
        y = np.flip(y, axis=axis)
    return y


@register("one_hot")
def op_one_hot(ctx: OpContext, a: dict[str, Any]) -> Any:
    idx = np.asarray(a["indices"]).astype(np.int64)
    depth = int(scalar(a["one_hot_vector_size"]))
    axis = axis_of(a.get("axis", -1), idx.ndim + 1)
    on, off = scalar(a.get("on_value", 1)), scalar(a.get("off_value", 0))
    hot = np.arange(depth).reshape((1,) * idx.ndim + (depth,)) == idx[..., None]
    out = np.where(hot, on, off)
    return np.moveaxis(out, -1, axis)


def _order(x: np.ndarray, axis: int, ascending: bool) -> np.ndarray:
    # stable sort; descending keeps the first of equal elements first, like Core ML
    if ascending:
        return np.argsort(x, axis=axis, kind="stable")
    flipped = np.flip(x, axis=axis)
    idx = np.argsort(flipped, axis=axis, kind="stable")
    idx = np.flip(idx, axis=axis)
    return x.shape[axis] - 1 - idx


@register("argsort")
def op_argsort(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    axis = axis_of(a.get("axis", -1), x.ndim)
    return _order(x, axis, bool(scalar(a.get("ascending", False))))


@register("topk")
def op_topk(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    axis = axis_of(a.get("axis", -1), x.ndim)
    k = int(scalar(a.get("k", 1)))
    order = _order(x, axis, bool(scalar(a.get("ascending", False))))
    idx = np.take(order, np.arange(k), axis=axis)
    values = np.take_along_axis(x, idx, axis=axis)
    if len(ctx.out_dtypes) == 1:
        return values
    return values, idx


@register("non_zero")
def op_non_zero(ctx: OpContext, a: dict[str, Any]) -> Any:
    return np.argwhere(np.asarray(a["x"]) != 0)
