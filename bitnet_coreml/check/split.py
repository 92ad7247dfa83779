"""Which weight dimensions over the ANE's limit (``limits.max_dimension``, 16384) the converter splits, and how.

The one definition shared by the check (it reports these as fixed), the size estimate (each chunk
is its own blob) and the converter (``bitnet_coreml.lower.split`` rewrites exactly these):

* ``MatMul(X, W[K, N])`` with a constant rank-2 ``W`` and ``N > limit``: ``W`` is cut along axis 1;
* ``Gather(E[V, D], ids, axis=0)`` with a constant rank-2 ``E`` and ``V > limit``: ``E`` is cut along axis 0;
* ``Gemm(A, B[N, K], C?, transB=1)`` (a Hugging Face lm_head; ``transA=0``, ``alpha=1``, ``C`` absent or a
  constant of 1 or ``N`` elements) with a constant rank-2 ``B`` and ``N > limit``: ``B`` is cut along axis 0
  (and ``C``, broadcast to ``N``, into the same chunks).

Row chunks of one table are shared: a tied embedding feeding both the Gather and the Gemm is cut into the
same chunks once (one copy in the package). A MatMul's column chunks are its own.

Chunks have the size ``ceil(n / ceil(n / limit))``, the last one possibly smaller. Any other
dimension over the limit is not split: the check reports it as leaving the ANE.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from bitnet_coreml.opsupport import max_dimension, node_id
from bitnet_coreml.vocab import ONNX_DOMAINS

if TYPE_CHECKING:
    import onnx_ir as ir

    from bitnet_coreml.check.capabilities import CapabilityDatabase

__all__ = ["SplitInfo", "gemm_bias_of", "node_id", "nodes_needing_split", "split_chunks", "split_of"]


def split_chunks(dim: int, limit: int) -> list[int]:
    """Chunk sizes of ``dim`` cut at ``limit``: ``ceil(dim / ceil(dim / limit))`` each, the last smaller."""
    if dim <= limit:
        return [dim]
    size = math.ceil(dim / math.ceil(dim / limit))
    return [min(size, dim - a) for a in range(0, dim, size)]


@dataclass(frozen=True)
class SplitInfo:
    """A weight dimension the converter splits: ``node``'s input ``input_index``, axis ``axis``."""

    node: str
    op_type: str
    input_index: int
    value: str
    axis: int
    dim: int
    chunks: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "chunks": list(self.chunks)}


def _shape(v: ir.Value | None) -> list[int] | None:
    if v is None or v.const_value is None:
        return None
    return [d if isinstance(d, int) else int(str(d)) for d in v.const_value.shape]


def attr_f(node: ir.Node, key: str, default: float) -> float:
    """A numeric attribute as float (``default`` when absent)."""
    a = node.attributes.get(key)
    return default if a is None else float(a.value)


def _gemm_ok(node: ir.Node) -> bool:
    """The Gemm forms the converter splits."""
    if len(node.inputs) < 2:
        return False
    if attr_f(node, "transB", 0) != 1 or attr_f(node, "transA", 0) != 0 or attr_f(node, "alpha", 1.0) != 1.0:
        return False
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is not None and c.const_value is None:
        return False
    b, cs = _shape(node.inputs[1]), _shape(c)
    if cs is not None and b is not None and len(b) == 2 and math.prod(cs) not in (1, b[0]):
        return False
    return True


def gemm_bias_of(node: ir.Node, limit: int) -> ir.Value | None:
    """The constant ``C`` of a Gemm the converter splits (cut into the same chunks as ``B``), or None."""
    sp = split_of(node, limit)
    if sp is None or sp.op_type != "Gemm" or len(node.inputs) < 3:
        return None
    return node.inputs[2]


def split_of(node: ir.Node, limit: int) -> SplitInfo | None:
    """The split the converter applies to ``node``, or None."""
    if node.domain not in ONNX_DOMAINS or limit <= 0:
        return None
    if node.op_type == "MatMul" and len(node.inputs) == 2:
        idx, axis = 1, 1
    elif node.op_type == "Gemm" and _gemm_ok(node):
        idx, axis = 1, 0
    elif node.op_type == "Gather" and len(node.inputs) >= 1:
        a = node.attributes.get("axis")
        if (a.as_int() if a is not None else 0) != 0:
            return None
        idx, axis = 0, 0
    else:
        return None
    v = node.inputs[idx]
    shape = _shape(v)
    if v is None or shape is None or len(shape) != 2 or shape[axis] <= limit:
        return None
    return SplitInfo(node_id(node), node.op_type, idx, v.name or "", axis, shape[axis],
                     tuple(split_chunks(shape[axis], limit)))


def nodes_needing_split(model: ir.Model, limit: int | None = None, db: CapabilityDatabase | None = None
                        ) -> list[SplitInfo]:
    """Every weight the converter splits (vocabulary embedding, LM head), in graph order; ``limit`` defaults
    to the capability database's ``max_dimension``."""
    limit = max_dimension(db) if limit is None else limit
    return [s for n in model.graph if (s := split_of(n, limit)) is not None]
