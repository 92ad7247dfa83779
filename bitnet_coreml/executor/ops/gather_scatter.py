"""``gather``, ``gather_along_axis``, ``gather_nd`` and the ``scatter*`` family (all modes)."""

from __future__ import annotations

from typing import Any

import numpy as np

from bitnet_coreml.errors import InputError
from bitnet_coreml.executor.half import HalfWeight
from bitnet_coreml.executor.ops._util import axis_of, scalar
from bitnet_coreml.executor.registry import OpContext, register


def _wrap(idx: Any, size: int, validate: Any = False) -> np.ndarray:
    """Negative indices count from the end (iOS15/16 ops).

    With iOS17's ``validate_indices`` only [0, size) is valid and anything else is a runtime error.
    """
    i = np.asarray(idx).astype(np.int64)
    if bool(validate) and i.size and (i.min() < 0 or i.max() >= size):
        raise InputError(f"gather indices out of range [0, {size}): min {i.min()}, max {i.max()}; "
                         "check the input values (e.g. token ids below the vocabulary size)")
    i = np.where(i < 0, i + size, i)
    if i.size and (i.min() < 0 or i.max() >= size):
        raise InputError(f"gather indices out of range [-{size}, {size}): min {i.min()}, max {i.max()}; "
                         "check the input values (e.g. token ids below the vocabulary size)")
    return i


def _validate(a: dict[str, Any]) -> bool:
    v = a.get("validate_indices", False)
    return bool(scalar(v))


@register("gather")
def op_gather(ctx: OpContext, a: dict[str, Any]) -> Any:
    if a["x"].__class__ is HalfWeight:  # rows of an fp16 table (the compiler checked axis 0, batch_dims 0)
        table = a["x"]
        return table.rows(_wrap(a["indices"], table.shape[0], _validate(a)))
    x = np.asarray(a["x"])
    axis = axis_of(a.get("axis", 0), x.ndim)
    b = int(scalar(a.get("batch_dims", 0)))
    idx = _wrap(a["indices"], x.shape[axis], _validate(a))
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
    return np.take_along_axis(x, _wrap(a["indices"], x.shape[axis], _validate(a)), axis=axis)


def _gather_nd0(x: np.ndarray, idx: np.ndarray, validate: bool = False) -> np.ndarray:
    k = idx.shape[-1]
    return x[tuple(_wrap(idx[..., i], x.shape[i], validate) for i in range(k))]


@register("gather_nd")
def op_gather_nd(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    idx = np.asarray(a["indices"]).astype(np.int64)
    b = int(scalar(a.get("batch_dims", 0)))
    if b == 0:
        return _gather_nd0(x, idx, _validate(a))
    batch = x.shape[:b]
    xb = x.reshape((-1,) + x.shape[b:])
    ib = idx.reshape((-1,) + idx.shape[b:])
    out = np.stack([_gather_nd0(xb[i], ib[i], _validate(a)) for i in range(xb.shape[0])], axis=0)
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
    idx = _wrap(a["indices"], out.shape[axis], _validate(a))
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
    idx = _wrap(a["indices"], out.shape[axis], _validate(a))
    mode = str(scalar(a.get("mode", "add")))
    grids: list[Any] = list(np.indices(idx.shape, sparse=True))
    grids[axis] = idx
    return _apply(out, tuple(grids), upd, mode)


@register("scatter_nd")
def op_scatter_nd(ctx: OpContext, a: dict[str, Any]) -> Any:
    out, upd = _work_copy(a["data"], a["updates"])
    idx = np.asarray(a["indices"]).astype(np.int64)
    mode = str(scalar(a.get("mode", "add")))
    k = idx.shape[-1]
    index = tuple(_wrap(idx[..., i], out.shape[i], _validate(a)) for i in range(k))
    return _apply(out, index, upd, mode)
