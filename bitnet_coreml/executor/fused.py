"""The fused decode path: a stateful package's ``decode`` function run as one compiled kernel call.

The interpreter (``executor/compiler.py``) walks a decode call's ops one by one in Python: for the
200M model that is ~2,400 ops per token, ~30 ms of dispatch and small numpy calls around ~10 ms of
matmuls. :class:`FusedFunction` translates the *compiled* function (the same steps, the same
constants in compute form: 2-bit ternary codes, fp16 weights, folded constants, all derived from
the package's own MIL program and ``weight.bin``) into an instruction table (layout:
``executor/_layout.py``) that one kernel call runs, writing the KV cache in place. The kernel
(:func:`kernel`): the C library ``executor/_vm.c`` when it is built for the current source and this
machine (``executor/native.py``, ``make setup``), else the numba kernel ``executor/_vm.py`` (same
results), else none and the interpreter runs the calls; :attr:`FusedFunction.kernel_note` says which
ran and why.

Every op of the function must translate, else :func:`fuse` returns ``(None, reason)`` and the caller
keeps the interpreter (nothing is guessed): the supported ops are the elementwise, comparison,
logic, select / clip, last-axis reduction and softmax ops, casts, reshapes, transposes, static
slices, concat, gathers of rows from a constant table, matmuls (2-bit ternary or fp16 weights,
activations, float32 constants), ``read_state`` / ``slice_update`` / ``coreml_update_state``, at
rank <= 4 with static shapes, values representable in float32 (integers below 2**24).

Results follow the interpreter op by op (see ``executor/_vm.py``): equal except where the
interpreter sums through BLAS (attention's products, float32 weights) or numpy's SIMD ``exp``,
where they may differ by float32 rounding before the op's own rounding.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bitnet_coreml.errors import InputError
from bitnet_coreml.executor import _layout as _vm

__all__ = ["FusedFunction", "fuse", "kernel", "KERNELS"]

log = logging.getLogger(__name__)

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
# Constants up to this many elements are copied into the arena; larger ones are buffers of their own.
ARENA_CONST_MAX = 1 << 16
EXACT_INT = 1 << 24

_BINARY = {"add": _vm.ADD, "sub": _vm.SUB, "mul": _vm.MUL, "real_div": _vm.DIV, "maximum": _vm.MAX,
           "minimum": _vm.MIN, "equal": _vm.EQ, "not_equal": _vm.NE, "less": _vm.LT, "less_equal": _vm.LE,
           "greater": _vm.GT, "greater_equal": _vm.GE, "logical_and": _vm.AND, "logical_or": _vm.OR,
           "logical_xor": _vm.XOR}
_UNARY = {"abs": _vm.ABS, "floor": _vm.FLOOR, "ceil": _vm.CEIL, "relu": _vm.RELU, "rsqrt": _vm.RSQRT,
          "sqrt": _vm.SQRT, "exp": _vm.EXP, "sigmoid": _vm.SIGMOID, "silu": _vm.SILU, "square": _vm.SQUARE,
          "logical_not": _vm.NOT, "cast": _vm.COPY}
_REDUCE = {"reduce_max": _vm.RMAX, "reduce_min": _vm.RMIN, "reduce_mean": _vm.RMEAN, "reduce_sum": _vm.RSUM}
_ALIAS = {"reshape", "expand_dims", "squeeze", "identity"}


class _Unsupported(Exception):
    """The function holds something the fused path does not translate (the reason is logged)."""


# the kernels that run the table: "auto" is native when built, else numba; the environment variable
# overrides "auto" (benchmarks compare the two kernels with it)
KERNELS = ("auto", "native", "numba")
KERNEL_ENV = "BITNET_COREML_KERNEL"
_Run = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[int, int]]


def kernel(which: str = "auto") -> tuple[_Run, str, str]:
    """``(run, name, note)``: the kernel that runs instruction tables, its name and why it was chosen.

    ``auto``: ``$BITNET_COREML_KERNEL`` when set, else the C library when it is built for the current source
    and machine, else the numba kernel; raises :class:`_Unsupported` when the one asked for (or, for
    ``auto``, either) is not available.
    """
    if which not in KERNELS:
        raise ValueError(f"kernel {which!r}; allowed: {', '.join(KERNELS)}")
    if which == "auto" and os.environ.get(KERNEL_ENV):
        which = os.environ[KERNEL_ENV]
        if which not in KERNELS:
            raise InputError(f"{KERNEL_ENV}={which!r}: allowed {', '.join(KERNELS)}")
    why = ""
    if which in ("auto", "native"):
        from bitnet_coreml.executor import native

        k, why = native.load()
        if k is not None:
            return k.run, "native", "native C kernel"
        if which == "native":
            raise _Unsupported(why)
    try:
        from bitnet_coreml.executor import _vm as numba_vm
    except ImportError as e:  # numba missing or broken: the interpreter runs the calls
        raise _Unsupported(f"no kernel: {why or 'native not asked for'}; numba: {e}") from e
    return numba_vm.run, "numba", f"numba kernel ({why})" if why else "numba kernel"


@dataclass(frozen=True)
class _Val:
    buf: int
    off: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # (numpy's prod costs ~10 us a call; the decode path asks per input)


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return tuple(reversed(out))


def _pad4(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if len(shape) > 4:
        raise _Unsupported(f"rank {len(shape)} > 4")
    k = 4 - len(shape)
    return (1,) * k + tuple(shape), (0,) * k + tuple(strides)


def _broadcast(val: _Val, out_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides of ``val`` read at the (4-D padded) output shape ``out_shape``."""
    if len(val.shape) > len(out_shape):
        raise _Unsupported(f"operand of shape {val.shape} broadcast to {out_shape}")
    shape = (1,) * (len(out_shape) - len(val.shape)) + val.shape
    st = (0,) * (len(out_shape) - len(val.shape)) + _strides(val.shape)
    res = []
    for d, o, s in zip(shape, out_shape, st, strict=True):
        if d == o:
            res.append(s if d != 1 else 0)
        elif d == 1:
            res.append(0)
        else:
            raise _Unsupported(f"operand of shape {val.shape} does not broadcast to {out_shape}")
    return _pad4(out_shape, tuple(res))[1]


def _layout(st: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """``flat`` when strides ``st`` (4-D) read a contiguous array of ``shape``, ``scalar`` when all are 0."""
    dims = (1,) * (4 - len(shape)) + tuple(shape)
    contig = _strides(dims)
    if all(s == 0 for s, d in zip(st, dims, strict=True) if d > 1):
        return "scalar" if any(d > 1 for d in dims) else "flat"
    if all(s == c for s, c, d in zip(st, contig, dims, strict=True) if d > 1):
        return "flat"
    return "strided"


def _mode(dt: np.dtype | None) -> tuple[int, int]:
    if dt is None:
        raise _Unsupported("an output without a tensor dtype")
    dt = np.dtype(dt)
    if dt == F16:
        return _vm.R_F16, 0
    if dt == F32:
        return _vm.R_NONE, 0
    if dt == np.dtype(np.bool_):
        return _vm.R_BOOL, 0
    if dt.kind == "i":
        return _vm.R_INT, 0
    if dt.kind == "u":
        return _vm.R_UINT, dt.itemsize * 8
    raise _Unsupported(f"dtype {dt}")


def _int(v: Any) -> int:
    return int(np.asarray(v).reshape(-1)[0])


class _Builder:
    def __init__(self, ex: Any) -> None:
        # the packed weight types (imported here: loading a stored table, executor/fused_store.py, needs neither)
        from bitnet_coreml.executor.half import KERNEL_MAX_ROWS, HalfWeight
        from bitnet_coreml.executor.ternary import TernaryWeight

        self.Tern, self.Half, self.half_max_rows = TernaryWeight, HalfWeight, KERNEL_MAX_ROWS
        self.ex = ex
        self.states = list(ex._states)  # state names, buffers 1..S
        self.state_slots: dict[int, int] = {}  # slot of a state input -> its index in states
        self.state_shapes: list[tuple[int, ...]] = []
        self.arena = 0
        self.init: list[tuple[int, np.ndarray]] = []
        self.big: list[np.ndarray] = []
        self.terns: list[np.ndarray] = []
        self.halves: list[np.ndarray] = []
        self.half_rows: list[int] = []  # N of each fp16 weight (its blocks are zero-padded)
        self.weights: dict[int, int] = {}
        self.consts: dict[int, tuple[Any, _Val]] = {}
        self.vals: dict[int, _Val] = {}
        self.rows: list[np.ndarray] = []
        self.last_read: dict[int, int] = {}
        # arena reuse (alloc / release): free regions, region sizes, live slots per region, never-freed regions
        self.free: list[tuple[int, int]] = []
        self.sizes: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.kept: set[int] = set()
        self.released: set[int] = set()

    # --- placement -----------------------------------------------------------------------------

    def alloc(self, shape: tuple[int, ...], *, keep: bool = False) -> _Val:
        """Arena space for a value: a freed region (first fit) or new space; ``keep``: never freed (constants,
        inputs). A region is freed once every slot holding it was last read, so the arena is the largest set
        of values alive at once, not their sum (every kernel op writes all of its output: reuse is safe)."""
        shape = tuple(int(d) for d in shape)
        n = max(int(np.prod(shape, dtype=np.int64)), 1)
        off = -1
        if not keep:
            for j, (o, size) in enumerate(self.free):
                if size >= n:
                    off = o
                    self.free[j:j + 1] = [(o + n, size - n)] if size > n else []
                    break
        if off < 0:
            off = self.arena
            self.arena += n
        if keep:
            self.kept.add(off)
        self.sizes[off] = n
        return _Val(0, off, shape)

    def hold(self, v: _Val) -> None:
        if v.buf == 0 and v.off not in self.kept:
            self.refs[v.off] = self.refs.get(v.off, 0) + 1

    def release(self, i: int, step: Any, ends: set[int]) -> None:
        """Free the arena regions whose last reader is step ``i`` (or that step's output nobody reads)."""
        slots = {s for _, s in step.slot_args} | {s for _, refs in step.tuples for s, _ in refs if s >= 0}
        for s in slots | set(step.out_slots):
            if s in ends or s in self.released or s not in self.vals or self.last_read.get(s, -1) > i:
                continue
            self.released.add(s)
            v = self.vals[s]
            if v.buf != 0 or v.off not in self.refs:
                continue
            self.refs[v.off] -= 1
            if self.refs[v.off] == 0:
                del self.refs[v.off]
                self.free.append((v.off, self.sizes[v.off]))
                self.free.sort()
                merged: list[tuple[int, int]] = []
                for o, size in self.free:
                    if merged and merged[-1][0] + merged[-1][1] == o:
                        merged[-1] = (merged[-1][0], merged[-1][1] + size)
                    else:
                        merged.append((o, size))
                self.free = merged

    def const(self, c: Any) -> _Val:
        key = id(c)
        if key in self.consts and self.consts[key][0] is c:
            return self.consts[key][1]
        if c.__class__ in (self.Tern, self.Half) or isinstance(c, str):
            raise _Unsupported(f"a {type(c).__name__} constant used as a value")
        arr = np.asarray(c)
        if arr.dtype.kind not in "biuf" or arr.dtype == np.float64:
            raise _Unsupported(f"a constant of dtype {arr.dtype}")
        if arr.dtype.kind in "iu" and arr.size and int(np.abs(arr.astype(np.int64)).max()) >= EXACT_INT:
            raise _Unsupported("an integer constant beyond 2**24")
        if arr.size <= ARENA_CONST_MAX:
            v = self.alloc(arr.shape, keep=True)
            self.init.append((v.off, arr.astype(np.float32).reshape(-1)))
        else:
            flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
            if not flat.flags.writeable:
                flat = flat.copy()
            self.big.append(flat)
            v = _Val(-len(self.big), 0, tuple(arr.shape))  # buffer id fixed in finish()
        self.consts[key] = (c, v)  # holds c: its id is not reused while building
        return v

    def arg(self, a: dict[str, tuple[int, Any]], name: str) -> _Val:
        if name not in a:
            raise _Unsupported(f"missing argument {name!r}")
        slot, c = a[name]
        if slot >= 0:
            if slot not in self.vals:
                raise _Unsupported(f"argument {name!r} has no value (a state or list)")
            return self.vals[slot]
        return self.const(c)

    def param(self, a: dict[str, tuple[int, Any]], name: str, default: Any = None) -> Any:
        if name not in a:
            return default
        slot, c = a[name]
        if slot >= 0:
            raise _Unsupported(f"parameter {name!r} computed at run time")
        return c

    # --- instructions --------------------------------------------------------------------------

    def emit(self, op: int, mode: tuple[int, int], dims: tuple[int, ...], out: tuple[int, int, tuple[int, ...]],
             *operands: tuple[int, int, tuple[int, ...]], params: tuple[int, ...] = ()) -> None:
        row = np.zeros(_vm.WIDTH, dtype=np.int64)
        row[_vm.OP], row[_vm.RND] = op, mode[0]
        row[_vm.P + 9] = mode[1]
        d4 = (1,) * (4 - len(dims)) + tuple(dims)
        row[_vm.D:_vm.D + 4] = d4
        for base, (buf, off, st) in zip((_vm.OUT, _vm.A, _vm.B, _vm.C), (out, *operands), strict=False):
            row[base], row[base + 1] = buf, off
            row[base + 2:base + 6] = (0,) * (4 - len(st)) + tuple(st)
        row[_vm.P:_vm.P + len(params)] = params
        self.rows.append(row)

    def contiguous(self, v: _Val) -> tuple[int, int, tuple[int, ...]]:
        return v.buf, v.off, _pad4(v.shape, _strides(v.shape))[1]

    # --- ops -----------------------------------------------------------------------------------

    def step(self, i: int, step: Any) -> None:
        t = step.ctx.op_type
        a = {name: (slot, c) for name, slot, c in step.args}
        if step.tuples and t != "concat":
            raise _Unsupported(f"op {step.ctx.name!r} ({t}) takes a list of values")
        if step.ctx.blocks or step.needs_env:
            raise _Unsupported(f"op {step.ctx.name!r} ({t}) has nested blocks")
        shapes = step.ctx.out_shapes
        if len(step.out_slots) != 1 or shapes[0] is None or any(d is None for d in shapes[0]):
            raise _Unsupported(f"op {step.ctx.name!r} ({t}): not one output of static shape")
        shape = tuple(int(d) for d in shapes[0])
        mode = _mode(step.out_dtypes[0])
        slot = step.out_slots[0]
        if t in _BINARY or t in ("select", "clip"):
            names = ("x", "y") if t in _BINARY else (("cond", "a", "b") if t == "select" else ("x", "alpha", "beta"))
            ins = [self.arg(a, n) for n in names]
            out = self.alloc(shape)
            op = _BINARY.get(t, _vm.SELECT if t == "select" else _vm.CLIP)
            strides = [_broadcast(v, shape) for v in ins]
            kinds = [_layout(st, shape) for st in strides]
            fast = 0
            if t in _BINARY and kinds[0] == "flat" and kinds[1] in ("flat", "scalar"):
                fast = 1 if kinds[1] == "flat" else 2
            elif t == "clip" and kinds == ["flat", "scalar", "scalar"]:
                fast = 3
            self.emit(op, mode, shape, self.contiguous(out), *((v.buf, v.off, st) for v, st in zip(ins, strides, strict=True)),
                      params=(0,) * 8 + (fast,))
        elif t in _UNARY:
            x = self.arg(a, "x")
            if x.shape != shape:
                raise _Unsupported(f"op {step.ctx.name!r} ({t}) changes the shape")
            out = self.alloc(shape)
            ops = [(x.buf, x.off, _broadcast(x, shape))]
            if t == "rsqrt":
                eps = self.const(np.float32(self.param(a, "epsilon", 1e-12)))
                ops.append((eps.buf, eps.off, (0, 0, 0, 0)))
            fast = 1 if _layout(ops[0][2], shape) == "flat" else 0
            self.emit(_UNARY[t], mode, shape, self.contiguous(out), *ops, params=(0,) * 8 + (fast,))
        elif t in _ALIAS:
            x = self.arg(a, "x")
            if x.size != int(np.prod(shape, dtype=np.int64)):
                raise _Unsupported(f"op {step.ctx.name!r} ({t}) changes the element count")
            out = _Val(x.buf, x.off, shape)
        elif t in _REDUCE or t == "softmax":
            out = self.reduce(t, a, shape, mode)
        elif t == "transpose":
            x = self.arg(a, "x")
            perm = [int(p) % len(x.shape) for p in np.asarray(self.param(a, "perm")).reshape(-1)]
            xs = _strides(x.shape)
            out = self.alloc(shape)
            self.emit(_vm.COPY, mode, shape, self.contiguous(out),
                      (x.buf, x.off, _pad4(shape, tuple(xs[p] for p in perm))[1]))
        elif t == "slice_by_index":
            out = self.slice(step, a, shape, mode)
        elif t == "concat":
            out = self.concat(step, a, shape, mode)
        elif t == "matmul":
            out = self.matmul(step, a, shape, mode)
        elif t == "gather":
            out = self.gather(step, a, shape, mode)
        elif t == "read_state":
            slot_in, _ = a["input"]
            if slot_in not in self.state_slots:
                raise _Unsupported(f"op {step.ctx.name!r}: read_state of a non-state")
            idx = self.state_slots[slot_in]
            out = _Val(1 + idx, 0, self.state_shapes[idx])
        elif t == "slice_update":
            out = self.slice_update(i, step, a, shape, mode)
        elif t == "coreml_update_state":
            slot_in, _ = a["state"]
            if slot_in not in self.state_slots:
                raise _Unsupported(f"op {step.ctx.name!r}: coreml_update_state of a non-state")
            idx = self.state_slots[slot_in]
            value = self.arg(a, "value")
            if value.shape != self.state_shapes[idx]:
                raise _Unsupported(f"op {step.ctx.name!r}: value shape {value.shape} != state shape")
            if (value.buf, value.off) != (1 + idx, 0):
                self.emit(_vm.COPY, (_vm.R_NONE, 0), value.shape, (1 + idx, 0, _pad4(value.shape, _strides(value.shape))[1]),
                          self.contiguous(value))
            out = _Val(1 + idx, 0, value.shape)
        else:
            raise _Unsupported(f"op {step.ctx.name!r}: {t} is not fused")
        self.vals[slot] = out
        self.hold(out)

    def reduce(self, t: str, a: dict[str, Any], shape: tuple[int, ...], mode: tuple[int, int]) -> _Val:
        x = self.arg(a, "x")
        rank = len(x.shape)
        if t == "softmax":
            axes = [_int(self.param(a, "axis", -1))]
        else:
            raw = self.param(a, "axes")
            axes = [int(v) for v in np.asarray(raw).reshape(-1)] if raw is not None else list(range(rank))
        if rank == 0 or [ax % rank for ax in axes] != [rank - 1]:
            raise _Unsupported(f"{t} over axes {axes} of a rank-{rank} value (only the last axis is fused)")
        xs4 = _pad4(x.shape, _strides(x.shape))
        n = x.shape[-1]
        out = self.alloc(shape)
        if t == "softmax":
            self.emit(_vm.SOFTMAX, mode, xs4[0][:3] + (1,), (0, out.off, xs4[1]), (x.buf, x.off, xs4[1]), params=(n,))
        else:
            outer = xs4[0][:3]
            self.emit(_REDUCE[t], mode, outer + (1,), (0, out.off, _strides(outer) + (0,)), (x.buf, x.off, xs4[1]),
                      params=(n,))
        return out

    def slice(self, step: Any, a: dict[str, Any], shape: tuple[int, ...], mode: tuple[int, int]) -> _Val:
        from bitnet_coreml.executor.ops.tensor_transformation import _index_slices

        x = self.arg(a, "x")
        consts = {n: self.param(a, n) for n in ("begin", "end", "stride", "begin_mask", "end_mask", "squeeze_mask")}
        sl, squeeze = _index_slices({k: v for k, v in consts.items() if v is not None},
                                    np.broadcast_to(np.float32(0), x.shape))
        xs = _strides(x.shape)
        off, dims, st = x.off, [], []
        for i, s in enumerate(sl):
            start, _, step_ = s.indices(x.shape[i])
            length = len(range(*s.indices(x.shape[i])))
            off += start * xs[i]
            if i not in squeeze:
                dims.append(length)
                st.append(step_ * xs[i])
        if tuple(dims) != shape:
            raise _Unsupported(f"op {step.ctx.name!r}: slice shape {dims} != declared {shape}")
        out = self.alloc(shape)
        self.emit(_vm.COPY, mode, shape, self.contiguous(out), (x.buf, off, _pad4(shape, tuple(st))[1]))
        return out

    def concat(self, step: Any, a: dict[str, Any], shape: tuple[int, ...], mode: tuple[int, int]) -> _Val:
        if bool(self.param(a, "interleave", False)):
            raise _Unsupported(f"op {step.ctx.name!r}: interleaved concat")
        (name, refs), = step.tuples
        parts = [self.vals[s] if s >= 0 else self.const(c) for s, c in refs]
        axis = _int(self.param(a, "axis")) % len(shape)
        out = self.alloc(shape)
        ost = _strides(shape)
        pos = 0
        for p in parts:
            if len(p.shape) != len(shape):
                raise _Unsupported(f"op {step.ctx.name!r}: concat of mixed ranks")
            self.emit(_vm.COPY, mode, p.shape, (0, out.off + pos * ost[axis], _pad4(p.shape, ost)[1]), self.contiguous(p))
            pos += p.shape[axis]
        if pos != shape[axis]:
            raise _Unsupported(f"op {step.ctx.name!r}: concat sizes do not add up")
        return out

    def weight(self, w: Any) -> int:
        key = id(w)
        if key not in self.weights:
            lst = self.terns if isinstance(w, self.Tern) else self.halves
            # read-only views: the kernels only read, and one array type whatever the source
            lst.append(np.ascontiguousarray(w.codes if isinstance(w, self.Tern) else w.blocks))
            if lst is self.halves:
                self.half_rows.append(int(w.shape[0]))
            self.weights[key] = len(lst) - 1
        return self.weights[key]

    def matmul(self, step: Any, a: dict[str, Any], shape: tuple[int, ...], mode: tuple[int, int]) -> _Val:
        tx = bool(self.param(a, "transpose_x", False))
        ty = bool(self.param(a, "transpose_y", False))
        x = self.arg(a, "x")
        slot_y, cy = a["y"]
        out = self.alloc(shape)
        if slot_y < 0 and cy.__class__ in (self.Tern, self.Half):
            n, k = cy.shape
            m = x.size // max(k, 1)
            if tx or not ty or x.shape[-1] != k or shape[-1] != n or m * n != out.size:
                raise _Unsupported(f"op {step.ctx.name!r}: matmul with a packed weight in another layout")
            if isinstance(cy, self.Half) and m > self.half_max_rows:
                raise _Unsupported(f"op {step.ctx.name!r}: {m} rows times an fp16 weight")
            op = _vm.MM_TERN if isinstance(cy, self.Tern) else _vm.MM_HALF
            self.emit(op, mode, shape, (0, out.off, (0, 0, 0, 0)), (x.buf, x.off, (0, 0, k, 1)),
                      params=(m, k, n, self.weight(cy)))
            return out
        y = self.arg(a, "y")
        if len(x.shape) < 2 or len(y.shape) < 2 or len(shape) > 4:
            raise _Unsupported(f"op {step.ctx.name!r}: matmul of ranks {len(x.shape)}, {len(y.shape)}")
        xs, ys = list(_strides(x.shape)), list(_strides(y.shape))
        xd, yd = list(x.shape), list(y.shape)
        if tx:
            xd[-1], xd[-2], xs[-1], xs[-2] = xd[-2], xd[-1], xs[-2], xs[-1]
        if ty:
            yd[-1], yd[-2], ys[-1], ys[-2] = yd[-2], yd[-1], ys[-2], ys[-1]
        k = xd[-1]
        if yd[-2] != k or shape[-2:] != (xd[-2], yd[-1]):
            raise _Unsupported(f"op {step.ctx.name!r}: matmul shapes {x.shape} x {y.shape} -> {shape}")
        out4 = _pad4(shape, _strides(shape))[0]

        def batch(d: list[int], s: list[int]) -> tuple[int, int]:
            bd = [1] * (4 - len(d)) + d[:-2]
            bs = [0] * (4 - len(s)) + s[:-2]
            res = []
            for j in range(2):
                if bd[j] == out4[j] and bd[j] != 1:
                    res.append(bs[j])
                elif bd[j] == 1:
                    res.append(0)
                else:
                    raise _Unsupported(f"op {step.ctx.name!r}: batch dims {d[:-2]} vs {shape[:-2]}")
            return res[0], res[1]

        if len(xd) > 4 or len(yd) > 4:
            raise _Unsupported(f"op {step.ctx.name!r}: matmul rank > 4")
        xb, yb = batch(xd, xs), batch(yd, ys)
        self.emit(_vm.MATMUL, mode, shape, self.contiguous(out), (x.buf, x.off, (*xb, xs[-2], 0)),
                  (y.buf, y.off, (*yb, 0, ys[-1])), params=(k, xs[-1], ys[-2]))
        return out

    def gather(self, step: Any, a: dict[str, Any], shape: tuple[int, ...], mode: tuple[int, int]) -> _Val:
        slot_x, cx = a["x"]
        if slot_x >= 0 or _int(self.param(a, "axis", 0)) != 0 or _int(self.param(a, "batch_dims", 0)) != 0:
            raise _Unsupported(f"op {step.ctx.name!r}: gather other than rows of a constant table")
        idx = self.arg(a, "indices")
        if len(idx.shape) > 3:
            raise _Unsupported(f"op {step.ctx.name!r}: indices of rank {len(idx.shape)}")
        validate = int(bool(self.param(a, "validate_indices", False)))
        out = self.alloc(shape)
        ids = _pad4(idx.shape + (1,), _strides(idx.shape) + (0,))
        dims = ids[0][:3] + (1,)
        if isinstance(cx, self.Half):
            rows, width = cx.shape
            self.emit(_vm.GATHER_HALF, mode, dims, (0, out.off, (0, 0, 0, 0)), (idx.buf, idx.off, ids[1]),
                      params=(rows, width, self.weight(cx), validate))
        else:
            table = self.const(cx)
            if len(table.shape) < 1:
                raise _Unsupported(f"op {step.ctx.name!r}: gather from a scalar")
            rows = table.shape[0]
            width = table.size // max(rows, 1)
            self.emit(_vm.GATHER, mode, dims, (0, out.off, (0, 0, 0, 0)), (idx.buf, idx.off, ids[1]),
                      (table.buf, table.off, (0, 0, width, 1)), params=(rows, width, -1, validate))
        if out.size != int(np.prod(idx.shape, dtype=np.int64)) * width:
            raise _Unsupported(f"op {step.ctx.name!r}: gather output shape {shape}")
        return out

    def slice_update(self, i: int, step: Any, a: dict[str, Any], shape: tuple[int, ...], mode: tuple[int, int]) -> _Val:
        for name in ("begin_mask", "end_mask", "squeeze_mask"):
            m = self.param(a, name)
            if m is not None and np.any(np.asarray(m)):
                raise _Unsupported(f"op {step.ctx.name!r}: slice_update with {name}")
        stride = self.param(a, "stride")
        if stride is not None and np.any(np.asarray(stride) != 1):
            raise _Unsupported(f"op {step.ctx.name!r}: slice_update with strides")
        x, upd, begin, end = (self.arg(a, n) for n in ("x", "update", "begin", "end"))
        if len(x.shape) != 4 or begin.size != 4 or end.size != 4 or x.shape != shape:
            raise _Unsupported(f"op {step.ctx.name!r}: slice_update of a rank-{len(x.shape)} value")
        slot_x = a["x"][0]
        if x.buf >= 1 and slot_x >= 0 and self.last_read.get(slot_x, -1) <= i and self.aliases(x) == 1:
            out = x  # the state's old value is read by nothing later: update the cache in place
        else:
            out = self.alloc(shape)
            self.emit(_vm.COPY, (_vm.R_NONE, 0), shape, self.contiguous(out), self.contiguous(x))
        if len(upd.shape) > 4 or upd.size == 0:
            raise _Unsupported(f"op {step.ctx.name!r}: update of shape {upd.shape}")
        ud = _pad4(upd.shape, _strides(upd.shape))
        if 1 <= out.buf <= len(self.states) and self.state_f16.get(out.buf - 1):  # type: ignore[attr-defined]
            mode = (_vm.R_F16, 0)  # into an fp16 state: its values are fp16 (a no-op on fp16 updates)
        self.emit(_vm.SCATTER, mode, ud[0], (out.buf, out.off, _strides(shape)), (upd.buf, upd.off, ud[1]),
                  (begin.buf, begin.off, (0, 0, 0, 1)), (end.buf, end.off, (0, 0, 0, 1)), params=shape)
        return out

    def aliases(self, v: _Val) -> int:
        """How many slots hold ``v``'s buffer (a reshape of a state's old value would also see the update)."""
        return sum(1 for w in self.vals.values() if (w.buf, w.off) == (v.buf, v.off))


@dataclass
class _Program:
    """A translated function: what :class:`FusedFunction` runs and ``executor/fused_store.py`` persists."""

    prog: np.ndarray
    arena: np.ndarray
    big: list[np.ndarray]
    terns: list[np.ndarray]  # uint8 [N, K/4] 2-bit codes
    halves: list[np.ndarray]  # uint16 [ceil(N/64), K, 64] fp16 bits (half.py's layout)
    inputs: list[tuple[str, _Val]]
    outputs: list[tuple[str, _Val]]
    states: list[str]
    init: list[tuple[int, np.ndarray]]  # (arena offset, float32 values): the arena's constants
    state_shapes: list[tuple[int, ...]]
    half_rows: list[int]


def _build(ex: Any) -> _Program:
    b = _Builder(ex)
    block = ex._block
    b.state_f16 = {}  # type: ignore[attr-defined]  # state index -> its dtype is fp16
    inputs: list[tuple[str, _Val]] = []
    for name, slot, is_state in ex._input_slots:
        if is_state:
            spec = ex._state_compute[name]
            if np.dtype(spec.dtype) not in (F16, F32) or any(d is None for d in spec.shape):
                raise _Unsupported(f"state {name!r} of dtype {spec.dtype}")
            b.state_slots[slot] = b.states.index(name)
            b.state_f16[b.states.index(name)] = np.dtype(spec.dtype) == F16  # type: ignore[attr-defined]
            b.state_shapes.append(tuple(int(d) for d in spec.shape))
        else:
            spec = ex._inputs[name]
            if any(d is None for d in spec.shape) or np.dtype(spec.dtype).kind not in "biuf":
                raise _Unsupported(f"input {name!r}: flexible shape or dtype {spec.dtype}")
            v = b.alloc(tuple(int(d) for d in spec.shape), keep=True)
            b.vals[slot] = v
            inputs.append((name, v))
    for i, step in enumerate(block.steps):
        for _, slot in step.slot_args:
            b.last_read[slot] = i
        for _, refs in step.tuples:
            for slot, _c in refs:
                if slot >= 0:
                    b.last_read[slot] = i
    ends = {slot for slot, _c in block.outputs if slot >= 0}
    for i, step in enumerate(block.steps):
        b.step(i, step)
        b.release(i, step, ends)
    outputs = []
    for name, (slot, _c) in zip(ex._outputs, block.outputs, strict=True):
        if slot < 0 or slot not in b.vals:
            raise _Unsupported(f"output {name!r} is not computed per call")
        outputs.append((name, b.vals[slot]))
    arena = np.zeros(max(b.arena, 1), dtype=np.float32)
    for off, vals in b.init:
        arena[off:off + vals.size] = vals
    prog = np.stack(b.rows) if b.rows else np.zeros((0, _vm.WIDTH), np.int64)
    # big constants' buffer ids: after the arena and the states
    first = 1 + len(b.states)
    for base in (_vm.OUT, _vm.A, _vm.B, _vm.C):
        neg = prog[:, base] < 0
        prog[neg, base] = first - 1 - prog[neg, base]
    fix = {n: (_Val(first - 1 - v.buf, v.off, v.shape) if v.buf < 0 else v) for n, v in outputs}
    return _Program(np.ascontiguousarray(prog), arena, b.big, b.terns, b.halves, inputs,
                    [(n, fix[n]) for n, _ in outputs], b.states, b.init,
                    list(b.state_shapes), b.half_rows)


def _f16_states(p: _Program) -> str | None:
    """None when the KV states can be held as fp16 bits by the C kernel (half the bytes each call reads),
    else why not. Exact when only the cache writes (``SCATTER`` rounding to fp16: the state's dtype) write
    a state and only the attention products (the dense ``MATMUL`` forms, reading y) read one: the fp16
    values are what a float32 state holds (``executor/_vm.c``, ``vm_run``)."""
    first, last = 1, len(p.states)
    if not p.states:
        return "no states"
    if any(first <= v.buf <= last for _, v in p.outputs):
        return "an output is a state"
    for row in p.prog:
        op = int(row[_vm.OP])
        touch = [first <= int(row[base]) <= last for base in (_vm.OUT, _vm.A, _vm.B, _vm.C)]
        if not any(touch):
            continue
        if op == _vm.SCATTER and touch == [True, False, False, False] and int(row[_vm.RND]) == _vm.R_F16:
            continue
        if op == _vm.MATMUL and touch == [False, False, True, False]:
            k, ska, skb = int(row[_vm.P]), int(row[_vm.P + 1]), int(row[_vm.P + 2])
            sna, sma, d3 = int(row[_vm.B + 5]), int(row[_vm.A + 4]), int(row[_vm.D + 3])
            dense = ska == 1 and sma == k and int(row[_vm.OUT + 5]) == 1 and int(row[_vm.OUT + 4]) == d3
            if dense and ((skb == 1 and sna == k) or (sna == 1 and skb == d3)):
                continue
        return f"instruction {op} reads or writes a state"
    return None


def _addresses(arrays: list[np.ndarray]) -> np.ndarray:
    """``[address, *shape]`` of each (C-contiguous) array: how the kernel finds them (``_vm.run``)."""
    ndim = {a.ndim for a in arrays}
    rows = [(a.ctypes.data, *a.shape) for a in arrays]
    return np.array(rows, dtype=np.int64).reshape(len(arrays), 1 + (ndim.pop() if ndim else 0))


class FusedFunction:
    """One function of a package run by the fused kernel against an interpreter's :class:`ExecutorState`."""

    def __init__(self, p: _Program, out_dtypes: dict[str, np.dtype | None], *, fp32: bool, ops: int,
                 kernel_name: str = "auto") -> None:
        self._run, self.kernel, self.kernel_note = kernel(kernel_name)
        self._p = p
        self.ops = ops
        self.instructions = int(p.prog.shape[0])
        self._out_dtypes = dict(out_dtypes)
        self._fp32 = fp32
        # the buffers (the kernel gets their addresses: these references keep them alive)
        self._py_bufs = [p.arena] + [np.zeros(1, np.float32)] * len(p.states) + p.big
        # [address, length, kind]: kind 1 an fp16 buffer (the C kernel's KV states, see _f16_states)
        self._bufs = np.zeros((len(self._py_bufs), 3), np.int64)
        self._bufs[:, :2] = _addresses(self._py_bufs)
        why = _f16_states(p) if self.kernel == "native" else "the numba kernel reads float32 states"
        # the dtype the KV states are held in between calls (fp16: the C kernel reads half the bytes)
        self.state_dtype = F16 if why is None else F32
        self._held: list[Any] = [None] * len(p.states)
        self._terns = _addresses(p.terns) if p.terns else np.zeros((0, 3), np.int64)
        self._halves = _addresses(p.halves) if p.halves else np.zeros((0, 4), np.int64)
        self._run(p.prog[:0], self._bufs, self._terns, self._halves)  # load the kernel now, not in a call

    def predict(self, inputs: dict[str, np.ndarray], state: Any) -> dict[str, np.ndarray]:
        p = self._p
        for name, v in p.inputs:
            arr = np.asarray(inputs[name])
            if arr.size != v.size:
                raise InputError(f"input {name!r} has {arr.size} values; the package declares shape {list(v.shape)}")
            if arr.dtype.kind in "iu" and arr.size and int(np.abs(arr.astype(np.int64)).max()) >= EXACT_INT:
                raise InputError(f"input {name!r}: values beyond 2**24 are not valid ids or positions")
            p.arena[v.off:v.off + v.size] = arr.reshape(-1)
        sd = self.state_dtype
        for i, name in enumerate(p.states):
            held = state._values[name]
            if held is not self._held[i]:
                if held.dtype != sd or not held.flags.c_contiguous or not held.flags.writeable:
                    # to fp16: exact (an fp16 state's values are fp16; the interpreter widens it back on entry)
                    held = np.ascontiguousarray(held, dtype=sd).copy()
                    state._values[name] = held
                self._py_bufs[1 + i] = held.reshape(-1)  # a view: keeps the array alive
                self._bufs[1 + i] = (held.ctypes.data, held.size, int(sd == F16))
                self._held[i] = held
        err, pc = self._run(p.prog, self._bufs, self._terns, self._halves)
        if err:
            what = "gather index" if err == _vm.E_INDEX else "cache slice"
            raise InputError(f"fused decode: {what} out of range at instruction {pc}; check the input values "
                             "(token ids below the vocabulary size, a position inside the context)")
        out = {}
        for name, v in p.outputs:
            arr = self._py_bufs[v.buf][v.off:v.off + v.size].reshape(v.shape).copy()
            dt = self._out_dtypes[name]
            if dt is not None and dt != F32 and not (dt == F16 and self._fp32):
                arr = arr.astype(dt)
            out[name] = arr
        return out


def fuse(ex: Any, kernel_name: str = "auto") -> tuple[FusedFunction | None, str | None]:
    """``(FusedFunction, None)`` for the interpreter's executor ``ex``, or ``(None, reason)``;
    ``kernel_name``: which kernel runs it (:data:`KERNELS`)."""
    try:
        return FusedFunction(_build(ex), dict(zip(ex._outputs, ex._output_dtypes, strict=True)), fp32=ex.fp32,
                             ops=len(ex._block.steps), kernel_name=kernel_name), None
    except _Unsupported as e:
        log.info("fused decode not used for %s (%s): %s", ex.source, ex.function_name, e)
        return None, str(e)
