"""Weights the executor keeps in their stored form: which consumers read them packed, and the dispatch.

Two forms (see their modules): :class:`~bitnet_coreml.executor.ternary.TernaryWeight` (2-bit codes
of a BitNet layer) and :class:`~bitnet_coreml.executor.half.HalfWeight` (an fp16 embedding /
lm_head). The compiler hands a consumer the packed weight only when :func:`keeps_packed` says it
computes with that form; every other consumer gets the dense float32 array (``.dense()``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitnet_coreml.executor import half, ternary
from bitnet_coreml.executor.half import HalfWeight
from bitnet_coreml.executor.ternary import TernaryWeight

__all__ = ["PACKED", "keeps_packed", "matmul_t"]

PACKED = (TernaryWeight, HalfWeight)


def _const_int(op: Any, name: str, default: int) -> int | None:
    var = op.inputs.get(name)
    if var is None:
        return default
    return None if var.val is None else int(np.asarray(var.val).reshape(-1)[0])


def keeps_packed(op: Any, input_name: str, value: Any) -> bool:
    """True when MIL ``op`` computes with the packed ``value`` given as its input ``input_name``."""
    if ternary.keeps_packed(op, input_name):  # x @ W^T: linear's weight, matmul's y with transpose_y
        return True
    if value.__class__ is HalfWeight and op.op_type == "gather" and input_name == "x":
        axis = _const_int(op, "axis", 0)
        return axis in (0, -2) and _const_int(op, "batch_dims", 0) == 0  # rows of the [N, K] table
    return False


def matmul_t(x: np.ndarray, w: Any) -> np.ndarray:
    """``x @ w.T`` for a packed weight ``w`` (float32 ``[..., N]``)."""
    if w.__class__ is HalfWeight:
        return half.matmul_t(x, w)
    return ternary.matmul_t(x, w)
