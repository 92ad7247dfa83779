"""``linear``, ``matmul`` and ``einsum``: BLAS-backed numpy matmuls in fp32.

A 2-bit ternary weight (a BitNet layer's ``constexpr_lut_to_dense``) arrives as a
:class:`~bitnet_coreml.executor.ternary.TernaryWeight` and is multiplied from its codes
(``ternary.matmul_t``, bit-identical to the dense product), a large fp16 weight as a
:class:`~bitnet_coreml.executor.half.HalfWeight` multiplied from its fp16 bits (``half.matmul_t``);
every other weight is a dense array (see ``executor/packed.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitnet_coreml.executor.ops._util import scalar
from bitnet_coreml.executor.packed import PACKED, matmul_t
from bitnet_coreml.executor.registry import OpContext, register


def _blasable(a: np.ndarray) -> np.ndarray:
    """numpy's matmul calls BLAS only when the last axis has unit stride; copy views that do not."""
    if a.ndim >= 2 and a.strides[-1] != a.itemsize and a.strides[-2] != a.itemsize:
        return np.ascontiguousarray(a)
    if a.ndim >= 3 and not a.flags.c_contiguous:
        return np.ascontiguousarray(a)
    return a


def _rows(x: np.ndarray) -> np.ndarray:
    """An N-D ``x`` as the 2-D matrix of its rows (one GEMM instead of numpy's loop over leading axes)."""
    return _blasable(x).reshape(-1, x.shape[-1])


def _mm(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x @ y; an N-D x times a 2-D y is one 2-D GEMM."""
    if y.ndim == 2 and x.ndim > 2:
        return np.matmul(_rows(x), y).reshape(x.shape[:-1] + (y.shape[-1],))
    return np.matmul(_blasable(x), _blasable(y))


def _mm_wt(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w.T for a 2-D ``w`` [N, K] stored row-major (a weight): computed as (w @ x.T).T.

    OpenBLAS's sgemm runs ~20 % faster with the big operand untransposed (measured on the 200M
    model's shapes: 79-86 vs 66-68 GFLOP/s at 64 rows); the transposed copy of the [N, M] result is
    small next to the product. Same products and sums, so the result is the same up to BLAS's
    summation order, as any two BLAS calls.
    """
    y = np.matmul(w, _rows(x).T)
    return np.ascontiguousarray(y.T).reshape(x.shape[:-1] + (w.shape[0],))


@register("linear")
def op_linear(ctx: OpContext, a: dict[str, Any]) -> Any:
    x, w = np.asarray(a["x"]), a["weight"]
    if w.__class__ in PACKED:
        y = matmul_t(x, w)
        b = a.get("bias")
        return y + b if b is not None else y
    y = _mm_wt(x, w) if w.ndim == 2 and w.flags.c_contiguous and x.ndim >= 1 else _mm(x, w.T)
    b = a.get("bias")
    if b is not None:
        y += b
    return y


@register("matmul")
def op_matmul(ctx: OpContext, a: dict[str, Any]) -> Any:
    x, y = np.asarray(a["x"]), a["y"]
    if bool(scalar(a.get("transpose_x", False))) and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if y.__class__ in PACKED:  # transpose_y is set: the compiler only keeps it packed then
        return matmul_t(x, y)
    y = np.asarray(y)
    if bool(scalar(a.get("transpose_y", False))) and y.ndim >= 2:
        if y.ndim == 2 and x.ndim >= 2 and y.flags.c_contiguous and x.dtype.kind == "f" and y.dtype.kind == "f":
            return _mm_wt(x, y)  # the BitLinear case: activations times a [N, K] weight
        y = np.swapaxes(y, -1, -2)
    if x.dtype.kind in "iu" and y.dtype.kind in "iu":
        return np.matmul(x.astype(np.int64), y.astype(np.int64))
    return np.matmul(_blasable(x), _blasable(y))


@register("einsum")
def op_einsum(ctx: OpContext, a: dict[str, Any]) -> Any:
    return np.einsum(str(scalar(a["equation"])), *a["values"], optimize=True)
