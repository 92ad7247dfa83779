"""Indexing: Gather, GatherElements, GatherND, ScatterND, ScatterElements, OneHot.

ONNX allows negative indices (counted from the end); constant indices are normalised at build
time, computed ones with a ``select`` (Core ML's gather takes no negative indices everywhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from bitnet_coreml.lower.ops._common import (
    as_dtype,
    attr,
    bad,
    cast,
    is_const,
    mb,
    mil_array,
    normalize_axis,
    np_dtype,
    rank_of,
    req,
    shape_of,
    static_shape,
    to_var,
)
from bitnet_coreml.lower.registry import LoweringContext, lowering


def _norm_const_indices(node: ir.Node, idx: np.ndarray, dim: int) -> np.ndarray:
    idx = np.asarray(idx).astype(np.int64)
    if idx.size and (idx.min() < -dim or idx.max() >= dim):
        raise bad(node, f"index range [{idx.min()}, {idx.max()}] out of bounds for axis of size {dim}")
    return np.where(idx < 0, idx + dim, idx)


def _norm_var_indices(idx: Any, dim: int | Any, name: str) -> Any:
    m = mb()
    idx = cast(idx, np.int32, f"{name}_i32")
    neg = m.less(x=idx, y=np.int32(0), name=f"{name}_neg")
    wrapped = m.add(x=idx, y=dim if not isinstance(dim, int) else np.int32(dim), name=f"{name}_wrap")
    return m.select(cond=neg, a=wrapped, b=idx, name=f"{name}_idx")


def _gather_inputs(ctx: LoweringContext, node: ir.Node) -> tuple[Any, Any, Any, int, str, np.ndarray | None]:
    """(data, indices, data shape, axis, op name, the indices normalised when they are constant) of a gather."""
    x, idx = req(ctx, node, 0), req(ctx, node, 1)
    s = static_shape(node, x)
    axis = normalize_axis(node, int(attr(node, "axis", 0)), len(s))
    ci = _norm_const_indices(node, idx, s[axis]) if is_const(idx) else None
    return x, idx, s, axis, ctx.name(node), ci


@lowering("Gather")
def gather(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x, idx, s, axis, nm, ci = _gather_inputs(ctx, node)
    if ci is not None:
        if is_const(x):
            return [np.asarray(np.take(np.asarray(x), ci, axis=axis))]
        if ci.ndim == 0:
            # A scalar index drops the axis: slice it out, then squeeze.
            i = int(ci)
            begin = [0] * len(s)
            end = list(s)
            begin[axis], end[axis] = i, i + 1
            sl = mb().slice_by_index(x=x, begin=np.array(begin, np.int32), end=np.array(end, np.int32),
                                     name=f"{nm}_slice")
            return [mb().squeeze(x=sl, axes=[axis], name=nm) if len(s) > 1 else
                    mb().reshape(x=sl, shape=np.array([], np.int32), name=nm)]
        return [mb().gather(x=to_var(x), indices=mil_array(ci), axis=axis, name=nm)]
    iv = _norm_var_indices(idx, s[axis], nm)
    return [mb().gather(x=to_var(x, f"{nm}_data"), indices=iv, axis=axis, name=nm)]


@lowering("GatherElements")
def gather_elements(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x, idx, s, axis, nm, ci = _gather_inputs(ctx, node)
    if ci is not None:
        if is_const(x):
            return [np.take_along_axis(np.asarray(x), ci, axis=axis)]
        iv: Any = mil_array(ci)
    else:
        iv = _norm_var_indices(idx, s[axis], nm)
    return [mb().gather_along_axis(x=to_var(x, f"{nm}_data"), indices=iv, axis=axis, name=nm)]


@lowering("GatherND")
def gather_nd(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x, idx = req(ctx, node, 0), req(ctx, node, 1)
    batch_dims = int(attr(node, "batch_dims", 0))
    nm = ctx.name(node)
    if is_const(idx):
        s = static_shape(node, x)
        ci = np.asarray(idx).astype(np.int64)
        k = ci.shape[-1]
        dims = np.asarray(s[batch_dims:batch_dims + k], np.int64)
        ci = np.where(ci < 0, ci + dims, ci)
        if is_const(x) and batch_dims == 0:
            a = np.asarray(x)
            flat = ci.reshape(-1, k)
            out = np.stack([a[tuple(r)] for r in flat]) if flat.shape[0] else np.empty((0,), a.dtype)
            return [out.reshape(ci.shape[:-1] + a.shape[k:])]
        iv: Any = mil_array(ci)
    else:
        iv = cast(idx, np.int32, f"{nm}_i32")
    if rank_of(iv) < 1:
        raise bad(node, "indices must have rank >= 1")
    return [mb().gather_nd(x=to_var(x, f"{nm}_data"), indices=iv, batch_dims=batch_dims, name=nm)]


_SCATTER_MODES = {"none": "update", "add": "add", "mul": "mul", "max": "max", "min": "min"}


def _scatter_mode(node: ir.Node) -> str:
    red = str(attr(node, "reduction", "none"))
    if red not in _SCATTER_MODES:
        raise bad(node, f"reduction={red!r} (allowed: {', '.join(_SCATTER_MODES)})")
    return _SCATTER_MODES[red]


def _np_scatter(a: np.ndarray, idx: tuple[Any, ...], upd: np.ndarray, mode: str) -> None:
    if mode == "update":
        a[idx] = upd
    else:
        {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}[mode].at(a, idx, upd)


@lowering("ScatterND")
def scatter_nd(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x, idx, upd = req(ctx, node, 0), req(ctx, node, 1), req(ctx, node, 2)
    mode = _scatter_mode(node)
    s = static_shape(node, x)
    nm = ctx.name(node)
    if is_const(idx):
        ci = np.asarray(idx).astype(np.int64)
        k = ci.shape[-1]
        ci = np.where(ci < 0, ci + np.asarray(s[:k], np.int64), ci)
        if is_const(x) and is_const(upd):
            out = np.array(x, copy=True)
            flat, u = ci.reshape(-1, k), np.asarray(upd).reshape((-1,) + out.shape[k:])
            for row, val in zip(flat, u, strict=True):
                _np_scatter(out, tuple(row), val, mode)
            return [out]
        iv: Any = mil_array(ci)
    else:
        iv = cast(idx, np.int32, f"{nm}_i32")
    dt = np_dtype(x if not is_const(x) else upd)
    return [mb().scatter_nd(data=to_var(as_dtype(x, dt) if is_const(x) else x, f"{nm}_data"), indices=iv,
                            updates=to_var(as_dtype(upd, dt) if is_const(upd) else upd, f"{nm}_upd"),
                            mode=mode, name=nm)]


@lowering("ScatterElements")
def scatter_elements(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x, idx, upd = req(ctx, node, 0), req(ctx, node, 1), req(ctx, node, 2)
    mode = _scatter_mode(node)
    s = static_shape(node, x)
    axis = normalize_axis(node, int(attr(node, "axis", 0)), len(s))
    nm = ctx.name(node)
    if is_const(idx):
        ci = _norm_const_indices(node, idx, s[axis])
        if is_const(x) and is_const(upd):
            out = np.array(x, copy=True)
            grid: list[Any] = list(np.indices(ci.shape))
            grid[axis] = ci
            _np_scatter(out, tuple(grid), np.asarray(upd), mode)
            return [out]
        iv: Any = mil_array(ci)
    else:
        iv = _norm_var_indices(idx, s[axis], nm)
    dt = np_dtype(x if not is_const(x) else upd)
    return [mb().scatter_along_axis(data=to_var(as_dtype(x, dt) if is_const(x) else x, f"{nm}_data"), indices=iv,
                                    updates=to_var(as_dtype(upd, dt) if is_const(upd) else upd, f"{nm}_upd"),
                                    axis=axis, mode=mode, name=nm)]


@lowering("OneHot")
def one_hot(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    idx, depth_v, values_v = req(ctx, node, 0), req(ctx, node, 1), req(ctx, node, 2)
    r = len(shape_of(idx)) + 1
    axis = normalize_axis(node, int(attr(node, "axis", -1)), r)
    if not (is_const(depth_v) and is_const(values_v)):
        return [_one_hot_runtime(ctx, node, idx, depth_v, values_v, axis)]
    depth = int(np.asarray(depth_v).reshape(-1)[0])
    values = np.asarray(values_v).reshape(-1)
    if is_const(idx):
        ci = np.asarray(idx).astype(np.int64)
        ci = np.where(ci < 0, ci + depth, ci)
        hot = np.moveaxis(ci[..., None] == np.arange(depth), -1, axis)
        return [np.where(hot, values[1], values[0]).astype(values.dtype)]
    nm = ctx.name(node)
    iv = _norm_var_indices(idx, depth, nm)
    vals = mil_array(values)
    return [mb().one_hot(indices=iv, one_hot_vector_size=np.int32(depth), axis=axis,
                         on_value=vals.dtype.type(vals[1]), off_value=vals.dtype.type(vals[0]), name=nm)]


def _one_hot_runtime(ctx: LoweringContext, node: ir.Node, idx: Any, depth: Any, values: Any, axis: int) -> Any:
    """OneHot with a runtime depth (a flexible output length: Core ML's CPU/GPU, never the ANE) or runtime
    off/on values: MIL one_hot of 0/1 as the condition of a ``select`` between on and off (exact)."""
    m = mb()
    nm = ctx.name(node)
    d = to_var(np.asarray(depth).reshape(()), f"{nm}_depth") if is_const(depth) else cast(
        m.reshape(x=depth, shape=np.asarray([], np.int32), name=f"{nm}_depth0") if rank_of(depth) else depth,
        np.int32, f"{nm}_depth")
    iv = _norm_var_indices(to_var(idx, f"{nm}_x") if is_const(idx) else idx, d, nm)
    vals = to_var(values, f"{nm}_values") if is_const(values) else values
    hot = m.one_hot(indices=iv, one_hot_vector_size=d, axis=axis, on_value=np.int32(1), off_value=np.int32(0),
                    name=f"{nm}_hot")
    cond = m.cast(x=hot, dtype="bool", name=f"{nm}_cond")
    flat = m.reshape(x=vals, shape=np.asarray([2], np.int32), name=f"{nm}_v")
    off = m.slice_by_index(x=flat, begin=np.asarray([0], np.int32), end=np.asarray([1], np.int32), name=f"{nm}_off")
    on = m.slice_by_index(x=flat, begin=np.asarray([1], np.int32), end=np.asarray([2], np.int32), name=f"{nm}_on")
    return m.select(cond=cond, a=on, b=off, name=nm)
