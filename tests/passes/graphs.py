"""BitNet-shaped ONNX graphs built in code, in the shapes transformers' exports take.

Each builder returns an ``onnx.ModelProto``; ONNX Runtime on it is the oracle for the passes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as h
import onnx.numpy_helper as nh

F = onnx.TensorProto.FLOAT


class G:
    """A tiny graph-building helper: named nodes, constants, deterministic names."""

    def __init__(self, opset: int = 18, clamp: str = "clip") -> None:
        self.clamp = clamp  # how the activation quantisation clamps: clip | minmax | maxmin
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0
        self.opset = opset

    def name(self, p: str) -> str:
        self.n += 1
        return f"{p}_{self.n}"

    def const(self, arr: np.ndarray | float, p: str = "c") -> str:
        nm = self.name(p)
        a = np.asarray(arr) if isinstance(arr, (np.ndarray, np.generic)) else np.asarray(arr, dtype=np.float32)
        self.inits.append(nh.from_array(a, nm))
        return nm

    def op(self, op_type: str, *inputs: str, **attrs: object) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(h.make_node(op_type, list(inputs), [out], name=self.name(op_type), **attrs))
        return out

    def model(self, inputs: list[tuple[str, int, list[int]]], outputs: list[tuple[str, str, int, list[int] | None]]) -> onnx.ModelProto:
        for src, dst, _, _ in outputs:
            self.nodes.append(h.make_node("Identity", [src], [dst], name=self.name("out")))
        g = h.make_graph(self.nodes, "g", [h.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                         [h.make_tensor_value_info(d, t, s) for _, d, t, s in outputs], self.inits)
        return h.make_model(g, opset_imports=[h.make_opsetid("", self.opset)], ir_version=10)

    # --- BitNet pieces --------------------------------------------------------------------------
    def act_quant(self, x: str, dequantize: bool, use_max: bool = False) -> tuple[str, str]:
        ax = self.op("Abs", x)
        if self.opset >= 18:
            mx = self.op("ReduceMax", ax, self.const(np.array([-1], np.int64), "axes"), keepdims=1)
        else:
            mx = self.op("ReduceMax", ax, axes=[-1], keepdims=1)
        eps = self.const(np.float32(1e-5), "eps")
        m = self.op("Max", mx, eps) if use_max else self.op("Clip", mx, eps)
        s = self.op("Div", self.const(np.float32(127.0), "qp"), m)
        r = self.op("Round", self.op("Mul", x, s))
        lo, hi = self.const(np.float32(-128.0)), self.const(np.float32(127.0))
        if self.clamp == "minmax":  # torch's unoptimised export of clamp(lo, hi)
            q = self.op("Min", self.op("Max", r, lo), hi)
        elif self.clamp == "maxmin":
            q = self.op("Max", self.op("Min", hi, r), lo)
        else:
            q = self.op("Clip", r, lo, hi)
        return (self.op("Div", q, s) if dequantize else q), s

    def offline_linear(self, x: str, w_ternary: np.ndarray, weight_scale: float) -> str:
        xd, _ = self.act_quant(x, dequantize=True)
        y = self.op("MatMul", xd, self.const(w_ternary.T.astype(np.float32).copy(), "wt"))
        return self.op("Mul", y, self.const(np.float32(weight_scale), "ws"))

    def online_linear(self, x: str, w: np.ndarray) -> str:
        """AutoBitLinear online: WeightQuant(W) in the graph: s=1/mean|W|; Wq=clip(round(W*s),-1,1)/s."""
        wc = self.const(w.astype(np.float32), "w")
        mean = self.op("ReduceMean", self.op("Abs", wc), keepdims=0) if self.opset < 18 else self.op("ReduceMean", self.op("Abs", wc), keepdims=0)
        s = self.op("Reciprocal", self.op("Clip", mean, self.const(np.float32(1e-5))))
        wq = self.op("Div", self.op("Clip", self.op("Round", self.op("Mul", wc, s)), self.const(np.float32(-1)), self.const(np.float32(1))), s)
        wt = self.op("Transpose", wq, perm=[1, 0])
        xd, _ = self.act_quant(x, dequantize=True)
        return self.op("MatMul", xd, wt)

    def packed_linear(self, x: str, codes: np.ndarray, weight_scale: float) -> str:
        """Packed BitLinear: uint8 [N/4, K] unpacked in-graph; y / (input_scale * weight_scale)."""
        n, k = codes.shape
        r = n // 4
        packed = np.zeros((r, k), np.uint8)
        for i in range(4):
            packed |= ((codes[i * r:(i + 1) * r] + 1).astype(np.uint8) << (2 * i))
        p32 = self.op("Cast", self.const(packed, "packed"), to=onnx.TensorProto.UINT32)
        parts = []
        for i in range(4):
            sh = self.op("BitShift", p32, self.const(np.uint32(2 * i)), direction="RIGHT")
            parts.append(self.op("BitwiseAnd", sh, self.const(np.uint32(3))))
        cat = self.op("Concat", *parts, axis=0)
        w = self.op("Sub", self.op("Cast", cat, to=F), self.const(np.float32(1)))
        q, s = self.act_quant(x, dequantize=False)
        y = self.op("MatMul", q, self.op("Transpose", w, perm=[1, 0]))
        return self.op("Div", y, self.op("Mul", s, self.const(np.float32(weight_scale), "ws")))

    def rmsnorm(self, x: str, gamma: np.ndarray, eps: float = 1e-5, form: str = "reciprocal") -> str:
        p = self.op("Pow", x, self.const(np.float32(2)))
        axes = self.const(np.array([-1], np.int64), "axes")
        v = self.op("ReduceMean", p, axes, keepdims=1)
        d = self.op("Sqrt", self.op("Add", v, self.const(np.float32(eps), "eps")))
        n = self.op("Mul", x, self.op("Reciprocal", d)) if form == "reciprocal" else self.op("Div", x, d)
        return self.op("Mul", self.const(gamma.astype(np.float32), "gamma"), n)

    def relu2(self, x: str, form: str = "pow") -> str:
        r = self.op("Relu", x)
        return self.op("Pow", r, self.const(np.float32(2))) if form == "pow" else self.op("Mul", r, r)


def ternary(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.integers(-1, 2, (n, k)).astype(np.int8)


def mlp_block(seed: int = 0, d: int = 32, hidden: int = 64, form: str = "offline", clamp: str = "clip"
              ) -> onnx.ModelProto:
    """x -> RMSNorm -> gate/up BitLinear -> relu2(gate)*up -> RMSNorm -> down BitLinear -> + x."""
    rng = np.random.default_rng(seed)
    g = G(clamp=clamp)
    x = "x"
    n = g.rmsnorm(x, rng.uniform(0.5, 1.5, d))

    def lin(inp: str, nout: int, nin: int) -> str:
        if form == "offline":
            return g.offline_linear(inp, ternary(rng, nout, nin), float(rng.uniform(0.01, 0.1)))
        if form == "online":
            return g.online_linear(inp, rng.standard_normal((nout, nin)).astype(np.float32) * 0.05)
        return g.packed_linear(inp, ternary(rng, nout, nin), float(rng.uniform(10, 100)))

    gate = lin(n, hidden, d)
    up = lin(n, hidden, d)
    act = g.op("Mul", g.relu2(gate), up)
    act = g.rmsnorm(act, rng.uniform(0.5, 1.5, hidden), form="div")
    down = lin(act, d, hidden)
    y = g.op("Add", x, down)
    return g.model([("x", F, [1, 8, d])], [(y, "y", F, [1, 8, d])])
