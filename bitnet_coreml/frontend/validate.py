"""Structural validation of an imported graph: opset, op domains, dangling values and cycles.

Errors name the file and the node and say what is allowed. The checks are cheap (no tensor data
is read), so they run on every import.
"""

from __future__ import annotations

import onnx_ir as ir

from bitnet_coreml.errors import ModelLoadError
from bitnet_coreml.vocab import DOMAIN, ONNX_DOMAINS, onnx_opset

MIN_OPSET = 13
# Domains whose ops we either lower or fold. A custom domain is allowed only when the model defines
# the function for it (model-local functions, as dynamo exports and our own fused ops use).
KNOWN_DOMAINS = {*ONNX_DOMAINS, DOMAIN}


def validate_graph(model: ir.Model, where: str) -> None:
    opset = onnx_opset(model.opset_imports)
    if opset is None:
        raise ModelLoadError(f"{where}: the model imports no default-domain opset; expected ai.onnx opset >= {MIN_OPSET}")
    if opset < MIN_OPSET:
        raise ModelLoadError(
            f"{where}: opset {opset} is too old; opset >= {MIN_OPSET} is supported (re-export, or upgrade it with "
            "onnx.version_converter)"
        )
    functions = {(f.domain, f.name) for f in model.functions.values()}
    for node in model.graph:
        dom = node.domain
        if dom not in KNOWN_DOMAINS and (dom, node.op_type) not in functions:
            raise ModelLoadError(
                f"{where}: node {node.name!r} uses op {node.op_type!r} from unknown domain {dom!r}; supported domains: "
                f"ai.onnx (default) and ops defined as model-local functions"
            )
    _check_acyclic(model.graph, where)


def _check_acyclic(graph: ir.Graph, where: str) -> None:
    """Kahn's algorithm over the node list; also finds inputs that nothing produces."""
    available: set[ir.Value] = set(graph.inputs) | set(graph.initializers.values())
    nodes = list(graph)
    producers: dict[ir.Value, ir.Node] = {}
    for n in nodes:
        for o in n.outputs:
            producers[o] = n
    indeg: dict[ir.Node, int] = {}
    users: dict[ir.Node, list[ir.Node]] = {n: [] for n in nodes}
    for n in nodes:
        deps = set()
        for v in n.inputs:
            if v is None or v in available:
                continue
            if v.const_value is not None:
                continue
            p = producers.get(v)
            if p is None:
                raise ModelLoadError(
                    f"{where}: node {n.name!r} ({n.op_type}) reads value {v.name!r} that no node, input or initializer produces"
                )
            deps.add(p)
        indeg[n] = len(deps)
        for p in deps:
            users[p].append(n)
    ready = [n for n in nodes if indeg[n] == 0]
    seen = 0
    while ready:
        n = ready.pop()
        seen += 1
        for u in users[n]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    if seen != len(nodes):
        stuck = [n for n in nodes if indeg[n] > 0]
        names = ", ".join(repr(n.name or n.op_type) for n in stuck[:5])
        raise ModelLoadError(f"{where}: the graph has a cycle through {len(stuck)} node(s) ({names}); ONNX graphs must be acyclic")
