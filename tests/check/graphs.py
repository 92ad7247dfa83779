"""Small onnx-ir graphs built in code for the check tests, with fused nodes per docs/ARCHITECTURE.md."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from bitnet_coreml.passes.fused import DOMAIN, make_node

F32 = ir.DataType.FLOAT
I64 = ir.DataType.INT64


class GraphBuilder:
    """Build an ``ir.Model`` node by node; every output gets an explicit shape and dtype."""

    def __init__(self) -> None:
        self.model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 18, DOMAIN: 1}), ir_version=10)
        self.g = self.model.graph
        self.n = 0

    def _name(self, p: str) -> str:
        self.n += 1
        return f"{p}_{self.n}"

    def input(self, name: str, shape: Sequence[int | str], dtype: ir.DataType = F32) -> ir.Value:
        v = ir.Value(name=name, shape=ir.Shape(list(shape)), type=ir.TensorType(dtype))
        self.g.inputs.append(v)
        return v

    def init(self, arr: np.ndarray, p: str = "w") -> ir.Value:
        name = self._name(p)
        v = ir.Value(name=name, shape=ir.Shape(list(arr.shape)), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                     const_value=ir.tensor(arr, name=name))
        self.g.register_initializer(v)
        return v

    def node(self, op: str, inputs: Sequence[ir.Value | None], shape: Sequence[int | str] | None,
             dtype: ir.DataType = F32, domain: str = "", **attrs: object) -> ir.Value:
        nd = ir.node(op, inputs=list(inputs), attributes=attrs, domain=domain, name=self._name(op))
        self.g.append(nd)
        out = nd.outputs[0]
        out.name = self._name(op.lower())
        out.shape = ir.Shape(list(shape)) if shape is not None else None
        out.type = ir.TensorType(dtype)
        return out

    def bitlinear(self, x: ir.Value, n_out: int, k_in: int, seed: int = 0, per_channel: bool = True,
                  out_shape: Sequence[int] | None = None) -> ir.Value:
        rng = np.random.default_rng(seed)
        w = self.init(rng.integers(-1, 2, (n_out, k_in)).astype(np.int8), "W")
        alpha = self.init(rng.uniform(0.01, 0.1, n_out if per_channel else ()).astype(np.float32), "Alpha")
        nd = make_node(self.model, "BitLinear", [x, w, alpha],
                       {"act_bits": 8, "act_eps": 1e-5, "convention": "multiply"}, name=self._name("BitLinear"))
        self.g.append(nd)
        out = nd.outputs[0]
        out.name = self._name("bitlinear")
        xs = [int(d) for d in x.shape] if x.shape is not None else [1]
        out.shape = ir.Shape(list(out_shape) if out_shape is not None else [*xs[:-1], n_out])
        out.type = ir.TensorType(F32)
        return out

    def fused(self, op: str, inputs: Sequence[ir.Value], attrs: dict[str, object], shape: Sequence[int]) -> ir.Value:
        nd = make_node(self.model, op, list(inputs), attrs, name=self._name(op))
        self.g.append(nd)
        out = nd.outputs[0]
        out.name = self._name(op.lower())
        out.shape = ir.Shape(list(shape))
        out.type = ir.TensorType(F32)
        return out

    def output(self, v: ir.Value) -> ir.Model:
        self.g.outputs.append(v)
        return self.model


def tiny_lm(vocab: int = 64, d: int = 32, hidden: int = 64, seq: int = 8, seed: int = 0,
            tied: bool | str = False) -> ir.Model:
    """ids -> Gather(embedding) -> RMSNorm -> BitLinear up -> Relu2 -> BitLinear down -> RMSNorm -> MatMul lm_head.

    ``tied=True``: the head is ``MatMul(h, Transpose(embedding))``; ``tied="gemm"``: the Hugging Face form
    ``Gemm(Reshape(h, [seq, d]), embedding, transB=1)``, the same initializer feeding the Gather and the Gemm.
    """
    rng = np.random.default_rng(seed)
    b = GraphBuilder()
    ids = b.input("input_ids", [1, seq], I64)
    emb = b.init(rng.standard_normal((vocab, d)).astype(np.float32) * 0.02, "embed")
    h = b.node("Gather", [emb, ids], [1, seq, d], axis=0)
    h = b.fused("RMSNorm", [h, b.init(rng.uniform(0.5, 1.5, d).astype(np.float32), "gamma")],
                {"epsilon": 1e-5}, [1, seq, d])
    up = b.bitlinear(h, hidden, d, seed=seed + 1)
    act = b.fused("Relu2", [up], {}, [1, seq, hidden])
    down = b.bitlinear(act, d, hidden, seed=seed + 2, per_channel=False)
    res = b.node("Add", [h, down], [1, seq, d])
    n2 = b.fused("RMSNorm", [res, b.init(rng.uniform(0.5, 1.5, d).astype(np.float32), "gamma")],
                 {"epsilon": 1e-5}, [1, seq, d])
    if tied == "gemm":
        flat = b.node("Reshape", [n2, b.init(np.array([seq, d], np.int64), "shape")], [seq, d])
        return b.output(b.node("Gemm", [flat, emb], [seq, vocab], transB=1))
    head = emb if tied else b.init(rng.standard_normal((d, vocab)).astype(np.float32) * 0.02, "lm_head")
    if tied:
        head = b.node("Transpose", [emb], [d, vocab], perm=[1, 0])
    logits = b.node("MatMul", [n2, head], [1, seq, vocab])
    return b.output(logits)
