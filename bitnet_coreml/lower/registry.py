"""The registry of lowerings from onnx-ir nodes to coremltools MIL builder calls.

A lowering is a function ``fn(ctx, node) -> sequence of outputs`` registered for one ``(domain, op_type)``
with :func:`lowering`. Each output is either a MIL ``Var`` (built with ``mb.*`` inside the program being
built) or a ``numpy.ndarray`` when the result is a compile-time constant (shape arithmetic, folded
``Shape``/``Range``/``ConstantOfShape``). Returning numpy keeps constants foldable for later nodes
(``Reshape`` needs a constant shape, ``Slice`` constant starts, and so on); the program builder
materialises numpy values as MIL constants only where a MIL op consumes them.

The registry refuses duplicates and, on a miss, lists what is supported. A lowering declares the
inputs it can only take as compile-time constants (``const_inputs``): the static refusals of
:mod:`bitnet_coreml.lower.support`, which ``check`` reads too, decide from them before lowering.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from bitnet_coreml.errors import UnsupportedOpError
from bitnet_coreml.vocab import ONNX_DOMAINS

LoweredValue = Any  # a MIL Var or a numpy array
LoweringFn = Callable[["LoweringContext", ir.Node], Sequence[LoweredValue]]

_REGISTRY: dict[tuple[str, str], LoweringFn] = {}
_CONST_INPUTS: dict[tuple[str, str], tuple[tuple[int, ...], str]] = {}
RefusesFn = Callable[[ir.Node], "str | None"]
_REFUSES: dict[tuple[str, str], RefusesFn] = {}
FIXED_SHAPES = "fixed shapes only"


def _norm_domain(domain: str) -> str:
    return "" if domain in ONNX_DOMAINS else domain


def lowering(op_type: str, domain: str = "", *, const_inputs: Iterable[int] = (), const_reason: str = FIXED_SHAPES,
             refuses: RefusesFn | None = None) -> Callable[[LoweringFn], LoweringFn]:
    """Register ``fn`` as the lowering of ``domain::op_type``; a second registration is an error.

    ``const_inputs``: input positions the lowering always needs as compile-time constants (it calls
    :meth:`LoweringContext.const` on them whenever they are present), ``const_reason`` why.
    ``refuses(node)``: the reason the lowering refuses ``node`` from its attributes / outputs alone, or
    None; the lowering raises it itself too (one predicate, read by ``check`` and ``convert`` before lowering).
    """

    key = (_norm_domain(domain), op_type)

    def deco(fn: LoweringFn) -> LoweringFn:
        if key in _REGISTRY:
            raise RuntimeError(f"duplicate lowering for {key[0] or 'ai.onnx'}::{op_type}")
        _REGISTRY[key] = fn
        _CONST_INPUTS[key] = (tuple(const_inputs), const_reason)
        if refuses is not None:
            _REFUSES[key] = refuses
        return fn

    return deco


def _load_all() -> None:
    # Importing the op-family modules registers their lowerings.
    from bitnet_coreml.lower import bitnet, ops, state  # noqa: F401


def supported_ops() -> list[str]:
    """Every ``domain::op_type`` (``op_type`` alone for the default domain) that has a lowering."""
    _load_all()
    return sorted(f"{d}::{o}" if d else o for d, o in _REGISTRY)


def get_lowering(node: ir.Node) -> LoweringFn:
    _load_all()
    key = (_norm_domain(node.domain), node.op_type)
    fn = _REGISTRY.get(key)
    if fn is None:
        raise UnsupportedOpError(
            f"no lowering for op {node.op_type!r} (domain {node.domain or 'ai.onnx'!r}, node {node.name!r}); "
            f"supported: {', '.join(supported_ops())}"
        )
    return fn


def lowers(domain: str, op_type: str) -> bool:
    """True when ``domain::op_type`` has a lowering."""
    _load_all()
    return (_norm_domain(domain), op_type) in _REGISTRY


def const_inputs(domain: str, op_type: str) -> tuple[int, ...]:
    """The input positions the lowering of ``domain::op_type`` needs as compile-time constants."""
    _load_all()
    return _CONST_INPUTS.get((_norm_domain(domain), op_type), ((), FIXED_SHAPES))[0]


def static_refusal(node: ir.Node) -> str | None:
    """Why the lowering of ``node`` refuses it from its attributes / outputs alone (None: it does not)."""
    _load_all()
    fn = _REFUSES.get((_norm_domain(node.domain), node.op_type))
    return fn(node) if fn is not None else None


def mil_ops(domain: str, op_type: str) -> tuple[str, ...]:
    """The MIL ops the lowering of ``domain::op_type`` builds, read from its source (sorted).

    Every name the lowering function (and the functions of ``bitnet_coreml.lower`` it calls, transitively)
    writes as an attribute (``mb().matmul``) or a string (``binary(..., "add")``), or holds in a variable
    it closes over (the lowerings registered in a loop), that is a core MIL op of coremltools' registry. Read from the code that builds the program, so it cannot drift from it;
    a branch that only folds constants in numpy builds none of them.
    """
    _load_all()
    fn = _REGISTRY.get((_norm_domain(domain), op_type))
    return _mil_ops_of(fn) if fn is not None else ()


@functools.cache
def _mil_op_names() -> frozenset[str]:
    from bitnet_coreml._quiet import coremltools as quiet_coremltools

    quiet_coremltools()
    import coremltools.converters.mil.mil.ops.defs  # noqa: F401 - importing registers the op definitions
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    return frozenset(SSAOpRegistry.core_ops)


def _parsed(fn: Callable[..., Any]) -> ast.AST:
    src = textwrap.dedent(inspect.getsource(fn)).strip()
    try:
        return ast.parse(src)
    except SyntaxError:
        pass
    # a lambda's source is the whole lines it stands on: keep from "lambda" on, and drop the end of the
    # call around it until the rest parses
    body = src[src.find("lambda"):]
    while body:
        try:
            return ast.parse(body)
        except SyntaxError:
            body = body[:-1]
    return ast.parse("")


def _mil_ops_of(fn: LoweringFn) -> tuple[str, ...]:
    # a lowering made by a registering loop names its MIL op (or a builder function) through a variable it
    # closes over
    cells = [c.cell_contents for c in fn.__closure__ or ()]
    names: set[str] = {x for c in cells for x in (c if isinstance(c, tuple) else (c,)) if isinstance(x, str)}
    todo = [f for f in (fn, *cells) if inspect.isfunction(f)]
    seen = {id(f) for f in todo}
    while todo:
        f = todo.pop()
        for n in ast.walk(_parsed(f)):
            if isinstance(n, ast.Attribute):
                names.add(n.attr)
            elif isinstance(n, ast.Constant) and isinstance(n.value, str):
                names.add(n.value)
            elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name):
                callee = f.__globals__.get(n.func.id)
                if inspect.isfunction(callee) and callee.__module__.startswith(__package__) \
                        and id(callee) not in seen:
                    seen.add(id(callee))
                    todo.append(callee)
    return tuple(sorted(names & _mil_op_names()))


def must_be_constant(node: ir.Node, i: int, node_name: str | None = None) -> str:
    """The one wording (check and convert) of "input ``i`` of ``node`` must be a compile-time constant".

    ``node_name`` overrides ``node.name`` (``check`` names nodes as the converter will, without renaming).
    """
    v = node.inputs[i] if i < len(node.inputs) else None
    named = f" ({v.name!r})" if v is not None and v.name else ""
    why = _CONST_INPUTS.get((_norm_domain(node.domain), node.op_type), ((), FIXED_SHAPES))[1]
    return (f"node {node_name or node.name!r} ({node.op_type}): input {i}{named} must be a compile-time constant "
            f"for Core ML ({why})")


def unsupported_ops(nodes: Iterable[ir.Node]) -> list[str]:
    """Every op type among ``nodes`` that has no lowering (sorted, unique), for one error listing them all."""
    _load_all()
    missing = {
        f"{n.domain}::{n.op_type}" if _norm_domain(n.domain) else n.op_type
        for n in nodes
        if (_norm_domain(n.domain), n.op_type) not in _REGISTRY
    }
    return sorted(missing)


@dataclass
class LoweringContext:
    """What a lowering sees: the values lowered so far and the conversion options.

    ``values`` maps ONNX value names to MIL Vars or numpy constants. ``compute_precision`` is
    ``"fp16"`` or ``"fp32"``; ``opset`` is the coremltools ``target`` the program is built for
    (e.g. ``ct.target.iOS17``). ``fp32_nodes`` names nodes the fp16-safety analysis keeps in fp32.
    ``notes`` collects human-readable notes (rescaling done, ops kept in fp32) for the report.
    """

    values: dict[str, LoweredValue] = field(default_factory=dict)
    compute_precision: str = "fp16"
    opset: Any = None
    fp32_nodes: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def input(self, node: ir.Node, i: int) -> LoweredValue | None:
        """The lowered value of input ``i`` (None when the optional input is absent)."""
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is None or not v.name:
            return None
        name = v.name
        if name in self.values:
            return self.values[name]
        if v.const_value is not None:
            arr = v.const_value.numpy()
            self.values[name] = arr
            return arr
        raise KeyError(f"value {name!r} (input {i} of node {node.name!r}) has not been lowered yet")

    def const(self, node: ir.Node, i: int) -> np.ndarray:
        """Input ``i`` as a compile-time numpy constant, or an UnsupportedOpError saying it must be one."""
        v = self.input(node, i)
        if isinstance(v, np.ndarray):
            return v
        if v is not None and getattr(v, "val", None) is not None:
            return np.asarray(v.val)
        raise UnsupportedOpError(must_be_constant(node, i))

    @staticmethod
    def name(node: ir.Node, suffix: str = "") -> str:
        base = node.name or f"{node.op_type}_{id(node)}"
        safe = "".join(c if c.isalnum() or c == "_" else "_" for c in base)
        return f"{safe}_{suffix}" if suffix else safe
