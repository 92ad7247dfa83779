"""``batch_norm``, ``instance_norm``, ``layer_norm``, ``l2_norm`` and ``local_response_norm``."""

from __future__ import annotations

from typing import Any

import numpy as np

from bitnet_coreml.executor.ops._util import int_list, scalar
from bitnet_coreml.executor.registry import OpContext, register


def _channel(p: Any, ndim: int) -> np.ndarray:
    return np.asarray(p).reshape((1, -1) + (1,) * (ndim - 2))


def _channel_affine(y: np.ndarray, a: dict[str, Any], ndim: int) -> np.ndarray:
    """Optional per-channel ``gamma`` scale and ``beta`` shift (axis 1), as batch/instance norm apply them."""
    if a.get("gamma") is not None:
        y = y * _channel(a["gamma"], ndim)
    if a.get("beta") is not None:
        y = y + _channel(a["beta"], ndim)
    return y


@register("batch_norm")
def op_batch_norm(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    eps = float(scalar(a.get("epsilon", 1e-5)))
    y = (x - _channel(a["mean"], x.ndim)) / np.sqrt(_channel(a["variance"], x.ndim) + eps)
    return _channel_affine(y, a, x.ndim)


@register("instance_norm")
def op_instance_norm(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    eps = float(scalar(a.get("epsilon", 1e-5)))
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = np.square(x - mean).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    return _channel_affine(y, a, x.ndim)


@register("layer_norm")
def op_layer_norm(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    eps = float(scalar(a.get("epsilon", 1e-5)))
    axes_in = a.get("axes")
    axes = tuple(sorted(ax % x.ndim for ax in int_list(axes_in))) if axes_in is not None else tuple(range(x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = np.square(x - mean).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    # gamma / beta have the shape of the normalised dims; place them on those axes
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    if a.get("gamma") is not None:
        y = y * np.asarray(a["gamma"]).reshape(shape)
    if a.get("beta") is not None:
        y = y + np.asarray(a["beta"]).reshape(shape)
    return y


@register("l2_norm")
def op_l2_norm(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    eps = float(scalar(a.get("epsilon", 1e-6)))
    axes = tuple(range(max(x.ndim - 3, 0), x.ndim)) if x.ndim >= 3 else tuple(range(x.ndim))
    return x / np.sqrt(np.sum(np.square(x), axis=axes, keepdims=True) + eps)


@register("local_response_norm")
def op_local_response_norm(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    size = int(scalar(a["size"]))
    alpha = float(scalar(a.get("alpha", 1e-4)))
    beta = float(scalar(a.get("beta", 0.75)))
    k = float(scalar(a.get("k", 1.0)))
    # channels are axis -3 (Core ML's reference outputs for a rank-3 [C, H, W] input confirm it);
    # the window is [c - size//2, c + (size-1)//2], as PyTorch's LocalResponseNorm
    axis = x.ndim - 3
    sq = np.moveaxis(np.square(x), axis, 0)
    c = sq.shape[0]
    half_lo = size // 2
    half_hi = size - 1 - half_lo
    padded = np.pad(sq, [(half_lo, half_hi)] + [(0, 0)] * (sq.ndim - 1))
    csum = np.concatenate([np.zeros_like(padded[:1]), np.cumsum(padded, axis=0)], axis=0)
    window = np.moveaxis(csum[size : size + c] - csum[:c], 0, axis)
    return x / np.power(k + alpha / size * window, beta)
