"""Lowering of ``bitnet_coreml::KVCacheUpdate`` to Core ML state ops, and the cross-function weight pass.

``KVCacheUpdate(Cache, New, Position)`` (see ``frontend/hf_stateful.py``): ``Cache`` is a graph input
the program builder made a Core ML state (fp16: the only state type Core ML supports, iOS18). The
lowering is the in-place pattern Core ML recognises::

    c = read_state(Cache)
    u = slice_update(c, cast(New, fp16), begin=[0, 0, p, 0], end=[1, Hkv, p+S, d])
    y = coreml_update_state(Cache, u)          # writes the state, returns the new cache
    Y = cast(y, New's dtype)

``share_weights_across_functions`` runs last in the pass pipeline of a multifunction program: it
gives every constant that several functions hold the same ``weight_id``, so the package stores it
once (coremltools' ``save_multifunction`` does the same through ``const_deduplication``, comparing
values pairwise with ``allclose``; here an array object the functions share is taken as equal to
itself, and only other candidates with the same leading bytes are compared whole).

``merge_equal_weights`` runs before coremltools' ``const_deduplication`` in every program: large
constants with equal bytes within one function (a tied embedding's halves, used by the gather and
by the lm_head) become one, found by hashing. coremltools hashes only the first elements and then
confirms each match with ``np.allclose`` over the whole array (about 0.4 s per 16000 x 1024 half).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from bitnet_coreml._quiet import coremltools
from bitnet_coreml.errors import UnsupportedOpError
from bitnet_coreml.lower.registry import LoweringContext, lowering
from bitnet_coreml.vocab import DOMAIN

SHARE_PASS = "bitnet_coreml::share_weights_across_functions"
MERGE_PASS = "bitnet_coreml::merge_equal_weights_pass"
# coremltools writes consts with fewer elements inline (backend/mil/helper.py should_use_weight_file)
_INLINE_BELOW = 10
# smaller constants are left to coremltools' const_deduplication, whose allclose check is cheap for them
_MERGE_MIN = 100_000
NAME_PASS = "bitnet_coreml::name_state_writes_pass"


@lowering("KVCacheUpdate", domain=DOMAIN)
def lower_kv_cache_update(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    nm = ctx.name(node)
    state, new, pos = ctx.input(node, 0), ctx.input(node, 1), ctx.input(node, 2)
    if state is None or not types.is_state(getattr(state, "sym_type", None)):
        raise UnsupportedOpError(f"node {node.name!r} (KVCacheUpdate): input 0 must be a state (a graph input listed "
                                 "in the model's bitnet_coreml.states metadata)")
    if isinstance(new, np.ndarray):
        new = mb.const(val=new.astype(np.float32), name=f"{nm}_new")
    if isinstance(pos, np.ndarray):
        pos = mb.const(val=pos.astype(np.int32), name=f"{nm}_pos")
    if new is None or pos is None:
        raise UnsupportedOpError(f"node {node.name!r} (KVCacheUpdate): inputs 1 (new) and 2 (position) are required")
    shape = tuple(int(d) for d in new.shape)
    cache_shape = tuple(int(d) for d in state.sym_type.wrapped_type().get_shape())
    half = new.dtype == types.fp16
    new16 = new if half else mb.cast(x=new, dtype="fp16", name=f"{nm}_new16")
    cache = mb.read_state(input=state, name=f"{nm}_read")
    zero = np.zeros(1, np.int32)
    begin = mb.concat(values=[zero, zero, pos, zero], axis=0, name=f"{nm}_begin")
    end = mb.concat(values=[np.array([cache_shape[0]], np.int32), np.array([cache_shape[1]], np.int32),
                            mb.add(x=pos, y=np.int32(shape[2]), name=f"{nm}_stop"),
                            np.array([cache_shape[3]], np.int32)], axis=0, name=f"{nm}_end")
    upd = mb.slice_update(x=cache, update=new16, begin=begin, end=end, name=f"{nm}_slice_update")
    out = mb.coreml_update_state(state=state, value=upd, name=f"{nm}_write")
    return [out if half else mb.cast(x=out, dtype="fp32", name=f"{nm}_y")]


def _digest(val: np.ndarray, seen: dict[int, str]) -> str:
    """A hash of ``val``'s bytes (``seen``: by array identity, for arrays held by several ops)."""
    import hashlib

    digest = seen.get(id(val))
    if digest is None:
        digest = hashlib.blake2b(np.ascontiguousarray(val).view(np.uint8).data, digest_size=20).hexdigest()
        seen[id(val)] = digest
    return digest


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` and ``b`` (same dtype and shape) hold the same bytes (NaNs and signed zeros included)."""
    return bool(np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8),
                               np.ascontiguousarray(b).reshape(-1).view(np.uint8)))


def _weight_key(op: Any, seen: dict[int, str]) -> tuple[Any, ...]:
    val = op.outputs[0].val
    # the MIL type too: uint2 indices live in uint8 numpy arrays
    return op.outputs[0].sym_type.__type_info__(), val.dtype.str, val.shape, _digest(val, seen)


def merge_equal_weights(prog: Any, min_elements: int = _MERGE_MIN) -> int:
    """Within each function, make every ``const`` of at least ``min_elements`` elements whose value
    equals an earlier one's (type, shape, bytes) use that one; returns how many were merged."""
    merged = 0
    for func in prog.functions.values():
        # candidates share type, shape and leading bytes; only those are hashed whole
        groups: dict[tuple[Any, ...], list[Any]] = {}
        for op in func.operations:
            val = op.outputs[0].val if op.op_type == "const" else None
            if isinstance(val, np.ndarray) and val.size >= min_elements and op.outputs[0] not in func.outputs:
                head = np.ascontiguousarray(val.reshape(-1)[:256]).tobytes()
                groups.setdefault((op.outputs[0].sym_type.__type_info__(), val.dtype.str, val.shape, head),
                                  []).append(op)
        seen: dict[int, str] = {}
        with func:
            for ops in groups.values():
                if len(ops) < 2:
                    continue
                first: dict[tuple[Any, ...], Any] = {}
                for op in ops:
                    keep = first.setdefault(_weight_key(op, seen), op.outputs[0])
                    if keep is not op.outputs[0]:
                        func.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=keep)
                        func.remove_ops([op])
                        merged += 1
    return merged


def share_weights(prog: Any) -> int:
    """Give every ``const`` whose value (dtype, shape, bytes) appears in several functions one shared
    ``weight_id``, so the package writes it once; returns the number of shared groups.

    The same as coremltools' ``const_deduplication._deduplicate_const_across_functions`` (what
    ``save_multifunction`` runs), without comparing every pair of candidates with ``allclose``: the
    functions of one build hold the same array objects for the same weight (``lower/program.py``'s
    ``shared``), and one object is equal to itself; other candidates with the same type, shape and
    leading bytes are compared whole.
    """
    groups: list[list[Any]] = []
    buckets: dict[tuple[Any, ...], list[tuple[np.ndarray, list[Any]]]] = {}
    for fname in sorted(prog.functions):
        for op in prog.functions[fname].operations:
            if op.op_type != "const" or op.weight_id is not None:
                continue
            val = op.outputs[0].val
            if not isinstance(val, np.ndarray) or val.size < _INLINE_BELOW:
                continue  # inlined in the program, not in weight.bin
            # the MIL type too: uint2 indices live in uint8 numpy arrays
            key = (op.outputs[0].sym_type.__type_info__(), val.dtype.str, val.shape,
                   np.ascontiguousarray(val.reshape(-1)[:256]).tobytes())
            reps = buckets.setdefault(key, [])
            group = next((g for rep, g in reps if rep is val), None)
            if group is None:
                group = next((g for rep, g in reps if _same_bytes(rep, val)), None)
            if group is None:
                group = []
                groups.append(group)
                reps.append((val, group))
            group.append(op)
    shared = 0
    for ops in groups:
        if len({op.enclosing_block for op in ops}) > 1:
            for op in ops:
                op.weight_id = f"shared_{shared}"
            shared += 1
    return shared




def name_state_writes(prog: Any) -> None:
    """Name every ``coreml_update_state`` after the op whose value it writes (``<op>_write``).

    coremltools' ``canonicalize_inplace_pattern`` re-creates these ops with names from a process-wide
    counter, so a second conversion in the same process would write other names: this keeps the
    package byte-identical however many conversions ran before.
    """
    for func in prog.functions.values():
        taken = {op.name for op in func.operations}
        for op in func.operations:
            if op.op_type != "coreml_update_state" or op.inputs["value"].op is None:
                continue
            base = name = f"{op.inputs['value'].op.name}_write"
            k = 1
            while name in taken and name != op.name:
                name, k = f"{base}_{k}", k + 1
            taken.add(name)
            op.name = name
            op.outputs[0].name = name


def register_share_pass() -> str:
    """Register this module's passes with coremltools (once); returns the weight-sharing pass's name."""
    coremltools()
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass

    if SHARE_PASS in PASS_REGISTRY:
        return SHARE_PASS

    @register_pass(namespace="bitnet_coreml")
    class merge_equal_weights_pass(AbstractGraphPass):  # coremltools names passes in snake case
        """Equal large constants within a function become one (hashed; see the module docstring)."""

        def apply(self, prog: Any) -> None:
            merge_equal_weights(prog)

    @register_pass(namespace="bitnet_coreml")
    class name_state_writes_pass(AbstractGraphPass):  # coremltools names passes in snake case
        """Deterministic names for the state writes coremltools' state passes re-created."""

        def apply(self, prog: Any) -> None:
            name_state_writes(prog)

    @register_pass(namespace="bitnet_coreml")
    class share_weights_across_functions(AbstractGraphPass):  # coremltools names passes in snake case
        """Constants equal across functions share one blob entry (``weight_id``); a no-op with one function."""

        def apply(self, prog: Any) -> None:
            if len(prog.functions) > 1:
                share_weights(prog)

    return SHARE_PASS
