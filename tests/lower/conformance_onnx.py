"""ONNX node-conformance harness for the op lowerings.

Each case of ``onnx.backend.test.case.node.collect_testcases()`` (shipped in the onnx wheel) is a
model plus inputs plus the outputs ONNX expects. For each case whose ops we claim, this harness:

1. loads the model into onnx-ir;
2. binds to constants the graph inputs Core ML needs fixed (``CONST_SLOTS``: Reshape's ``shape``,
   Slice's starts, weights, ...), as an exported model has them as initializers, plus rank-0 and
   unread inputs; input dtypes a Core ML model cannot declare (int8/uint8/int16/uint16/uint32/uint64,
   float64) are declared int32/float32 (values checked to fit);
3. evaluates it, in one of two modes:

   * ``"execute"``: the convert stage's ``build_program`` + ``convert_program`` (``ct.convert`` to an
     ML Program, fp32 by default, ``--precision``/``--ios`` to change) and the project's
     :class:`bitnet_coreml.executor.ReferenceExecutor` (numpy execution of the package);
   * ``"fold"``: a minimal graph walker here feeds the inputs as MIL constants and reads the outputs
     from coremltools' own value inference of each MIL op (no conversion). Only ops with a value
     inference produce a result; the rest are reported as ``no-oracle``.

4. compares with the expected outputs (exact for ints/bools, the case's rtol/atol for floats).

Run it directly for the per-op table: ``python -m tests.lower.conformance_onnx [--mode fold] [--md]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import logging
import sys
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from bitnet_coreml.errors import BitnetCoremlError, UnsupportedOpError
from bitnet_coreml.lower.ops._common import is_const, mil_array, np_dtype
from bitnet_coreml.lower.registry import LoweringContext, get_lowering, supported_ops

log = logging.getLogger(__name__)

# Inputs that must be compile-time constants for Core ML (fixed shapes), per op: the harness binds
# a graph input feeding one of these slots to the case's data, like an initializer.
CONST_SLOTS: dict[str, set[int]] = {
    "Reshape": {1}, "Slice": {1, 2, 3, 4}, "Unsqueeze": {1}, "Squeeze": {1}, "Expand": {1}, "Tile": {1},
    "Range": {0, 1, 2}, "ConstantOfShape": {0}, "Split": {1}, "CumSum": {1}, "Trilu": {1},
    "Conv": {1, 2}, "ConvTranspose": {1, 2}, "LayerNormalization": {1, 2}, "BatchNormalization": {1, 2, 3, 4},
    "InstanceNormalization": {1, 2}, "RMSNormalization": {1}, "Clip": {1, 2}, "Dropout": {1, 2},
    "CastLike": {1}, "Pad": {1, 2, 3}, "TopK": {1}, "OneHot": {1, 2}, "GroupNormalization": {1, 2},
    "Attention": {6},
    **{op: {1} for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                          "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp")},
}

# Element types Core ML has no equivalent for (a case using them is a legitimate exclusion).
_NO_COREML_DTYPES = {
    ir.DataType.STRING, ir.DataType.COMPLEX64, ir.DataType.COMPLEX128, ir.DataType.BFLOAT16,
    ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E4M3FNUZ, ir.DataType.FLOAT8E5M2, ir.DataType.FLOAT8E5M2FNUZ,
    ir.DataType.UINT4, ir.DataType.INT4, ir.DataType.FLOAT4E2M1,
    *(getattr(ir.DataType, n) for n in ("INT2", "UINT2", "FLOAT8E8M0") if hasattr(ir.DataType, n)),
}
_I32 = np.iinfo(np.int32)
# The MIL opset (iOS version) programs are built for; ``--ios`` changes it (the converter's minimum is 16).
IOS = 17
# Compute precision of the converted program. The cases' tolerances are fp32-tight, so an fp16 run
# (``--precision fp16``) is for finding lowerings that break under the fp16 cast, not a pass rate.
PRECISION = "fp32"


@dataclass
class CaseResult:
    name: str
    op: str
    status: str  # pass | fail | excluded | no-oracle
    reason: str = ""
    composite: bool = False


@dataclass
class Report:
    results: list[CaseResult] = field(default_factory=list)

    def per_op(self, composite: bool = False) -> dict[str, Counter[str]]:
        table: dict[str, Counter[str]] = defaultdict(Counter)
        for r in self.results:
            if r.composite == composite:
                table[r.op][r.status] += 1
        return dict(sorted(table.items()))

    def to_markdown(self, composite: bool = False) -> str:
        lines = ["| op | cases | pass | fail | excluded | no oracle | pass rate (of run) |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for op, c in self.per_op(composite).items():
            run = c["pass"] + c["fail"]
            rate = f"{100.0 * c['pass'] / run:.0f}%" if run else "n/a"
            lines.append(f"| {op} | {sum(c.values())} | {c['pass']} | {c['fail']} | {c['excluded']} | "
                         f"{c['no-oracle']} | {rate} |")
        return "\n".join(lines)


# --- case selection ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _collect() -> list[Any]:
    import gc

    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = list(collect_testcases())
    # ct.convert runs gc.collect() on every call; the ~2000 cases' arrays would make each one cost
    # ~0.3 s. They live for the whole run, so move them out of the collector's view.
    gc.collect()
    gc.freeze()
    return cases


def claimed_cases(ops: Iterable[str] | None = None, composite: bool = False) -> list[tuple[str, Any]]:
    """``(op, case)`` for every single-node case of a claimed op (``composite``: also the multi-node
    ``*_expanded`` cases built only from claimed ops, attributed to the op in their name)."""
    claimed = {o for o in supported_ops() if "::" not in o}
    wanted = set(ops) if ops is not None else claimed
    out = []
    for case in _collect():
        nodes = case.model.graph.node
        types = {n.op_type for n in nodes if n.domain in ("", "ai.onnx")}
        if any(n.domain not in ("", "ai.onnx") for n in nodes):
            continue
        if len(nodes) == 1 and nodes[0].op_type in wanted:
            out.append((nodes[0].op_type, case))
        elif composite and len(nodes) > 1 and types <= claimed:
            op = _op_from_name(case.name, claimed)
            if op in wanted:
                out.append((op, case))
    return out


def _op_from_name(name: str, claimed: set[str]) -> str:
    base = name.removeprefix("test_").replace("_", "").lower()
    # ONNX names these cases greater_equal / less_equal.
    base = base.replace("greaterequal", "greaterorequal").replace("lessequal", "lessorequal")
    best = ""
    for op in claimed:
        if base.startswith(op.lower()) and len(op) > len(best):
            best = op
    return best or "composite"


# --- the minimal graph walker ---------------------------------------------------------------------


class Excluded(Exception):
    """The case uses something Core ML cannot represent (dtype, dynamic shape, empty tensor...)."""


def _ct() -> Any:
    from bitnet_coreml._quiet import coremltools

    return coremltools()


def _const_bound_inputs(graph: ir.Graph) -> set[str]:
    names = set()
    for node in graph:
        for i, v in enumerate(node.inputs):
            if v is not None and v.is_graph_input() and i in CONST_SLOTS.get(node.op_type, set()):
                names.add(v.name)
    return names


def _check_dtypes(model: ir.Model) -> None:
    g = model.graph
    for v in list(g.inputs) + list(g.outputs):
        if v.dtype in _NO_COREML_DTYPES:
            raise Excluded(f"dtype {v.dtype.name} has no Core ML equivalent")
    for node in g:
        for v in node.outputs:
            if v.dtype in _NO_COREML_DTYPES:
                raise Excluded(f"dtype {v.dtype.name} has no Core ML equivalent")


def _int_range_ok(a: np.ndarray) -> bool:
    return a.dtype.kind not in "iu" or not a.size or (int(a.min()) >= _I32.min and int(a.max()) <= _I32.max)


def lower_case(model: ir.Model, feeds: dict[str, np.ndarray], mode: str) -> tuple[Any, dict[str, Any]]:
    """Lower ``model``; returns (program or None, {output name: numpy constant or MIL Var})."""
    _ct()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Placeholder, Program, types

    ct = _ct()
    g = model.graph
    _check_dtypes(model)
    bound = _const_bound_inputs(g)
    ctx = LoweringContext(compute_precision="fp32", opset=ct.target.iOS17)
    placeholders: dict[str, Any] = {}
    casts: dict[str, np.dtype] = {}
    for v in g.inputs:
        if v.name not in feeds:
            continue
        data = np.asarray(feeds[v.name])
        if v.name in bound:
            ctx.values[v.name] = data
            continue
        if not _int_range_ok(data):
            raise Excluded(f"input {v.name!r} has integer values beyond int32 (Core ML has no int64)")
        if data.size == 0:
            raise Excluded(f"input {v.name!r} is empty (Core ML has no zero-size tensors)")
        if mode == "execute":
            mil = mil_array(data)
            stored = np.int32 if mil.dtype == np.bool_ else mil.dtype
            casts[v.name] = mil.dtype
            placeholders[v.name] = Placeholder(list(data.shape), types.numpy_type_to_builtin_type(stored))
    prog = Program()
    outs: dict[str, Any] = {}
    with Function(placeholders, opset_version=ctx.opset) as func:
        for name, dt in casts.items():
            var = func.inputs[name]
            ctx.values[name] = mb.cast(x=var, dtype="bool", name=f"{name}_bool") if dt == np.bool_ else var
        if mode == "fold":
            for v in g.inputs:
                if v.name in feeds and v.name not in bound:
                    ctx.values[v.name] = mb.const(val=_scalar_or_array(mil_array(np.asarray(feeds[v.name]))),
                                                  name=f"in_{_safe(v.name)}")
        for i, node in enumerate(g):
            if not node.name:
                node.name = f"n{i}_{node.op_type}"
            vals = list(get_lowering(node)(ctx, node))
            for out, val in zip(node.outputs, vals, strict=False):
                if out is not None and out.name:
                    ctx.values[out.name] = val
        program_outs = []
        for v in g.outputs:
            val = ctx.values[v.name]
            outs[v.name] = val
            if not is_const(val) and mode == "execute":
                if np_dtype(val) == np.bool_:
                    val = mb.cast(x=val, dtype="int32", name=f"out_{_safe(v.name)}")
                    outs[v.name] = val
                elif val.op is None or val.op.op_type == "const" or val in func.inputs.values():
                    val = mb.identity(x=val, name=f"out_{_safe(v.name)}")
                    outs[v.name] = val
                program_outs.append(val)
        func.set_outputs(program_outs or [mb.const(val=np.zeros(1, np.float32), name="unused_out")])
        prog.add_function("main", func)
    return (prog if program_outs else None), outs


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _scalar_or_array(a: np.ndarray) -> Any:
    return a.dtype.type(a.item()) if a.ndim == 0 else a


_EXEC_INPUT_DTYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.INT32, ir.DataType.INT64, ir.DataType.BOOL}
# Input dtypes Core ML models cannot declare, widened/narrowed the way an exporter for Core ML would
# (the values are checked to fit; results are compared exactly for ints, at the case's tolerance for
# floats computed in fp32 instead of fp64).
_WIDEN = {ir.DataType.INT8: ir.DataType.INT32, ir.DataType.UINT8: ir.DataType.INT32,
          ir.DataType.INT16: ir.DataType.INT32, ir.DataType.UINT16: ir.DataType.INT32,
          ir.DataType.UINT32: ir.DataType.INT32, ir.DataType.UINT64: ir.DataType.INT32,
          ir.DataType.DOUBLE: ir.DataType.FLOAT}


def _bind_constants(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Turn graph inputs that feed a must-be-constant slot into initializers; returns the rest."""
    g = model.graph
    bound = _const_bound_inputs(g)
    rest = {}
    for v in list(g.inputs):
        if v.name not in feeds:
            continue
        data = np.asarray(feeds[v.name])
        if v.name in bound or data.ndim == 0 or not v.uses():
            # Core ML model inputs need rank >= 1; a scalar operand is an initializer in real exports.
            # An input no node reads (CastLike's expansion drops `like`) is not a model input at all.
            g.inputs.remove(v)
            v.const_value = ir.tensor(data, name=v.name)
            g.register_initializer(v)
            continue
        if not _int_range_ok(data):
            raise Excluded(f"input {v.name!r} has integer values beyond int32 (Core ML has no int64)")
        if v.dtype in _WIDEN:
            v.dtype = _WIDEN[v.dtype]
        if v.dtype not in _EXEC_INPUT_DTYPES:
            raise Excluded(f"input {v.name!r} is {v.dtype.name}; Core ML model inputs are fp16/fp32/int32 "
                           "(int64 narrowed)/bool")
        if not _int_range_ok(data):
            raise Excluded(f"input {v.name!r} has integer values beyond int32 (Core ML has no int64)")
        if data.size == 0:
            raise Excluded(f"input {v.name!r} is empty (Core ML has no zero-size tensors)")
        rest[v.name] = data
    return rest


def _execute(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The convert engineer's program builder, ``ct.convert`` and the reference executor."""
    from bitnet_coreml.executor import ReferenceExecutor
    from bitnet_coreml.lower.program import BuildOptions, build_program, convert_program

    _check_dtypes(model)
    rest = _bind_constants(model, feeds)
    built = build_program(model, BuildOptions(precision=PRECISION, ios=IOS))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        mlmodel = convert_program(built, precision=PRECISION)
    ex = ReferenceExecutor(mlmodel)
    specs = ex.input_specs
    feed = {}
    for onnx_name, mil_name in built.input_names.items():
        # ct.convert may re-declare an input (bool inputs become fp32 with a cast inside).
        feed[mil_name] = mil_array(rest[onnx_name]).astype(specs[mil_name].dtype)
    run = ex.predict(feed)
    return {onnx_name: np.asarray(run[mil_name]) for onnx_name, mil_name in built.output_names.items()}


def evaluate(model: ir.Model, feeds: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray | None]:
    """Lower and run one model; None for an output the mode cannot evaluate."""
    if mode == "execute":
        return dict(_execute(model, feeds))
    prog, outs = lower_case(model, feeds, mode)
    results: dict[str, np.ndarray | None] = {}
    for name, val in outs.items():
        results[name] = np.asarray(val) if is_const(val) else (None if val.val is None else np.asarray(val.val))
    return results


def compare(expected: np.ndarray, got: np.ndarray, rtol: float, atol: float) -> str:
    """'' when ``got`` matches ``expected``, else a one-line reason."""
    expected = np.asarray(expected)
    got = np.asarray(got)
    if expected.shape != got.shape:
        if expected.size == got.size == 1:
            got = got.reshape(expected.shape)
        else:
            return f"shape {got.shape} != expected {expected.shape}"
    if expected.dtype.kind in "biu":
        if not np.array_equal(expected.astype(np.int64), got.astype(np.int64)):
            bad = int(np.sum(expected.astype(np.int64) != got.astype(np.int64)))
            return f"{bad} of {expected.size} values differ"
        return ""
    e = expected.astype(np.float64)
    g = got.astype(np.float64)
    both_nan = np.isnan(e) & np.isnan(g)
    same_inf = np.isinf(e) & (e == g)
    with np.errstate(invalid="ignore"):
        close = np.abs(g - e) <= atol + rtol * np.abs(e)
    ok = both_nan | same_inf | close
    if not ok.all():
        i = int(np.argmax(~ok.reshape(-1)))
        return (f"{int((~ok).sum())} of {e.size} values differ (first at flat {i}: got {g.reshape(-1)[i]!r}, "
                f"expected {e.reshape(-1)[i]!r})")
    return ""


def run_case(op: str, case: Any, mode: str, composite: bool = False) -> CaseResult:
    name = case.name
    try:
        model = ir.from_proto(case.model)
        statuses = []
        for inputs, expected in case.data_sets:
            names = [v.name for v in model.graph.inputs]
            feeds = {n: _to_np(a) for n, a in zip(names, inputs, strict=False) if not _is_sequence(a)}
            if len(feeds) != len([a for a in inputs]):
                raise Excluded("sequence/optional inputs have no Core ML equivalent")
            m = ir.from_proto(case.model)  # a fresh graph per data set (lowering names nodes)
            with np.errstate(all="ignore"):
                got = evaluate(m, feeds, mode)
            for out_v, exp in zip(m.graph.outputs, expected, strict=True):
                g = got[out_v.name]
                if g is None:
                    statuses.append(("no-oracle", f"output {out_v.name!r} has no value inference in fold mode"))
                    continue
                reason = compare(_to_np(exp), g, case.rtol, case.atol)
                statuses.append(("fail", reason) if reason else ("pass", ""))
        for st in ("fail", "no-oracle"):
            for s, reason in statuses:
                if s == st:
                    return CaseResult(name, op, st, reason, composite)
        return CaseResult(name, op, "pass", "", composite)
    except Excluded as e:
        return CaseResult(name, op, "excluded", str(e), composite)
    except UnsupportedOpError as e:
        return CaseResult(name, op, "excluded", e.one_line(), composite)
    except BitnetCoremlError as e:
        return CaseResult(name, op, "fail", f"{type(e).__name__}: {e.one_line()}", composite)
    except Exception as e:  # noqa: BLE001 - a harness reports every failure, it does not stop at one
        if "rank <= 5" in str(e):
            return CaseResult(name, op, "excluded", "a tensor of rank > 5 (Core ML supports rank <= 5)", composite)
        msg = " ".join(str(e).split())[:300]
        return CaseResult(name, op, "fail", f"{type(e).__name__}: {msg}", composite)


def _to_np(a: Any) -> np.ndarray:
    """Case data as numpy (a few cases store TensorProtos, e.g. for float16 data)."""
    if hasattr(a, "raw_data") and hasattr(a, "data_type"):
        from onnx import numpy_helper

        return numpy_helper.to_array(a)
    return np.asarray(a)


def _is_sequence(a: Any) -> bool:
    return isinstance(a, (list, tuple)) or a is None


def run_all(ops: Sequence[str] | None = None, mode: str = "execute", composite: bool = False,
            names: Sequence[str] | None = None) -> Report:
    report = Report()
    for op, case in claimed_cases(ops, composite):
        if names is not None and case.name not in names:
            continue
        is_comp = len(case.model.graph.node) > 1
        report.results.append(run_case(op, case, mode, composite=is_comp))
    return report


def executor_available() -> bool:
    try:
        from bitnet_coreml.executor import ReferenceExecutor  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["execute", "fold"], default="execute" if executor_available() else "fold")
    p.add_argument("--op", action="append", help="only these ops (repeatable)")
    p.add_argument("--composite", action="store_true", help="also the multi-node *_expanded cases")
    p.add_argument("--md", action="store_true", help="print the per-op markdown table")
    p.add_argument("--failures", action="store_true", help="list failing/excluded cases with reasons")
    p.add_argument("--precision", choices=["fp32", "fp16"], default=PRECISION, help="compute precision")
    p.add_argument("--ios", type=int, default=IOS, choices=[16, 17, 18], help="MIL opset (deployment target)")
    args = p.parse_args(argv)
    globals()["IOS"] = args.ios
    globals()["PRECISION"] = args.precision
    report = run_all(args.op, args.mode, args.composite)
    out = sys.stdout
    if args.md:
        out.write(report.to_markdown() + "\n")
        if args.composite:
            out.write("\nComposite (*_expanded) cases:\n\n" + report.to_markdown(composite=True) + "\n")
    if args.failures:
        for r in report.results:
            if r.status != "pass":
                out.write(f"{r.status:9s} {r.op:20s} {r.name}: {r.reason}\n")
    c = Counter(r.status for r in report.results)
    out.write(f"mode={args.mode} cases={len(report.results)} " + " ".join(f"{k}={v}" for k, v in sorted(c.items()))
              + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# --- helpers for the op unit tests ------------------------------------------------------------------


def single_node_model(op_type: str, inputs: dict[str, np.ndarray], outputs: Sequence[str] = ("y",),
                      initializers: dict[str, np.ndarray] | None = None, opset: int = 18,
                      infer: bool = True, **attrs: Any) -> Any:
    """An ``onnx.ModelProto`` with one node; ``inputs`` become graph inputs, ``initializers`` constants.

    Output types are inferred by ONNX shape inference (strict), so the model is what an exporter
    would write; ``infer=False`` skips it, for deliberately invalid models.
    """
    import onnx
    from onnx import helper, numpy_helper

    initializers = initializers or {}
    names = list(inputs) + list(initializers)
    node = helper.make_node(op_type, names, list(outputs), **attrs)
    g_in = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in inputs.items()]
    g_out = [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in outputs]
    inits = [numpy_helper.from_array(np.asarray(a), n) for n, a in initializers.items()]
    graph = helper.make_graph([node], f"{op_type}_test", g_in, g_out, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True) if infer else model


def reference_outputs(model: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The ONNX reference evaluator's outputs (the independent oracle)."""
    from onnx.reference import ReferenceEvaluator

    return [np.asarray(a) for a in ReferenceEvaluator(model).run(None, feeds)]


def run_model(model: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Our outputs: program builder + ct.convert (fp32) + ReferenceExecutor, in graph output order."""
    m = ir.from_proto(model)
    got = _execute(m, dict(feeds))
    return [got[v.name] for v in m.graph.outputs]
