"""The op-support table: one answer, for every stage, to "does this op convert, and where does it run?".

As torch.fx's ``OperatorSupport`` is one table for its checker and its partitioner, this module is the
one place ``check``, ``convert``, the fp16 planner, the splitter and the runtime's expectations (the
fallback plan ``check`` stores in the package) read what an ONNX op can do:

* **lowers**: whether the converter has a lowering (:mod:`bitnet_coreml.lower.registry`), the inputs it
  needs as compile-time constants, and the MIL ops the lowering builds;
* **units**: the compute units it can run on and why. Each ``[[unit_rule]]`` row of the capability
  database names a *matcher* from :data:`MATCHERS` (the vocabulary below), the op types it is limited to
  (``ops``; empty = any op), the units it excludes, a reason and a source. :func:`expected_unit` evaluates
  every row in file order (the bundled rows, then user rows from ``--capabilities``): the op runs on the
  first of ANE, GPU, CPU that no matching row excludes, and the first matching row that excludes the
  unit before it gives the reason. Nothing here knows a row by its id: a user row takes effect as it is;
* **limits**: dtype and shape limits (:func:`limit`): every number comes from the capability database
  (``data/capabilities.toml``, with its source), never from a constant in code;
* **fp16 hazards**: what can overflow or flush in fp16 (:data:`FP16_HAZARDS`, :func:`mask_constant`,
  :func:`mask_value`: the one definition of "an attention mask" for the static check and the planner).

This module imports neither onnx, coremltools nor numpy at import time: the runtime and the CLI's
capability loading use it cheaply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bitnet_coreml.vocab import DOMAIN, ONNX_DOMAINS

if TYPE_CHECKING:
    import onnx_ir as ir

    from bitnet_coreml.check.capabilities import CapabilityDatabase, UnitRule

CONV_OPS = ("Conv", "ConvTranspose")
UNIT_ORDER = ("ANE", "GPU", "CPU")  # preference: an op runs on the first unit no matching rule excludes


# --- limits: the capability database, and nowhere else -------------------------------------------


def database(db: CapabilityDatabase | None = None) -> CapabilityDatabase:
    """``db`` or the bundled capability database."""
    if db is not None:
        return db
    from bitnet_coreml.check.capabilities import default_database

    return default_database()


def limit(name: str, key: str = "value", db: CapabilityDatabase | None = None) -> Any:
    """Field ``key`` of the capability database's ``[limits.<name>]`` (e.g. ``limit("max_dimension")``)."""
    return database(db).limit(name)[key]


def max_dimension(db: CapabilityDatabase | None = None) -> int:
    """The ANE's largest tensor dimension (16384 in the bundled database); the splitter cuts weights to it."""
    return int(limit("max_dimension", db=db))


def fp16_max(db: CapabilityDatabase | None = None) -> float:
    """fp16's largest finite value (65504): what the fp16 planner and the check compare against."""
    return float(limit("fp16_range", "max", db))


def max_rank(db: CapabilityDatabase | None = None) -> int:
    """Core ML's largest tensor rank (5)."""
    return int(limit("max_rank", db=db))


# --- graph helpers (shared by the matchers and the check rules) -----------------------------------


def node_id(node: ir.Node) -> str:
    """A node's name, or ``Op->first output`` for an unnamed node (the check's node naming)."""
    return node.name or f"{node.op_type}->{node.outputs[0].name if node.outputs else '?'}"


def op_label(node: ir.Node) -> str:
    """``Op`` for the ONNX domain, ``domain::Op`` otherwise: how rows name op types."""
    return node.op_type if node.domain in ONNX_DOMAINS else f"{node.domain}::{node.op_type}"


def dims(v: ir.Value) -> list[int | str] | None:
    """A value's dims (symbolic ones as strings), from its shape or its constant; None when unknown."""
    if v.shape is not None:
        return [d if isinstance(d, int) else str(d) for d in v.shape.dims]
    if v.const_value is not None:
        return [d if isinstance(d, int) else int(str(d)) for d in v.const_value.shape]
    return None


def dtype_name(v: ir.Value) -> str:
    """ONNX element type name (``FLOAT``, ``INT64``...) of a value; "" when unknown."""
    if v.const_value is not None:
        return v.const_value.dtype.name
    return v.dtype.name if v.dtype is not None else ""


def int_attr(node: ir.Node, name: str) -> list[int]:
    """An int or ints attribute as a list ([] when absent)."""
    a = node.attributes.get(name)
    if a is None:
        return []
    v = a.value
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def non_channel_dims(node: ir.Node, v: ir.Value, d: list[int | str]) -> list[int | str]:
    """Dims the max_dimension rule applies to: conv channel axes have their own (max_channels) limit."""
    if node.domain in ONNX_DOMAINS and node.op_type in CONV_OPS:
        if v.const_value is not None:
            return d[2:]
        return d[:1] + d[2:]
    return d


def _values(node: ir.Node) -> list[tuple[ir.Value, list[int | str] | None]]:
    return [(v, dims(v)) for v in (*node.inputs, *node.outputs) if v is not None]


# --- unit rules: the matcher vocabulary ------------------------------------------------------------


@dataclass(frozen=True)
class UnitQuery:
    """What a matcher sees besides the node: the conversion's precision and what the converter changes."""

    db: CapabilityDatabase
    precision: str = "fp16"
    split_nodes: frozenset[str] = frozenset()  # nodes whose weight the converter splits (check.split)
    fp32_nodes: dict[str, str] = field(default_factory=dict)  # node -> constant that keeps it in fp32


# A matcher returns None (no match) or the detail shown after the row's reason ("" for none).
MatchFn = Callable[["ir.Node", "UnitRule", UnitQuery], "str | None"]


@dataclass(frozen=True)
class Matcher:
    fn: MatchFn
    doc: str
    params: tuple[str, ...] = ()  # row fields the matcher needs


MATCHERS: dict[str, Matcher] = {}


def _matcher(name: str, doc: str, params: tuple[str, ...] = ()) -> Callable[[MatchFn], MatchFn]:
    def deco(fn: MatchFn) -> MatchFn:
        if name in MATCHERS:
            raise RuntimeError(f"duplicate unit-rule matcher {name!r}")
        MATCHERS[name] = Matcher(fn, doc, params)
        return fn

    return deco


@_matcher("op", "the node's op type is one of `ops` (every node of those types)", ("ops",))
def _m_op(node: ir.Node, r: UnitRule, q: UnitQuery) -> str | None:
    return "" if op_label(node) in r.ops else None


@_matcher("foreign_domain", "the node's domain is neither ONNX nor bitnet_coreml (a custom layer)")
def _m_foreign(node: ir.Node, r: UnitRule, q: UnitQuery) -> str | None:
    return None if node.domain in ONNX_DOMAINS or node.domain == DOMAIN else f"domain {node.domain}"


def number_attr(node: ir.Node, name: str) -> list[int | float]:
    """The numbers of an int, float, ints or floats attribute ([] when absent or of another kind)."""
    a = node.attributes.get(name)
    v = a.value if a is not None else None
    vals = list(v) if isinstance(v, (list, tuple)) else [v]
    return [x for x in vals if isinstance(x, (int, float)) and not isinstance(x, bool)]


@_matcher("attribute_above", "a numeric attribute `attribute` has a value above `above` (e.g. dilations > 1)",
          ("attribute", "above"))
def _m_attr(node: ir.Node, r: UnitRule, q: UnitQuery) -> str | None:
    vals = number_attr(node, str(r.attribute))
    return f"{r.attribute} {vals}" if any(x > float(r.above or 0) for x in vals) else None


@_matcher("dtype", "an input or output of the node has an element type in `dtypes` (ONNX names: DOUBLE, INT64...)",
          ("dtypes",))
def _m_dtype(node: ir.Node, r: UnitRule, q: UnitQuery) -> str | None:
    for v, _ in _values(node):
        if dtype_name(v) in r.dtypes:
            return f"value {v.name} dtype {dtype_name(v)}"
    return None


@_matcher("dynamic_shape", "an input or output of the node has an unknown or symbolic dimension")
def _m_dynamic(node: ir.Node, r: UnitRule, q: UnitQuery) -> str | None:
    for v, d in _values(node):
        if d is None or any(not isinstance(x, int) for x in d):
            return f"value {v.name} shape {d}"
    return None


@_matcher("fp32", "the node computes in fp32: precision fp32, or the fp16 plan keeps it in fp32 (a constant "
                  "beyond fp16's range)")
def _m_fp32(node: ir.Node, r: UnitRule, q: UnitQuery) -> str | None:
    if q.precision == "fp32":
        return "conversion precision fp32"
    nid = node_id(node)
    if nid in q.fp32_nodes:
        return f"kept in fp32: constant {q.fp32_nodes[nid]!r} overflows fp16"
    return None


@_matcher("dimension_above_limit", "an input or output has a (non-channel) dimension above limits.max_dimension "
                                   "that the converter does not split")
def _m_dim(node: ir.Node, r: UnitRule, q: UnitQuery) -> str | None:
    if node_id(node) in q.split_nodes:
        return None
    lim = max_dimension(q.db)
    for v, d in _values(node):
        if d and any(isinstance(x, int) and x > lim for x in non_channel_dims(node, v, d)):
            return f"value {v.name} shape {d}"
    return None


def conv_weight(node: ir.Node) -> tuple[list[int], int, int | None] | None:
    """(weight dims, channels = max(out, in * group), kernel width or None) of a node's static weight (input 1)."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    wd = dims(w) if w is not None else None
    if not wd or len(wd) < 2 or not all(isinstance(d, int) for d in wd):
        return None
    ints = [int(d) for d in wd]
    group = max(1, int_attr(node, "group")[0] if "group" in node.attributes else 1)
    return ints, max(ints[0], ints[1] * group), (ints[-1] if len(ints) > 2 else None)


@_matcher("conv_weight_above_limit", "the weight (input 1) has more channels than limits.max_channels or a kernel "
                                     "wider than limits.max_conv_kernel_width")
def _m_conv(node: ir.Node, r: UnitRule, q: UnitQuery) -> str | None:
    cw = conv_weight(node)
    if cw is None:
        return None
    wd, chans, kw = cw
    if chans > int(limit("max_channels", db=q.db)) or (kw is not None and kw > int(limit("max_conv_kernel_width",
                                                                                           db=q.db))):
        return f"weight {wd}"
    return None


def row_matches(node: ir.Node, r: UnitRule, q: UnitQuery) -> str | None:
    """The detail of ``r`` matching ``node`` (``ops`` limits every matcher), or None."""
    if r.ops and op_label(node) not in r.ops:
        return None
    return MATCHERS[r.match].fn(node, r, q)


@dataclass(frozen=True)
class OpUnit:
    """Where one node is expected to run, and why (the row that decided it)."""

    node: str
    op_type: str
    unit: str
    reason: str
    source: str = ""
    rule: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "op_type": self.op_type, "unit": self.unit, "reason": self.reason,
                "source": self.source, "rule": self.rule}


def expected_unit(node: ir.Node, db: CapabilityDatabase, *, precision: str = "fp16",
                  split_nodes: frozenset[str] = frozenset(), ane: bool | None = True,
                  fp32_nodes: dict[str, str] | None = None) -> OpUnit:
    """The compute unit ``node`` is expected to run on and why (see the module docstring)."""
    nid, op = node_id(node), op_label(node)
    if ane is False:
        return OpUnit(nid, op, "GPU", "the target has no Neural Engine", "capability database chip row", "no_ane")
    q = UnitQuery(db, precision, split_nodes, dict(fp32_nodes or {}))
    excluded: set[str] = set()
    why: dict[str, tuple[UnitRule, str]] = {}  # excluded unit -> the first row excluding it
    for r in db.unit_rules.values():
        if set(r.excludes) <= excluded:
            continue  # it cannot change the unit or the reason
        detail = row_matches(node, r, q)
        if detail is None:
            continue
        for u in r.excludes:
            why.setdefault(u, (r, detail))
        excluded |= set(r.excludes)
    unit = next(u for u in UNIT_ORDER if u not in excluded)
    if unit != UNIT_ORDER[0]:
        r, detail = why[UNIT_ORDER[UNIT_ORDER.index(unit) - 1]]
        return OpUnit(nid, op, unit, r.reason + (f" ({detail})" if detail else ""), r.source, r.id)
    reason = "no rule moves it off the ANE"
    if nid in split_nodes:
        reason += f" (after the converter splits its weight into chunks <= {max_dimension(db)})"
    return OpUnit(nid, op, "ANE", reason, "", "ane_default")


# --- fp16 hazards ----------------------------------------------------------------------------------

# fused / ONNX op -> what overflows or flushes in fp16, and what the converter does about it.
FP16_HAZARDS: dict[str, str] = {
    f"{DOMAIN}::Relu2": "relu(x)^2 overflows fp16 for |x| > sqrt(fp16 max); the fp16 planner rescales the MLP by an "
                      "exact power of two before its scale-invariant RMSNorm, or keeps it in fp32",
    f"{DOMAIN}::RMSNorm": "an epsilon below half of fp16's smallest subnormal rounds to 0",
    f"{DOMAIN}::BitLinear": "the activation scale Qp / max|x| is not representable once max|x| < Qp / fp16 max; the "
                          "lowering divides by max|x| first",
    "Softmax": "an attention mask (-FLT_MAX) becomes -inf in fp16; softmax maps it to exactly 0 (kept in fp16)",
}


def feeds_softmax_only(v: ir.Value) -> bool:
    """True when ``v`` has readers and every one is a Softmax."""
    uses = [u.node for u in v.uses()]
    return bool(uses) and all(n.domain in ONNX_DOMAINS and n.op_type == "Softmax" for n in uses)


def mask_value(v: ir.Value, hi: float, lo: float, fmax: float) -> bool:
    """An attention mask *value*: only its negative side passes ``-fmax`` and only Softmax reads it.

    The planner's test on measured ranges: fp16 turns it into -inf, which softmax maps to exactly 0
    (intended); keeping it in fp32 would only push attention off the ANE.
    """
    return hi <= fmax and lo < -fmax and feeds_softmax_only(v)


def mask_constant(v: ir.Value, hi: float, fmax: float) -> bool:
    """An attention mask *constant*: its positive side fits fp16 and it is only added / selected into
    values only Softmax reads (the check's static test, one step before :func:`mask_value`)."""
    users = [u.node for u in v.uses()]
    return (hi <= fmax and bool(users)
            and all(n.domain in ONNX_DOMAINS and n.op_type in ("Add", "Sub", "Where")
                    and all(feeds_softmax_only(o) for o in n.outputs) for n in users))


# --- the table -------------------------------------------------------------------------------------


SPLIT_OPS = {"MatMul": "weight B columns", "Gemm": "weight B rows (transB=1)", "Gather": "table rows (axis 0)"}


@dataclass(frozen=True)
class OpSupport:
    """One row of the op-support table (``op``: ``Op`` or ``domain::Op``)."""

    op: str
    lowers: bool
    mil_ops: tuple[str, ...]
    const_inputs: tuple[int, ...]
    units: tuple[str, ...]  # the units no op-wide rule excludes (attribute/shape rules may exclude more)
    why: dict[str, str]  # excluded unit -> the reason of the op-wide row excluding it
    unit_rules: tuple[str, ...]  # the rows that may move this op off a unit (op-wide or per node)
    limits: dict[str, Any]  # shape and dtype limits that apply to it, from the capability database
    fp16_hazard: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "lowers": self.lowers, "mil_ops": list(self.mil_ops),
                "const_inputs": list(self.const_inputs), "units": list(self.units), "why": dict(self.why),
                "unit_rules": list(self.unit_rules), "limits": dict(self.limits), "fp16_hazard": self.fp16_hazard}


def _split_op(op: str) -> tuple[str, str]:
    domain, _, op_type = op.rpartition("::")
    return domain, op_type


def op_support(op: str, db: CapabilityDatabase | None = None) -> OpSupport:
    """The table row of ``op`` (``"Gather"``, ``"bitnet_coreml::BitLinear"``)."""
    from bitnet_coreml.lower import registry  # loads the lowerings: coremltools

    db = database(db)
    domain, op_type = _split_op(op)
    lowers = registry.lowers(domain, op_type)
    why: dict[str, str] = {}
    rules: list[str] = []
    limits: dict[str, Any] = {"max_rank": max_rank(db), "max_dimension": max_dimension(db)}
    if op in SPLIT_OPS:
        limits["split_by_converter"] = SPLIT_OPS[op]
    foreign = domain not in ONNX_DOMAINS and domain != DOMAIN
    for r in db.unit_rules.values():
        if (r.ops and op not in r.ops) or (r.match == "foreign_domain" and not foreign):
            continue
        rules.append(r.id)
        if r.match in ("op", "foreign_domain"):  # every node of the op
            for u in r.excludes:
                why.setdefault(u, r.reason)
        elif r.match == "conv_weight_above_limit":
            limits["max_channels"] = int(limit("max_channels", db=db))
            limits["max_conv_kernel_width"] = int(limit("max_conv_kernel_width", db=db))
        elif r.match == "dtype":
            for u in r.excludes:  # element types that keep the op off a unit
                limits.setdefault("dtypes_off", {}).setdefault(u, []).extend(r.dtypes)
    return OpSupport(op, lowers, registry.mil_ops(domain, op_type) if lowers else (),
                     registry.const_inputs(domain, op_type) if lowers else (),
                     tuple(u for u in UNIT_ORDER if u not in why), why, tuple(rules), limits, FP16_HAZARDS.get(op))


def support_table(db: CapabilityDatabase | None = None) -> list[OpSupport]:
    """:func:`op_support` of every op with a lowering, sorted by name."""
    from bitnet_coreml.lower import registry

    return [op_support(op, db) for op in registry.supported_ops()]


def matcher_docs() -> Iterator[tuple[str, str, tuple[str, ...]]]:
    """(name, what it matches, the row fields it needs) of every matcher, for docs and error messages."""
    for name, m in MATCHERS.items():
        yield name, m.doc, m.params
