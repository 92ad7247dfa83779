"""Compile a MIL function once into a flat list of steps the executor walks on every call.

Each non-constant op becomes one :class:`Step`: its registered implementation, where each input
comes from (a slot of the per-call environment, or a value fixed at load), the slots its outputs go
to and the dtype each output is rounded to. ``const`` and ``constexpr_*`` ops, and any pure op whose
inputs are all constant (a transposed or cast weight, a shape computation), are evaluated here, once,
so a prediction never touches work proportional to the weight size except the matmuls themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitnet_coreml._quiet import coremltools
from bitnet_coreml.errors import (
    BitnetCoremlError,
    InputError,
    InternalError,
    ModelError,
    OperationError,
    ResourceMemoryError,
    UnsupportedOpError,
    is_bug,
)
from bitnet_coreml.executor import half, registry
from bitnet_coreml.executor._fp16 import round_to_fp16
from bitnet_coreml.executor._types import np_dtype, static_shape
from bitnet_coreml.executor.blobs import PackedBits
from bitnet_coreml.executor.packed import PACKED, keeps_packed
from bitnet_coreml.executor.registry import OpContext

__all__ = ["CompiledBlock", "Step", "compile_function", "run_block", "StateCell", "finish", "plan_frees"]

log = logging.getLogger(__name__)

F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)

# Control-flow ops whose nested blocks the executor compiles; every other op with blocks is refused.
_BLOCK_OPS = {"cond", "while_loop"}
# Ops whose every output value is one of their input values (data movement, selection, max/min,
# comparisons with a constant bound) or an integer no larger than an input's magnitude (floor, ceil,
# round, sign). When all their floating-point inputs are typed fp16 (so hold fp16 values), their
# fp16 results are fp16 values already: rounding them again would change nothing, so it is skipped.
# The decompression ops that copy LUT entries or sparse non-zeros are among them: skipping their
# rounding at load saves two passes over every weight of a palettized model.
_VALUE_PRESERVING = frozenset({
    "constexpr_lut_to_dense", "constexpr_sparse_to_dense", "constexpr_lut_to_sparse",
    "identity", "reshape", "reshape_like", "transpose", "expand_dims", "squeeze", "flatten2d",
    "concat", "stack", "split", "tile", "slice_by_index", "slice_by_size", "slice_update", "reverse",
    "reverse_sequence", "gather", "gather_along_axis", "gather_nd", "select", "pad", "band_part",
    "depth_to_space", "space_to_depth", "pixel_shuffle", "pixel_unshuffle", "space_to_batch",
    "batch_to_space", "sliding_windows", "fill", "fill_like", "one_hot", "read_state", "topk",
    "relu", "relu6", "threshold", "abs", "sign", "floor", "ceil", "round", "clip", "maximum",
    "minimum", "reduce_max", "reduce_min", "max_pool",
})
# Dtypes whose every value is exactly representable in fp16 (a cast from them to fp16 is exact).
_FP16_EXACT_SOURCES = frozenset({np.dtype(np.float16), np.dtype(np.bool_), np.dtype(np.int8), np.dtype(np.uint8)})


class StateCell:
    """The mutable holder a state input's slot points to during one call."""

    __slots__ = ("value", "dtype", "name")

    def __init__(self, name: str, value: np.ndarray, dtype: np.dtype) -> None:
        self.name = name
        self.value = value
        self.dtype = dtype


@dataclass(slots=True)
class Step:
    fn: Any
    ctx: OpContext
    args: tuple[tuple[str, int, Any], ...]
    tuples: tuple[tuple[str, tuple[tuple[int, Any], ...]], ...]
    out_slots: tuple[int, ...]
    out_dtypes: tuple[np.dtype | None, ...]
    needs_env: bool
    # derived once: the constant arguments as a dict to copy, and (name, slot) of the per-call ones
    consts: dict[str, Any] = field(default_factory=dict)
    slot_args: tuple[tuple[str, int], ...] = ()
    # slots whose values nothing reads after this step: dropped right after it (see plan_frees)
    frees: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.consts = {name: const for name, slot, const in self.args if slot < 0}
        self.slot_args = tuple((name, slot) for name, slot, _ in self.args if slot >= 0)


@dataclass
class CompiledBlock:
    steps: list[Step]
    input_slots: tuple[int, ...]
    # (slot, constant): slot < 0 means the output is the constant.
    outputs: tuple[tuple[int, Any], ...]


def _slots_read(step: Step) -> set[int]:
    """Every env slot ``step`` reads, including those read by the ops of its nested blocks."""
    read = {slot for _, slot in step.slot_args}
    read.update(slot for _, refs in step.tuples for slot, _ in refs if slot >= 0)
    for block in step.ctx.blocks:
        for inner in block.steps:
            read |= _slots_read(inner)
        read.update(slot for slot, _ in block.outputs if slot >= 0)
    return read


def plan_frees(block: CompiledBlock) -> None:
    """Give each step of a top-level block the slots to drop after it: those no later step reads.

    Without this every intermediate value of a call stays referenced until the call ends (~470 MB
    per call on the 200M model); glibc then returns that memory at the end of each call and the next
    call page-faults all of it back in, which cost ~40% of the call. Nested blocks (cond /
    while_loop bodies, which may run many times) free nothing themselves; their reads count as reads
    by the op that owns them.
    """
    last: dict[int, int] = {}
    for i, step in enumerate(block.steps):
        for slot in step.out_slots:
            last[slot] = i  # an output nothing reads is dropped right after the step that made it
        for slot in _slots_read(step):
            last[slot] = i
    keep = {slot for slot, _ in block.outputs if slot >= 0}
    frees: dict[int, list[int]] = {}
    for slot, i in last.items():
        if slot not in keep:
            frees.setdefault(i, []).append(slot)
    for i, step in enumerate(block.steps):
        step.frees = tuple(sorted(frees.get(i, ())))


# Constants up to this many bytes are keyed by their value when no blob key names them (scalars, shapes).
_VALUE_KEY_BYTES = 256


@dataclass
class _Compiler:
    fp32: bool
    slots: dict[int, int] = field(default_factory=dict)
    consts: dict[int, Any] = field(default_factory=dict)
    n_slots: int = 0
    folded: int = 0
    unknown: dict[str, str] = field(default_factory=dict)
    # Sharing with other functions of the package (executor/shared.py): blob key per MIL name of this
    # function, values computed so far by key (None: share nothing), and the key of each const var.
    blob_keys: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    shared: dict[tuple[Any, ...], Any] | None = None
    keys: dict[int, tuple[Any, ...] | None] = field(default_factory=dict)
    reused: int = 0
    # weights the loader left in the package file (executor/blobs.py), read here as they are met
    blobs: Any = None

    def blob_key(self, var: Any) -> tuple[Any, ...] | None:
        """The blob entry a constant comes from, when known (by its name, or as a lazy weight)."""
        k = self.blob_keys.get(var.name)
        if k is None and self.blobs is not None:
            k = self.blobs.key(var.val)
        return k

    def const_key(self, var: Any, value: Any) -> tuple[Any, ...] | None:
        """What identifies a constant across functions: its blob entry, or its value when small."""
        k = self.blob_key(var)
        if k is not None:
            return k
        if isinstance(value, str):
            return ("str", value)
        if isinstance(value, np.ndarray) and value.nbytes <= _VALUE_KEY_BYTES:
            return ("val", value.dtype.str, value.shape, value.tobytes())
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return ("strs", tuple(value))
        return None

    def new_const(self, var: Any) -> Any:
        key = self.blob_key(var)
        if key is not None and self.shared is not None and ("const", self.fp32, key) in self.shared:
            value = self.shared[("const", self.fp32, key)]  # another function read this weight already
            self.reused += 1
            self.consts[id(var)] = value
            self.keys[id(var)] = key
            return value
        value = self.const_value(var)
        key = key or self.const_key(var, value)
        if key is not None and self.shared is not None:
            held = self.shared.setdefault(("const", self.fp32, key), value)
            if held is not value:
                self.reused += 1
                value = held
        self.consts[id(var)] = value
        self.keys[id(var)] = key
        return value

    def fold_key(self, op: Any) -> tuple[Any, ...] | None:
        """Key of the values ``op`` folds to: its type and its inputs' keys (None if any is unknown)."""
        parts: list[Any] = [op.op_type]
        for name, var in op.inputs.items():
            vs = var if isinstance(var, (list, tuple)) else (var,)
            for v in vs:
                k = self.blob_keys.get(f"{op.outputs[0].name}:{name}") or self.keys.get(id(v))
                if k is None:
                    return None
                parts.append((name, k))
        return tuple(parts)

    def dtype_of(self, var: Any) -> np.dtype | None:
        try:
            dt = np_dtype(var.dtype)
        except Exception:  # noqa: BLE001 - list vars (make_list) have no dtype
            dt = None
        if dt == F16 and self.fp32:
            return F32
        return dt

    def new_slot(self, var: Any) -> int:
        slot = self.n_slots
        self.n_slots += 1
        self.slots[id(var)] = slot
        return slot

    def const_value(self, var: Any) -> Any:
        """A const var's value in compute form: str stays str, fp16 arrays become fp32 (exact), except
        large 2-D fp16 weights, kept as :class:`~bitnet_coreml.executor.half.HalfWeight`."""
        val = var.val
        if self.blobs is not None and self.blobs.is_lazy(val):  # a weight still in the package file
            val = self.blobs.materialize(val, packed=_reads_packed(var))
            if val.__class__ is PackedBits:
                return val
        if isinstance(val, str):
            return val
        if isinstance(val, (list, tuple)) and val and isinstance(val[0], str):
            return val
        arr = np.asarray(val)
        if arr.dtype == F16 and arr.ndim == 2 and arr.nbytes >= half.MIN_BYTES:
            return half.HalfWeight(arr)  # kept at 2 bytes (an embedding / lm_head): executor/half.py
        dt = self.dtype_of(var)
        if dt is not None and arr.dtype != dt and arr.dtype.kind != "U":
            arr = arr.astype(dt)
        return compute_form(arr)

    def ref(self, var: Any) -> tuple[int, Any]:
        key = id(var)
        if key in self.consts:
            return -1, self.consts[key]
        if key in self.slots:
            return self.slots[key], None
        if var.op is not None and var.op.op_type == "const":
            return -1, self.new_const(var)
        raise ModelError(f"MIL var {var.name!r} is used before it is defined")

    def compile_block(self, block: Any, input_vars: list[Any] | None = None) -> CompiledBlock:
        in_slots = tuple(self.new_slot(v) for v in (input_vars if input_vars is not None else block.inputs))
        steps: list[Step] = []
        for op in block.operations:
            self.compile_op(op, steps)
        outputs = tuple(self.ref(v) for v in block.outputs)
        return CompiledBlock(steps=steps, input_slots=in_slots, outputs=outputs)

    def compile_op(self, op: Any, steps: list[Step]) -> None:
        if op.op_type == "const":
            for v in op.outputs:
                self.new_const(v)
            return
        if not registry.is_registered(op.op_type):
            self.unknown.setdefault(op.op_type, op.name)
            for v in op.outputs:
                self.new_slot(v)
            return
        entry = registry.lookup(op.op_type)
        blocks: tuple[CompiledBlock, ...] = ()
        if op.blocks:
            if op.op_type not in _BLOCK_OPS:
                raise UnsupportedOpError(f"op {op.name!r}: nested blocks of {op.op_type!r} are not supported")
            blocks = tuple(self.compile_block(b) for b in op.blocks)
        args: list[tuple[str, int, Any]] = []
        tuples: list[tuple[str, tuple[tuple[int, Any], ...]]] = []
        all_const = True
        for name, var in op.inputs.items():
            if isinstance(var, (list, tuple)):
                refs = tuple(self.ref(v) for v in var)
                all_const &= all(s < 0 for s, _ in refs)
                tuples.append((name, refs))
            else:
                slot, const = self.ref(var)
                all_const &= slot < 0
                if const.__class__ in PACKED and not keeps_packed(op, name, const):
                    const = const.dense()  # a packed weight read by an op that does not compute with it
                elif const.__class__ is PackedBits and not (op.op_type == "constexpr_lut_to_dense" and name == "indices"):
                    const = const.unpack()
                args.append((name, slot, const))
        ctx = OpContext(
            name=op.name,
            op_type=op.op_type,
            out_dtypes=tuple(self.dtype_of(v) for v in op.outputs),
            out_shapes=tuple(static_shape(v) for v in op.outputs),
            blocks=blocks,
            run_block=run_block if blocks else None,
        )
        out_dtypes = ctx.out_dtypes
        if F16 in out_dtypes and _fp16_exact(op):
            # fp16 values stay in their float32 compute form: only the container dtype is checked
            out_dtypes = tuple(F32 if d == F16 else d for d in out_dtypes)
        step = Step(
            fn=entry.fn,
            ctx=ctx,
            args=tuple(args),
            tuples=tuple(tuples),
            out_slots=(),
            out_dtypes=out_dtypes,
            needs_env=entry.needs_env,
        )
        if all_const and entry.pure and not blocks:
            # Evaluate once at load (constexpr_* decompression, weight transposes, shape arithmetic);
            # once per package when another function already folded the same op of the same weights.
            fkey = self.fold_key(op) if self.shared is not None else None
            held = self.shared.get(("fold", self.fp32, fkey)) if fkey is not None else None  # type: ignore[union-attr]
            if held is not None:
                values = held
                self.reused += 1
            else:
                with np.errstate(all="ignore"):
                    values = _call(step, None)
                # contiguous once at load: numpy only uses BLAS for matmuls whose last axis has unit
                # stride, and a folded transpose of a weight is a strided view
                values = tuple(np.ascontiguousarray(v) if isinstance(v, np.ndarray) and not v.flags.c_contiguous
                               else v for v in (compute_form(x) for x in values))
                if fkey is not None:
                    self.shared[("fold", self.fp32, fkey)] = values  # type: ignore[index]
            for i, (v, value) in enumerate(zip(op.outputs, values, strict=False)):
                self.consts[id(v)] = value
                self.keys[id(v)] = None if fkey is None else ("fold", fkey, i)
            self.folded += 1
            return
        step.out_slots = tuple(self.new_slot(v) for v in op.outputs)
        steps.append(step)


def _reads_packed(var: Any) -> bool:
    """True when every reader of ``var`` is a LUT decompression taking it as its (sub-byte) indices."""
    readers = list(getattr(var, "child_ops", ()) or ())
    return bool(readers) and all(op.op_type == "constexpr_lut_to_dense" and op.inputs.get("indices") is var
                                 for op in readers)


def _fp16_exact(op: Any) -> bool:
    """True when ``op``'s fp16 outputs are exact without rounding (see _VALUE_PRESERVING)."""
    if op.op_type == "cast":
        return np_dtype(op.inputs["x"].dtype) in _FP16_EXACT_SOURCES
    if op.op_type not in _VALUE_PRESERVING:
        return False
    for var in op.inputs.values():
        for v in var if isinstance(var, (list, tuple)) else (var,):
            try:
                dt = np_dtype(v.dtype)  # None: a string parameter, carries no values
            except Exception:  # noqa: BLE001 - list vars have no dtype: not provably exact
                return False
            if dt is not None and dt.kind == "f" and dt != F16:
                return False
    return True


def compute_form(value: Any) -> Any:
    """fp16 arrays are kept as fp32 copies (exact) because every op computes in fp32."""
    if isinstance(value, np.ndarray) and value.dtype == F16:
        return value.astype(F32)
    return value


def finish(value: Any, dt: np.dtype | None, *, inplace: bool = False) -> Any:
    """Round an op result to its declared MIL dtype (fp16 overflow and rounding happen here).

    fp16-typed results are kept in float32 arrays holding exactly the fp16 values: ops compute in
    fp32 anyway, and numpy's float16 conversions cost a hundred times an add. ``inplace``: the
    value is an array the op made itself, whose memory the rounding may reuse.
    """
    if dt is None or value.__class__ in PACKED:  # a packed weight stays packed (executor/packed.py)
        return value
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    if dt == F16:
        return round_to_fp16(arr, inplace=inplace)
    if arr.dtype != dt:
        arr = arr.astype(dt)
    return arr


def _gather_args(step: Step, env: list[Any] | None) -> dict[str, Any]:
    # No fp16 arrays ever sit in env or among constants (inputs are widened on entry, finish()
    # keeps fp16 values in float32, constants are in compute form), so no conversion here.
    a = step.consts.copy()
    for name, slot in step.slot_args:
        a[name] = env[slot]  # type: ignore[index]
    for name, refs in step.tuples:
        a[name] = tuple(const if slot < 0 else env[slot] for slot, const in refs)  # type: ignore[index]
    return a


def _op_error(step: Step, e: Exception) -> BitnetCoremlError:
    if is_bug(e):  # our op implementation is wrong: not an op failure to retry
        return InternalError(f"the reference executor, op {step.ctx.name!r} ({step.ctx.op_type})", e)
    if isinstance(e, MemoryError):
        return ResourceMemoryError(f"op {step.ctx.name!r} ({step.ctx.op_type}) ran out of memory in the reference "
                                   f"executor: {type(e).__name__}: {e}")
    return OperationError(
        f"op {step.ctx.name!r} ({step.ctx.op_type}) failed in the reference executor: {type(e).__name__}: {e}"
    )


def _count_error(step: Step, n: int) -> OperationError:
    return OperationError(
        f"op {step.ctx.name!r} ({step.ctx.op_type}) produced {n} outputs, MIL declares {len(step.out_dtypes)}"
    )


def _call(step: Step, env: list[Any] | None) -> tuple[Any, ...]:
    a = _gather_args(step, env)
    try:
        out = step.fn(step.ctx, a, env) if step.needs_env else step.fn(step.ctx, a)
    except InputError as e:  # the op found the inputs' values out of its domain: name the op
        raise InputError(f"op {step.ctx.name!r} ({step.ctx.op_type}): {e}") from e
    except BitnetCoremlError:
        raise
    except Exception as e:
        raise _op_error(step, e) from e
    if not isinstance(out, tuple):
        out = (out,)
    if len(out) != len(step.out_dtypes):
        raise _count_error(step, len(out))
    return tuple(finish(o, dt) for o, dt in zip(out, step.out_dtypes, strict=False))


def run_block(block: CompiledBlock, env: list[Any], inputs: tuple[Any, ...] = ()) -> list[Any]:
    """Run a compiled block on ``env``; returns its output values (fp16-typed ones as rounded float32).

    Callers run it under ``np.errstate(all="ignore")``: fp16 overflow to inf, NaN from inf - inf and
    division by zero are results to reproduce, not warnings (set once per call, not per op: cheap).
    """
    for slot, value in zip(block.input_slots, inputs, strict=False):
        env[slot] = value
    for step in block.steps:
        if len(step.out_slots) == 1 and not step.needs_env:
            # the common case, inlined: one output, no nested blocks
            a = _gather_args(step, env)
            try:
                out = step.fn(step.ctx, a)
            except InputError as e:  # the op found the inputs' values out of its domain: name the op
                raise InputError(f"op {step.ctx.name!r} ({step.ctx.op_type}): {e}") from e
            except BitnetCoremlError:
                raise
            except Exception as e:
                raise _op_error(step, e) from e
            if out.__class__ is tuple:
                if len(out) != 1:
                    raise _count_error(step, len(out))
                out = out[0]
            dt = step.out_dtypes[0]
            # an array the op made itself is rounded in place; one that is (a view of) an input or
            # constant, e.g. a cast returning its input, is copied first
            fresh = (dt == F16 and out.__class__ is np.ndarray and out.flags.owndata
                     and all(v is not out for v in a.values()))
            env[step.out_slots[0]] = finish(out, dt, inplace=fresh)
            for slot in step.frees:
                env[slot] = None
            continue
        outs = _call(step, env)
        for slot, o in zip(step.out_slots, outs, strict=False):
            env[slot] = o
        for slot in step.frees:
            env[slot] = None
    return [const if slot < 0 else env[slot] for slot, const in block.outputs]


def compile_function(func: Any, *, fp32: bool, blob_keys: dict[str, tuple[Any, ...]] | None = None,
                     shared: dict[tuple[Any, ...], Any] | None = None,
                     blobs: Any = None) -> tuple[CompiledBlock, int, int]:
    """Compile a MIL function; returns ``(block, number of env slots, number of ops folded at load)``.

    ``shared`` (with the function's ``blob_keys``) holds constants and folded values by key across
    the functions of one package: what another function computed from the same weights is reused.
    ``blobs``: the package's weights the loader left in its file (``executor/blobs.py``).
    """
    coremltools()
    comp = _Compiler(fp32=fp32, blob_keys=dict(blob_keys or {}), shared=shared, blobs=blobs)
    input_vars = list(func.inputs.values())
    block = comp.compile_block(func, input_vars)
    plan_frees(block)
    if comp.unknown:
        listed = ", ".join(f"{t} (first at op {n!r})" for t, n in sorted(comp.unknown.items()))
        err = UnsupportedOpError(
            f"the reference executor has no implementation of MIL op(s) {listed}; "
            f"supported: {', '.join(registry.supported_ops())}"
        )
        err.ops = sorted(comp.unknown)  # type: ignore[attr-defined]  # for callers that group by op
        raise err
    log.debug("compiled %d steps, %d ops folded at load, %d constants shared", len(block.steps), comp.folded,
              comp.reused)
    return block, comp.n_slots, comp.folded
