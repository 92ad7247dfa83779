"""Matrix products: MatMul and Gemm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from bitnet_coreml.lower.ops._common import attr, bad, is_const, mb, mil_array, np_dtype, rank_of, to_var
from bitnet_coreml.lower.registry import LoweringContext, lowering


def _same_dtype(a: Any, b: Any) -> tuple[Any, Any]:
    if is_const(a) and not is_const(b):
        a = mil_array(np.asarray(a).astype(np_dtype(b)))
    if is_const(b) and not is_const(a):
        b = mil_array(np.asarray(b).astype(np_dtype(a)))
    return a, b


@lowering("MatMul")
def matmul(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    a, b = ctx.input(node, 0), ctx.input(node, 1)
    if is_const(a) and is_const(b):
        return [np.matmul(np.asarray(a), np.asarray(b))]
    a, b = _same_dtype(a, b)
    nm = ctx.name(node)
    ra, rb = rank_of(a), rank_of(b)
    if ra >= 2 and rb >= 2:
        return [mb().matmul(x=to_var(a), y=to_var(b), name=nm)]
    # numpy's 1-D rules: a vector operand gets a unit dim (prepended for a, appended for b) that the
    # result then drops. MIL matmul wants rank >= 2 on both sides.
    m = mb()
    x = np.expand_dims(a, 0) if is_const(a) and ra == 1 else (
        m.expand_dims(x=a, axes=[0], name=f"{nm}_a2") if ra == 1 else a)
    y = np.expand_dims(b, -1) if is_const(b) and rb == 1 else (
        m.expand_dims(x=b, axes=[-1], name=f"{nm}_b2") if rb == 1 else b)
    mm = m.matmul(x=to_var(x), y=to_var(y), name=f"{nm}_mm")
    drop = ([-2] if ra == 1 else []) + ([-1] if rb == 1 else [])
    r_out = max(ra, rb, 2)
    axes = sorted(d + r_out for d in drop)
    if ra == 1 and rb == 1:
        return [m.reshape(x=mm, shape=np.array([], np.int32), name=nm)]
    return [m.squeeze(x=mm, axes=axes, name=nm)]


@lowering("Gemm")
def gemm(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    a, b, c = ctx.input(node, 0), ctx.input(node, 1), ctx.input(node, 2)
    alpha = float(attr(node, "alpha", 1.0))
    beta = float(attr(node, "beta", 1.0))
    ta, tb = bool(attr(node, "transA", 0)), bool(attr(node, "transB", 0))
    for i, v in enumerate((a, b)):
        if rank_of(v) != 2:
            raise bad(node, f"input {i} must be 2-D, found rank {rank_of(v)}")
    nm = ctx.name(node)
    if is_const(a) and is_const(b) and (c is None or is_const(c)):
        aa = np.asarray(a).T if ta else np.asarray(a)
        bb = np.asarray(b).T if tb else np.asarray(b)
        y = alpha * (aa @ bb)
        if c is not None:
            y = y + beta * np.asarray(c)
        return [y.astype(np.asarray(a).dtype)]
    a, b = _same_dtype(a, b)
    dt = np_dtype(a)
    m = mb()
    y = m.matmul(x=to_var(a), y=to_var(b), transpose_x=ta, transpose_y=tb,
                 name=nm if (alpha == 1.0 and (c is None or beta == 0.0)) else f"{nm}_mm")
    if alpha != 1.0:
        y = m.mul(x=y, y=np.asarray(alpha, dt), name=nm if (c is None or beta == 0.0) else f"{nm}_alpha")
    if c is not None and beta != 0.0:
        if is_const(c):
            y = m.add(x=y, y=mil_array((beta * np.asarray(c)).astype(dt)), name=nm)
        else:
            cb = c if beta == 1.0 else m.mul(x=c, y=np.asarray(beta, dt), name=f"{nm}_beta")
            y = m.add(x=y, y=cb, name=nm)
    return [y]
