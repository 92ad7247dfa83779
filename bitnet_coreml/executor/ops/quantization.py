"""``quantize`` / ``dequantize`` (iOS17): affine int8/uint8 with scalar or per-axis scale and zero point."""

from __future__ import annotations

from typing import Any

import numpy as np

from bitnet_coreml.executor.ops._util import scalar
from bitnet_coreml.executor.ops.constexpr import along_axis
from bitnet_coreml.executor.registry import OpContext, register

_RANGES = {"int8": (-128, 127), "uint8": (0, 255)}


def _params(a: dict[str, Any], x: np.ndarray) -> tuple[np.ndarray, Any]:
    axis = int(scalar(a["axis"])) if a.get("axis") is not None else 0
    scale = along_axis(a["scale"], x.ndim, axis).astype(np.float32)
    zp = a.get("zero_point")
    zero = along_axis(zp, x.ndim, axis).astype(np.float32) if zp is not None else np.float32(0)
    return scale, zero


@register("quantize")
def op_quantize(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["input"], dtype=np.float32)
    scale, zero = _params(a, x)
    dt = ctx.out_dtypes[0]
    lo, hi = _RANGES.get(np.dtype(dt).name if dt is not None else "int8", (-128, 127))
    return np.clip(np.round(x / scale + zero), lo, hi)


@register("dequantize")
def op_dequantize(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["input"]).astype(np.float32)
    scale, zero = _params(a, x)
    return (x - zero) * scale
