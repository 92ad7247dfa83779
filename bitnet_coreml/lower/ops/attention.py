"""Transformer building blocks of opset 23: RotaryEmbedding and Attention.

Written with slices, elementwise ops and concat so it runs on every compute unit; rank stays <= 5
(the interleaved form pairs values along one extra trailing axis of size 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from bitnet_coreml.lower.ops._common import (
    as_dtype,
    attr,
    bad,
    cast,
    is_const,
    mb,
    np_dtype,
    req,
    static_shape,
    to_var,
    unsupported,
)
from bitnet_coreml.lower.registry import LoweringContext, lowering


def _last_slice(x: Any, rank: int, lo: int, hi: int, step: int, name: str) -> Any:
    begin, end, stride = [0] * rank, [0] * rank, [1] * rank
    begin[-1], end[-1], stride[-1] = lo, hi, step
    mask = [True] * (rank - 1) + [False]
    return mb().slice_by_index(x=x, begin=np.array(begin, np.int32), end=np.array(end, np.int32),
                               stride=np.array(stride, np.int32), begin_mask=np.array(mask),
                               end_mask=np.array(mask), name=name)


@lowering("RotaryEmbedding")
def rotary_embedding(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = to_var(req(ctx, node, 0))
    cos, sin = req(ctx, node, 1), req(ctx, node, 2)
    pos = ctx.input(node, 3)
    s = static_shape(node, x)
    interleaved = bool(attr(node, "interleaved", 0))
    nm = ctx.name(node)
    m = mb()
    dt = np_dtype(x)
    if len(s) == 4:
        b, _h, seq, d = s
        xr = x
        head_axis = 1  # cos/sin [B, S, r/2] broadcast as [B, 1, S, r/2]
    elif len(s) == 3:
        heads = int(attr(node, "num_heads", 0))
        if heads <= 0 or s[2] % heads:
            raise bad(node, f"3-D input needs num_heads dividing the hidden size {s[2]}, found {heads}")
        b, seq, d = s[0], s[1], s[2] // heads
        xr = m.reshape(x=x, shape=np.array([b, seq, heads, d], np.int32), name=f"{nm}_heads")
        head_axis = 2  # [B, S, 1, r/2]
    else:
        raise unsupported(node, f"input rank {len(s)} (allowed: 3, 4)")
    r = int(attr(node, "rotary_embedding_dim", 0)) or d
    if r % 2 or r > d:
        raise bad(node, f"rotary_embedding_dim {r} must be even and <= head size {d}")
    # Positions select rows of the caches: [B, S, r/2].
    if pos is not None:
        if is_const(pos) and is_const(cos) and is_const(sin):
            p = np.asarray(pos).astype(np.int64)
            cos, sin = np.asarray(cos)[p], np.asarray(sin)[p]
        else:
            pv = cast(pos, np.int32, f"{nm}_pos")
            cos = m.gather(x=to_var(cos), indices=to_var(pv), axis=0, name=f"{nm}_cos")
            sin = m.gather(x=to_var(sin), indices=to_var(pv), axis=0, name=f"{nm}_sin")
    if static_shape(node, cos)[-1] != r // 2:
        raise bad(node, f"cos/sin caches have {static_shape(node, cos)[-1]} columns, expected {r // 2}")
    if is_const(cos):
        cos = np.expand_dims(as_dtype(cos, dt), head_axis)
        sin = np.expand_dims(as_dtype(sin, dt), head_axis)
    else:
        cos = m.expand_dims(x=cos, axes=[head_axis], name=f"{nm}_cosx")
        sin = m.expand_dims(x=sin, axes=[head_axis], name=f"{nm}_sinx")
    rot = xr if r == d else _last_slice(xr, 4, 0, r, 1, f"{nm}_rot")
    if interleaved:
        x1 = _last_slice(rot, 4, 0, r, 2, f"{nm}_x1")
        x2 = _last_slice(rot, 4, 1, r, 2, f"{nm}_x2")
    else:
        x1 = _last_slice(rot, 4, 0, r // 2, 1, f"{nm}_x1")
        x2 = _last_slice(rot, 4, r // 2, r, 1, f"{nm}_x2")
    real = m.sub(x=m.mul(x=x1, y=cos, name=f"{nm}_c1"), y=m.mul(x=x2, y=sin, name=f"{nm}_s2"), name=f"{nm}_re")
    imag = m.add(x=m.mul(x=x1, y=sin, name=f"{nm}_s1"), y=m.mul(x=x2, y=cos, name=f"{nm}_c2"), name=f"{nm}_im")
    if interleaved:
        pair = m.concat(values=[m.expand_dims(x=real, axes=[-1], name=f"{nm}_re5"),
                                m.expand_dims(x=imag, axes=[-1], name=f"{nm}_im5")], axis=-1, name=f"{nm}_pair")
        shp = list(static_shape(node, real))
        shp[-1] = r
        rotated = m.reshape(x=pair, shape=np.array(shp, np.int32), name=f"{nm}_inter")
    else:
        rotated = m.concat(values=[real, imag], axis=-1, name=f"{nm}_cat")
    if r < d:
        rotated = m.concat(values=[rotated, _last_slice(xr, 4, r, d, 1, f"{nm}_pass")], axis=-1,
                           name=f"{nm}_full")
    if len(s) == 3:
        return [m.reshape(x=rotated, shape=np.array(s, np.int32), name=nm)]
    return [m.identity(x=rotated, name=nm)]


def _heads_4d(m: Any, node: ir.Node, x: Any, heads: int, name: str) -> Any:
    """[B, S, H*D] -> [B, H, S, D]."""
    b, s, hd = static_shape(node, x)
    if heads <= 0 or hd % heads:
        raise bad(node, f"3-D inputs need a head count dividing {hd}, found {heads}")
    y = m.reshape(x=x, shape=np.array([b, s, heads, hd // heads], np.int32), name=f"{name}_r")
    return m.transpose(x=y, perm=[0, 2, 1, 3], name=f"{name}_t")


def _structural_bias(q_len: int, kv_len: int, causal: bool, left: int, right: int, offset: Any,
                     nonpad: np.ndarray | None, batch: int) -> np.ndarray | None:
    """The additive 0/-inf bias from causality, sliding windows and kv padding (ONNX Attention)."""
    i = np.arange(q_len).reshape(q_len, 1)
    j = np.arange(kv_len).reshape(1, kv_len)
    off = np.reshape(offset, (-1, 1, 1)) if np.ndim(offset) else int(offset)
    allowed = np.ones(np.broadcast_shapes(np.shape(i + off), (1, kv_len)), dtype=bool)
    used = False
    if causal:
        allowed = allowed & (j <= i + off)
        used = True
    if left >= 0 or right >= 0:
        diff = (i + off) - j
        if left >= 0:
            allowed = allowed & (diff <= left)
        if right >= 0:
            allowed = allowed & (-diff <= right)
        used = True
    bias = np.where(allowed, np.float32(0), np.float32(-np.inf)) if used else None
    if bias is not None and bias.ndim == 3:  # per-batch offsets: (B, 1, q, kv)
        bias = bias.reshape(bias.shape[0], 1, q_len, kv_len)
    if nonpad is not None:
        pad = np.where(np.arange(kv_len) < nonpad.reshape(-1, 1), np.float32(0), np.float32(-np.inf))
        pad = pad.reshape(batch, 1, 1, kv_len)
        bias = pad if bias is None else bias + pad
    return bias


@lowering("Attention", const_inputs=(6,))
def attention(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    m = mb()
    nm = ctx.name(node)
    q, k, v = (to_var(req(ctx, node, i)) for i in range(3))
    mask, past_k, past_v = ctx.input(node, 3), ctx.input(node, 4), ctx.input(node, 5)
    nonpad_c = ctx.input(node, 6)
    nonpad = None if nonpad_c is None else np.asarray(ctx.const(node, 6)).astype(np.int64).reshape(-1)
    dt = np_dtype(q)
    rank = len(static_shape(node, q))
    if rank == 3:
        q = _heads_4d(m, node, q, int(attr(node, "q_num_heads", 0)), f"{nm}_q")
        k = _heads_4d(m, node, k, int(attr(node, "kv_num_heads", 0)), f"{nm}_k")
        v = _heads_4d(m, node, v, int(attr(node, "kv_num_heads", 0)), f"{nm}_v")
    elif rank != 4:
        raise unsupported(node, f"input rank {rank} (allowed: 3, 4)")
    b, hq, q_len, dq = static_shape(node, q)
    present_k = k if past_k is None else m.concat(values=[to_var(past_k), k], axis=2, name=f"{nm}_pk")
    present_v = v if past_v is None else m.concat(values=[to_var(past_v), v], axis=2, name=f"{nm}_pv")
    _, hkv, kv_len, _ = static_shape(node, present_k)
    scale = attr(node, "scale", None)
    scale = 1.0 / np.sqrt(dq) if scale is None else float(scale)
    kk, vv = present_k, present_v
    if hq != hkv:
        if hq % hkv:
            raise bad(node, f"{hq} query heads are not a multiple of {hkv} kv heads")
        rep = hq // hkv
        # Grouped-query attention: each kv head serves `rep` consecutive query heads (np.repeat).
        kk, vv = (m.reshape(x=m.tile(x=m.expand_dims(x=t, axes=[2], name=f"{nm}_{tag}e"),
                                     reps=np.array([1, 1, rep, 1, 1], np.int32), name=f"{nm}_{tag}t"),
                            shape=np.array([b, hq, kv_len, static_shape(node, t)[3]], np.int32),
                            name=f"{nm}_{tag}g")
                  for t, tag in ((present_k, "k"), (present_v, "v")))
    # sqrt(scale) on both sides, as ONNX's definition does (keeps fp16 products in range).
    root = np.asarray(np.sqrt(scale), dt)
    qs = m.mul(x=q, y=root, name=f"{nm}_qs")
    ks = m.mul(x=kk, y=root, name=f"{nm}_ks")
    qk = m.matmul(x=qs, y=ks, transpose_y=True, name=f"{nm}_qk")
    softcap = float(attr(node, "softcap", 0.0))
    if softcap > 0:
        t = m.tanh(x=m.real_div(x=qk, y=np.asarray(softcap, dt), name=f"{nm}_capd"), name=f"{nm}_capt")
        qk = m.mul(x=t, y=np.asarray(softcap, dt), name=f"{nm}_cap")
    # Additive bias: the mask (bool -> 0/-inf, padded to kv_len) plus the structural parts.
    bias: Any = None
    if mask is not None:
        mlen = static_shape(node, mask)[-1]
        if np_dtype(mask) == np.bool_:
            mask = np.where(np.asarray(mask), np.float32(0), np.float32(-np.inf)) if is_const(mask) else \
                m.select(cond=mask, a=np.zeros(static_shape(node, mask), dt), b=np.asarray(-np.inf, dt),
                         name=f"{nm}_mf")
        if mlen < kv_len:
            fill_shape = list(static_shape(node, mask))
            fill_shape[-1] = kv_len - mlen
            fill = np.full(fill_shape, -np.inf, np.float32)
            mask = np.concatenate([np.asarray(mask, np.float32), fill], -1) if is_const(mask) else \
                m.concat(values=[mask, fill.astype(dt)], axis=-1, name=f"{nm}_mpad")
        bias = np.asarray(mask, np.float32) if is_const(mask) else mask
    offset: Any = static_shape(node, past_k)[2] if past_k is not None else 0
    if past_k is None and nonpad is not None:
        offset = nonpad - q_len
    struct = _structural_bias(q_len, kv_len, bool(attr(node, "is_causal", 0)), int(attr(node, "left_window_size", -1)),
                              int(attr(node, "right_window_size", -1)), offset, nonpad, b)
    if struct is not None:
        bias = struct if bias is None else (bias + struct if is_const(bias) else
                                            m.add(x=bias, y=struct.astype(dt), name=f"{nm}_bias"))
    scores = qk if bias is None else m.add(x=qk, y=as_dtype(bias, dt) if is_const(bias) else bias, name=f"{nm}_qkb")
    mode = int(attr(node, "qk_matmul_output_mode", 0))
    # Rows with no attendable key softmax to zeros (ONNX), not NaN.
    masked: Any = None
    if bias is not None:
        if is_const(bias):
            rows = np.isneginf(np.max(bias, axis=-1, keepdims=True))
            masked = rows if rows.any() else None
        else:
            masked = m.equal(x=m.reduce_max(x=bias, axes=[-1], keep_dims=True, name=f"{nm}_bmax"),
                             y=np.asarray(-np.inf, dt), name=f"{nm}_rows")
    safe = scores if masked is None else m.select(cond=masked, a=np.asarray(0, dt), b=scores, name=f"{nm}_safe")
    probs = m.softmax(x=safe, axis=-1, name=f"{nm}_sm")
    if masked is not None:
        probs = m.select(cond=masked, a=np.asarray(0, dt), b=probs, name=f"{nm}_probs")
    out = m.matmul(x=probs, y=vv, name=f"{nm}_av")
    if rank == 3:
        dv = static_shape(node, out)[3]
        out = m.reshape(x=m.transpose(x=out, perm=[0, 2, 1, 3], name=f"{nm}_ot"),
                        shape=np.array([b, q_len, hq * dv], np.int32), name=nm)
    else:
        out = m.identity(x=out, name=nm)
    qk_out = {0: qk, 1: qk, 2: scores, 3: probs}.get(mode)
    if qk_out is None:
        raise bad(node, f"qk_matmul_output_mode={mode} (allowed: 0-3)")
    return [out, present_k, present_v, qk_out][: len(node.outputs)]
