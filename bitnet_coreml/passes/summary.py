"""What ``inspect`` reports: inputs/outputs, opset, op histograms, parameters and BitLinear layers.

Parameter counting is exact: ternary parameters are the elements of every fused BitLinear's codes;
other parameters are the elements of every other floating-point initializer the graph uses
(the per-layer BitLinear multipliers are counted separately as ``scales``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx_ir as ir

from bitnet_coreml.passes.fused import DOMAIN, bitlinear_attrs
from bitnet_coreml.vocab import ONNX_DOMAINS, onnx_opset

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: list[int | str]
    dtype: str


@dataclass(frozen=True)
class BitLinearInfo:
    name: str
    in_features: int
    out_features: int
    convention: str
    per_channel: bool
    act_bits: int


@dataclass
class ModelSummary:
    source: str
    opset: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    ops_source: dict[str, int]
    ops: dict[str, int]
    params_total: int
    params_ternary: int
    params_other: int
    params_scales: int
    bitlinear: list[BitLinearInfo] = field(default_factory=list)
    ternary_unfused: list[str] = field(default_factory=list)
    size_2bit_bytes: int = 0
    size_fp16_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tinfo(v: ir.Value) -> TensorInfo:
    shape: list[int | str] = [] if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape]
    dtype = v.dtype.name.lower() if v.dtype is not None else "unknown"
    return TensorInfo(v.name or "", shape, dtype)


def op_histogram(model: ir.Model) -> dict[str, int]:
    c = Counter(f"{n.domain}::{n.op_type}" if n.domain not in ONNX_DOMAINS else n.op_type for n in model.graph)
    return dict(sorted(c.items()))


def summarize(model: ir.Model, *, source: str = "", ops_source: dict[str, int] | None = None,
              ternary_unfused: list[str] | None = None) -> ModelSummary:
    """Summarise a model after ``run_default_passes`` (``ops_source``: histogram before the passes)."""
    ternary_vals: set[ir.Value] = set()
    scale_vals: set[ir.Value] = set()
    layers: list[BitLinearInfo] = []
    for n in model.graph:
        if n.domain == DOMAIN and n.op_type == "BitLinear":
            w, a = n.inputs[1], n.inputs[2]
            assert w is not None and a is not None and w.const_value is not None
            ternary_vals.add(w)
            scale_vals.add(a)
            out_f, in_f = (int(d) for d in w.const_value.shape.numpy())
            bits, _, conv = bitlinear_attrs(n)
            layers.append(BitLinearInfo(n.name or "", in_f, out_f, conv, a.const_value is not None and a.const_value.size > 1, bits))
    used: set[ir.Value] = {v for n in model.graph for v in n.inputs if v is not None}
    tern = sum(v.const_value.size for v in ternary_vals if v.const_value is not None)
    scales = sum(v.const_value.size for v in scale_vals if v.const_value is not None)
    other = 0
    for v in model.graph.initializers.values():
        if v in ternary_vals or v in scale_vals or v not in used or v.const_value is None:
            continue
        if v.const_value.dtype in _FLOAT_TYPES:
            other += v.const_value.size
    opset = onnx_opset(model.opset_imports, 0)
    return ModelSummary(
        source=source, opset=int(opset),
        inputs=[_tinfo(v) for v in model.graph.inputs], outputs=[_tinfo(v) for v in model.graph.outputs],
        ops_source=ops_source or {}, ops=op_histogram(model),
        params_total=tern + other + scales, params_ternary=tern, params_other=other, params_scales=scales,
        bitlinear=layers, ternary_unfused=list(ternary_unfused or []),
        size_2bit_bytes=(tern * 2 + 7) // 8 + (other + scales) * 2, size_fp16_bytes=(tern + other + scales) * 2,
    )
