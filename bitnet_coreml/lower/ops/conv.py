"""Convolution and pooling: Conv (groups, strides, pads, dilations, auto_pad), ConvTranspose, MaxPool, AveragePool,
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


def pool_refusal(node: ir.Node) -> str | None:
    """What MIL pools cannot do, from the node alone (the lowering and the static refusals both ask)."""
    if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].name:
        return "the Indices output of MaxPool is not supported"
    if any(d != 1 for d in (attr(node, "dilations", None) or [1])):
        return "dilated pooling is not supported"
    if attr(node, "storage_order", 0):
        return "storage_order=1 is not supported"
    return None


def _pool(ctx: LoweringContext, node: ir.Node, kind: str) -> Sequence[Any]:
    x = to_var(req(ctx, node, 0))
    xs = static_shape(node, x)
    n_spatial = len(xs) - 2
    if n_spatial not in (1, 2, 3):
        raise unsupported(node, f"input rank {len(xs)} (allowed: 3, 4, 5)")
    int_input = np_dtype(x).kind != "f"
    if int_input and kind != "max":
        raise unsupported(node, f"input dtype {np_dtype(x)} (Core ML pools float tensors only)")
    if int_input:
        # MaxPool of (u)int8 data: the max of fp32 copies is exact (|v| < 2**24), then back to int32.
        x = mb().cast(x=x, dtype="fp32", name=f"{ctx.name(node)}_f")
    why = pool_refusal(node)
    if why:
        raise unsupported(node, why)
    kernel = attr(node, "kernel_shape")
    strides = attr(node, "strides", None) or [1] * n_spatial
    kw: dict[str, Any] = _padding(node, n_spatial)
    kw["ceil_mode"] = bool(attr(node, "ceil_mode", 0))
    m = mb()
    common = {"x": x, "kernel_sizes": np.asarray(kernel, np.int32), "strides": np.asarray(strides, np.int32),
              "name": ctx.name(node), **kw}
    if kind == "max":
        if int_input:
            common["name"] = f"{ctx.name(node)}_pool"
            return [m.cast(x=m.max_pool(**common), dtype="int32", name=ctx.name(node))]
        return [m.max_pool(**common)]
    return [m.avg_pool(exclude_padding_from_average=not bool(attr(node, "count_include_pad", 0)), **common)]


@lowering("MaxPool", refuses=pool_refusal)
def max_pool(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return _pool(ctx, node, "max")


@lowering("AveragePool", refuses=pool_refusal)
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


@lowering("ConvTranspose", const_inputs=(1,))
def conv_transpose(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    """Full transposed convolution (no padding), then ONNX's output_padding and pads as pad + crop.

    Positions that only output_padding creates receive no input contribution, just the bias, so the
    bias is added after the crop; this pins ONNX's size arithmetic exactly instead of relying on how
    a backend interprets MIL's ``output_shape``.
    """
    # MIL conv_transpose needs its weight at compile time (unlike conv).
    x, w, b = to_var(req(ctx, node, 0)), ctx.const(node, 1), ctx.input(node, 2)
    xs = static_shape(node, x)
    n_sp = len(xs) - 2
    if n_sp not in (1, 2, 3):
        raise unsupported(node, f"input rank {len(xs)} (allowed: 3, 4, 5)")
    dt = np_dtype(x)
    ws = static_shape(node, w)
    groups = int(attr(node, "group", 1))
    strides = attr(node, "strides", None) or [1] * n_sp
    dil = attr(node, "dilations", None) or [1] * n_sp
    out_pad = attr(node, "output_padding", None) or [0] * n_sp
    kernel = ws[2:]
    full = [strides[i] * (xs[2 + i] - 1) + (kernel[i] - 1) * dil[i] + 1 for i in range(n_sp)]
    auto = str(attr(node, "auto_pad", "NOTSET"))
    out_shape = attr(node, "output_shape", None)
    if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        target = list(out_shape)[-n_sp:] if out_shape is not None else [xs[2 + i] * strides[i] for i in range(n_sp)]
        total = [full[i] + out_pad[i] - target[i] for i in range(n_sp)]
        if auto == "SAME_UPPER":
            begin = [t // 2 for t in total]
        else:
            begin = [t - t // 2 for t in total]
        end = [t - bg for t, bg in zip(total, begin, strict=True)]
    elif auto == "VALID":
        begin, end = [0] * n_sp, [0] * n_sp
    else:
        pads = attr(node, "pads", None) or [0] * (2 * n_sp)
        begin, end = [int(p) for p in pads[:n_sp]], [int(p) for p in pads[n_sp:]]
    nm = ctx.name(node)
    m = mb()
    weight = mil_array(np.asarray(w).astype(dt)) if is_const(w) else w
    y = m.conv_transpose(x=x, weight=weight, pad_type="valid", strides=np.asarray(strides, np.int32),
                         dilations=np.asarray(dil, np.int32), groups=groups, name=f"{nm}_full")
    # Negative padding (an output_shape larger than the full result) extends with zeros like output_padding.
    grow_lo = [max(-v, 0) for v in begin]
    grow_hi = [max(-v, 0) + int(out_pad[i]) for i, v in enumerate(end)]
    if any(grow_lo + grow_hi):
        pad = [v for i in range(n_sp) for v in (grow_lo[i], grow_hi[i])]
        y = m.pad(x=y, pad=np.asarray(pad, np.int32), mode="constant", constant_val=dt.type(0), name=f"{nm}_opad")
    crop_lo, crop_hi = [max(v, 0) for v in begin], [max(v, 0) for v in end]
    if any(crop_lo + crop_hi):
        sizes = [full[i] + grow_lo[i] + grow_hi[i] for i in range(n_sp)]
        lo = [0, 0] + crop_lo
        hi = [xs[0], ws[1] * groups] + [sizes[i] - crop_hi[i] for i in range(n_sp)]
        y = m.slice_by_index(x=y, begin=np.asarray(lo, np.int32), end=np.asarray(hi, np.int32), name=f"{nm}_crop")
    if b is None:
        return [m.identity(x=y, name=nm)]
    shp = [1, ws[1] * groups] + [1] * n_sp
    bias = np.asarray(b).astype(dt).reshape(shp) if is_const(b) else m.reshape(
        x=b, shape=np.asarray(shp, np.int32), name=f"{nm}_b")
    return [m.add(x=y, y=bias, name=nm)]
