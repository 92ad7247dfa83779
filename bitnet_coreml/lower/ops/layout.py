"""Data-layout ops: DepthToSpace, SpaceToDepth, EyeLike (folded), NonZero (constants only)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from bitnet_coreml.lower.ops._common import attr, bad, is_const, mb, np_dtype, req, static_shape, unsupported
from bitnet_coreml.lower.registry import LoweringContext, lowering


@lowering("DepthToSpace")
def depth_to_space(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    n, c, h, w = static_shape(node, x)
    b = int(attr(node, "blocksize"))
    mode = str(attr(node, "mode", "DCR"))
    if c % (b * b):
        raise bad(node, f"{c} channels are not a multiple of blocksize^2 = {b * b}")
    # DCR: channels split as (b, b, c'); CRD: (c', b, b). Spelled out with reshape/transpose for both.
    if mode == "DCR":
        shape6, perm = [n, b, b, c // (b * b), h, w], [0, 3, 4, 1, 5, 2]
    elif mode == "CRD":
        shape6, perm = [n, c // (b * b), b, b, h, w], [0, 1, 4, 2, 5, 3]
    else:
        raise bad(node, f"mode={mode!r} (allowed: DCR, CRD)")
    out = [n, c // (b * b), h * b, w * b]
    if is_const(x):
        return [np.asarray(x).reshape(shape6).transpose(perm).reshape(out)]
    nm = ctx.name(node)
    m = mb()
    if mode == "DCR":
        return [m.depth_to_space(x=x, block_size=b, name=nm)]
    # Rank 6 exceeds Core ML's limit of 5: fold n (which must be 1 here) away.
    if n != 1:
        raise unsupported(node, "CRD mode with batch > 1 needs a rank-6 tensor (Core ML allows rank <= 5)")
    y = m.reshape(x=x, shape=np.array(shape6[1:], np.int32), name=f"{nm}_r")
    y = m.transpose(x=y, perm=[p - 1 for p in perm[1:]], name=f"{nm}_t")
    return [m.reshape(x=y, shape=np.array(out, np.int32), name=nm)]


@lowering("SpaceToDepth")
def space_to_depth(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    n, c, h, w = static_shape(node, x)
    b = int(attr(node, "blocksize"))
    if h % b or w % b:
        raise bad(node, f"spatial size {h}x{w} is not a multiple of blocksize {b}")
    mode = str(attr(node, "mode", "DCR"))
    if mode not in ("DCR", "CRD"):
        raise bad(node, f"mode={mode!r} (allowed: DCR, CRD)")
    # Output channels are ordered (b, b, c) in DCR mode and (c, b, b) in CRD mode.
    perm = [0, 3, 5, 1, 2, 4] if mode == "DCR" else [0, 1, 3, 5, 2, 4]
    out = [n, c * b * b, h // b, w // b]
    if is_const(x):
        return [np.asarray(x).reshape(n, c, h // b, b, w // b, b).transpose(perm).reshape(out)]
    nm = ctx.name(node)
    if mode == "DCR":
        return [mb().space_to_depth(x=x, block_size=b, name=nm)]
    if n != 1:
        raise unsupported(node, "CRD mode with batch > 1 needs a rank-6 tensor (Core ML allows rank <= 5)")
    m = mb()
    y = m.reshape(x=x, shape=np.array([c, h // b, b, w // b, b], np.int32), name=f"{nm}_r")
    y = m.transpose(x=y, perm=[p - 1 for p in perm[1:]], name=f"{nm}_t")
    return [m.reshape(x=y, shape=np.array(out, np.int32), name=nm)]


@lowering("EyeLike")
def eye_like(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    s = static_shape(node, x)
    if len(s) != 2:
        raise bad(node, f"input must be 2-D, found rank {len(s)}")
    dt_attr = attr(node, "dtype", None)
    # The output dtype is the attribute's, else the input's (the ONNX input dtype, not MIL's int32).
    if dt_attr is not None:
        dt = np.dtype(ir.DataType(int(dt_attr)).numpy())
    elif node.inputs[0] is not None and node.inputs[0].dtype is not None:
        dt = np.dtype(node.inputs[0].dtype.numpy())
    else:
        dt = np_dtype(x)
    return [np.eye(s[0], s[1], k=int(attr(node, "k", 0)), dtype=dt)]


@lowering("NonZero")
def non_zero(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    if not is_const(x):
        raise unsupported(node, "the output shape depends on the data; supported only on constants")
    return [np.asarray(np.nonzero(np.asarray(x)), dtype=np.int64)]
