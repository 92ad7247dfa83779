"""``scaled_dot_product_attention`` (iOS18): softmax(Q K^T / sqrt(E) + mask) V."""

from __future__ import annotations

from typing import Any

import numpy as np

from bitnet_coreml.executor.registry import OpContext, register


@register("scaled_dot_product_attention")
def op_sdpa(ctx: OpContext, a: dict[str, Any]) -> Any:
    q, k, v = np.asarray(a["query"]), np.asarray(a["key"]), np.asarray(a["value"])
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.float32(np.sqrt(q.shape[-1]))
    mask = a.get("attn_mask")
    if mask is not None:
        m = np.asarray(mask)
        # a bool mask says which positions take part; a float mask is added to the scores
        scores = np.where(m, scores, -np.inf) if m.dtype == np.bool_ else scores + m
    mx = np.max(scores, axis=-1, keepdims=True)
    e = np.exp(scores - mx)
    p = e / np.sum(e, axis=-1, keepdims=True)
    return np.matmul(p, v)
