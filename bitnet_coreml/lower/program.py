"""The program builder: walks an onnx-ir graph and emits one MIL program through the lowering registry.

``build_program(model, options)`` first names every node uniquely and deterministically, then checks
that every op has a lowering (one :class:`UnsupportedOpError` listing all missing ops, before any
work), then lowers node by node in the graph's topological order inside one MIL function whose
inputs have the graph's fixed shapes (int64 inputs become int32: Core ML has no int64 tensors).
Each graph output becomes a MIL output of the same name.

``convert_program`` turns the program into an ``MLModel`` with coremltools' default pass pipeline;
the ops that the fp16-safety analysis keeps in fp32 are excluded from the fp16 cast.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from bitnet_coreml._quiet import coremltools
from bitnet_coreml.errors import InputError, UnsupportedOpError
from bitnet_coreml.lower.registry import LoweringContext, get_lowering
from bitnet_coreml.lower.support import (
    assign_node_names,
    check_lowerable,
    input_dtype_message,
    max_rank,
    rank_message,
    safe_name,
)
from bitnet_coreml.vocab import DOMAIN, os_for_ios, os_names, os_versions

__all__ = ["BuildOptions", "BuiltProgram", "assign_node_names", "build_program", "check_supported", "convert_program",
           "safe_name", "target_for"]

log = logging.getLogger(__name__)

# Programs are built for an opset named by its iOS version (bitnet_coreml.vocab: iOS17 == macOS14).
_IOS = tuple(o.major for o in os_versions("ios", convertible=True))
MIN_IOS = _IOS[0]  # constexpr_lut_to_dense (2-bit ternary weights) needs iOS16 / macOS13
_SHARE_MIN_ELEMENTS = 1024  # fp16 copies of initializers at least this big are shared between functions' builds


@dataclass(frozen=True)
class BuildOptions:
    """How to build the program: compute precision, MIL opset (iOS version) and fp32-kept nodes."""

    precision: str = "fp16"
    ios: int = MIN_IOS
    fp32_nodes: frozenset[str] = frozenset()
    # (RMSNorm node name, factor its input was scaled by) from the fp16-safety analysis
    rmsnorm_input_scale: tuple[tuple[str, float], ...] = ()
    # build every op in fp16 (no fp32 program + coremltools' fp16 cast pass): float initializers and inputs
    # enter as fp16, a Cast/CastLike to float32 inside the graph builds fp16 too (the checkpoint graphs cast
    # their fp16 embedding rows up to float32 first), fp32-kept nodes are cast in and out by the builder.
    # convert() builds every fp16 program (stateless, stateful, chunked) this way.
    native_fp16: bool = False
    compact_names: bool = True  # short op names n<node index>_<j> (smaller model.mlmodel)

    def __post_init__(self) -> None:
        if self.precision not in ("fp16", "fp32"):
            raise InputError(f"precision must be 'fp16' or 'fp32', got {self.precision!r}")
        if self.ios not in _IOS:
            os_for_ios(self.ios)  # raises, naming the supported targets
            raise InputError(f"deployment target iOS{self.ios} is not supported; allowed: {os_names('ios')}")


@dataclass
class BuiltProgram:
    """The MIL program plus what the later stages need to know about it."""

    program: Any
    ios: int  # the opset the program needs (>= the requested one)
    input_names: dict[str, str]  # ONNX input name -> MIL input name
    output_names: dict[str, str]  # ONNX output name -> MIL output name
    fp32_ops: frozenset[str] = frozenset()  # MIL op names kept in fp32
    notes: list[str] = field(default_factory=list)
    # ONNX input/output name -> how the package declares it differently from the source graph (a scalar
    # as shape [1], bool as int32 0/1, int64 as int32): the package descriptions and notes say so.
    declared: dict[str, str] = field(default_factory=dict)


def target_for(ios: int, platform: str = "ios") -> Any:
    """The ``ct.target`` member for iOS version ``ios`` (macOS name when ``platform == 'macos'``)."""
    ct = coremltools()
    return getattr(ct.target, os_for_ios(ios, platform).name)


def ios_of_target(target: Any) -> int:
    """The iOS version number of a ``ct.target`` member (macOS members map to their iOS twin)."""
    ct = coremltools()
    for v in _IOS:
        if getattr(ct.target, f"iOS{v}") == target:
            return v
    if target < ct.target.iOS16:
        return 15
    return max(_IOS)


def _mil_dtype(v: ir.Value) -> Any:
    from coremltools.converters.mil.mil import types

    dt = v.dtype
    table = {
        ir.DataType.FLOAT: types.fp32, ir.DataType.FLOAT16: types.fp16, ir.DataType.INT64: types.int32,
        ir.DataType.INT32: types.int32, ir.DataType.BOOL: types.bool,
    }
    if dt not in table:
        raise InputError(input_dtype_message(v))
    return table[dt]


def _input_shape(v: ir.Value) -> tuple[int, ...]:
    if v.shape is None:
        raise InputError(f"graph input {v.name!r} has no shape; Core ML needs fixed input shapes")
    dims = []
    for d in v.shape:
        if not isinstance(d, int):
            raise InputError(
                f"graph input {v.name!r} has a dynamic dimension {str(d)!r} (shape {v.shape}); Core ML on the ANE "
                "needs fixed shapes: re-export with fixed shapes"
            )
        dims.append(d)
    return tuple(dims)


def graph_states(model: ir.Model) -> set[str]:
    """Names of the graph inputs that are Core ML states (the model's ``bitnet_coreml.states`` metadata)."""
    raw = model.metadata_props.get("bitnet_coreml.states")
    return set(json.loads(raw)) if raw else set()


def build_functions(models: dict[str, ir.Model], default: str, options: BuildOptions | None = None) -> BuiltProgram:
    """One multifunction MIL program: ``models[name]`` becomes function ``name`` (``default`` is the default).

    Every function is built by :func:`build_program` with the same options; they must have the same
    input and output names (they describe one model). The program needs iOS18 (multifunction).
    """
    coremltools()
    from coremltools.converters.mil.mil import Program

    if default not in models:
        raise InputError(f"default function {default!r} is not among {', '.join(models)}")
    options = options or BuildOptions()
    prog = Program()
    ios = 18
    fp32_ops: set[str] = set()
    notes: list[str] = []
    first: BuiltProgram | None = None
    shared: dict[Any, Any] = {}  # the graphs import the same checkpoint: convert each weight once
    for name, model in models.items():
        built = build_program(model, options, shared=shared)
        prog.add_function(name, built.program.functions["main"])
        ios = max(ios, built.ios)
        fp32_ops |= built.fp32_ops  # op names repeat across functions: keeping more in fp32 is the safe side
        notes += [f"{name}: {n}" for n in built.notes]
        first = first or built
    assert first is not None
    prog.default_function_name = default
    prog.export_as_multifunction = True
    return BuiltProgram(prog, ios, first.input_names, first.output_names, frozenset(fp32_ops), notes, first.declared)


def check_supported(model: ir.Model) -> None:
    """Raise the converter's static refusals of ``model`` (unsupported ops first; :mod:`.support`)."""
    check_lowerable(model)


def _as_var(value: Any, name: str) -> Any:
    from coremltools.converters.mil import Builder as mb

    if isinstance(value, np.ndarray) or np.isscalar(value):
        arr = np.asarray(value)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        elif arr.dtype == np.int64:
            arr = arr.astype(np.int32)
        return mb.const(val=arr, name=name)
    return value


def _compact_names(ops: list[Any], idx: int) -> None:
    """Name the MIL ops of ONNX node number ``idx`` ``n<idx>_<j>`` (outputs ``n<idx>_<j>[_<k>]``).

    Names derived from ONNX node names plus helper suffixes average ~35 characters and appear in
    the package once per definition and once per use: for a 200M-parameter model that is a few
    hundred KB of model.mlmodel. The node index keeps every op traceable to its ONNX node.
    """
    for j, op in enumerate(ops):
        op.name = f"n{idx}_{j}"
        for k, out in enumerate(op.outputs):
            out.name = op.name if k == 0 else f"{op.name}_{k}"


def build_program(model: ir.Model, options: BuildOptions | None = None, *,
                  shared: dict[Any, Any] | None = None) -> BuiltProgram:
    """Lower ``model`` (after the default passes) to a MIL program; see the module docstring.

    ``shared`` is a cache that builds of several graphs of the same model (the functions of a
    multifunction program) pass along: weights converted for one are reused by the next.
    """
    coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, types

    options = options or BuildOptions()
    graph = model.graph
    check_supported(model)
    # coremltools names ops and consts it makes unnamed (a cast's dtype const, the ops its passes add)
    # from a process-wide counter: start it afresh, so the package does not depend on what ran before
    from collections import defaultdict

    mb.name_count = defaultdict(int)
    assign_node_names(graph)

    input_names: dict[str, str] = {}
    specs: dict[str, Any] = {}
    states = graph_states(model)
    declared: dict[str, str] = {}
    for v in graph.inputs:
        if v.const_value is not None and v.name in graph.initializers:
            continue  # an initializer listed as input (old exporters): a constant, not a model input
        mil_name = safe_name(v.name or f"input_{len(specs)}")
        if v.name in states:
            if v.dtype != ir.DataType.FLOAT16:
                raise InputError(f"state {v.name!r} is {v.dtype}; Core ML states are fp16 only")
            specs[mil_name] = mb.StateTensorSpec(shape=_input_shape(v), dtype=types.fp16)
        else:
            shape, dtype = _input_shape(v), _mil_dtype(v)
            declared.update(_declared_input(v.name or mil_name, shape, dtype))
            # Core ML model inputs have rank >= 1 and no bool type: a scalar is declared [1] and reshaped
            # inside, a bool input int32 0/1 cast inside (the descriptions say so).
            specs[mil_name] = mb.placeholder(shape=shape or (1,), dtype=types.int32 if dtype == types.bool else dtype,
                                             name=mil_name)
        input_names[v.name or mil_name] = mil_name

    ctx = LoweringContext(compute_precision=options.precision, opset=target_for(options.ios),
                          fp32_nodes=set(options.fp32_nodes),
                          options={"ios": options.ios, "rmsnorm_input_scale": dict(options.rmsnorm_input_scale),
                                   "shared": shared, "float_is_fp16": options.native_fp16})
    fp32_ops: set[str] = set()
    output_names: dict[str, str] = {}
    rank_limit = max_rank()
    with Function(specs, opset_version=target_for(options.ios)) as func:
        for onnx_name, mil_name in input_names.items():
            v = func.inputs[mil_name]
            onnx_in = next(x for x in graph.inputs if (x.name or mil_name) == onnx_name)
            if onnx_in.dtype == ir.DataType.INT64:
                log.debug("input %s: int64 -> int32", onnx_name)
            if options.native_fp16 and onnx_in.dtype == ir.DataType.FLOAT:
                v = mb.cast(x=v, dtype="fp16", name=f"{mil_name}_fp16")
            if onnx_in.dtype == ir.DataType.BOOL:
                v = mb.cast(x=v, dtype="bool", name=f"{mil_name}_bool")
            if not _input_shape(onnx_in):
                v = mb.squeeze(x=v, name=f"{mil_name}_scalar")
            ctx.values[onnx_name] = v
        if options.native_fp16:
            # Float initializers enter the program as fp16, so every op is built in fp16 directly and
            # coremltools' add_fp16_cast pass (a Python rewrite of every op) is not needed.
            for init in graph.initializers.values():
                if init.name and init.const_value is not None and init.dtype == ir.DataType.FLOAT and init.uses() \
                        and all(u.node.domain != DOMAIN or u.idx == 0 for u in init.uses()):
                    key = ("fp16", init.name, tuple(init.shape or ()))
                    half = shared.get(key) if shared is not None else None
                    if half is None:
                        with np.errstate(over="ignore"):  # attention masks hold finfo.min: -inf on purpose
                            half = init.const_value.numpy().astype(np.float16)
                        if shared is not None and half.size >= _SHARE_MIN_ELEMENTS:
                            shared[key] = half
                    ctx.values[init.name] = half
        kept_fp32: dict[str, Any] = {}  # fp32 outputs of fp32-kept nodes in a native build -> their fp16 cast
        for idx, node in enumerate(graph):
            fn = get_lowering(node)
            before = len(func.operations)
            in_fp32 = options.native_fp16 and node.name in ctx.fp32_nodes
            swapped = (_enter_fp32(ctx, node, graph, idx) if in_fp32
                       else _from_fp32(ctx, node, kept_fp32, idx) if kept_fp32 else {})
            try:
                outs = list(fn(ctx, node))
            except (InputError, UnsupportedOpError):
                raise
            except Exception as e:
                raise RuntimeError(f"lowering node {node.name!r} ({node.op_type}) failed: {e}") from e
            finally:
                ctx.values.update(swapped)
                ctx.options["float_is_fp16"] = options.native_fp16
            if in_fp32 and (any(not isinstance(v, np.ndarray) for v in swapped.values())
                            or any(v is not None and v.name in kept_fp32 for v in node.inputs)):
                # it reads fp16 program values (or an fp32-kept node that does): its float outputs go back
                # to fp16 where a node outside fp32 reads them (and stay fp32 for the next fp32-kept node)
                kept_fp32.update({o.name: None for o in node.outputs if o.name})
            _check_ranks(node, outs, rank_limit)
            if len(outs) < len([o for o in node.outputs if o.name]):
                raise RuntimeError(f"lowering of {node.op_type} returned {len(outs)} values for node {node.name!r} "
                                   f"with {len(node.outputs)} outputs")
            for o, val in zip(node.outputs, outs, strict=False):
                if o.name:
                    ctx.values[o.name] = val
            new_ops = list(func.operations)[before:]
            if options.compact_names:
                _compact_names(new_ops, idx)
            if node.name in ctx.fp32_nodes:
                fp32_ops.update(op.name for op in new_ops)
        outputs = []
        used: set[str] = set()
        for o in graph.outputs:
            if not o.name:
                raise InputError("a graph output has no name; Core ML outputs need names")
            if o.name not in ctx.values:
                if o.const_value is None:
                    raise RuntimeError(f"graph output {o.name!r} was never computed")
                ctx.values[o.name] = o.const_value.numpy()
            mil_name = safe_name(o.name)
            while mil_name in used or mil_name in specs:
                mil_name += "_out"
            used.add(mil_name)
            var = _as_var(ctx.values[o.name], f"{mil_name}_const")
            var, how = _declared_output(o, var, mil_name)
            if how:
                declared[o.name] = how
            if options.native_fp16 and o.dtype == ir.DataType.FLOAT and var.dtype != types.fp32:
                outputs.append(mb.cast(x=var, dtype="fp32", name=mil_name))  # the graph's output dtype
            else:
                outputs.append(mb.identity(x=var, name=mil_name))
            output_names[o.name] = mil_name
        func.set_outputs(outputs)
    needed, _op = func.get_max_opset_version_and_op()
    ios = max(options.ios, ios_of_target(needed)) if needed is not None else options.ios
    prog = Program()
    prog.add_function("main", func)
    notes = list(ctx.notes)
    notes += [f"{'input' if k in input_names else 'output'} {k!r}: {how}" for k, how in sorted(declared.items())]
    if fp32_ops:
        notes.append(f"{len(ctx.fp32_nodes)} node(s) kept in fp32: {', '.join(sorted(ctx.fp32_nodes))}")
    return BuiltProgram(prog, ios, input_names, output_names, frozenset(fp32_ops), notes, declared)


def _enter_fp32(ctx: LoweringContext, node: ir.Node, graph: ir.Graph, idx: int) -> dict[str, Any]:
    """Make the float inputs of ``node`` fp32 for its lowering in an fp16-native build (the fp16-safety
    analysis keeps it in fp32); returns the values it replaced, to restore afterwards.

    MIL inputs are cast up; initializers enter at their stored fp32 precision (not via their fp16 copy:
    an attention mask's finfo.min stays finite). Ops made here belong to the node (kept in fp32).
    """
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    saved: dict[str, Any] = {}
    for i, v in enumerate(node.inputs):
        if v is None or not v.name or v.name in saved or v.name not in ctx.values:
            continue
        cur = ctx.values[v.name]
        if isinstance(cur, np.ndarray) and cur.dtype == np.float16:
            init = graph.initializers.get(v.name)
            full = init.const_value.numpy() if init is not None and init.const_value is not None else None
            new: Any = full if full is not None and full.dtype == np.float32 else cur.astype(np.float32)
        elif not isinstance(cur, np.ndarray) and getattr(cur, "dtype", None) == types.fp16:
            new = mb.cast(x=cur, dtype="fp32", name=f"n{idx}_fp32_{i}")
        else:
            continue
        saved[v.name] = cur
        ctx.values[v.name] = new
    ctx.options["float_is_fp16"] = False
    return saved


def _from_fp32(ctx: LoweringContext, node: ir.Node, kept: dict[str, Any], idx: int) -> dict[str, Any]:
    """Give ``node`` (built in fp16) the fp16 cast of every fp32-kept output it reads (made once, on first
    use; ``kept`` caches it); returns the values it replaced, to restore afterwards."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    saved: dict[str, Any] = {}
    for i, v in enumerate(node.inputs):
        if v is None or v.name not in kept or v.name in saved:
            continue
        cur = ctx.values[v.name]
        if kept[v.name] is None:
            kept[v.name] = mb.cast(x=cur, dtype="fp16", name=f"n{idx}_fp16_{i}") \
                if getattr(cur, "dtype", None) == types.fp32 else cur
        saved[v.name] = cur
        ctx.values[v.name] = kept[v.name]
    return saved


def _declared_input(name: str, shape: tuple[int, ...], dtype: Any) -> dict[str, str]:
    from coremltools.converters.mil.mil import types

    how = []
    if not shape:
        how.append("a scalar in the source graph, declared shape [1] (a 0-d array is accepted too)")
    if dtype == types.bool:
        how.append("bool in the source graph, declared int32 (pass 0/1)")
    return {name: "; ".join(how)} if how else {}


def _declared_output(o: ir.Value, var: Any, mil_name: str) -> tuple[Any, str]:
    """``var`` as the package can return it (rank >= 1, no bool) and how that differs from the source graph."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    how = []
    if var.dtype == types.bool:
        var = mb.cast(x=var, dtype="int32", name=f"{mil_name}_int")
        how.append("bool in the source graph, returned as int32 0/1 (Core ML has no bool tensors)")
    elif o.dtype in (ir.DataType.INT64, ir.DataType.DOUBLE) and types.nptype_from_builtin(var.dtype) in (np.int32,
                                                                                                      np.float32):
        how.append(f"{o.dtype.name.lower()} in the source graph, returned as "
                   f"{'int32' if o.dtype == ir.DataType.INT64 else 'float32'} (Core ML has no 64-bit tensors)")
    if var.rank == 0:
        var = mb.reshape(x=var, shape=np.asarray([1], np.int32), name=f"{mil_name}_1d")
        how.append("a scalar in the source graph, returned as shape [1]")
    return var, "; ".join(how)


def _check_ranks(node: ir.Node, outs: list[Any], limit: int) -> None:
    """A lowered output above Core ML's rank limit is refused here, naming the node (coremltools would raise)."""
    for o, val in zip(node.outputs, outs, strict=False):
        shape = np.shape(val) if isinstance(val, np.ndarray) else getattr(val, "shape", ())
        if not isinstance(val, np.ndarray) and len(shape) > limit:
            dims = [d if isinstance(d, int) else str(d) for d in shape]
            raise UnsupportedOpError(rank_message(f"node {node.name!r} ({node.op_type}): output", o, dims, limit))


# The coremltools passes our programs need, in the default pipeline's order. The default pipeline
# runs 95 passes and validates the whole program after each one, which dominates conversion time
# for a few thousand ops; the ones left out fuse patterns our lowerings never emit (conv/batchnorm/
# pad/gelu/prelu/pixel-shuffle fusions, image preprocessing, state and quantized-op canonicalisation).
FAST_PASSES = (
    "common::update_output_dtypes",
    "common::cast_optimization",
    "common::noop_elimination",
    "common::const_elimination",
    "common::sanitize_input_output_names",
    "common::divide_to_multiply",
    "common::const_deduplication",
    "common::merge_consecutive_reshapes",
    "common::merge_consecutive_transposes",
    "common::fuse_transpose_matmul",
    "common::remove_redundant_ops",
    "common::dedup_op_and_var_names",
    "common::add_fp16_cast",
    "common::add_int16_cast",
    "common::update_output_dtypes",
    "common::guard_negative_gather_indices",
    "common::const_elimination",
    "common::cast_optimization",
    "common::dead_code_elimination",
    "common::topological_reorder",
)
PIPELINES = ("fast", "full")


# Stateful programs also need coremltools' state canonicalisations (in-place read -> update -> write).
STATE_PASSES = ("common::canonicalize_inplace_pattern", "common::prefer_state_in_downstream",
                "common::dead_code_elimination")


def ct_pass_pipeline(name: str, *, stateful: bool = False, multifunction: bool = False) -> Any:
    """The coremltools pass pipeline: ``fast`` (FAST_PASSES) or ``full`` (coremltools' default).

    ``stateful`` adds the state canonicalisations to ``fast`` (``full`` has them); ``multifunction``
    ends either with the pass that stores constants shared by several functions once.
    """
    ct = coremltools()
    if name == "full":
        pipe = ct.PassPipeline.DEFAULT
    elif name == "fast":
        from bitnet_coreml.lower.state import MERGE_PASS, register_share_pass

        register_share_pass()  # registers MERGE_PASS too
        names = list(FAST_PASSES)
        names.insert(names.index("common::const_deduplication"), MERGE_PASS)
        pipe = ct.PassPipeline(pass_names=names, pipeline_name="bitnet_coreml_fast")
        # Every BitLinear/RMSNorm repeats the same scalars (0.5, 2, 127, eps ...): share them. The
        # default threshold (100 elements) keeps one const op per use, ~80 bytes each in model.mlmodel.
        pipe.set_options("common::const_deduplication", {"const_threshold": 1})
        if stateful:
            for p in STATE_PASSES:
                pipe.append_pass(p)
    else:
        raise InputError(f"pass pipeline {name!r} is not known; allowed: {', '.join(PIPELINES)}")
    if stateful or multifunction:
        from bitnet_coreml.lower.state import NAME_PASS, register_share_pass

        share = register_share_pass()  # registers both passes
        if stateful:
            pipe.append_pass(NAME_PASS)
        if multifunction:
            pipe.append_pass(share)
    return pipe


def _skip_validate(check_essential_scope: bool = False) -> None:
    """Stands in for ``Program.validate`` while coremltools runs its passes (see ``convert_program``)."""


def convert_program(built: BuiltProgram, precision: str = "fp16", ios: int | None = None,
                    platform: str = "ios", pipeline: str = "fast") -> Any:
    """``ct.convert`` the built program to an ML Program ``MLModel`` (not compiled or loaded)."""
    ct = coremltools()
    target = target_for(max(ios or built.ios, built.ios), platform)
    if precision == "fp16":
        fp32_ops = built.fp32_ops
        compute_precision = ct.transform.FP16ComputePrecision(
            op_selector=lambda op: op.name not in fp32_ops
        ) if fp32_ops else ct.precision.FLOAT16
    else:
        compute_precision = ct.precision.FLOAT32
    # coremltools draws a tqdm bar per pass pipeline on stderr; the CLI has its own progress display.
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes import pass_pipeline

    bar = pass_pipeline.tqdm
    pass_pipeline.tqdm = lambda it, *a, **k: it
    # apply_pipeline logs f"...{prog}" at debug level: the f-string prints the whole program (seconds on
    # a 200M model, per pipeline and function) even when nothing is logged. Print nothing then.
    from coremltools.converters.mil.mil import Program

    program_str = Program.__str__
    if not pass_pipeline.logger.isEnabledFor(logging.DEBUG):
        Program.__str__ = lambda self: "<MIL program (enable debug logging to print it)>"  # type: ignore[method-assign]
    try:
        with warnings.catch_warnings():
            # attention masks hold finfo.min, which the fp16 cast turns into -inf on purpose (see fp16.py)
            warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning)
            prog = built.program
            stateful = any(types.is_state(v.sym_type) for f in prog.functions.values() for v in f.inputs.values())
            # coremltools validates the whole program before each pipeline and after every pass (~30
            # times; a third of the pass time for a few thousand ops, paid per function). Our pipeline is
            # fixed, so the program is validated once, after all passes and before anything is written.
            prog.validate = _skip_validate  # type: ignore[method-assign]
            try:
                mlmodel = ct.convert(prog, convert_to="mlprogram", compute_precision=compute_precision,
                                     minimum_deployment_target=target, skip_model_load=True,
                                     pass_pipeline=ct_pass_pipeline(pipeline, stateful=stateful,
                                                                    multifunction=len(prog.functions) > 1))
            finally:
                del prog.validate
            prog.validate(check_essential_scope=True)
            return mlmodel
    finally:
        pass_pipeline.tqdm = bar
        Program.__str__ = program_str  # type: ignore[method-assign]
