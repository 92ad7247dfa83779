"""Predict the bytes of a converted package's ``weights/weight.bin`` from the graph, without reading weights.

What the converter writes (the contract this estimate follows; see ``docs/check.md``):

* every ``BitLinear`` W ``[N, K]`` as a 2-bit ``constexpr_lut_to_dense``: packed uint8 indices,
  ``ceil(N*K*2/8)`` bytes; its 4-entry LUT ``{-1, 0, 1, 0}`` is inlined in the program;
* every BitLinear ``Alpha`` as a separate const (fp16, or fp32 at precision fp32) multiplied after
  the linear;
* every other float initializer as an fp16 (fp32) const, except that with ``embed_bits`` the weight
  matrices of ``Gather`` (embeddings), ``MatMul``/``Gemm`` (e.g. the LM head) and ``Conv`` with at least
  65536 elements (per split chunk; ``bitnet_coreml.lower.palettize``'s ``min_size``) are palettized:
  ``ceil(n*bits/8)`` bytes of packed indices plus a ``2**bits``-entry LUT per tensor (fp16, or fp32
  at precision fp32);
* the vocabulary embedding / LM head dimensions > 16384 split by the converter into chunks, each its
  own blob (the split rule is :mod:`bitnet_coreml.check.split`, shared with the converter's); a tied
  table whose Gather and Gemm(transB=1) LM head are both split shares its row chunks (written once); a
  table that one consumer splits and another uses whole is written in both forms.

coremltools' MIL backend (``converters/mil/backend/mil/load.py::should_use_weight_file``) writes a
const into ``weight.bin`` only when it has >= 10 elements and a float16/float32/uint8/int8 dtype;
smaller ones are inlined in the program. The MILBlob storage format (``libmilstoragepython``'s
``BlobWriter``) starts the file with a 64-byte header and gives each blob a 64-byte metadata record,
with every record starting on a 64-byte boundary; the last blob is not padded. Measured with
``ct.convert`` + ``save`` (tests/check/test_size.py builds such packages): a 1024x1024 2-bit weight
plus a 1024-element fp16 bias is exactly 264,384 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bitnet_coreml.check.split import SplitInfo, split_of
from bitnet_coreml.vocab import ONNX_DOMAINS

if TYPE_CHECKING:
    import onnx_ir as ir

BLOB_FILE_HEADER = 64
BLOB_METADATA = 64
BLOB_ALIGN = 64
INLINE_BELOW_ELEMENTS = 10
TERNARY_BITS = 2
PALETTIZE_MIN_ELEMENTS = 1 << 16  # smaller consts stay fp16 (the converter's palettize min_size)
PRECISIONS = {"fp16": 2, "fp32": 4}
_FLOAT_DTYPES = {"FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE"}
_INT8_DTYPES = {"INT8", "UINT8"}


def _align(n: int) -> int:
    return (n + BLOB_ALIGN - 1) // BLOB_ALIGN * BLOB_ALIGN


def blob_file_bytes(blob_payloads: Iterable[int]) -> int:
    """Size of a MILBlob weight file holding blobs of these payload sizes, in writing order (0 if none)."""
    end = 0
    for n in blob_payloads:
        if end == 0:
            end = BLOB_FILE_HEADER
        end = _align(end) + BLOB_METADATA + n
    return end


@dataclass(frozen=True)
class TensorBytes:
    """One initializer as the converter will store it."""

    name: str
    kind: str  # "ternary" | "scale" | "float" | "palettized" | "int8" | "inlined"
    shape: tuple[int, ...]
    elements: int
    bits: int
    blobs: tuple[int, ...]  # payload bytes of each blob it becomes (empty when inlined)
    fp16_blobs: tuple[int, ...]  # the same tensor stored as plain fp16

    @property
    def bytes(self) -> int:
        return sum(self.blobs)


@dataclass(frozen=True)
class SizeEstimate:
    """Predicted ``weight.bin`` bytes (``total_bytes``) and the all-fp16 comparison (``fp16_total_bytes``)."""

    total_bytes: int
    fp16_total_bytes: int
    precision: str
    embed_bits: int | None
    params_ternary: int
    params_other: int
    params_scales: int
    tensors: tuple[TensorBytes, ...] = field(default_factory=tuple)

    @property
    def ratio_vs_fp16(self) -> float:
        return self.fp16_total_bytes / self.total_bytes if self.total_bytes else 1.0

    def to_dict(self, with_tensors: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "total_bytes": self.total_bytes, "fp16_total_bytes": self.fp16_total_bytes,
            "precision": self.precision, "embed_bits": self.embed_bits,
            "params_ternary": self.params_ternary, "params_other": self.params_other,
            "params_scales": self.params_scales,
        }
        if with_tensors:
            d["tensors"] = [{"name": t.name, "kind": t.kind, "shape": list(t.shape), "elements": t.elements,
                             "bits": t.bits, "blobs": list(t.blobs), "fp16_blobs": list(t.fp16_blobs), "bytes": t.bytes}
                            for t in self.tensors]
        return d


def _dtype_name(v: ir.Value) -> str:
    t = v.const_value
    dt = t.dtype if t is not None else v.dtype
    return dt.name if dt is not None else ""


def _shape(v: ir.Value) -> tuple[int, ...]:
    t = v.const_value
    assert t is not None
    return tuple(d if isinstance(d, int) else int(str(d)) for d in t.shape)


def _chunk_counts(shape: tuple[int, ...], split: SplitInfo | None, index: int) -> list[int]:
    """Element counts of the blobs a weight becomes: one, or one per chunk when the converter splits it."""
    if split is None or split.input_index != index:
        return [math.prod(shape)]
    rest = math.prod(d for a, d in enumerate(shape) if a != split.axis)
    return [c * rest for c in split.chunks]


def _stored_counts(shape: tuple[int, ...], uses: list[tuple[ir.Node, int]], limit: int) -> list[int]:
    """Element counts of the blobs one constant becomes, over all its consumers.

    The converter splits a table for the consumers that need it and keeps the whole table for any other
    consumer: both forms are then written. Row chunks are shared (a tied embedding split for its Gather and
    for its Gemm(transB=1) LM head is written once); a split Gemm's bias is cut into that Gemm's chunks.
    """
    forms: dict[tuple[Any, ...], list[int]] = {}
    whole = False
    for nd, k in uses:
        sp = split_of(nd, limit)
        if sp is not None and sp.input_index == k:
            forms.setdefault((sp.axis, sp.chunks), _chunk_counts(shape, sp, k))
        elif sp is not None and sp.op_type == "Gemm" and k == 2:
            forms.setdefault(("bias", sp.node), list(sp.chunks))
        else:
            whole = True
    return [c for counts in forms.values() for c in counts] + ([math.prod(shape)] if whole else [])


def palettizable_inputs(node: ir.Node) -> tuple[int, ...]:
    """Input indices of ``node`` whose float initializer ``embed_bits`` palettizes (weight matrices)."""
    if node.domain in ONNX_DOMAINS:
        if node.op_type in ("Gather", "GatherElements"):
            return (0,)
        if node.op_type in ("MatMul", "Gemm", "Conv"):
            return (1,)
    return ()


def estimate_weight_bytes(model: ir.Model, embed_bits: int | None = None, precision: str = "fp16",
                          *, split_limit: int | None = None) -> SizeEstimate:
    """Predict the converted package's ``weights/weight.bin`` size (see the module docstring).

    Reads shapes and dtypes only (never the weight data), so it is cheap on multi-GB models.
    """
    from bitnet_coreml.errors import InputError
    from bitnet_coreml.passes.fused import DOMAIN

    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
    if embed_bits is not None and not (1 <= embed_bits <= 8):
        raise InputError(f"embed_bits {embed_bits} is out of range; palettization uses 1..8 bits (ANE: 1, 2, 4, 6, 8)")
    if split_limit is None:
        from bitnet_coreml.opsupport import max_dimension

        split_limit = max_dimension()
    fbytes = PRECISIONS[precision]
    tensors: list[TensorBytes] = []
    tern = other = scales = 0

    def fp16_of(counts: list[int]) -> tuple[int, ...]:
        return tuple(c * 2 for c in counts if c >= INLINE_BELOW_ELEMENTS)

    # every constant input with all its uses, in order of first use (the order the converter writes them)
    uses: dict[int, list[tuple[ir.Node, int]]] = {}
    values: list[ir.Value] = []
    for node in model.graph:
        for i, v in enumerate(node.inputs):
            if v is None or v.const_value is None:
                continue
            if id(v) not in uses:
                uses[id(v)] = []
                values.append(v)
            uses[id(v)].append((node, i))

    for v in values:
        node, i = uses[id(v)][0]
        is_bitlinear = node.domain == DOMAIN and node.op_type == "BitLinear"
        shape = _shape(v)
        n = math.prod(shape)
        dt = _dtype_name(v)
        name = v.name or ""
        if is_bitlinear and i == 1:
            blobs: tuple[int, ...] = ((n * TERNARY_BITS + 7) // 8,)
            tensors.append(TensorBytes(name, "ternary", shape, n, TERNARY_BITS, blobs, fp16_of([n])))
            tern += n
        elif is_bitlinear and i == 2:
            blobs = (n * fbytes,) if n >= INLINE_BELOW_ELEMENTS else ()
            tensors.append(TensorBytes(name, "scale" if blobs else "inlined", shape, n, fbytes * 8, blobs,
                                       fp16_of([n])))
            scales += n
        elif dt in _FLOAT_DTYPES:
            other += n
            counts = _stored_counts(shape, uses[id(v)], split_limit)
            pal = len(shape) >= 2 and any(k in palettizable_inputs(nd) for nd, k in uses[id(v)])
            if pal and embed_bits is not None and any(c >= PALETTIZE_MIN_ELEMENTS for c in counts):
                lut = 2**embed_bits
                blobs_l: list[int] = []
                for c in counts:
                    if c < PALETTIZE_MIN_ELEMENTS:
                        blobs_l.append(c * fbytes)
                        continue
                    blobs_l.append((c * embed_bits + 7) // 8)
                    if lut >= INLINE_BELOW_ELEMENTS:
                        blobs_l.append(lut * fbytes)
                tensors.append(TensorBytes(name, "palettized", shape, n, embed_bits, tuple(blobs_l), fp16_of(counts)))
                continue
            blobs = tuple(c * fbytes for c in counts if c >= INLINE_BELOW_ELEMENTS)
            tensors.append(TensorBytes(name, "float" if blobs else "inlined", shape, n, fbytes * 8, blobs,
                                       fp16_of(counts)))
        elif dt in _INT8_DTYPES:
            blobs = (n,) if n >= INLINE_BELOW_ELEMENTS else ()
            tensors.append(TensorBytes(name, "int8" if blobs else "inlined", shape, n, 8, blobs, blobs))
    total = blob_file_bytes(b for t in tensors for b in t.blobs)
    fp16 = blob_file_bytes(b for t in tensors for b in t.fp16_blobs)
    return SizeEstimate(total, fp16, precision, embed_bits, tern, other, scales, tuple(tensors))
