"""``linear``, ``matmul`` and ``einsum``: BLAS-backed numpy matmuls in fp32.

Ternary weights arrive here already decompressed (``constexpr_lut_to_dense`` is folded at load), so
a BitNet layer is one dense fp32 BLAS matmul: exact, since {-s, 0, s} codes are exact in fp32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitnet_coreml.executor.ops._util import scalar
from bitnet_coreml.executor.registry import OpContext, register


@register("linear")
def op_linear(ctx: OpContext, a: dict[str, Any]) -> Any:
    x, w = a["x"], a["weight"]
    y = np.matmul(x, w.T)
    b = a.get("bias")
    if b is not None:
        y += b
    return y


@register("matmul")
def op_matmul(ctx: OpContext, a: dict[str, Any]) -> Any:
    x, y = np.asarray(a["x"]), np.asarray(a["y"])
    if bool(scalar(a.get("transpose_x", False))) and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if bool(scalar(a.get("transpose_y", False))) and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    if x.dtype.kind in "iu" and y.dtype.kind in "iu":
        return np.matmul(x.astype(np.int64), y.astype(np.int64))
    return np.matmul(x, y)


@register("einsum")
def op_einsum(ctx: OpContext, a: dict[str, Any]) -> Any:
    return np.einsum(str(scalar(a["equation"])), *a["values"], optimize=True)
