"""Shape and layout ops: Constant, Identity, Shape, Size, Reshape, Flatten, Transpose, Slice, Concat,
Unsqueeze, Squeeze, Expand, Tile, Split, Range, ConstantOfShape.

Core ML needs fixed shapes, so every shape-valued input (Reshape's shape, Slice's starts, ...) must
fold to a constant, and Shape/Size/Range/ConstantOfShape always fold to numpy. Constants keep their
ONNX dtype (int64 shape arithmetic stays exact); they become int32 only when a MIL op consumes them.
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
    const_input,
    int_list,
    is_const,
    mb,
    normalize_axis,
    np_dtype,
    rank_of,
    req,
    shape_of,
    static_shape,
    to_var,
    unsupported,
)
from bitnet_coreml.lower.ops.activation import onnx_opset
from bitnet_coreml.lower.registry import LoweringContext, lowering


def _no_empty(node: ir.Node, shape: Sequence[int]) -> None:
    if any(d == 0 for d in shape):
        raise unsupported(node, f"result shape {list(shape)} is empty; Core ML has no zero-size tensors")


def _i32(vals: Sequence[int]) -> np.ndarray:
    return np.asarray(list(vals), dtype=np.int32)


@lowering("Constant")
def constant(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        v = attr(node, key)
        if v is None:
            continue
        if key == "value":
            return [np.asarray(v)]
        dt = np.float32 if "float" in key else np.int64
        return [np.asarray(v, dtype=dt)]
    present = sorted(node.attributes)
    raise unsupported(node, f"attribute(s) {present} are not supported (allowed: value, value_float(s), value_int(s))")


@lowering("Identity")
def identity(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    return [x if is_const(x) else mb().identity(x=x, name=ctx.name(node))]


@lowering("Dropout", const_inputs=(2,), const_reason="training_mode: inference only")
def dropout(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    # Inference only: the output is the input and the optional mask is all true.
    x = req(ctx, node, 0)
    training = ctx.input(node, 2)
    if training is not None and (not is_const(training) or bool(np.asarray(training).reshape(-1)[0])):
        raise unsupported(node, "training_mode must be a constant false (inference only)")
    out = [x if is_const(x) else mb().identity(x=x, name=ctx.name(node))]
    if len(node.outputs) > 1:
        out.append(np.ones(static_shape(node, x), dtype=np.bool_))
    return out


@lowering("Shape")
def shape(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    s = np.asarray(static_shape(node, req(ctx, node, 0)), dtype=np.int64)
    start = int(attr(node, "start", 0))
    end = attr(node, "end", None)
    return [s[start:] if end is None else s[start:int(end)]]


@lowering("Size")
def size(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    return [np.asarray(int(np.prod(static_shape(node, req(ctx, node, 0)))), dtype=np.int64)]


def reshape_target(node: ir.Node, in_shape: Sequence[int], target: Sequence[int], allowzero: bool) -> list[int]:
    """ONNX's Reshape target with 0 (copy, unless allowzero) and -1 (infer) resolved."""
    out = []
    for i, d in enumerate(target):
        if d == 0 and not allowzero:
            if i >= len(in_shape):
                raise bad(node, f"shape entry {i} is 0 (copy) but the input has rank {len(in_shape)}")
            out.append(int(in_shape[i]))
        else:
            out.append(int(d))
    if out.count(-1) > 1:
        raise bad(node, f"shape {list(target)} has more than one -1")
    total = int(np.prod(in_shape))
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1]))
        if known == 0 or total % known:
            raise bad(node, f"cannot infer -1 in shape {list(target)} for input shape {list(in_shape)}")
        out[out.index(-1)] = total // known
    if int(np.prod(out)) != total:
        raise bad(node, f"shape {list(target)} does not match input shape {list(in_shape)} ({total} elements)")
    return out


def reshape_to(x: Any, target: Sequence[int], name: str) -> Any:
    if is_const(x):
        return np.asarray(x).reshape(target)
    if tuple(shape_of(x)) == tuple(target):
        return mb().identity(x=x, name=name)
    return mb().reshape(x=x, shape=_i32(target), name=name)


@lowering("Reshape", const_inputs=(1,))
def reshape(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    in_shape = static_shape(node, x)
    target = int_list(node, ctx.const(node, 1))
    out = reshape_target(node, in_shape, target, bool(attr(node, "allowzero", 0)))
    if not is_const(x):
        _no_empty(node, out)
    return [reshape_to(x, out, ctx.name(node))]


@lowering("Flatten")
def flatten(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    s = static_shape(node, x)
    axis = int(attr(node, "axis", 1))
    axis = axis + len(s) if axis < 0 else axis
    if not 0 <= axis <= len(s):
        raise bad(node, f"axis {attr(node, 'axis', 1)} is out of range for rank {len(s)}")
    return [reshape_to(x, [int(np.prod(s[:axis])), int(np.prod(s[axis:]))], ctx.name(node))]


@lowering("Transpose")
def transpose(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    r = rank_of(x)
    perm = attr(node, "perm", None)
    perm = list(range(r))[::-1] if perm is None else [normalize_axis(node, int(p), r) for p in perm]
    if is_const(x):
        return [np.transpose(x, perm)]
    if perm == list(range(r)):
        return [mb().identity(x=x, name=ctx.name(node))]
    return [mb().transpose(x=x, perm=_i32(perm), name=ctx.name(node))]


@lowering("Slice", const_inputs=(1, 2, 3, 4))
def slice_(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    s = static_shape(node, x)
    r = len(s)
    if onnx_opset(node) < 10:
        starts, ends = attr(node, "starts", []), attr(node, "ends", [])
        axes, steps = attr(node, "axes", None), None
    else:
        starts, ends = int_list(node, ctx.const(node, 1)), int_list(node, ctx.const(node, 2))
        a, st = const_input(ctx, node, 3), const_input(ctx, node, 4)
        axes = None if a is None else int_list(node, a)
        steps = None if st is None else int_list(node, st)
    axes = list(range(len(starts))) if axes is None else [normalize_axis(node, int(a), r) for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise bad(node, f"starts/ends/axes/steps lengths differ: {len(starts)}/{len(ends)}/{len(axes)}/{len(steps)}")
    if len(set(axes)) != len(axes):
        raise bad(node, f"axes {axes} repeat an axis")
    py = [slice(None)] * r
    for st_, en, ax, sp in zip(starts, ends, axes, steps, strict=True):
        if sp == 0:
            raise bad(node, f"step for axis {ax} is 0")
        # Python's slicing clamps exactly like ONNX (INT64_MAX ends, negative starts, reverse steps).
        # Keep the original bounds: re-slicing with slice.indices' output would read a -1 end as "last".
        py[ax] = slice(int(st_), int(en), int(sp))
    if is_const(x):
        return [np.asarray(x)[tuple(py)]]
    out_shape = [len(range(*sl.indices(d))) for sl, d in zip(py, s, strict=True)]
    if 0 in out_shape:
        # An empty result holds no data: an empty numpy constant (Core ML has no zero-size tensors).
        return [np.zeros(out_shape, dtype=np_dtype(x))]
    begin, end, stride, end_mask = [], [], [], []
    for sl, d in zip(py, s, strict=True):
        lo, hi, step = sl.indices(d)
        begin.append(lo)
        stride.append(step)
        # A reverse slice that runs through index 0 ends "before 0", which MIL can only say with a mask.
        end_mask.append(step < 0 and hi < 0)
        end.append(0 if (step < 0 and hi < 0) else hi)
    return [mb().slice_by_index(x=x, begin=_i32(begin), end=_i32(end), stride=_i32(stride),
                                end_mask=np.asarray(end_mask), name=ctx.name(node))]


@lowering("Concat")
def concat(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    vals = [ctx.input(node, i) for i in range(len(node.inputs))]
    vals = [v for v in vals if v is not None]
    r = rank_of(vals[0])
    axis = normalize_axis(node, int(attr(node, "axis", 0)), r)
    # Empty inputs (a 0-length axis) contribute nothing and Core ML cannot hold them.
    vals = [v for v in vals if not (is_const(v) and np.asarray(v).size == 0)] or vals[:1]
    if all(is_const(v) for v in vals):
        return [np.concatenate([np.asarray(v) for v in vals], axis=axis)]
    dt = next(np_dtype(v) for v in vals if not is_const(v))
    mil_vals = [to_var(as_dtype(v, dt)) if is_const(v) else v for v in vals]
    if len(mil_vals) == 1:
        return [mb().identity(x=mil_vals[0], name=ctx.name(node))]
    return [mb().concat(values=mil_vals, axis=axis, name=ctx.name(node))]


def _axes_arg(ctx: LoweringContext, node: ir.Node, since: int) -> list[int] | None:
    if onnx_opset(node) < since:
        a = attr(node, "axes", None)
        return None if a is None else [int(v) for v in a]
    c = const_input(ctx, node, 1)
    return None if c is None else int_list(node, c)


@lowering("Unsqueeze", const_inputs=(1,))
def unsqueeze(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    axes = _axes_arg(ctx, node, 13)
    if not axes:
        raise bad(node, "axes are required")
    out_rank = rank_of(x) + len(axes)
    axes = sorted(normalize_axis(node, a, out_rank) for a in axes)
    if len(set(axes)) != len(axes):
        raise bad(node, f"axes {axes} repeat an axis")
    if is_const(x):
        return [np.expand_dims(np.asarray(x), tuple(axes))]
    return [mb().expand_dims(x=x, axes=axes, name=ctx.name(node))]


@lowering("Squeeze", const_inputs=(1,))
def squeeze(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    s = static_shape(node, x)
    axes = _axes_arg(ctx, node, 13)
    if axes is None:
        axes = [i for i, d in enumerate(s) if d == 1]
    else:
        axes = sorted(normalize_axis(node, a, len(s)) for a in axes)
    for a in axes:
        if s[a] != 1:
            raise bad(node, f"cannot squeeze axis {a} of size {s[a]} (shape {list(s)})")
    if is_const(x):
        return [np.squeeze(np.asarray(x), axis=tuple(axes))]
    if not axes:
        return [mb().identity(x=x, name=ctx.name(node))]
    return [mb().squeeze(x=x, axes=axes, name=ctx.name(node))]


def broadcast_to(node: ir.Node, x: Any, out_shape: Sequence[int], name: str) -> Any:
    """``x`` broadcast to ``out_shape`` (expand_dims + tile on a Var; numpy broadcast on a constant)."""
    if is_const(x):
        return np.array(np.broadcast_to(np.asarray(x), out_shape))
    s = static_shape(node, x)
    out_shape = list(out_shape)
    m = mb()
    if len(s) < len(out_shape):
        x = m.expand_dims(x=x, axes=list(range(len(out_shape) - len(s))), name=f"{name}_rank")
        s = (1,) * (len(out_shape) - len(s)) + tuple(s)
    reps = [o // d if d == 1 else 1 for d, o in zip(s, out_shape, strict=True)]
    if all(r == 1 for r in reps):
        return m.identity(x=x, name=name)
    return m.tile(x=x, reps=_i32(reps), name=name)


@lowering("Expand", const_inputs=(1,))
def expand(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    s = static_shape(node, x)
    target = int_list(node, ctx.const(node, 1))
    try:
        out = list(np.broadcast_shapes(tuple(s), tuple(target)))
    except ValueError as e:
        raise bad(node, f"shape {target} does not broadcast with input shape {list(s)}") from e
    if not is_const(x):
        _no_empty(node, out)
    return [broadcast_to(node, x, out, ctx.name(node))]


@lowering("Tile", const_inputs=(1,))
def tile(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    reps = int_list(node, ctx.const(node, 1))
    if len(reps) != rank_of(x):
        raise bad(node, f"repeats has {len(reps)} entries, input rank is {rank_of(x)}")
    if is_const(x):
        return [np.tile(np.asarray(x), reps)]
    _no_empty(node, [d * r for d, r in zip(static_shape(node, x), reps, strict=True)])
    return [mb().tile(x=x, reps=_i32(reps), name=ctx.name(node))]


@lowering("Split", const_inputs=(1,))
def split(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    s = static_shape(node, x)
    axis = normalize_axis(node, int(attr(node, "axis", 0)), len(s))
    n_out = len(node.outputs)
    sizes = attr(node, "split", None) if onnx_opset(node) < 13 else None
    if onnx_opset(node) >= 13 and const_input(ctx, node, 1) is not None:
        sizes = int_list(node, ctx.const(node, 1))
    if sizes is None:
        n = int(attr(node, "num_outputs", n_out))
        # Opset 18: equal chunks of ceil(dim / n), the last one smaller.
        chunk = -(-s[axis] // n)
        sizes = [chunk] * (n - 1) + [s[axis] - chunk * (n - 1)]
    sizes = [int(v) for v in sizes]
    if sum(sizes) != s[axis] or len(sizes) != n_out:
        raise bad(node, f"split sizes {sizes} do not cover axis {axis} of size {s[axis]} in {n_out} outputs")
    if is_const(x):
        return list(np.split(np.asarray(x), np.cumsum(sizes)[:-1], axis=axis))
    nm = ctx.name(node)
    if n_out == 1:
        return [mb().identity(x=x, name=nm)]
    # A zero-size piece holds no data: it is an empty numpy constant (Core ML has no zero-size
    # tensors; a Concat downstream drops it).
    live = [i for i, n in enumerate(sizes) if n]
    empty = {i: np.zeros([0 if a == axis else d for a, d in enumerate(s)], dtype=np_dtype(x))
             for i, n in enumerate(sizes) if not n}
    if len(live) == 1:
        pieces: list[Any] = [mb().identity(x=x, name=nm)]
    else:
        pieces = list(mb().split(x=x, split_sizes=_i32([sizes[i] for i in live]), axis=axis, name=nm))
    it = iter(pieces)
    return [empty[i] if i in empty else next(it) for i in range(n_out)]


@lowering("Range")
def range_(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    vals = [req(ctx, node, i) for i in range(3)]
    if not all(is_const(v) for v in vals):
        # Runtime scalars: MIL range_1d, whose length is known only when the program runs (a flexible
        # output shape: Core ML runs it on the CPU/GPU, never the ANE).
        dt = np_dtype(next(v for v in vals if not is_const(v)))
        nm = ctx.name(node)
        start, end, step = (cast(v, dt, f"{nm}_{k}") if not is_const(v) else to_var(as_dtype(np.reshape(v, ()), dt))
                            for k, v in zip(("start", "end", "step"), vals, strict=True))
        return [mb().range_1d(start=start, end=end, step=step, name=nm)]
    start, limit, delta = (np.asarray(v).reshape(()) for v in vals)
    if delta == 0:
        raise bad(node, "delta is 0")
    n = max(int(np.ceil((limit - start) / delta)), 0)
    # ONNX defines Range by repeated addition in the input dtype; start + i*delta equals it for ints
    # and for the float cases ONNX's own reference computes with arange.
    return [(start + np.arange(n, dtype=start.dtype) * delta).astype(start.dtype)]


@lowering("ConstantOfShape", const_inputs=(0,))
def constant_of_shape(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    shape_v = [int(v) for v in np.asarray(ctx.const(node, 0)).reshape(-1)]
    value = attr(node, "value", None)
    value = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    return [np.full(shape_v, value[0], dtype=value.dtype)]


@lowering("Trilu")
def trilu(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    s = static_shape(node, x)
    kv = ctx.input(node, 1)
    if kv is not None and not is_const(kv):
        # A runtime k: keep where (column - row) >= k (upper) / <= k (lower), compared when the program runs.
        rows, cols = s[-2], s[-1]
        diff = (np.arange(cols, dtype=np.int32)[None, :] - np.arange(rows, dtype=np.int32)[:, None])
        nm = ctx.name(node)
        k = cast(kv, np.int32, f"{nm}_k")  # a scalar or [1]: broadcasts against diff
        cmp = mb().greater_equal if attr(node, "upper", 1) else mb().less_equal
        xv = to_var(x, f"{nm}_x") if is_const(x) else x
        keep_v = cmp(x=diff, y=k, name=f"{nm}_keep")
        return [mb().select(cond=keep_v, a=xv, b=np.zeros((rows, cols), dtype=np_dtype(xv)), name=nm)]
    k = 0 if kv is None else int(np.asarray(kv).reshape(-1)[0])
    upper = bool(attr(node, "upper", 1))
    rows, cols = s[-2], s[-1]
    keep = (np.triu if upper else np.tril)(np.ones((rows, cols), dtype=bool), k)
    if is_const(x):
        return [np.where(keep, np.asarray(x), np.zeros((), np.asarray(x).dtype))]
    zero = np.zeros((rows, cols), dtype=np_dtype(x))
    return [mb().select(cond=keep, a=x, b=zero, name=ctx.name(node))]


@lowering("CumSum", const_inputs=(1,))
def cumsum(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    axis = normalize_axis(node, int(np.asarray(ctx.const(node, 1)).reshape(-1)[0]), rank_of(x))
    exclusive, reverse = bool(attr(node, "exclusive", 0)), bool(attr(node, "reverse", 0))
    if is_const(x):
        a = np.asarray(x)
        a2 = np.flip(a, axis) if reverse else a
        c = np.cumsum(a2, axis=axis, dtype=a.dtype)
        if exclusive:
            c = c - a2
        return [np.flip(c, axis) if reverse else c]
    nm = ctx.name(node)
    if not exclusive:
        return [mb().cumsum(x=x, axis=axis, reverse=reverse, name=nm)]
    # Exclusive = inclusive minus the element itself (coremltools' own exclusive value inference is
    # broken, and this keeps one code path for every runtime).
    inc = mb().cumsum(x=x, axis=axis, reverse=reverse, name=f"{nm}_inc")
    return [mb().sub(x=inc, y=x, name=nm)]



_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "wrap"}


def _axis_slice(x: Any, ax: int, lo: int, hi: int, step: int, name: str) -> Any:
    s = static_shape_any(x)
    begin, end = [0] * len(s), list(s)
    stride = [1] * len(s)
    begin[ax], end[ax], stride[ax] = lo, hi, step
    end_mask = [False] * len(s)
    if step < 0 and hi < 0:
        end[ax], end_mask[ax] = 0, True
    return mb().slice_by_index(x=x, begin=_i32(begin), end=_i32(end), stride=_i32(stride),
                               end_mask=np.asarray(end_mask), name=name)


def static_shape_any(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in shape_of(x))


def _pad_axis_by_concat(node: ir.Node, x: Any, ax: int, b: int, e: int, mode: str, value: Any, nm: str) -> Any:
    d = static_shape(node, x)[ax]
    m = mb()
    pieces: list[Any] = []
    if mode == "constant":
        shp = list(static_shape(node, x))
        for n in (b, e):
            shp[ax] = n
            pieces.append(np.full(shp, value, dtype=np_dtype(x)) if n else None)
        head, tail = pieces
    elif mode == "edge":
        head = m.tile(x=_axis_slice(x, ax, 0, 1, 1, f"{nm}_h1"), reps=_i32([b if i == ax else 1 for i in
                      range(len(shape_of(x)))]), name=f"{nm}_h") if b else None
        tail = m.tile(x=_axis_slice(x, ax, d - 1, d, 1, f"{nm}_t1"), reps=_i32([e if i == ax else 1 for i in
                      range(len(shape_of(x)))]), name=f"{nm}_t") if e else None
    elif mode == "reflect":
        if b >= d or e >= d:
            raise unsupported(node, f"reflect pad of {max(b, e)} on an axis of size {d}")
        head = _axis_slice(x, ax, b, 0, -1, f"{nm}_h") if b else None
        tail = _axis_slice(x, ax, d - 2, d - 2 - e, -1, f"{nm}_t") if e else None
    else:  # wrap
        if b > d or e > d:
            raise unsupported(node, f"wrap pad of {max(b, e)} on an axis of size {d}")
        head = _axis_slice(x, ax, d - b, d, 1, f"{nm}_h") if b else None
        tail = _axis_slice(x, ax, 0, e, 1, f"{nm}_t") if e else None
    parts = [p for p in (head, x, tail) if p is not None]
    return m.concat(values=[to_var(p) for p in parts], axis=ax, name=nm)


@lowering("Pad", const_inputs=(1, 3))
def pad(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    x = req(ctx, node, 0)
    s = static_shape(node, x)
    r = len(s)
    mode = str(attr(node, "mode", "constant"))
    runtime_value = None
    if onnx_opset(node) < 11:
        pads, value, axes = [int(p) for p in attr(node, "pads")], attr(node, "value", 0.0), None
    else:
        pads = int_list(node, ctx.const(node, 1))
        cv = ctx.input(node, 2)
        if cv is not None and not is_const(cv) and mode == "constant":
            runtime_value, cv = cv, None  # pad with 0, then select the runtime value into the padding
        elif cv is not None:
            cv = ctx.const(node, 2)
        value = 0 if cv is None or np.asarray(cv).size == 0 else np.asarray(cv).reshape(-1)[0]
        a = const_input(ctx, node, 3)
        axes = None if a is None else [normalize_axis(node, int(v), r) for v in np.asarray(a).reshape(-1)]
    axes = list(range(r)) if axes is None else axes
    if len(pads) != 2 * len(axes):
        raise bad(node, f"pads has {len(pads)} entries, expected {2 * len(axes)}")
    begin, end = [0] * r, [0] * r
    for i, ax in enumerate(axes):
        begin[ax], end[ax] = pads[i], pads[i + len(axes)]
    if mode not in _PAD_MODES:
        raise unsupported(node, f"mode {mode!r} (allowed: {', '.join(_PAD_MODES)})")
    y = _pad(ctx, node, x, s, begin, end, mode, value)
    if runtime_value is None:
        return [y]
    nm = ctx.name(node)
    inside = tuple(slice(max(b, 0), max(b, 0) + d - max(-b, 0) - max(-e, 0)) for b, e, d in zip(begin, end, s, strict=True))
    border = np.ones([d + b + e for b, e, d in zip(begin, end, s, strict=True)], dtype=bool)
    border[inside] = False
    fill = cast(runtime_value, np_dtype(y), f"{nm}_value")
    return [mb().select(cond=border, a=fill, b=to_var(y, f"{nm}_zero") if is_const(y) else y, name=f"{nm}_fill")]


def _pad(ctx: LoweringContext, node: ir.Node, x: Any, s: tuple[int, ...], begin: list[int], end: list[int], mode: str,
         value: Any) -> Any:
    """``x`` padded (negative pads crop) with a constant ``value`` or by ``mode``: a numpy constant or a MIL Var."""
    r = len(s)
    dt = np_dtype(x)
    if is_const(x):
        a = np.asarray(x)
        crop = tuple(slice(max(-b, 0), d - max(-e, 0)) for b, e, d in zip(begin, end, s, strict=True))
        widths = [(max(b, 0), max(e, 0)) for b, e in zip(begin, end, strict=True)]
        a = a[crop]
        np_mode: Any = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode]
        kw: dict[str, Any] = {"constant_values": np.asarray(value, dt)} if mode == "constant" else {}
        return np.pad(a, widths, mode=np_mode, **kw)
    nm = ctx.name(node)
    m = mb()
    if any(v < 0 for v in begin + end):
        # Negative pads crop.
        lo = [max(-b, 0) for b in begin]
        hi = [d - max(-e, 0) for e, d in zip(end, s, strict=True)]
        _no_empty(node, [h - lo_ for lo_, h in zip(lo, hi, strict=True)])
        x = m.slice_by_index(x=x, begin=_i32(lo), end=_i32(hi), name=f"{nm}_crop")
        begin, end = [max(b, 0) for b in begin], [max(e, 0) for e in end]
    if not any(begin + end):
        return m.identity(x=x, name=nm)
    if dt.kind != "f" or mode == "wrap":
        # MIL pad is float-only and has no wrap mode: build each padded axis from slices + concat.
        for ax in range(r):
            if begin[ax] or end[ax]:
                x = _pad_axis_by_concat(node, x, ax, begin[ax], end[ax], mode, value, f"{nm}_ax{ax}")
        return m.identity(x=x, name=nm)
    # MIL pads only the trailing dims it is given: list every dim from the first padded one.
    first = next(i for i in range(r) if begin[i] or end[i])
    mil_pad = [v for i in range(first, r) for v in (begin[i], end[i])]
    kw2: dict[str, Any] = {"constant_val": np.asarray(value, dt).item()} if mode == "constant" else {}
    return m.pad(x=x, pad=_i32(mil_pad), mode=_PAD_MODES[mode], name=nm, **kw2)
