"""``conv`` and ``conv_transpose`` (1-D/2-D/3-D, groups, strides, dilations, all pad types).

``conv`` is im2col over a strided window view followed by one batched BLAS matmul per call.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bitnet_coreml.executor.ops._util import int_list, scalar
from bitnet_coreml.executor.registry import OpContext, register


def spatial_pads(
    pad_type: str, pad: Any, in_sizes: list[int], kernel: list[int], strides: list[int], dilations: list[int],
    *, ceil_mode: bool = False,
) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim for MIL's ``valid`` / ``same`` / ``same_lower`` / ``custom``."""
    n = len(in_sizes)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        p = int_list(pad) if pad is not None else [0] * (2 * n)
        return [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        out = []
        for size, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=False):
            eff = (k - 1) * d + 1
            total = max((math.ceil(size / s) - 1) * s + eff - size, 0)
            small = total // 2
            out.append((small, total - small) if pad_type == "same" else (total - small, small))
        return out
    raise ValueError(f"pad_type {pad_type!r}; allowed: valid, same, same_lower, custom")


def _windows(x: np.ndarray, kernel: list[int], strides: list[int], dilations: list[int]) -> np.ndarray:
    """View of shape (N, C, *out, *K) over an already padded ``x`` of shape (N, C, *spatial)."""
    n = len(kernel)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=False)]
    v = np.lib.stride_tricks.sliding_window_view(x, eff, axis=tuple(range(2, 2 + n)))
    sl = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + tuple(
        slice(None, None, d) for d in dilations
    )
    return v[sl]


@register("conv")
def op_conv(ctx: OpContext, a: dict[str, Any]) -> Any:
    x, w = np.asarray(a["x"]), np.asarray(a["weight"])
    n_sp = x.ndim - 2
    kernel = list(w.shape[2:])
    strides = int_list(a["strides"]) if a.get("strides") is not None else [1] * n_sp
    dilations = int_list(a["dilations"]) if a.get("dilations") is not None else [1] * n_sp
    groups = int(scalar(a.get("groups", 1)))
    pads = spatial_pads(str(scalar(a.get("pad_type", "valid"))), a.get("pad"), list(x.shape[2:]), kernel, strides, dilations)
    if any(p != (0, 0) for p in pads):
        x = np.pad(x, [(0, 0), (0, 0)] + pads)
    win = _windows(x, kernel, strides, dilations)  # (N, C, *out, *K)
    batch, c_in = x.shape[0], x.shape[1]
    out_sp = win.shape[2 : 2 + n_sp]
    c_out = w.shape[0]
    cg = c_in // groups
    og = c_out // groups
    kprod = int(np.prod(kernel)) if kernel else 1
    p = int(np.prod(out_sp))
    # (N, G, Cg, *out, *K) -> (N, G, P, Cg*K) im2col, then (G, Og, Cg*K) @ -> (N, G, Og, P)
    cols = win.reshape((batch, groups, cg) + tuple(out_sp) + tuple(kernel))
    perm = (0, 1) + tuple(range(3, 3 + n_sp)) + (2,) + tuple(range(3 + n_sp, 3 + 2 * n_sp))
    cols = np.ascontiguousarray(cols.transpose(perm)).reshape(batch, groups, p, cg * kprod)
    wm = w.reshape(groups, og, cg * kprod)
    y = np.matmul(cols, wm.transpose(0, 2, 1))  # (N, G, P, Og)
    y = y.transpose(0, 1, 3, 2).reshape((batch, c_out) + tuple(out_sp))
    b = a.get("bias")
    if b is not None:
        y = y + np.asarray(b).reshape((1, -1) + (1,) * n_sp)
    return y


@register("conv_transpose")
def op_conv_transpose(ctx: OpContext, a: dict[str, Any]) -> Any:
    x, w = np.asarray(a["x"]), np.asarray(a["weight"])  # w: (C_in, C_out/groups, *K)
    n_sp = x.ndim - 2
    kernel = list(w.shape[2:])
    strides = int_list(a["strides"]) if a.get("strides") is not None else [1] * n_sp
    dilations = int_list(a["dilations"]) if a.get("dilations") is not None else [1] * n_sp
    groups = int(scalar(a.get("groups", 1)))
    pad_type = str(scalar(a.get("pad_type", "valid")))
    batch, c_in = x.shape[:2]
    in_sp = list(x.shape[2:])
    og = w.shape[1]
    cg = c_in // groups
    full = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(in_sp, strides, kernel, dilations, strict=False)]
    y = np.zeros((batch, groups * og) + tuple(full), dtype=np.float32)
    xg = x.reshape((batch, groups, cg, -1))  # (N, G, Cg, Pin)
    wg = w.reshape((groups, cg, og) + tuple(kernel))
    for kidx in np.ndindex(*kernel):
        wk = wg[(slice(None), slice(None), slice(None)) + kidx]  # (G, Cg, Og)
        contrib = np.matmul(wk.transpose(0, 2, 1)[None], xg)  # (N, G, Og, Pin)
        contrib = contrib.reshape((batch, groups * og) + tuple(in_sp))
        sl = tuple(slice(k * d, k * d + (i - 1) * s + 1, s) for k, d, i, s in zip(kidx, dilations, in_sp, strides, strict=False))
        y[(slice(None), slice(None)) + sl] += contrib
    out_shape = a.get("output_shape")
    if pad_type == "custom" or pad_type == "valid":
        p = int_list(a["pad"]) if (pad_type == "custom" and a.get("pad") is not None) else [0] * (2 * n_sp)
        sl = tuple(slice(p[2 * i], full[i] - p[2 * i + 1]) for i in range(n_sp))
    elif pad_type in ("same", "same_lower"):
        target = [i * s for i, s in zip(in_sp, strides, strict=False)]
        sl_list = []
        for i in range(n_sp):
            total = max(full[i] - target[i], 0)
            before = total // 2 if pad_type == "same" else total - total // 2
            sl_list.append(slice(before, before + target[i]))
        sl = tuple(sl_list)
    else:
        raise ValueError(f"pad_type {pad_type!r}; allowed: valid, same, same_lower, custom")
    y = y[(slice(None), slice(None)) + sl]
    if out_shape is not None:
        want = int_list(out_shape)[-n_sp:]
        if list(y.shape[2:]) != want:
            padded: np.ndarray = np.zeros(y.shape[:2] + tuple(want), dtype=y.dtype)
            have: list[int] = [int(v) for v in list(y.shape)[2:]]  # type: ignore[var-annotated]
            common = tuple(slice(0, min(h, t)) for h, t in zip(have, want, strict=False))
            padded[(slice(None), slice(None)) + common] = y[(slice(None), slice(None)) + common]
            y = padded
    b = a.get("bias")
    if b is not None:
        y = y + np.asarray(b).reshape((1, -1) + (1,) * n_sp)
    return y
