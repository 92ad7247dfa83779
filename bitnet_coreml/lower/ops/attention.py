"""Transformer building blocks of opset 23: RotaryEmbedding.

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
