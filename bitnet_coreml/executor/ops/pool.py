"""``max_pool``, ``avg_pool`` and ``l2_pool`` over 1-3 spatial dims (pad types and ``ceil_mode``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bitnet_coreml.executor.ops._util import int_list, scalar
from bitnet_coreml.executor.ops.conv import _windows, spatial_pads
from bitnet_coreml.executor.registry import OpContext, register


def _pool(a: dict[str, Any], kind: str) -> np.ndarray:
    x = np.asarray(a["x"], dtype=np.float32)
    n_sp = x.ndim - 2
    kernel = int_list(a["kernel_sizes"])
    strides = int_list(a["strides"]) if a.get("strides") is not None else [1] * n_sp
    pad_type = str(scalar(a.get("pad_type", "valid")))
    ceil_mode = bool(scalar(a.get("ceil_mode", False)))
    in_sp = list(x.shape[2:])
    pads = spatial_pads(pad_type, a.get("pad"), in_sp, kernel, strides, [1] * n_sp)
    if ceil_mode and pad_type in ("valid", "custom"):
        extended = []
        for (b, e), size, k, s in zip(pads, in_sp, kernel, strides, strict=False):
            out = math.ceil((size + b + e - k) / s) + 1
            # the last window must start inside the input or left padding (PyTorch / Core ML rule)
            if (out - 1) * s >= size + b:
                out -= 1
            need = max((out - 1) * s + k - (size + b + e), 0)
            extended.append((b, e + need))
        pads = extended
    spatial_pad = [(0, 0), (0, 0)] + list(pads)
    ones = [1] * n_sp
    if kind == "max":
        xp = np.pad(x, spatial_pad, constant_values=-np.inf)
        return _windows(xp, kernel, strides, ones).max(axis=tuple(range(-n_sp, 0)))
    if kind == "l2":
        xp = np.pad(x * x, spatial_pad)
        return np.sqrt(_windows(xp, kernel, strides, ones).sum(axis=tuple(range(-n_sp, 0))))
    xp = np.pad(x, spatial_pad)
    sums = _windows(xp, kernel, strides, ones).sum(axis=tuple(range(-n_sp, 0)))
    if bool(scalar(a.get("exclude_padding_from_average", False))):
        mask = np.pad(np.ones((1, 1) + tuple(in_sp), dtype=np.float32), spatial_pad)
        counts = _windows(mask, kernel, strides, ones).sum(axis=tuple(range(-n_sp, 0)))
        return sums / np.maximum(counts, 1)
    return sums / float(np.prod(kernel))


@register("max_pool")
def op_max_pool(ctx: OpContext, a: dict[str, Any]) -> Any:
    return _pool(a, "max")


@register("avg_pool")
def op_avg_pool(ctx: OpContext, a: dict[str, Any]) -> Any:
    return _pool(a, "avg")


@register("l2_pool")
def op_l2_pool(ctx: OpContext, a: dict[str, Any]) -> Any:
    return _pool(a, "l2")
