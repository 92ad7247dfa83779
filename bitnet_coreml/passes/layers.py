"""Which decoder layer each node of a fused BitNet graph belongs to, and the residual stream between them.

A decoder layer adds two sublayers (attention, MLP) to the residual stream, each read through an
RMSNorm: ``h' = h + f(RMSNorm(h))``. A *residual add* is therefore an ``Add`` one of whose inputs also
feeds a fused ``RMSNorm``; in graph order they come in pairs, (attention, MLP) per layer. Nodes before
the first RMSNorm are the ``embedding`` group, nodes after the last residual add the ``head`` group
(final norm, LM head). This is a structural rule (it needs ``run_default_passes`` to have fused the
norms), not a naming convention, so ONNX exports and checkpoint graphs group the same way.

The converter's fp16 analysis (per-layer maxima in the package metadata) and the report (compute
units per layer, parity by depth) both use this one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx_ir as ir

from bitnet_coreml.passes.fused import DOMAIN
from bitnet_coreml.vocab import ONNX_DOMAINS

EMBEDDING = "embedding"
HEAD = "head"


@dataclass(frozen=True)
class ResidualPoint:
    """One residual add: the value it produces (the stream after a sublayer) and where it sits."""

    label: str  # "layer 3 attention" / "layer 3 MLP" (or "block 3" when adds do not pair up)
    layer: str  # the group label of its node ("layer 3")
    value: str  # ONNX value name of the add's output
    node: str  # ONNX node name of the add


def _is_rmsnorm(node: ir.Node) -> bool:
    return node.domain == DOMAIN and node.op_type == "RMSNorm"


def _residual_adds(graph: ir.Graph) -> list[ir.Node]:
    adds = []
    for node in graph:
        if node.op_type != "Add" or node.domain not in ONNX_DOMAINS:
            continue
        for v in node.inputs:
            if v is not None and any(_is_rmsnorm(u.node) for u in v.uses()):
                adds.append(node)
                break
    return adds


def _paired(n_adds: int) -> bool:
    return n_adds > 0 and n_adds % 2 == 0


def _layer_label(k: int, paired: bool) -> str:
    return f"layer {k // 2}" if paired else f"block {k}"


def layer_groups(graph: ir.Graph) -> list[str]:
    """The group label of every node of ``graph``, in graph order (see the module docstring)."""
    adds = _residual_adds(graph)
    paired = _paired(len(adds))
    add_ids = {id(n) for n in adds}
    labels: list[str] = []
    seen_norm = False
    k = 0  # residual adds seen so far
    for node in graph:
        seen_norm = seen_norm or _is_rmsnorm(node)
        if not adds:
            labels.append(HEAD if seen_norm else EMBEDDING)
        elif not seen_norm:
            labels.append(EMBEDDING)
        elif k >= len(adds):
            labels.append(HEAD)
        else:
            labels.append(_layer_label(k, paired))
        if id(node) in add_ids:
            k += 1
    return labels


def group_order(labels: list[str]) -> list[str]:
    """The distinct labels in order of first appearance."""
    return list(dict.fromkeys(labels))


def residual_points(graph: ir.Graph) -> list[ResidualPoint]:
    """Every residual add, in graph order, labelled by layer and sublayer."""
    adds = _residual_adds(graph)
    paired = _paired(len(adds))
    out = []
    for k, node in enumerate(adds):
        layer = _layer_label(k, paired)
        label = f"{layer} {'attention' if k % 2 == 0 else 'MLP'}" if paired else layer
        out.append(ResidualPoint(label, layer, str(node.outputs[0].name), str(node.name)))
    return out


def run_lengths(labels: list[str]) -> list[list[Any]]:
    """``[label, count]`` runs of consecutive equal labels (the compact form the package metadata stores)."""
    out: list[list[Any]] = []
    for lab in labels:
        if out and out[-1][0] == lab:
            out[-1][1] += 1
        else:
            out.append([lab, 1])
    return out


def expand_runs(runs: list[list[Any]]) -> list[str]:
    """The inverse of :func:`run_lengths`."""
    return [str(lab) for lab, n in runs for _ in range(int(n))]
