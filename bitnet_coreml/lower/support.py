"""What the converter refuses, decided before lowering: one definition for ``convert`` and ``check``.

:func:`refusals` reads the graph (after the default passes) and returns every reason the lowering
would refuse that can be decided statically, each one line naming the node (or graph input), the
input and the rule:

* ``unsupported_op``: op types without a lowering (:mod:`bitnet_coreml.lower.registry`), all at once;
* ``value_type``: sequence / optional / map values (Core ML has tensors only);
* ``input_dtype``: graph inputs of an element type a Core ML model cannot declare;
* ``const_input``: a graph input feeding an input the lowering needs as a compile-time constant
  (the positions each lowering declares with ``@lowering(..., const_inputs=...)``);
* ``attribute``: what a lowering refuses from the node's attributes / outputs alone (its
  ``@lowering(..., refuses=...)`` predicate: dilated pooling, training mode, ...);
* ``rank``: a value of rank above the capability database's ``max_rank`` (Core ML tensors: rank <= 5).

``convert`` raises them (:func:`check_lowerable`) before any work; ``check`` reports each as a
violation with the same words (rule ``lowering``; rank as ``rank_over_5``). Refusals that depend on
values computed while lowering (a shape that only folding reveals) stay in the lowerings, which
raise the project's errors with the same wording (:func:`bitnet_coreml.lower.registry.must_be_constant`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir

from bitnet_coreml.errors import InputError, UnsupportedOpError
from bitnet_coreml.lower import registry
from bitnet_coreml.opsupport import dims as _dims
from bitnet_coreml.opsupport import max_rank
from bitnet_coreml.opsupport import op_label as _op

# Graph input element types a Core ML model can declare (int64 is declared int32, bool as int32 0/1).
INPUT_DTYPES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.INT32: "int32",
                ir.DataType.INT64: "int64 (declared int32)", ir.DataType.BOOL: "bool (declared int32 0/1)"}
_SHOWN = 5  # refusals spelled out in convert's one-line error

_SAFE = re.compile(r"[^0-9A-Za-z_]")


@dataclass(frozen=True)
class Refusal:
    """One reason the converter refuses the graph: rule id, node (or graph input) name, one-line message."""

    rule: str
    node: str | None
    message: str
    actual: Any = None
    limit: Any = None


def safe_name(name: str) -> str:
    """A MIL-legal identifier for an ONNX name (letters, digits, underscore; not starting with a digit)."""
    s = _SAFE.sub("_", name) or "v"
    return f"v_{s}" if s[0].isdigit() else s


def node_names(graph: ir.Graph) -> dict[int, str]:
    """``id(node) -> name`` as the converter names nodes: unique, deterministic, MIL-legal.

    Names are kept where possible and numbered in graph order otherwise; a graph already named by
    :func:`assign_node_names` maps to its own names, so ``check`` and ``convert`` say the same.
    """
    seen: set[str] = set()
    out: dict[int, str] = {}
    for i, node in enumerate(graph):
        base = safe_name(node.name) if node.name else f"{node.op_type.lower()}_{i}"
        name = base
        k = 1
        while name in seen:
            name = f"{base}_{k}"
            k += 1
        seen.add(name)
        out[id(node)] = name
    return out


def assign_node_names(graph: ir.Graph) -> None:
    """Give every node its :func:`node_names` name (in place): lowerings derive MIL op names from them."""
    names = node_names(graph)
    for node in graph:
        node.name = names[id(node)]


def _kind(v: ir.Value) -> str | None:
    """'sequence' / 'optional' / 'map' ... for a non-tensor value, None for a tensor (or an untyped value)."""
    t = v.type
    if t is None or isinstance(t, ir.TensorType):
        return None
    return type(t).__name__.removesuffix("Type").lower() or "non-tensor"


def input_dtype_message(v: ir.Value, reader: str | None = None) -> str:
    """The one wording of "graph input ``v`` has an element type Core ML cannot declare"."""
    by = f" (read by node {reader!r})" if reader else ""
    dt = v.dtype.name if v.dtype is not None else "unknown"
    return (f"graph input {v.name!r}{by}: dtype {dt} is not supported; allowed: "
            f"{', '.join(INPUT_DTYPES.values())}")


def rank_message(where: str, v: ir.Value | str, dims: list[Any], limit: int) -> str:
    """The one wording of the rank rule (``where``: "node 'n' (Op): output" or "graph input")."""
    name = v if isinstance(v, str) else v.name
    return f"{where} {name!r} has rank {len(dims)} > {limit} (shape {dims}); Core ML tensors have rank <= {limit}"


def _is_model_input(v: ir.Value, graph: ir.Graph) -> bool:
    return v.is_graph_input() and not (v.const_value is not None and v.name in graph.initializers)


def rank_refusals(model: ir.Model, limit: int | None = None) -> list[Refusal]:
    """Values (graph inputs, initializers, node outputs) whose rank is above ``limit`` (default: the database's)."""
    limit = max_rank() if limit is None else limit
    g = model.graph
    names = node_names(g)
    out: list[Refusal] = []
    seen: set[int] = set()
    for v in [*g.inputs, *g.initializers.values()]:
        d = _dims(v)
        if id(v) not in seen and d is not None and len(d) > limit:
            kind = "graph input" if v.is_graph_input() else "initializer"
            out.append(Refusal("rank", v.name, rank_message(kind, v, d, limit), len(d), limit))
        seen.add(id(v))
    for node in g:
        for v in node.outputs:
            d = _dims(v)
            if id(v) not in seen and d is not None and len(d) > limit:
                nm = names[id(node)]
                out.append(Refusal("rank", nm, rank_message(f"node {nm!r} ({node.op_type}): output", v, d, limit),
                                   len(d), limit))
            seen.add(id(v))
    return out


def refusals(model: ir.Model, *, rank_limit: int | None = None) -> list[Refusal]:
    """Every statically decidable reason the converter refuses ``model``; see the module docstring."""
    g = model.graph
    names = node_names(g)
    out: list[Refusal] = []
    missing: dict[str, list[str]] = {}
    for node in g:
        if not registry.lowers(node.domain, node.op_type):
            missing.setdefault(_op(node), []).append(names[id(node)])
    if missing:
        parts = [f"{op} (node{'s' if len(ns) > 1 else ''} {', '.join(repr(n) for n in ns[:3])}"
                 f"{' ...' if len(ns) > 3 else ''})" for op, ns in sorted(missing.items())]
        first = names[id(next(n for n in g if _op(n) in missing))]
        out.append(Refusal("unsupported_op", first,
                           f"{len(missing)} unsupported op type(s): {', '.join(parts)}; supported: "
                           f"{', '.join(registry.supported_ops())}", sorted(missing)))
    readers: dict[int, str] = {}
    for node in g:
        for v in node.inputs:
            if v is not None:
                readers.setdefault(id(v), names[id(node)])
    for v in g.inputs:
        if not _is_model_input(v, g):
            continue
        kind = _kind(v)
        if kind is not None:
            out.append(Refusal("value_type", v.name, f"graph input {v.name!r} has type {v.type}; Core ML model "
                               "inputs are tensors (sequence/optional types are not supported)", kind))
        elif v.dtype is not None and v.dtype not in INPUT_DTYPES:
            out.append(Refusal("input_dtype", v.name, input_dtype_message(v, readers.get(id(v))), v.dtype.name))
    for node in g:
        for v in node.outputs:
            kind = _kind(v)
            if kind is not None:
                nm = names[id(node)]
                out.append(Refusal("value_type", nm, f"node {nm!r} ({node.op_type}): output {v.name!r} has type "
                                   f"{v.type}; Core ML has tensors only (sequence/optional types are not supported)",
                                   kind))
        if not registry.lowers(node.domain, node.op_type):
            continue
        why = registry.static_refusal(node)
        if why:
            nm = names[id(node)]
            out.append(Refusal("attribute", nm, f"node {nm!r} ({node.op_type}): {why}"))
        for i in registry.const_inputs(node.domain, node.op_type):
            v = node.inputs[i] if i < len(node.inputs) else None
            if v is not None and v.name and _is_model_input(v, g):
                # The same words the lowering raises, with the node named the way the converter names it.
                out.append(Refusal("const_input", names[id(node)],
                                   registry.must_be_constant(node, i, names[id(node)])))
    out.extend(rank_refusals(model, rank_limit))
    return out


def check_lowerable(model: ir.Model) -> None:
    """Raise the converter's refusals of ``model`` as one line (UnsupportedOpError / InputError)."""
    found = refusals(model)
    if not found:
        return
    text = "; ".join(r.message for r in found[:_SHOWN])
    if len(found) > _SHOWN:
        text += f"; and {len(found) - _SHOWN} more (run `bitnet-coreml check` for the full list)"
    if all(r.rule == "input_dtype" for r in found):
        raise InputError(text)
    raise UnsupportedOpError(text)
