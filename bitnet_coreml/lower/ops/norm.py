"""Normalisations: LayerNormalization, RMSNormalization, BatchNormalization (inference), GroupNormalization,
LpNormalization, MeanVarianceNormalization,
InstanceNormalization.

LayerNormalization uses MIL ``layer_norm`` when Scale/Bias are constants of the normalised shape
(the fused op the ANE runs); otherwise, or when the optional Mean/InvStdDev outputs are wanted, it
is spelled out with reductions.
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
    normalize_axis,
    np_dtype,
    req,
    static_shape,
    to_var,
    unsupported,
)
from bitnet_coreml.lower.registry import LoweringContext, lowering


def _wanted(node: ir.Node, i: int) -> bool:
    return i < len(node.outputs) and node.outputs[i] is not None and bool(node.outputs[i].name) and \
        len(node.outputs[i].uses()) + int(node.outputs[i].is_graph_output()) > 0


def _float(node: ir.Node, x: Any) -> Any:
    x = to_var(x)
    if np_dtype(x).kind != "f":
        raise unsupported(node, f"input dtype {np_dtype(x)} is not supported (allowed: float16, float32)")
    return x


def _param(v: Any, dt: np.dtype) -> Any:
    return mil_array(np.asarray(v).astype(dt)) if is_const(v) else v


@lowering("LayerNormalization")
def layer_norm(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = _float(node, req(ctx, node, 0))
    scale: Any = req(ctx, node, 1)
    bias: Any = ctx.input(node, 2)
    s = static_shape(node, x)
    axis = normalize_axis(node, int(attr(node, "axis", -1)), len(s))
    eps = float(attr(node, "epsilon", 1e-5))
    axes = list(range(axis, len(s)))
    norm_shape = tuple(s[axis:])
    dt = np_dtype(x)
    nm = ctx.name(node)
    m = mb()
    stats = _wanted(node, 1) or _wanted(node, 2)
    fused_ok = is_const(scale) and np.shape(scale) == norm_shape and (
        bias is None or (is_const(bias) and np.shape(bias) == norm_shape))
    if fused_ok and not stats:
        kw: dict[str, Any] = {"gamma": mil_array(np.asarray(scale).astype(dt))}
        if bias is not None:
            kw["beta"] = mil_array(np.asarray(bias).astype(dt))
        return [m.layer_norm(x=x, axes=axes, epsilon=np.asarray(eps, dt), name=nm, **kw)]
    mean = m.reduce_mean(x=x, axes=axes, keep_dims=True, name=f"{nm}_mean")
    centered = m.sub(x=x, y=mean, name=f"{nm}_c")
    var = m.reduce_mean(x=m.mul(x=centered, y=centered, name=f"{nm}_c2"), axes=axes, keep_dims=True,
                        name=f"{nm}_var")
    inv = m.rsqrt(x=var, epsilon=np.asarray(eps, dt), name=f"{nm}_inv")
    y = m.mul(x=centered, y=inv, name=f"{nm}_n")
    y = m.mul(x=y, y=_param(scale, dt), name=f"{nm}_s" if bias is not None else nm)
    if bias is not None:
        y = m.add(x=y, y=_param(bias, dt), name=nm)
    return [y, mean, inv][: len(node.outputs)]


@lowering("RMSNormalization")
def rms_norm(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = _float(node, req(ctx, node, 0))
    scale = ctx.input(node, 1)
    s = static_shape(node, x)
    axis = normalize_axis(node, int(attr(node, "axis", -1)), len(s))
    eps = float(attr(node, "epsilon", 1e-5))
    dt = np_dtype(x)
    nm = ctx.name(node)
    m = mb()
    ms = m.reduce_mean(x=m.mul(x=x, y=x, name=f"{nm}_sq"), axes=list(range(axis, len(s))), keep_dims=True,
                       name=f"{nm}_ms")
    inv = m.rsqrt(x=ms, epsilon=np.asarray(eps, dt), name=f"{nm}_inv")
    y = m.mul(x=x, y=inv, name=f"{nm}_n")
    return [m.mul(x=y, y=_param(scale, dt), name=nm)]


def _channel_shape(rank: int, c: int) -> list[int]:
    return [1, c] + [1] * (rank - 2)


def _bn_refusal(node: ir.Node) -> str | None:
    return "training_mode=1 is not supported (inference only)" if attr(node, "training_mode", 0) else None


@lowering("BatchNormalization", const_inputs=(1, 2, 3, 4), refuses=_bn_refusal)
def batch_norm(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    why = _bn_refusal(node)
    if why:
        raise unsupported(node, why)
    x = _float(node, req(ctx, node, 0))
    s = static_shape(node, x)
    if len(s) < 2:
        raise unsupported(node, f"input rank {len(s)} < 2")
    vals = [ctx.input(node, i) for i in range(1, 5)]
    if not all(is_const(v) for v in vals):
        raise unsupported(node, "scale, B, mean and var must be constants")
    scale, b, mean, var = (np.asarray(v, np.float64) for v in vals)
    eps = float(attr(node, "epsilon", 1e-5))
    # Inference batch norm is one affine map per channel: fold it to y = x * k + t.
    k = scale / np.sqrt(var + eps)
    t = b - mean * k
    dt = np_dtype(x)
    shp = _channel_shape(len(s), s[1])
    m = mb()
    nm = ctx.name(node)
    y = m.mul(x=x, y=k.reshape(shp).astype(dt), name=f"{nm}_k")
    return [m.add(x=y, y=t.reshape(shp).astype(dt), name=nm)]


@lowering("InstanceNormalization")
def instance_norm(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = _float(node, req(ctx, node, 0))
    s = static_shape(node, x)
    scale, b = ctx.input(node, 1), ctx.input(node, 2)
    eps = float(attr(node, "epsilon", 1e-5))
    dt = np_dtype(x)
    nm = ctx.name(node)
    m = mb()
    axes = list(range(2, len(s)))
    mean = m.reduce_mean(x=x, axes=axes, keep_dims=True, name=f"{nm}_mean")
    c = m.sub(x=x, y=mean, name=f"{nm}_c")
    var = m.reduce_mean(x=m.mul(x=c, y=c, name=f"{nm}_c2"), axes=axes, keep_dims=True, name=f"{nm}_var")
    y = m.mul(x=c, y=m.rsqrt(x=var, epsilon=np.asarray(eps, dt), name=f"{nm}_inv"), name=f"{nm}_n")
    shp = _channel_shape(len(s), s[1])
    sc = np.asarray(scale).astype(dt).reshape(shp) if is_const(scale) else m.reshape(
        x=scale, shape=np.array(shp, np.int32), name=f"{nm}_sr")
    bb = np.asarray(b).astype(dt).reshape(shp) if is_const(b) else m.reshape(
        x=b, shape=np.array(shp, np.int32), name=f"{nm}_br")
    y = m.mul(x=y, y=sc, name=f"{nm}_s")
    return [m.add(x=y, y=bb, name=nm)]


@lowering("LpNormalization")
def lp_norm(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = _float(node, req(ctx, node, 0))
    s = static_shape(node, x)
    axis = normalize_axis(node, int(attr(node, "axis", -1)), len(s))
    p = int(attr(node, "p", 2))
    if p not in (1, 2):
        raise unsupported(node, f"p={p} (allowed: 1, 2)")
    nm = ctx.name(node)
    m = mb()
    op = m.reduce_l2_norm if p == 2 else m.reduce_l1_norm
    n = op(x=x, axes=[axis], keep_dims=True, name=f"{nm}_norm")
    # A zero vector stays zero (ONNX divides by 1 there rather than producing NaN).
    zero = m.equal(x=n, y=np.asarray(0, np_dtype(x)), name=f"{nm}_zero")
    n = m.select(cond=zero, a=np.asarray(1, np_dtype(x)), b=n, name=f"{nm}_safe")
    return [m.real_div(x=x, y=n, name=nm)]


@lowering("MeanVarianceNormalization")
def mvn(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = _float(node, req(ctx, node, 0))
    s = static_shape(node, x)
    axes = sorted(normalize_axis(node, int(a), len(s)) for a in (attr(node, "axes", None) or [0, 2, 3]))
    nm = ctx.name(node)
    m = mb()
    dt = np_dtype(x)
    mean = m.reduce_mean(x=x, axes=axes, keep_dims=True, name=f"{nm}_mean")
    c = m.sub(x=x, y=mean, name=f"{nm}_c")
    var = m.reduce_mean(x=m.mul(x=c, y=c, name=f"{nm}_c2"), axes=axes, keep_dims=True, name=f"{nm}_var")
    # ONNX's function body divides by sqrt(var) + 1e-9.
    den = m.add(x=m.sqrt(x=var, name=f"{nm}_std"), y=np.asarray(1e-9, dt), name=f"{nm}_den")
    return [m.real_div(x=c, y=den, name=nm)]


@lowering("GroupNormalization", const_inputs=(1, 2))
def group_norm(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = _float(node, req(ctx, node, 0))
    s = static_shape(node, x)
    g = int(attr(node, "num_groups"))
    eps = float(attr(node, "epsilon", 1e-5))
    n, c = s[0], s[1]
    if c % g:
        raise bad(node, f"{c} channels do not split into num_groups={g}")
    scale, bias = req(ctx, node, 1), req(ctx, node, 2)
    if not (is_const(scale) and is_const(bias)):
        raise unsupported(node, "scale and bias must be constants")
    dt = np_dtype(x)
    nm = ctx.name(node)
    m = mb()
    xg = m.reshape(x=x, shape=np.array([n, g, -1], np.int32), name=f"{nm}_g")
    mean = m.reduce_mean(x=xg, axes=[2], keep_dims=True, name=f"{nm}_mean")
    cen = m.sub(x=xg, y=mean, name=f"{nm}_c")
    var = m.reduce_mean(x=m.mul(x=cen, y=cen, name=f"{nm}_c2"), axes=[2], keep_dims=True, name=f"{nm}_var")
    y = m.mul(x=cen, y=m.rsqrt(x=var, epsilon=np.asarray(eps, dt), name=f"{nm}_inv"), name=f"{nm}_n")
    y = m.reshape(x=y, shape=np.array(s, np.int32), name=f"{nm}_back")
    sc, bb = np.asarray(scale).reshape(-1), np.asarray(bias).reshape(-1)
    if sc.size == g:  # opset 18: one scale per group
        sc, bb = np.repeat(sc, c // g), np.repeat(bb, c // g)
    shp = _channel_shape(len(s), c)
    y = m.mul(x=y, y=sc.astype(dt).reshape(shp), name=f"{nm}_s")
    return [m.add(x=y, y=bb.astype(dt).reshape(shp), name=nm)]
