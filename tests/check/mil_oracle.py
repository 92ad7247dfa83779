"""Write real Core ML packages whose weights follow the converter's storage contract, to measure weight.bin.

The oracle for the size estimate is coremltools' own blob writer: this builds a MIL program with one
const (or ``constexpr_lut_to_dense``) per initializer, stored the way docs/check.md says the converter
stores it, converts and saves it with ``ct.convert`` + ``save``, and returns the size of
``weights/weight.bin``. Data values are random: only their sizes and dtypes matter to the writer.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import onnx_ir as ir

from bitnet_coreml._quiet import coremltools
from bitnet_coreml.passes.fused import DOMAIN

_PAL = {"Gather": 0, "GatherElements": 0, "MatMul": 1, "Gemm": 1, "Conv": 1}
_PAL_MIN = 65536  # the converter palettizes consts of at least this many elements


def _pieces(shape: tuple[int, ...], axis: int | None, limit: int) -> list[tuple[int, ...]]:
    """Shapes of the pieces when ``axis`` is cut like the converter does (ceil-sized chunks, last smaller)."""
    if axis is None or shape[axis] <= limit:
        return [shape]
    d = shape[axis]
    size = -(-d // -(-d // limit))
    return [tuple(min(size, d - a) if i == axis else x for i, x in enumerate(shape)) for a in range(0, d, size)]


def _split_axis(node: ir.Node, i: int, shape: tuple[int, ...]) -> int | None:
    if node.domain not in ("", "ai.onnx") or len(shape) != 2:
        return None
    if node.op_type == "MatMul" and i == 1:
        return 1
    if node.op_type == "Gather" and i == 0 and ("axis" not in node.attributes or node.attributes["axis"].as_int() == 0):
        return 0
    # the Hugging Face lm_head Gemm(x, E, transB=1) is cut along E's rows (shared with a tied Gather)
    if node.op_type == "Gemm" and i == 1 and "transB" in node.attributes and node.attributes["transB"].as_int() == 1:
        return 0
    return None


def weight_bin_bytes(model: ir.Model, embed_bits: int | None = None, precision: str = "fp16",
                     split_limit: int = 16384, target: str = "iOS16") -> int:
    ct = coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    fdt = np.float16 if precision == "fp16" else np.float32
    rng = np.random.default_rng(0)
    consts: list[tuple[str, object]] = []  # ("dense", array) or ("lut", (indices, lut, shape))
    seen: set[int] = set()
    for node in model.graph:
        bl = node.domain == DOMAIN and node.op_type == "BitLinear"
        for i, v in enumerate(node.inputs):
            if v is None or v.const_value is None or id(v) in seen:
                continue
            seen.add(id(v))
            shape = tuple(int(d) for d in v.const_value.shape)
            dt = v.const_value.dtype
            if bl and i == 1:
                n = math.prod(shape)
                consts.append(("lut", (rng.integers(0, 256, (n * 2 + 7) // 8).astype(np.uint8),
                                       np.array([-1, 0, 1, 0], fdt), shape)))
            elif bl and i == 2:
                consts.append(("dense", rng.random(shape).astype(fdt)))
            elif dt in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
                pal = node.domain in ("", "ai.onnx") and _PAL.get(node.op_type) == i and len(shape) >= 2
                pieces = _pieces(shape, _split_axis(node, i, shape), split_limit)
                for s in pieces:
                    n = math.prod(s)
                    if pal and embed_bits is not None and n >= _PAL_MIN:
                        consts.append(("lut", (rng.integers(0, 256, (n * embed_bits + 7) // 8).astype(np.uint8),
                                               rng.random(2**embed_bits).astype(fdt), s)))
                    else:
                        consts.append(("dense", rng.random(s).astype(fdt)))
            elif dt in (ir.DataType.INT8, ir.DataType.UINT8):
                consts.append(("dense", rng.integers(0, 2, shape).astype(np.int8)))

    opset = getattr(ct.target, target)

    np_err = np.errstate(over="ignore")  # reduce_sum of random fp16 consts overflows in value inference
    np_err.__enter__()

    @mb.program(input_specs=[mb.TensorSpec((1,), dtype=types.fp16 if precision == "fp16" else types.fp32)],
                opset_version=opset)
    def prog(x):  # type: ignore[no-untyped-def]
        acc = x
        for kind, payload in consts:
            if kind == "lut":
                idx, lut, s = payload  # type: ignore[misc]
                if opset >= ct.target.iOS18:  # iOS18 form: typed sub-byte indices of the weight's shape
                    nbits = int(np.log2(lut.size))
                    sub = {1: types.np_uint1_dtype, 2: types.np_uint2_dtype, 4: types.np_uint4_dtype,
                           6: types.np_uint6_dtype, 8: np.uint8}[nbits]
                    ind = rng.integers(0, lut.size, s).astype(sub)
                    w = mb.constexpr_lut_to_dense(indices=ind, lut=lut.reshape([1] * len(s) + [lut.size, 1]))
                else:
                    w = mb.constexpr_lut_to_dense(indices=idx, lut=lut, shape=np.array(s, np.uint32))
            else:
                w = mb.const(val=payload)
            if w.dtype == types.int8:
                w = mb.cast(x=w, dtype="fp16" if precision == "fp16" else "fp32")
            acc = mb.add(x=acc, y=mb.reduce_sum(x=w, axes=None, keep_dims=False))
        return acc

    np_err.__exit__(None, None, None)
    m = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=opset,
                   compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
                   pass_pipeline=ct.PassPipeline.EMPTY)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "m.mlpackage")
        m.save(p)
        wb = os.path.join(p, "Data", "com.apple.CoreML", "weights", "weight.bin")
        return os.path.getsize(wb) if os.path.exists(wb) else 0
