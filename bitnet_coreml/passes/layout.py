"""Rank-6 reshape/transpose/reshape chains that are DepthToSpace or SpaceToDepth become the native op.

ONNX's function bodies of ``DepthToSpace`` / ``SpaceToDepth`` (and exporters that expand them, e.g.
a pixel shuffle) go through a rank-6 intermediate: ``Reshape(x, [N, b, b, C/b^2, H, W])`` ->
``Transpose`` -> ``Reshape`` back to rank 4. Core ML tensors have rank <= 5, so the chain cannot be
lowered as written; the native op (MIL ``depth_to_space`` / ``space_to_depth`` or a rank-5 rewrite)
can. A chain is replaced only when, on an index tensor of the input's static shape, it computes
exactly what the native op's ONNX definition computes (every element lands in the same place), so
the rewrite is exact whatever the chain's spelling. Needs constant reshape targets: runs after
constant folding.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from bitnet_coreml.vocab import ONNX_DOMAINS

log = logging.getLogger(__name__)

_RANK_LIMIT = 5  # only chains through a tensor above Core ML's rank are rewritten; the rest lower as they are


def depth_to_space(x: np.ndarray, b: int, mode: str) -> np.ndarray:
    """ONNX DepthToSpace (operator definition) in numpy."""
    n, c, h, w = x.shape
    if mode == "DCR":
        t = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    else:
        t = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    return t.reshape(n, c // (b * b), h * b, w * b)


def space_to_depth(x: np.ndarray, b: int, mode: str) -> np.ndarray:
    """ONNX SpaceToDepth (operator definition, with the ``mode`` of opset 24) in numpy."""
    n, c, h, w = x.shape
    perm = (0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4)
    t = x.reshape(n, c, h // b, b, w // b, b).transpose(perm)
    return t.reshape(n, c * b * b, h // b, w // b)


def _const_ints(v: ir.Value | None) -> list[int] | None:
    if v is None or v.const_value is None:
        return None
    return [int(d) for d in v.const_value.numpy().reshape(-1)]


def _static(v: ir.Value) -> list[int] | None:
    if v.shape is None or not all(isinstance(d, int) for d in v.shape):
        return None
    return [int(d) for d in v.shape]  # type: ignore[arg-type]


def _single_user(v: ir.Value, op_type: str) -> ir.Node | None:
    uses = list(v.uses())
    if len(uses) != 1 or v.is_graph_output():
        return None
    node = uses[0].node
    return node if node.op_type == op_type and node.domain in ONNX_DOMAINS else None


def _match(first: ir.Node, model_opset: int) -> tuple[ir.Node, ir.Node, str, dict[str, int | str]] | None:
    """(transpose, last reshape, native op, attributes) when ``first`` starts a replaceable chain."""
    x = first.inputs[0]
    s1 = _const_ints(first.inputs[1] if len(first.inputs) > 1 else None)
    xs = _static(x) if x is not None else None
    if xs is None or s1 is None or len(xs) != 4 or len(s1) <= _RANK_LIMIT or 0 in xs:
        return None
    tr = _single_user(first.outputs[0], "Transpose")
    if tr is None or "perm" not in tr.attributes:
        return None
    last = _single_user(tr.outputs[0], "Reshape")
    s2 = _const_ints(last.inputs[1] if last is not None and len(last.inputs) > 1 else None)
    if last is None or s2 is None or len(s2) != 4:
        return None
    idx = np.arange(int(np.prod(xs)), dtype=np.int64).reshape(xs)
    try:
        got = idx.reshape(s1).transpose(list(tr.attributes["perm"].as_ints())).reshape(s2)
    except ValueError:
        return None
    n, c, h, w = xs
    for b in range(2, max(c, h, w) + 1):
        cands: list[tuple[str, dict[str, int | str], np.ndarray]] = []
        if c % (b * b) == 0:
            cands += [("DepthToSpace", {"blocksize": b, "mode": m}, depth_to_space(idx, b, m)) for m in ("DCR", "CRD")]
        if h % b == 0 and w % b == 0:
            cands.append(("SpaceToDepth", {"blocksize": b}, space_to_depth(idx, b, "DCR")))
            if model_opset >= 24:  # SpaceToDepth has a mode from opset 24
                cands.append(("SpaceToDepth", {"blocksize": b, "mode": "CRD"}, space_to_depth(idx, b, "CRD")))
        for op, attrs, want in cands:
            if want.shape == got.shape and np.array_equal(want, got):
                return tr, last, op, attrs
    return None


def native_space_depth(model: ir.Model) -> int:
    """Replace every rank-6 DepthToSpace / SpaceToDepth chain by the native op; returns how many."""
    g = model.graph
    done = 0
    for node in list(g):
        if node.graph is not g or node.op_type != "Reshape" or node.domain not in ONNX_DOMAINS:
            continue
        m = _match(node, model.opset_imports.get("", 1))
        if m is None:
            continue
        tr, last, op, attrs = m
        new = ir.node(op, inputs=[node.inputs[0]], attributes=attrs, name=f"{last.name or op}_native")
        ir.convenience.replace_nodes_and_values(g, last, [node, tr, last], [new], [last.outputs[0]], [new.outputs[0]])
        log.debug("rank-6 chain ending at %s -> %s %s", last.name, op, attrs)
        done += 1
    return done
