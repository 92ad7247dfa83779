"""``reduce_*`` (sum, mean, max, min, prod, norms, log-sum, log-sum-exp) and ``reduce_argmax/argmin``."""

from __future__ import annotations

from typing import Any

import numpy as np

from bitnet_coreml.executor.ops._util import int_list, scalar
from bitnet_coreml.executor.registry import OpContext, register


def _axes(a: dict[str, Any]) -> tuple[int, ...] | None:
    axes = a.get("axes")
    if axes is None:
        return None
    return tuple(int_list(axes))


def _lse(x: np.ndarray, axis: Any, keepdims: bool) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis if axis is not None else tuple(range(x.ndim)))


_REDUCERS = {
    "reduce_sum": lambda x, ax, k: np.sum(x, axis=ax, keepdims=k),
    "reduce_mean": lambda x, ax, k: np.mean(x, axis=ax, keepdims=k),
    "reduce_max": lambda x, ax, k: np.max(x, axis=ax, keepdims=k),
    "reduce_min": lambda x, ax, k: np.min(x, axis=ax, keepdims=k),
    "reduce_prod": lambda x, ax, k: np.prod(x, axis=ax, keepdims=k),
    "reduce_l1_norm": lambda x, ax, k: np.sum(np.abs(x), axis=ax, keepdims=k),
    "reduce_l2_norm": lambda x, ax, k: np.sqrt(np.sum(np.square(x), axis=ax, keepdims=k)),
    "reduce_sum_square": lambda x, ax, k: np.sum(np.square(x), axis=ax, keepdims=k),
    "reduce_log_sum": lambda x, ax, k: np.log(np.sum(x, axis=ax, keepdims=k)),
    "reduce_log_sum_exp": _lse,
}


def _make(fn: Any) -> Any:
    def impl(ctx: OpContext, a: dict[str, Any]) -> Any:
        x = np.asarray(a["x"])
        keep = bool(scalar(a.get("keep_dims", False)))
        return fn(x, _axes(a), keep)

    return impl


for _name, _fn in _REDUCERS.items():
    _impl = _make(_fn)
    _impl.__name__ = f"op_{_name}"
    register(_name)(_impl)


def _arg(a: dict[str, Any], fn: Any) -> Any:
    x = np.asarray(a["x"])
    axis = int(scalar(a.get("axis", -1)))
    keep = bool(scalar(a.get("keep_dims", False)))
    # ties go to the first index, as numpy; NaN handling follows numpy too
    return fn(x, axis=axis, keepdims=keep)


@register("reduce_argmax")
def op_reduce_argmax(ctx: OpContext, a: dict[str, Any]) -> Any:
    return _arg(a, np.argmax)


@register("reduce_argmin")
def op_reduce_argmin(ctx: OpContext, a: dict[str, Any]) -> Any:
    return _arg(a, np.argmin)
