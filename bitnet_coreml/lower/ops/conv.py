"""Convolution and pooling: Conv (groups, strides, pads, dilations, auto_pad), MaxPool, AveragePool,
GlobalAveragePool, GlobalMaxPool.

ONNX pads are ``[x1_begin, x2_begin, ..., x1_end, x2_end]``; MIL wants ``[x1_begin, x1_end, ...]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from bitnet_coreml.lower.ops._common import (
    attr,
    bad,
    is_const,
    mb,
    mil_array,
    np_dtype,
    req,
    static_shape,
    to_var,
    unsupported,
)
from bitnet_coreml.lower.registry import LoweringContext, lowering

_AUTO_PAD = {"SAME_UPPER": "same", "SAME_LOWER": "same_lower", "VALID": "valid"}


def _padding(node: ir.Node, n_spatial: int) -> dict[str, Any]:
    auto = attr(node, "auto_pad", "NOTSET")
    if auto not in ("NOTSET", ""):
        if auto not in _AUTO_PAD:
            raise bad(node, f"auto_pad={auto!r} (allowed: NOTSET, SAME_UPPER, SAME_LOWER, VALID)")
        return {"pad_type": _AUTO_PAD[auto]}
    pads = attr(node, "pads", None) or [0] * (2 * n_spatial)
    if len(pads) != 2 * n_spatial:
        raise bad(node, f"pads has {len(pads)} entries, expected {2 * n_spatial}")
    mil_pad = []
    for i in range(n_spatial):
        mil_pad += [int(pads[i]), int(pads[i + n_spatial])]
    return {"pad_type": "custom", "pad": np.asarray(mil_pad, np.int32)}


@lowering("Conv")
def conv(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x, w, b = req(ctx, node, 0), ctx.input(node, 1), ctx.input(node, 2)
    xs = static_shape(node, x)
    n_spatial = len(xs) - 2
    if n_spatial not in (1, 2, 3):
        raise unsupported(node, f"input rank {len(xs)} (allowed: 3, 4, 5)")
    dt = np_dtype(x)
    if np.dtype(dt).kind != "f":
        raise unsupported(node, f"input dtype {dt} (allowed: float)")
    strides = attr(node, "strides", None) or [1] * n_spatial
    dilations = attr(node, "dilations", None) or [1] * n_spatial
    groups = int(attr(node, "group", 1))
    kw: dict[str, Any] = _padding(node, n_spatial)
    if b is not None:
        kw["bias"] = mil_array(np.asarray(b).astype(dt)) if is_const(b) else b
    weight = mil_array(np.asarray(w).astype(dt)) if is_const(w) else w
    return [mb().conv(x=to_var(x), weight=weight, strides=np.asarray(strides, np.int32),
                      dilations=np.asarray(dilations, np.int32), groups=groups, name=ctx.name(node), **kw)]


def _pool(ctx: LoweringContext, node: ir.Node, kind: str) -> Sequence[Any]:
    x = to_var(req(ctx, node, 0))
    xs = static_shape(node, x)
    n_spatial = len(xs) - 2
    if n_spatial not in (1, 2, 3):
        raise unsupported(node, f"input rank {len(xs)} (allowed: 3, 4, 5)")
    if np_dtype(x).kind != "f":
        raise unsupported(node, f"input dtype {np_dtype(x)} (Core ML pools float tensors only)")
    if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].name:
        raise unsupported(node, "the Indices output of MaxPool is not supported")
    kernel = attr(node, "kernel_shape")
    strides = attr(node, "strides", None) or [1] * n_spatial
    if any(d != 1 for d in (attr(node, "dilations", None) or [1])):
        raise unsupported(node, "dilated pooling is not supported")
    if attr(node, "storage_order", 0):
        raise unsupported(node, "storage_order=1 is not supported")
    kw: dict[str, Any] = _padding(node, n_spatial)
    kw["ceil_mode"] = bool(attr(node, "ceil_mode", 0))
    m = mb()
    common = {"x": x, "kernel_sizes": np.asarray(kernel, np.int32), "strides": np.asarray(strides, np.int32),
              "name": ctx.name(node), **kw}
    if kind == "max":
        return [m.max_pool(**common)]
    return [m.avg_pool(exclude_padding_from_average=not bool(attr(node, "count_include_pad", 0)), **common)]


@lowering("MaxPool")
def max_pool(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return _pool(ctx, node, "max")


@lowering("AveragePool")
def avg_pool(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return _pool(ctx, node, "avg")


def _global(ctx: LoweringContext, node: ir.Node, op: str) -> Sequence[Any]:
    x = to_var(req(ctx, node, 0))
    r = len(static_shape(node, x))
    return [getattr(mb(), op)(x=x, axes=list(range(2, r)), keep_dims=True, name=ctx.name(node))]


@lowering("GlobalAveragePool")
def global_avg_pool(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return _global(ctx, node, "reduce_mean")


@lowering("GlobalMaxPool")
def global_max_pool(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return _global(ctx, node, "reduce_max")
