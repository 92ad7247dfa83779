"""The graph pass pipelines, on onnx-ir's pass infrastructure, and their report.

Every pass is an ``onnx_ir.passes.InPlacePass`` whose ``call`` returns a :class:`DetailedResult` (a
``PassResult`` that also says what the pass changed: ``fused``, ``rewritten``, ...); a pipeline is a
named list of passes run by ``onnx_ir.passes.PassManager``. :func:`run_pass_pipeline` records each pass's
result and time in a :class:`PassReport` (convert's JSON ``passes``, inspect, report).

Pipelines (:data:`PIPELINES`):

* ``default``: order matters. Shape inference gives the matchers ranks; constant folding (with size
  limits raised) turns online WeightQuant and packed-uint8 unpack subgraphs into plain constants; only
  then can the numeric ternary detection see the weights and BitLinear fusion match. RMSNorm/relu2
  fusion runs last, and dead nodes/initializers are removed at the end so the float copies of fused
  weights go. After every pass the model is still valid ONNX that ONNX Runtime runs.
* ``fused``: the fast path for graphs built already fused (the checkpoint and GGUF importers tag them
  ``bitnet_coreml.fused=1``): shape inference, the size check and cleanup only; folding and fusing
  again would read every weight (a 2B model's tied 1.3 GB head included) to find nothing to do.
  Choosing it is logged and named in the report (``pipeline``, ``note``).

A pass that fails raises through onnx-ir's ``PassError`` chain; :func:`run_pass_pipeline` re-raises the
pass's own exception (a project error keeps its exit code; a foreign one is named by its pass stage)
with the ``PassError`` kept as its context, so ``--debug`` shows both.
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir
import onnx_ir.passes.common as common

from bitnet_coreml.errors import InputError, stage
from bitnet_coreml.passes.bitlinear import fuse_bitlinear
from bitnet_coreml.passes.fused import DOMAIN
from bitnet_coreml.passes.layout import native_space_depth
from bitnet_coreml.passes.norms import fuse_relu2, fuse_rmsnorm
from bitnet_coreml.vocab import ONNX_DOMAINS

log = logging.getLogger(__name__)

# Folding limits, in elements. The defaults of onnxscript (8192 in / 262144 out) would leave every
# WeightQuant subgraph of a real layer unfolded; weights of a 2B model are at most ~330M elements.
FOLD_SIZE_LIMIT = 1 << 40

# Graphs built already fused (the checkpoint importer) say so in their metadata.
FUSED_METADATA_KEY = "bitnet_coreml.fused"


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassReport:
    passes: list[PassRecord] = field(default_factory=list)
    pipeline: str = "default"
    note: str | None = None  # why this pipeline was chosen, when it was not the default

    @property
    def bitlinear_count(self) -> int:
        for p in self.passes:
            if p.name == "fuse_bitlinear":
                return int(p.details.get("fused", 0))
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "note": self.note,
                "passes": [{"name": p.name, "modified": p.modified, "seconds": round(p.seconds, 4), **p.details}
                           for p in self.passes]}

    def summary(self) -> str:
        """One line: the pipeline and what each pass that changed the graph did."""
        return describe_passes(self.to_dict())


def describe_passes(report: dict[str, Any]) -> str:
    """:meth:`PassReport.summary` of a report's ``to_dict()`` (as convert's JSON carries it)."""
    skip = {"name", "modified", "seconds"}
    changed = [p["name"] + "".join(f" {k}={v}" for k, v in p.items()
                                   if k not in skip and isinstance(v, int) and not isinstance(v, bool) and v)
               for p in report.get("passes", []) if p.get("modified")]
    return (f"{report.get('pipeline', '?')} pipeline ({len(report.get('passes', []))} passes): "
            + (", ".join(changed) or "no change"))


@dataclass
class DetailedResult(ir.passes.PassResult):
    """A ``PassResult`` that also says what the pass changed (counts, skipped reason)."""

    details: dict[str, Any] = field(default_factory=dict)


class GraphPass(ir.passes.InPlacePass):
    """A pass of ours: in place, named (the name is the report's and the error stage's)."""

    name: ClassVar[str]

    def __repr__(self) -> str:  # PassManager names the failing pass by str()
        return self.name


class InlineForeignFunctions(GraphPass):
    """Inline functions that are not ours (exporter helper functions); keep the fused-op definitions."""

    name = "inline_foreign_functions"

    def call(self, model: ir.Model) -> DetailedResult:
        ours = {k: f for k, f in model.functions.items() if k[0] == DOMAIN}
        foreign = len(model.functions) - len(ours)
        if not foreign:
            return DetailedResult(model, False)
        for k in ours:
            del model.functions[k]
        try:
            common.InlinePass()(model)
        finally:
            for k, f in ours.items():
                model.functions[k] = f
        return DetailedResult(model, True, {"inlined_functions": foreign})


class ShapeInference(GraphPass):
    """onnx-ir's shape inference (with data propagation; unknown ops keep their shapes)."""

    name = "shape_inference"

    def call(self, model: ir.Model) -> DetailedResult:
        result = common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
        return DetailedResult(model, result.modified)


class CheckSizes(GraphPass):
    """Refuse values whose declared (inferred) shape is negative or too large to ever allocate.

    Runs right after shape inference, before folding, ONNX Runtime or the converter allocate anything:
    a graph input declared ``[2**20, 2**20]``, a ``ConstantOfShape`` / ``Tile`` / ``Expand`` whose inferred
    output is terabytes, is one line naming the value and its producer instead of an allocation failure.
    """

    name = "check_sizes"

    def call(self, model: ir.Model) -> DetailedResult:
        from bitnet_coreml._files import check_budget

        values: list[tuple[ir.Value, str]] = [(v, "graph input") for v in model.graph.inputs]
        for node in model.graph:
            values.extend((v, f"output of node {node.name!r} ({node.op_type})") for v in node.outputs)
        for v, what in values:
            shape, dtype = v.shape, v.dtype
            if shape is None:
                continue
            dims = [d for d in shape if isinstance(d, int)]
            if any(d < 0 for d in dims):
                raise InputError(f"value {v.name!r} ({what}) has a negative dimension in shape {list(shape)}")
            if len(dims) != len(shape) or dtype is None:
                continue
            n = 1
            for d in dims:
                n *= d
            try:
                itemsize = float(dtype.itemsize)
            except (AttributeError, TypeError, ValueError):  # strings: at least a byte each
                itemsize = 1.0
            check_budget(int(n * itemsize), f"value {v.name!r} ({what}, shape {list(shape)} {dtype.name})")
        return DetailedResult(model, False)


def _constant_node(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "Constant" and node.domain in ONNX_DOMAINS


def _has_foldable(model: ir.Model) -> bool:
    """True when some node computes only from constants (cheap scan; exporters often pre-fold)."""
    for node in model.graph:
        if node.op_type == "Constant" or not node.inputs:
            continue
        # Constant *nodes* count too: the TorchScript exporter writes its constants that way.
        if all(v is None or v.const_value is not None or _constant_node(v.producer()) for v in node.inputs):
            return True
        if node.op_type in ("Shape", "Size"):
            return True
    return False


class FoldConstants(GraphPass):
    """onnxscript's constant folding with the size limits raised, then dead-node removal."""

    name = "fold_constants"

    def call(self, model: ir.Model) -> DetailedResult:
        if not _has_foldable(model):
            return DetailedResult(model, False, {"skipped": "nothing foldable"})
        from onnxscript.optimizer import fold_constants  # heavy import, only when folding

        res = fold_constants(model, input_size_limit=FOLD_SIZE_LIMIT, output_size_limit=FOLD_SIZE_LIMIT)
        common.RemoveUnusedNodesPass()(model)
        return DetailedResult(model, bool(res.modified))


class _CountingPass(GraphPass):
    """A pass that is one rewrite function returning how many places it changed (its ``counter``)."""

    counter: ClassVar[str] = "fused"

    @abc.abstractmethod
    def rewrite(self, model: ir.Model) -> int:
        """Rewrite ``model`` in place; the number of places changed."""

    def call(self, model: ir.Model) -> DetailedResult:
        n = self.rewrite(model)
        return DetailedResult(model, n > 0, {self.counter: n})


class NativeSpaceDepth(_CountingPass):
    """Exporter space-to-depth / depth-to-space subgraphs -> the native ops (``passes/layout.py``)."""

    name = "native_space_depth"
    counter = "rewritten"

    def rewrite(self, model: ir.Model) -> int:
        return native_space_depth(model)


class FuseBitLinear(GraphPass):
    """Ternary weight + activation quantisation -> ``bitnet_coreml::BitLinear`` (``passes/bitlinear.py``)."""

    name = "fuse_bitlinear"

    def call(self, model: ir.Model) -> DetailedResult:
        rep = fuse_bitlinear(model)
        return DetailedResult(model, rep.fused > 0, {"fused": rep.fused, "ternary_unfused": rep.ternary_unfused})


class FuseRMSNorm(_CountingPass):
    """The RMSNorm subgraph -> ``bitnet_coreml::RMSNorm`` (``passes/norms.py``)."""

    name = "fuse_rmsnorm"

    def rewrite(self, model: ir.Model) -> int:
        return fuse_rmsnorm(model)


class FuseRelu2(_CountingPass):
    """``relu(x)^2`` -> ``bitnet_coreml::Relu2`` (``passes/norms.py``)."""

    name = "fuse_relu2"

    def rewrite(self, model: ir.Model) -> int:
        return fuse_relu2(model)


class Cleanup(GraphPass):
    """Remove dead nodes, initializers and functions; sort topologically."""

    name = "cleanup"

    def call(self, model: ir.Model) -> DetailedResult:
        a = common.RemoveUnusedNodesPass()(model).modified
        b = common.RemoveUnusedFunctionsPass()(model).modified
        common.TopologicalSortPass()(model)
        return DetailedResult(model, bool(a or b))


PIPELINES: dict[str, tuple[type[GraphPass], ...]] = {
    "default": (InlineForeignFunctions, ShapeInference, CheckSizes, FoldConstants, NativeSpaceDepth, FuseBitLinear,
                FuseRMSNorm, FuseRelu2, Cleanup),
    "fused": (ShapeInference, CheckSizes, Cleanup),
}


class _Recorded(ir.passes.InPlacePass):
    """Runs one pass under its error stage and records its result and time in the report."""

    def __init__(self, inner: GraphPass, report: PassReport) -> None:
        self.inner = inner
        self.report = report

    def __repr__(self) -> str:
        return repr(self.inner)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        t0 = time.perf_counter()
        with stage(f"graph pass {self.inner.name}"):
            result = self.inner(model)
        details = dict(result.details) if isinstance(result, DetailedResult) else {}
        self.report.passes.append(PassRecord(self.inner.name, result.modified, time.perf_counter() - t0, details))
        log.debug("pass %s: modified=%s %s", self.inner.name, result.modified, details)
        return ir.passes.PassResult(result.model, result.modified)


def pipeline_for(model: ir.Model) -> tuple[str, str | None]:
    """The pipeline ``model`` needs and, for the fast path, why."""
    if model.metadata_props.get(FUSED_METADATA_KEY) == "1":
        skipped = [c.name for c in PIPELINES["default"] if c not in PIPELINES["fused"]]
        return "fused", (f"graph passes: the 'fused' pipeline (graph tagged {FUSED_METADATA_KEY}=1 by its importer; "
                         f"skipped {', '.join(skipped)})")
    return "default", None


def run_pass_pipeline(model: ir.Model, name: str | None = None, *, until: str | None = None) -> PassReport:
    """Run the pipeline ``name`` (default: :func:`pipeline_for`) in place, stopping after the pass ``until``."""
    note = None
    if name is None:
        name, note = pipeline_for(model)
        if note:
            log.info("%s", note)
    if name not in PIPELINES:
        raise InputError(f"pass pipeline {name!r}; allowed: {', '.join(PIPELINES)}")
    passes = PIPELINES[name]
    if until is not None:
        order = [c.name for c in PIPELINES["default"]]
        if until not in order:
            raise InputError(f"pass {until!r}; allowed: {', '.join(order)}")
        passes = tuple(c for c in passes if order.index(c.name) <= order.index(until))
    report = PassReport(pipeline=name, note=note)
    if not passes:
        return report
    manager = ir.passes.PassManager([_Recorded(cls(), report) for cls in passes], steps=1, early_stop=False)
    try:
        manager(model)
    except ir.passes.PassError as e:
        cause = _pass_cause(e)
        if cause is e:
            raise
        raise cause  # noqa: B904 - onnx-ir's PassError chain stays as its __context__ (shown by --debug)
    return report


def _pass_cause(error: BaseException) -> BaseException:
    """The failing pass's own exception under onnx-ir's ``PassError`` wrappers (the error itself if none)."""
    while isinstance(error, ir.passes.PassError) and error.__cause__ is not None:
        error = error.__cause__
    return error


def run_default_passes(model: ir.Model, *, until: str | None = None) -> PassReport:
    """Run the pipeline the graph needs (``default``, or ``fused`` for a graph imported already fused)."""
    return run_pass_pipeline(model, until=until)
