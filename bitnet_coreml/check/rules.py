"""The rule predicates: one definition of "supported" for the checker, the converter and the predictor.

Each rule reads the imported graph (after ``run_default_passes``) and the resolved target, and
yields :class:`Finding` records (rule id, severity, node, actual value, limit, source). The limits
and their sources come from the capability database, never from constants here. Besides the
findings, this module answers two questions other stages ask:

* :func:`nodes_needing_split`: which weight dimensions > ``limits.max_dimension`` the converter splits;
* :func:`expected_units`: the compute unit (ANE, GPU or CPU) each op is expected to run on, and why
  (the ``[[unit_rule]]`` rows, evaluated by the op-support table :mod:`bitnet_coreml.opsupport`).

Rules register with :func:`rule`; the registry refuses duplicates. onnx-ir is only used through the
objects passed in, so importing this module stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bitnet_coreml.check.capabilities import MIB, CapabilityDatabase, default_database
from bitnet_coreml.check.size import SizeEstimate
from bitnet_coreml.check.split import SplitInfo, gemm_bias_of, split_of
from bitnet_coreml.check.split import nodes_needing_split as _split_nodes
from bitnet_coreml.opsupport import (
    CONV_OPS,
    OpUnit,
    conv_weight,
    expected_unit,
    mask_constant,
)
from bitnet_coreml.opsupport import dims as _dims
from bitnet_coreml.opsupport import fp16_max as _fp16_max
from bitnet_coreml.opsupport import max_dimension as _max_dimension
from bitnet_coreml.opsupport import node_id as _nid
from bitnet_coreml.opsupport import non_channel_dims as _non_channel_dims
from bitnet_coreml.opsupport import op_label as _op
from bitnet_coreml.vocab import DOMAIN, ONNX_DOMAINS

if TYPE_CHECKING:
    import onnx_ir as ir

    from bitnet_coreml.check.target import ResolvedTarget

__all__ = ["OpUnit", "expected_unit", "expected_units", "nodes_needing_split"]
_INT8_COMPUTE_OPS = ("MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv")
_FLOAT_DTYPES = {"FLOAT", "DOUBLE", "BFLOAT16"}


@dataclass(frozen=True)
class Finding:
    """One rule result. ``severity``: "error" (a violation), "warning", or "info" (fixed by the converter)."""

    rule: str
    severity: str
    message: str
    node: str | None = None
    actual: Any = None
    limit: Any = None
    source: str = ""
    fixed_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "severity": self.severity, "message": self.message, "node": self.node,
                "actual": self.actual, "limit": self.limit, "source": self.source, "fixed_by": self.fixed_by}


@dataclass
class RuleContext:
    model: ir.Model
    db: CapabilityDatabase
    target: ResolvedTarget
    size: SizeEstimate
    precision: str = "fp16"
    embed_bits: int | None = None
    splits: list[SplitInfo] = field(default_factory=list)
    overflow: list[OverflowConst] = field(default_factory=list)
    stateful: Any = None  # check.stateful.StatefulSpec of a --stateful conversion

    @property
    def state_bytes(self) -> int:
        """KV-cache bytes of a stateful package (0 otherwise)."""
        return self.stateful.cache_bytes(self.precision) if self.stateful is not None else 0

    @property
    def memory_bytes(self) -> int:
        """What the package holds in memory: weights plus KV-cache states."""
        return self.size.total_bytes + self.state_bytes

    def memory_label(self) -> str:
        return "estimated weights + KV cache" if self.stateful is not None else "estimated weights"


RuleFn = Callable[[RuleContext], Iterator[Finding]]
RULES: dict[str, tuple[RuleFn, str]] = {}


def rule(rule_id: str, doc: str) -> Callable[[RuleFn], RuleFn]:
    """Register a rule; a second registration of the same id is an error."""

    def deco(fn: RuleFn) -> RuleFn:
        if rule_id in RULES:
            raise RuntimeError(f"duplicate check rule {rule_id!r}")
        RULES[rule_id] = (fn, doc)
        return fn

    return deco


# --- graph helpers --------------------------------------------------------------------------------


def _tshape(t: ir.TensorProtocol) -> list[int]:
    """A tensor's (always static) shape as ints."""
    return [d if isinstance(d, int) else int(str(d)) for d in t.shape]


def _all_values(model: ir.Model) -> Iterator[tuple[ir.Value, ir.Node | None]]:
    """(value, producing node or None) for graph inputs, initializers and node outputs, each once."""
    seen: set[int] = set()
    for v in model.graph.inputs:
        seen.add(id(v))
        yield v, None
    for v in model.graph.initializers.values():
        if id(v) not in seen:
            seen.add(id(v))
            yield v, None
    for n in model.graph:
        for v in n.outputs:
            if id(v) not in seen:
                seen.add(id(v))
                yield v, n


def nodes_needing_split(model: ir.Model, limit: int | None = None,
                        db: CapabilityDatabase | None = None) -> list[SplitInfo]:
    """The weights the converter splits (vocabulary embedding, LM head): dims > ``limit`` (default: the
    database's max_dimension, 16384). The rule is :mod:`bitnet_coreml.check.split`, shared with the converter."""
    return _split_nodes(model, _max_dimension(db) if limit is None else limit)


def _split_outputs(model: ir.Model, splits: list[SplitInfo]) -> set[int]:
    """Ids of values whose large dims come from a split node (produced in chunks, not one tensor)."""
    names = {s.node for s in splits}
    return {id(v) for n in model.graph if _nid(n) in names for v in n.outputs}


@dataclass(frozen=True)
class OverflowConst:
    """A float initializer with values beyond fp16's range. ``mask``: an attention mask (see below)."""

    value: str
    peak: float
    mask: bool
    consumers: tuple[str, ...]


_SCAN_CHUNK = 1 << 16  # 256 KB of fp32: the abs() and max() passes stay in cache


def _abs_max(a: Any) -> float:
    """max |a| in one read of the data, through a small buffer (no weight-sized temporary); inf for NaN."""
    import numpy as np

    flat = a.reshape(-1)
    buf = np.empty(min(flat.size, _SCAN_CHUNK), flat.dtype)
    peak = 0.0
    for i in range(0, flat.size, _SCAN_CHUNK):
        c = flat[i:i + _SCAN_CHUNK]
        np.abs(c, out=buf[:c.size])
        m = float(buf[:c.size].max())
        if not m <= peak:  # also catches NaN
            peak = m if math.isfinite(m) else math.inf
    return peak


def fp16_overflow_constants(model: ir.Model, fmax: float) -> list[OverflowConst]:
    """Float initializers holding |x| > ``fmax``, read once (two reductions, no temporary copy).

    An *attention mask* (only its negative side is huge, and it is only added/selected into values
    that only Softmax reads) becomes -inf in fp16, which softmax maps to exactly 0: harmless, and
    the converter keeps it in fp16. Any other overflowing constant makes the converter keep its
    consumers in fp32 (``bitnet_coreml.lower.fp16``), which takes them off the ANE.
    """
    cands = [v for v in model.graph.initializers.values()
             if v.const_value is not None and v.const_value.dtype.name in _FLOAT_DTYPES and v.const_value.size]
    out: list[OverflowConst] = []
    for v in cands:
        t = v.const_value
        assert t is not None
        a = t.numpy()
        over = _abs_max(a) > fmax
        hi, lo = (float(a.max()), float(a.min())) if over else (0.0, 0.0)
        del a
        release = getattr(t, "release", None)
        if callable(release):
            # a memory-mapped weight (onnx-ir ExternalTensor): unmap it again, or its pages stay in our
            # RSS until exit; onnx-ir maps it anew on the next access
            release()
        if not over:
            continue
        peak = max(hi, -lo)
        users = [u[0] for u in v.uses()]
        mask = mask_constant(v, hi, fmax)
        out.append(OverflowConst(v.name or "", peak, mask, tuple(_nid(n) for n in users)))
    return out


def fp32_consumers(overflow: list[OverflowConst]) -> dict[str, str]:
    """node -> the constant that keeps it in fp32 (non-mask overflowing constants only)."""
    return {n: o.value for o in overflow if not o.mask for n in o.consumers}


# --- compute units --------------------------------------------------------------------------------


def expected_units(model: ir.Model, db: CapabilityDatabase | None = None, *, precision: str = "fp16",
                   ane: bool | None = True) -> list[OpUnit]:
    """:func:`expected_unit` for every node of the graph, in graph order."""
    db = db or default_database()
    split_nodes = frozenset(s.node for s in nodes_needing_split(model, db=db))
    fp32 = fp32_consumers(fp16_overflow_constants(model, _fp16_max(db))) if precision == "fp16" else {}
    return [expected_unit(n, db, precision=precision, split_nodes=split_nodes, ane=ane, fp32_nodes=fp32)
            for n in model.graph]


# --- the rules ------------------------------------------------------------------------------------


@rule("package_size", "estimated weight.bin bytes vs the platform's per-package limit (hard)")
def _package_size(ctx: RuleContext) -> Iterator[Finding]:
    lim = ctx.db.limit("package_bytes")
    limit = ctx.target.package_limit_bytes
    got = ctx.size.total_bytes
    if got > limit:
        bits = f"embed_bits={ctx.size.embed_bits}" if ctx.size.embed_bits else "no --embed-bits"
        yield Finding("package_size", lim.severity,
                      f"estimated weights {got:,} B exceed the {ctx.target.platform} per-package limit {limit:,} B "
                      f"(ternary at 2 bits, {ctx.size.precision}, {bits}); split the model or palettize with --embed-bits",
                      None, got, limit, lim.source)


def _memory_over(ctx: RuleContext, rule_id: str, limit_name: str, limit_mb: float, what: str, source: str
                 ) -> Iterator[Finding]:
    """A finding when the package's memory (weights + KV cache) exceeds ``limit_mb`` (``what``: the limit, worded)."""
    limit = int(limit_mb * MIB)
    if ctx.memory_bytes > limit:
        yield Finding(rule_id, ctx.db.limit(limit_name).severity,
                      f"{ctx.memory_label()} {ctx.memory_bytes / MIB:.1f} MB exceed the {what}",
                      None, ctx.memory_bytes, limit, source)


@rule("ane_size_budget", "estimated weights vs the seed's per-generation budget (soft)")
def _ane_budget(ctx: RuleContext) -> Iterator[Finding]:
    ane = ctx.target.ane
    if ane is not None and ane.model_size_budget_mb is not None:
        lim = ctx.db.limit("ane_generation_budget")
        yield from _memory_over(ctx, "ane_size_budget", lim.name, ane.model_size_budget_mb,
                                f"{ane.label} budget of {ane.model_size_budget_mb:g} MB (a soft budget; not "
                                "Apple-documented)", lim.source + "; " + ane.sources[-1])


@rule("gpu_memory", "estimated weights vs the seed's device-matrix memory limit of the chip's GPU (soft)")
def _gpu_memory(ctx: RuleContext) -> Iterator[Finding]:
    dev = ctx.target.device
    if dev is not None and dev.memory_limit_mb is not None:
        yield from _memory_over(ctx, "gpu_memory", "gpu_memory", dev.memory_limit_mb,
                                f"{dev.name} memory limit {dev.memory_limit_mb:g} MB of the capability database's "
                                "GPU row (GPU fallback)", dev.source)


@rule("dim_over_16384", "tensor dimensions > 16384: weights are split by the converter, anything else leaves the ANE")
def _dims_rule(ctx: RuleContext) -> Iterator[Finding]:
    lim = ctx.db.limit("max_dimension")
    limit = int(lim["value"])
    for s in ctx.splits:
        yield Finding("dim_over_16384", "info",
                      f"{s.op_type} {s.node}: weight {s.value!r} axis {s.axis} is {s.dim} > {limit}; "
                      f"fixed by the converter's split into {len(s.chunks)} chunks of <= {limit}",
                      s.node, s.dim, limit, lim.source, fixed_by=f"converter split: {len(s.chunks)} chunks {list(s.chunks)}")
    split_vals = {id(n.inputs[sp.input_index]) for n in ctx.model.graph
                  if (sp := split_of(n, limit)) is not None}
    split_vals |= {id(c) for n in ctx.model.graph if (c := gemm_bias_of(n, limit)) is not None}
    chunked = _split_outputs(ctx.model, ctx.splits)
    consumers: dict[int, ir.Node] = {}
    for n in ctx.model.graph:
        for v in n.inputs:
            if v is not None:
                consumers.setdefault(id(v), n)
    for v, producer in _all_values(ctx.model):
        if id(v) in split_vals or id(v) in chunked:
            continue
        d = _dims(v)
        user = producer or consumers.get(id(v))
        if not d or user is None:
            continue
        dd = _non_channel_dims(user, v, d)
        big = [x for x in dd if isinstance(x, int) and x > limit]
        if big:
            yield Finding("dim_over_16384", lim.severity,
                          f"value {v.name!r} (shape {d}) has a dimension {max(big)} > {limit} that the converter does "
                          f"not split; {_op(user)} {_nid(user)} falls off the ANE",
                          _nid(user), max(big), limit, lim.source)


@rule("rank_over_5", "tensor rank <= 5")
def _rank(ctx: RuleContext) -> Iterator[Finding]:
    from bitnet_coreml.lower.support import rank_refusals  # the converter's wording of the rule

    lim = ctx.db.limit("max_rank")
    for r in rank_refusals(ctx.model, int(lim["value"])):
        yield Finding("rank_over_5", lim.severity, r.message, r.node, r.actual, r.limit, lim.source)


@rule("lowering", "every op lowers: the converter's own refusals, decided before lowering (bitnet_coreml.lower.support)")
def _lowering(ctx: RuleContext) -> Iterator[Finding]:
    # One definition of "supported": the lowering registry and its static refusals, in the converter's
    # words (check never passes a graph convert refuses for these reasons). Rank is rank_over_5 above.
    from bitnet_coreml.lower.support import refusals

    for r in refusals(ctx.model, rank_limit=int(ctx.db.limit("max_rank")["value"])):
        if r.rule != "rank":
            yield Finding("lowering", "error", r.message, r.node, r.actual, None,
                          f"bitnet_coreml.lower ({r.rule}): what the converter can lower")


@rule("conv_limits", "conv channels <= 65536 and kernel width <= 13 stay on the ANE")
def _conv(ctx: RuleContext) -> Iterator[Finding]:
    ch = ctx.db.limit("max_channels")
    kw = ctx.db.limit("max_conv_kernel_width")
    for n in ctx.model.graph:
        cw = conv_weight(n) if n.domain in ONNX_DOMAINS and n.op_type in CONV_OPS else None
        if cw is None:
            continue
        wd, chans, _ = cw
        if chans > int(ch["value"]):
            yield Finding("channels_over_65536", ch.severity, f"{_nid(n)}: {chans} channels > {ch['value']}; off the ANE",
                          _nid(n), chans, int(ch["value"]), ch.source)
        if len(wd) > 2 and int(wd[-1]) > int(kw["value"]):
            yield Finding("conv_kernel_width", kw.severity,
                          f"{_nid(n)}: kernel width {wd[-1]} > {kw['value']}; off the ANE",
                          _nid(n), int(wd[-1]), int(kw["value"]), kw.source)


@rule("lut_bits", "palettization bits must be ANE-accelerated (1, 2, 4, 6, 8)")
def _lut(ctx: RuleContext) -> Iterator[Finding]:
    lim = ctx.db.limit("lut_bits")
    allowed = list(lim["values"])
    if ctx.embed_bits is not None and ctx.embed_bits not in allowed:
        yield Finding("lut_bits", lim.severity,
                      f"--embed-bits {ctx.embed_bits} is not an ANE-accelerated LUT size; allowed: {allowed}",
                      None, ctx.embed_bits, allowed, lim.source)
    if 2 not in allowed and ctx.size.params_ternary:
        yield Finding("lut_bits", lim.severity, f"ternary weights need 2-bit LUTs; the database allows {allowed}",
                      None, 2, allowed, lim.source)


@rule("int8_compute", "int8 x int8 compute only on A17 Pro / M4 and newer")
def _int8(ctx: RuleContext) -> Iterator[Finding]:
    lim = ctx.db.limit("int8_compute")
    chip = ctx.target.chip
    for n in ctx.model.graph:
        if n.domain in ONNX_DOMAINS and n.op_type in _INT8_COMPUTE_OPS:
            if chip is not None and chip.int8_compute:
                continue
            who = (f"{chip.name} has no int8 x int8 compute" if chip is not None and chip.int8_compute is False
                   else "int8 x int8 compute cannot be confirmed for this target (no chip given or unknown)")
            yield Finding("int8_compute", lim.severity, f"{n.op_type} {_nid(n)}: {who}; it computes in fp16",
                          _nid(n), chip.name if chip else None, "A17 Pro / M4 or newer", lim.source)


@rule("flexible_shape", "graph inputs with flexible (symbolic) dimensions lose the ANE")
def _flex(ctx: RuleContext) -> Iterator[Finding]:
    lim = ctx.db.limit("flexible_shapes")
    for v in ctx.model.graph.inputs:
        d = _dims(v)
        if d is None or any(not isinstance(x, int) for x in d):
            yield Finding("flexible_shape", lim.severity,
                          f"input {v.name!r} has flexible shape {d}; fix it (e.g. --seq-len) or use EnumeratedShapes "
                          f"(<= {lim['enumerated_max']}) to keep the ANE", v.name, d, "static shape", lim.source)


@rule("fp16_range", "constants must fit fp16 (max 65504); relu2 may overflow; epsilons must not flush to 0")
def _fp16(ctx: RuleContext) -> Iterator[Finding]:
    lim = ctx.db.limit("fp16_range")
    fmax, fmin_sub = float(lim["max"]), float(lim["min_subnormal"])
    if ctx.precision == "fp16":
        for o in ctx.overflow:
            if o.mask:
                yield Finding("fp16_mask_constant", "info",
                              f"initializer {o.value!r} holds {-o.peak:g}: an attention mask; it becomes -inf in fp16 "
                              "and softmax maps it to exactly 0", o.value, -o.peak, -fmax, lim.source,
                              fixed_by="none needed: the converter keeps the mask in fp16 (softmax gives exact 0)")
            else:
                yield Finding("fp16_overflow_constant", lim.severity,
                              f"initializer {o.value!r} holds |x| = {o.peak:g} > fp16 max {fmax:g}; the converter keeps "
                              f"its consumers ({', '.join(o.consumers) or 'none'}) in fp32, off the ANE",
                              o.value, o.peak, fmax, lim.source)
    for n in ctx.model.graph:
        if n.domain == DOMAIN and n.op_type == "Relu2":
            yield Finding("fp16_relu2_overflow", "info",
                          f"Relu2 {_nid(n)}: relu(x)^2 overflows fp16 for |x| > {math.sqrt(fmax):.1f}",
                          _nid(n), None, fmax, lim.source,
                          fixed_by="the converter's fp16-safety pass measures the MLP on a calibration input and "
                                   "rescales it by an exact power of two, or keeps it in fp32")
        if n.domain == DOMAIN and n.op_type == "RMSNorm" and "epsilon" in n.attributes:
            eps = n.attributes["epsilon"].as_float()
            if 0 < eps < fmin_sub / 2:
                yield Finding("fp16_epsilon", "warning",
                              f"RMSNorm {_nid(n)}: epsilon {eps:g} rounds to 0 in fp16 (smallest {fmin_sub:g}); "
                              "use an epsilon fp16 can represent (ml-ane-transformers uses 1e-7)",
                              _nid(n), eps, fmin_sub, lim.source)


def needed_features(model: ir.Model, embed_bits: int | None, *, stateful: bool = False
                    ) -> list[tuple[str, str | None]]:
    """(feature, first node needing it) for the Core ML features the converted graph uses."""
    out: list[tuple[str, str | None]] = [("mlprogram", None)]
    if stateful:  # a KV cache as state, in a package with prefill and decode functions
        out += [("state_tensors", None), ("multifunction", None)]
    first = next((_nid(n) for n in model.graph if n.domain == DOMAIN and n.op_type == "BitLinear"), None)
    if first is not None:
        out.append(("constexpr_lut_to_dense", first))
    elif embed_bits is not None:
        out.append(("constexpr_lut_to_dense", None))
    return out


@rule("min_os_features", "the minimum OS must have every Core ML feature the converted graph uses")
def _min_os(ctx: RuleContext) -> Iterator[Finding]:
    os_row = ctx.target.os
    for name, node in needed_features(ctx.model, ctx.embed_bits, stateful=ctx.stateful is not None):
        f = ctx.db.feature(name)
        if os_row.spec_version < f.min_spec_version:
            need = ctx.db.lowest_os(ctx.target.platform, f.min_spec_version)
            need_s = need.label if need else f"specification {f.min_spec_version}"
            yield Finding("min_os_features", "error",
                          f"{name} needs {need_s} or newer (Core ML spec {f.min_spec_version}); the minimum OS is "
                          f"{os_row.label} (spec {os_row.spec_version})" + (f"; first used by {node}" if node else ""),
                          node, os_row.label, need_s, f.source)


@rule("fp32_compute", "fp32 precision keeps every op off the ANE")
def _fp32(ctx: RuleContext) -> Iterator[Finding]:
    if ctx.precision == "fp32":
        r = ctx.db.unit_rules.get("fp32_gpu")
        yield Finding("fp32_compute", "warning", "precision fp32: the ANE computes in fp16, so every op runs on GPU/CPU",
                      None, "fp32", "fp16", r.source if r else "")


@rule("no_ane", "the target chip has no Neural Engine row")
def _no_ane(ctx: RuleContext) -> Iterator[Finding]:
    chip = ctx.target.chip
    if chip is not None and chip.ane_generation is None:
        yield Finding("no_ane", "warning", f"chip {chip.name} has no ANE generation in the capability database: "
                      "GPU/CPU only", None, None, "an ANE generation", chip.source)


def evaluate_rules(ctx: RuleContext) -> list[Finding]:
    """Every registered rule over ``ctx``, in registration order."""
    out: list[Finding] = []
    for fn, _ in RULES.values():
        out.extend(fn(ctx))
    return out
