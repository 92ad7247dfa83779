"""``gather``, ``gather_along_axis``, ``gather_nd`` and the ``scatter*`` family (all modes)."""

from __future__ import annotations

from typing import Any

import numpy as np

from bitnet_coreml.executor.ops._util import axis_of, scalar
from bitnet_coreml.executor.registry import OpContext, register


def _wrap(idx: Any, size: int) -> np.ndarray:
    i = np.asarray(idx).astype(np.int64)
    return np.where(i < 0, i + size, i)


@register("gather")
def op_gather(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    axis = axis_of(a.get("axis", 0), x.ndim)
    b = int(scalar(a.get("batch_dims", 0)))
    idx = _wrap(a["indices"], x.shape[axis])
    if b == 0:
        return np.take(x, idx, axis=axis)
    batch = x.shape[:b]
    xb = x.reshape((-1,) + x.shape[b:])
    ib = idx.reshape((-1,) + idx.shape[b:])
    parts = [np.take(xb[i], ib[i], axis=axis - b) for i in range(xb.shape[0])]
    out = np.stack(parts, axis=0)
    return out.reshape(tuple(batch) + out.shape[1:])


@register("gather_along_axis")
def op_gather_along_axis(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    axis = axis_of(a.get("axis", 0), x.ndim)
    return np.take_along_axis(x, _wrap(a["indices"], x.shape[axis]), axis=axis)


def _gather_nd0(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    k = idx.shape[-1]
    wrapped = [np.where(idx[..., i] < 0, idx[..., i] + x.shape[i], idx[..., i]) for i in range(k)]
    return x[tuple(wrapped)]


@register("gather_nd")
def op_gather_nd(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    idx = np.asarray(a["indices"]).astype(np.int64)
    b = int(scalar(a.get("batch_dims", 0)))
    if b == 0:
        return _gather_nd0(x, idx)
    batch = x.shape[:b]
    xb = x.reshape((-1,) + x.shape[b:])
    ib = idx.reshape((-1,) + idx.shape[b:])
    out = np.stack([_gather_nd0(xb[i], ib[i]) for i in range(xb.shape[0])], axis=0)
    return out.reshape(tuple(batch) + out.shape[1:])


_MODES = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "max": np.maximum,
    "min": np.minimum,
}


def _apply(out: np.ndarray, index: tuple[Any, ...], updates: np.ndarray, mode: str) -> np.ndarray:
    if mode == "update":
        out[index] = updates
        return out
    if mode not in _MODES:
        raise ValueError(f"scatter mode {mode!r}; allowed: update, {', '.join(_MODES)}")
    _MODES[mode].at(out, index, updates)
    return out


def _work_copy(data: Any, updates: Any) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(data)
    dt = np.result_type(d.dtype, np.asarray(updates).dtype) if d.dtype.kind == "f" else d.dtype
    return np.array(d, dtype=dt, copy=True), np.asarray(updates)


@register("scatter")
def op_scatter(ctx: OpContext, a: dict[str, Any]) -> Any:
    out, upd = _work_copy(a["data"], a["updates"])
    axis = axis_of(a.get("axis", 0), out.ndim)
    idx = _wrap(a["indices"], out.shape[axis])
    mode = str(scalar(a.get("mode", "add")))
    # updates: data.shape[:axis] + indices.shape + data.shape[axis+1:]
    moved = np.moveaxis(out, axis, 0)
    upd_moved = np.moveaxis(upd, list(range(axis, axis + idx.ndim)), list(range(idx.ndim)))
    _apply(moved, (idx,), upd_moved, mode)
    return out


@register("scatter_along_axis")
def op_scatter_along_axis(ctx: OpContext, a: dict[str, Any]) -> Any:
    out, upd = _work_copy(a["data"], a["updates"])
    axis = axis_of(a.get("axis", 0), out.ndim)
    idx = _wrap(a["indices"], out.shape[axis])
    mode = str(scalar(a.get("mode", "add")))
    grids = list(np.indices(idx.shape, sparse=True))
    grids[axis] = idx
    return _apply(out, tuple(grids), upd, mode)


@register("scatter_nd")
def op_scatter_nd(ctx: OpContext, a: dict[str, Any]) -> Any:
    out, upd = _work_copy(a["data"], a["updates"])
    idx = np.asarray(a["indices"]).astype(np.int64)
    mode = str(scalar(a.get("mode", "add")))
    k = idx.shape[-1]
    index = tuple(np.where(idx[..., i] < 0, idx[..., i] + out.shape[i], idx[..., i]) for i in range(k))
    return _apply(out, index, upd, mode)
