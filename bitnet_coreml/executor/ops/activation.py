"""Activations: relu family, gelu (three modes), silu, sigmoid, softplus, softmax, elu, prelu ..."""

from __future__ import annotations

from typing import Any

import numpy as np

from bitnet_coreml.executor.ops._util import erf, scalar
from bitnet_coreml.executor.registry import OpContext, register


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@register("relu")
def op_relu(ctx: OpContext, a: dict[str, Any]) -> Any:
    return np.maximum(a["x"], 0)


@register("relu6")
def op_relu6(ctx: OpContext, a: dict[str, Any]) -> Any:
    return np.minimum(np.maximum(a["x"], 0), 6)


@register("leaky_relu")
def op_leaky_relu(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = a["x"]
    return np.where(x >= 0, x, x * a.get("alpha", 0.01))


@register("elu")
def op_elu(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = a["x"]
    return np.where(x > 0, x, a.get("alpha", 1.0) * (np.exp(np.minimum(x, 0)) - 1))


@register("prelu")
def op_prelu(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = a["x"]
    alpha = np.asarray(a["alpha"]).reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.where(x >= 0, x, x * alpha)


@register("thresholded_relu")
def op_thresholded_relu(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = a["x"]
    return np.where(x >= a.get("alpha", 1.0), x, 0)


@register("clamped_relu")
def op_clamped_relu(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = a["x"]
    alpha, beta = a.get("alpha", 0.01), a.get("beta", 6.0)
    return np.minimum(np.where(x >= 0, x, alpha * x), beta)


@register("linear_activation")
def op_linear_activation(ctx: OpContext, a: dict[str, Any]) -> Any:
    return a.get("alpha", 1.0) * a["x"] + a.get("beta", 0.0)


@register("scaled_tanh")
def op_scaled_tanh(ctx: OpContext, a: dict[str, Any]) -> Any:
    return a.get("alpha", 1.0) * np.tanh(a.get("beta", 1.0) * a["x"])


@register("sigmoid")
def op_sigmoid(ctx: OpContext, a: dict[str, Any]) -> Any:
    return _sigmoid(a["x"])


@register("sigmoid_hard")
def op_sigmoid_hard(ctx: OpContext, a: dict[str, Any]) -> Any:
    return np.minimum(np.maximum(a.get("alpha", 0.2) * a["x"] + a.get("beta", 0.5), 0), 1)


@register("silu")
def op_silu(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = a["x"]
    return x * _sigmoid(x)


@register("softplus")
def op_softplus(ctx: OpContext, a: dict[str, Any]) -> Any:
    return np.logaddexp(0, a["x"])


@register("softplus_parametric")
def op_softplus_parametric(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = a["x"]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    alpha = np.asarray(a["alpha"]).reshape(shape)
    beta = np.asarray(a["beta"]).reshape(shape)
    return alpha * np.logaddexp(0, beta * x)


@register("softsign")
def op_softsign(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = a["x"]
    return x / (1 + np.abs(x))


@register("gelu")
def op_gelu(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = a["x"]
    mode = scalar(a.get("mode", "EXACT"))
    if mode == "EXACT":
        return (0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))).astype(np.float32)
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(1.702 * x)
    raise ValueError(f"gelu mode {mode!r}; allowed: EXACT, TANH_APPROXIMATION, SIGMOID_APPROXIMATION")


@register("softmax")
def op_softmax(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = a["x"]
    axis = int(scalar(a.get("axis", -1)))
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)
