"""Cast and CastLike.

Core ML holds int32/fp16/fp32/bool tensors only: a cast to int64 (or any integer type) becomes int32,
to float64 becomes fp32. Constants keep the exact ONNX target dtype (int64 stays int64 while it folds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from bitnet_coreml.lower.ops._common import (
    attr,
    cast,
    is_const,
    mb,
    mil_dtype_str,
    np_dtype,
    req,
    unsupported,
)
from bitnet_coreml.lower.registry import LoweringContext, lowering

_CASTABLE = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BOOL, ir.DataType.INT8,
             ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64, ir.DataType.UINT8, ir.DataType.UINT16,
             ir.DataType.UINT32, ir.DataType.UINT64}


def _cast_to(ctx: LoweringContext, node: ir.Node, x: Any, target: np.dtype) -> Any:
    if target == np.float32 and ctx.options.get("float_is_fp16"):
        target = np.dtype(np.float16)  # a native fp16 build (lower/program.py BuildOptions.native_fp16)
    if is_const(x):
        a = np.asarray(x)
        if a.dtype.kind == "f" and target.kind in "iu":
            # Float -> int truncates toward zero (C semantics, as ONNX's reference).
            with np.errstate(all="ignore"):
                return np.trunc(a).astype(target)
        return a.astype(target)
    nm = ctx.name(node)
    if mil_dtype_str(np_dtype(x)) == mil_dtype_str(target):
        return mb().identity(x=x, name=nm)
    return cast(x, target, nm)


@lowering("Cast")
def cast_(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    to = ir.DataType(int(attr(node, "to")))
    if to not in _CASTABLE:
        raise unsupported(node, f"cast to {to.name} is not supported (Core ML: float, int, bool)")
    return [_cast_to(ctx, node, req(ctx, node, 0), np.dtype(to.numpy()))]


@lowering("CastLike")
def cast_like(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    like = node.inputs[1]
    to = like.dtype if like is not None else None
    if to is None:
        to = ir.DataType.from_numpy(np_dtype(ctx.input(node, 1)))
    if to not in _CASTABLE:
        raise unsupported(node, f"cast to {to.name} is not supported (Core ML: float, int, bool)")
    return [_cast_to(ctx, node, req(ctx, node, 0), np.dtype(to.numpy()))]
