"""The default pass pipeline and its report.

Order matters: shape inference gives the matchers ranks; constant folding (with size limits raised)
turns online WeightQuant and packed-uint8 unpack subgraphs into plain constants; only then can the
numeric ternary detection see the weights and BitLinear fusion match. RMSNorm/relu2 fusion runs
last, and dead nodes/initializers are removed at the end so the float copies of fused weights go.
After every pass the model is still valid ONNX that ONNX Runtime runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common

from bitnet_coreml.errors import InputError, stage
from bitnet_coreml.passes.bitlinear import fuse_bitlinear
from bitnet_coreml.passes.fused import DOMAIN
from bitnet_coreml.passes.layout import native_space_depth
from bitnet_coreml.passes.norms import fuse_relu2, fuse_rmsnorm

log = logging.getLogger(__name__)

# Folding limits, in elements. The defaults of onnxscript (8192 in / 262144 out) would leave every
# WeightQuant subgraph of a real layer unfolded; weights of a 2B model are at most ~330M elements.
FOLD_SIZE_LIMIT = 1 << 40


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassReport:
    passes: list[PassRecord] = field(default_factory=list)

    @property
    def bitlinear_count(self) -> int:
        for p in self.passes:
            if p.name == "fuse_bitlinear":
                return int(p.details.get("fused", 0))
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {"passes": [{"name": p.name, "modified": p.modified, "seconds": round(p.seconds, 4), **p.details}
                           for p in self.passes]}


def _shape_inference(model: ir.Model) -> tuple[bool, dict[str, Any]]:
    result = common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    return result.modified, {}


def _check_sizes(model: ir.Model) -> tuple[bool, dict[str, Any]]:
    """Refuse values whose declared (inferred) shape is negative or too large to ever allocate.

    Runs right after shape inference, before folding, ONNX Runtime or the converter allocate anything:
    a graph input declared ``[2**20, 2**20]``, a ``ConstantOfShape`` / ``Tile`` / ``Expand`` whose inferred
    output is terabytes, is one line naming the value and its producer instead of an allocation failure.
    """
    from bitnet_coreml._files import check_budget  # noqa: PLC0415

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
    return False, {}


def _inline_foreign_functions(model: ir.Model) -> tuple[bool, dict[str, Any]]:
    """Inline functions that are not ours (exporter helper functions); keep the fused-op definitions."""
    ours = {k: f for k, f in model.functions.items() if k[0] == DOMAIN}
    foreign = len(model.functions) - len(ours)
    if not foreign:
        return False, {}
    for k in ours:
        del model.functions[k]
    try:
        common.InlinePass()(model)
    finally:
        for k, f in ours.items():
            model.functions[k] = f
    return True, {"inlined_functions": foreign}


def _constant_node(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx")


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


def _fold(model: ir.Model) -> tuple[bool, dict[str, Any]]:
    if not _has_foldable(model):
        return False, {"skipped": "nothing foldable"}
    from onnxscript.optimizer import fold_constants  # noqa: PLC0415  (heavy import, only when folding)

    res = fold_constants(model, input_size_limit=FOLD_SIZE_LIMIT, output_size_limit=FOLD_SIZE_LIMIT)
    common.RemoveUnusedNodesPass()(model)
    return bool(res.modified), {}


def _native_space_depth(model: ir.Model) -> tuple[bool, dict[str, Any]]:
    n = native_space_depth(model)
    return n > 0, {"rewritten": n}


def _fuse_bitlinear(model: ir.Model) -> tuple[bool, dict[str, Any]]:
    rep = fuse_bitlinear(model)
    return rep.fused > 0, {"fused": rep.fused, "ternary_unfused": rep.ternary_unfused}


def _fuse_norms(model: ir.Model) -> tuple[bool, dict[str, Any]]:
    n = fuse_rmsnorm(model)
    return n > 0, {"fused": n}


def _fuse_relu2(model: ir.Model) -> tuple[bool, dict[str, Any]]:
    n = fuse_relu2(model)
    return n > 0, {"fused": n}


def _cleanup(model: ir.Model) -> tuple[bool, dict[str, Any]]:
    a = common.RemoveUnusedNodesPass()(model).modified
    b = common.RemoveUnusedFunctionsPass()(model).modified
    common.TopologicalSortPass()(model)
    return bool(a or b), {}


DEFAULT_PASSES: list[tuple[str, Callable[[ir.Model], tuple[bool, dict[str, Any]]]]] = [
    ("inline_foreign_functions", _inline_foreign_functions),
    ("shape_inference", _shape_inference),
    ("check_sizes", _check_sizes),
    ("fold_constants", _fold),
    ("native_space_depth", _native_space_depth),
    ("fuse_bitlinear", _fuse_bitlinear),
    ("fuse_rmsnorm", _fuse_norms),
    ("fuse_relu2", _fuse_relu2),
    ("cleanup", _cleanup),
]


# Graphs built already fused (the checkpoint importer) say so; folding and fusing them again would
# only read every weight (a 2B model's tied 1.3 GB head included) to find nothing to do.
FUSED_METADATA_KEY = "bitnet_coreml.fused"
_SKIP_WHEN_FUSED = {"inline_foreign_functions", "fold_constants", "native_space_depth", "fuse_bitlinear", "fuse_rmsnorm", "fuse_relu2"}


def run_default_passes(model: ir.Model, *, until: str | None = None) -> PassReport:
    """Run the default pipeline in place (optionally stopping after the pass named ``until``)."""
    report = PassReport()
    prefused = model.metadata_props.get(FUSED_METADATA_KEY) == "1"
    for name, fn in DEFAULT_PASSES:
        if prefused and name in _SKIP_WHEN_FUSED:
            report.passes.append(PassRecord(name, False, 0.0, {"skipped": "graph imported already fused"}))
            if until == name:
                break
            continue
        t0 = time.perf_counter()
        with stage(f"graph pass {name}"):
            modified, details = fn(model)
        report.passes.append(PassRecord(name, modified, time.perf_counter() - t0, details))
        log.debug("pass %s: modified=%s %s", name, modified, details)
        if until == name:
            break
    return report
