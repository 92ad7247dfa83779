"""Shape and layout ops: reshape, transpose, slices, concat/split/stack, squeeze/expand, pad, space/depth moves."""

from __future__ import annotations

from typing import Any

import numpy as np

from bitnet_coreml.executor.ops._util import axis_of, bool_list, int_list, scalar
from bitnet_coreml.executor.registry import OpContext, register


@register("reshape")
def op_reshape(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    shape = int_list(a["shape"])
    # 0 copies the input dimension matched right-aligned (iOS17 rule; identical when len == rank);
    # a 0 with no matching input dimension is 1
    rev = x.shape[::-1]
    k = len(shape)
    shape = [(rev[k - 1 - i] if k - 1 - i < len(rev) else 1) if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


@register("reshape_like")
def op_reshape_like(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    shape: list[int] = []
    for ref, b, e, em in zip(a["ref_tensors"], int_list(a["begins"]), int_list(a["ends"]), bool_list(a["end_masks"]), strict=False):
        dims = list(np.asarray(ref).shape)
        shape += dims[b:] if em else dims[b:e]
    return x.reshape(shape)


@register("transpose")
def op_transpose(ctx: OpContext, a: dict[str, Any]) -> Any:
    return np.transpose(a["x"], int_list(a["perm"]))


@register("expand_dims")
def op_expand_dims(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    out_rank = x.ndim + len(int_list(a["axes"]))
    axes = sorted(ax + out_rank if ax < 0 else ax for ax in int_list(a["axes"]))
    return np.expand_dims(x, tuple(axes))


@register("squeeze")
def op_squeeze(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    if a.get("axes") is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(int_list(a["axes"])))


def _index_slices(a: dict[str, Any], x: np.ndarray) -> tuple[tuple[Any, ...], list[int]]:
    rank = x.ndim
    begin = int_list(a["begin"])
    end = int_list(a["end"])
    stride = int_list(a["stride"]) if a.get("stride") is not None else [1] * rank
    bmask = bool_list(a["begin_mask"]) if a.get("begin_mask") is not None else [False] * rank
    emask = bool_list(a["end_mask"]) if a.get("end_mask") is not None else [False] * rank
    smask = bool_list(a["squeeze_mask"]) if a.get("squeeze_mask") is not None else [False] * rank
    sl: list[Any] = []
    squeeze: list[int] = []
    for i in range(rank):
        b = None if bmask[i] else begin[i]
        e = None if emask[i] else end[i]
        if smask[i]:
            idx = begin[i] if not bmask[i] else (0 if stride[i] > 0 else -1)
            idx = idx + x.shape[i] if idx < 0 else idx
            sl.append(slice(idx, idx + 1))
            squeeze.append(i)
        else:
            sl.append(slice(b, e, stride[i]))
    return tuple(sl), squeeze


@register("slice_by_index")
def op_slice_by_index(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    sl, squeeze = _index_slices(a, x)
    y = x[sl]
    return np.squeeze(y, axis=tuple(squeeze)) if squeeze else y


@register("slice_update")
def op_slice_update(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.array(a["x"], copy=True)
    sl, _ = _index_slices(a, x)
    target = x[sl]
    x[sl] = np.asarray(a["update"]).reshape(target.shape)
    return x


@register("slice_by_size")
def op_slice_by_size(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    sl = []
    for i, (b, s) in enumerate(zip(int_list(a["begin"]), int_list(a["size"]), strict=False)):
        b = b + x.shape[i] if b < 0 else b
        sl.append(slice(b, None if s == -1 else b + s))
    return x[tuple(sl)]


@register("concat")
def op_concat(ctx: OpContext, a: dict[str, Any]) -> Any:
    values = [np.asarray(v) for v in a["values"]]
    axis = axis_of(a["axis"], values[0].ndim)
    if bool(scalar(a.get("interleave", False))):
        stacked = np.stack(values, axis=axis + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


@register("split")
def op_split(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    axis = axis_of(a["axis"], x.ndim)
    if a.get("split_sizes") is not None:
        sizes = int_list(a["split_sizes"])
        bounds = np.cumsum(sizes)[:-1]
        return tuple(np.split(x, bounds, axis=axis))
    return tuple(np.split(x, int(scalar(a["num_splits"])), axis=axis))


@register("stack")
def op_stack(ctx: OpContext, a: dict[str, Any]) -> Any:
    values = [np.asarray(v) for v in a["values"]]
    return np.stack(values, axis=axis_of(a["axis"], values[0].ndim + 1))


@register("tile")
def op_tile(ctx: OpContext, a: dict[str, Any]) -> Any:
    return np.tile(a["x"], int_list(a["reps"]))


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}


@register("pad")
def op_pad(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    pad = int_list(a["pad"])
    k = len(pad) // 2
    widths = [(0, 0)] * (x.ndim - k) + [(pad[2 * i], pad[2 * i + 1]) for i in range(k)]
    mode = str(scalar(a.get("mode", "constant")))
    if mode not in _PAD_MODES:
        raise ValueError(f"pad mode {mode!r}; allowed: {', '.join(_PAD_MODES)}")
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=scalar(a.get("constant_val", 0.0)))
    return np.pad(x, widths, mode=_PAD_MODES[mode])  # type: ignore[call-overload]


@register("reverse")
def op_reverse(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    if a.get("axes") is None:
        return np.flip(x)
    return np.flip(x, axis=tuple(int_list(a["axes"])))


@register("reverse_sequence")
def op_reverse_sequence(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.array(a["x"], copy=True)
    lengths = int_list(a["lengths"])
    seq = axis_of(a.get("seq_axis", 0), x.ndim)
    bat = axis_of(a.get("batch_axis", 0), x.ndim)
    src = np.asarray(a["x"])
    for b, n in enumerate(lengths):
        idx: list[Any] = [slice(None)] * x.ndim
        idx[bat] = b
        idx[seq] = slice(0, n)
        part = src[tuple(idx)]
        # the seq axis inside the batch slice shifts left by one when it follows the batch axis
        x[tuple(idx)] = np.flip(part, axis=seq - (1 if seq > bat else 0))
    return x


@register("depth_to_space")
def op_depth_to_space(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    bs = int(scalar(a["block_size"]))
    n, c, h, w = x.shape
    y = x.reshape(n, bs, bs, c // (bs * bs), h, w).transpose(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (bs * bs), h * bs, w * bs)


@register("space_to_depth")
def op_space_to_depth(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    bs = int(scalar(a["block_size"]))
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // bs, bs, w // bs, bs).transpose(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * bs * bs, h // bs, w // bs)


@register("pixel_shuffle")
def op_pixel_shuffle(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    r = int(scalar(a["upscale_factor"]))
    n, c, h, w = x.shape
    y = x.reshape(n, c // (r * r), r, r, h, w).transpose(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (r * r), h * r, w * r)


@register("pixel_unshuffle")
def op_pixel_unshuffle(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    r = int(scalar(a["downscale_factor"]))
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // r, r, w // r, r).transpose(0, 1, 3, 5, 2, 4)
    return y.reshape(n, c * r * r, h // r, w // r)


@register("space_to_batch")
def op_space_to_batch(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    block = int_list(a["block_shape"])
    m = len(block)
    pads = np.asarray(a["paddings"]).reshape(m, 2)
    x = np.pad(x, [(0, 0), (0, 0)] + [(int(p[0]), int(p[1])) for p in pads])
    n, c = x.shape[:2]
    sp = x.shape[2:]
    shape = [n, c]
    for s, b in zip(sp, block, strict=False):
        shape += [s // b, b]
    y = x.reshape(shape)
    perm = [3 + 2 * i for i in range(m)] + [0, 1] + [2 + 2 * i for i in range(m)]
    y = y.transpose(perm)
    return y.reshape([n * int(np.prod(block)), c] + [s // b for s, b in zip(sp, block, strict=False)])


@register("batch_to_space")
def op_batch_to_space(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    block = int_list(a["block_shape"])
    m = len(block)
    crops = np.asarray(a["crops"]).reshape(m, 2)
    nb, c = x.shape[:2]
    sp = x.shape[2:]
    n = nb // int(np.prod(block))
    y = x.reshape(block + [n, c] + list(sp))
    perm = [m, m + 1]
    for i in range(m):
        perm += [m + 2 + i, i]
    y = y.transpose(perm).reshape([n, c] + [s * b for s, b in zip(sp, block, strict=False)])
    sl = tuple(slice(int(cr[0]), y.shape[2 + i] - int(cr[1])) for i, cr in enumerate(crops))
    return y[(slice(None), slice(None)) + sl]


@register("flatten2d")
def op_flatten2d(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    axis = axis_of(a.get("axis", 1), x.ndim)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


@register("sliding_windows")
def op_sliding_windows(ctx: OpContext, a: dict[str, Any]) -> Any:
    x = np.asarray(a["x"])
    axis = axis_of(a["axis"], x.ndim)
    size = int(scalar(a["size"]))
    stride = int(scalar(a.get("stride", 1)))
    v = np.lib.stride_tricks.sliding_window_view(x, size, axis=axis)  # window dim last
    v = np.moveaxis(v, -1, axis + 1)
    sl: list[Any] = [slice(None)] * v.ndim
    sl[axis] = slice(None, None, stride)
    return np.ascontiguousarray(v[tuple(sl)])
