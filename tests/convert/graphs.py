"""Graphs made only of the fused BitNet ops (plus their ONNX function bodies), built in code.

They let the converter be tested before (and independently of) the standard-op lowerings: ONNX
Runtime runs them through the model-local function definitions, and :func:`np_*` are numpy oracles
written from the semantics in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh

from bitnet_coreml.passes.fused import DOMAIN, function_proto

F = onnx.TensorProto.FLOAT


class FusedGraph:
    """Builds a graph of BitLinear / RMSNorm / Relu2 nodes with deterministic names."""

    def __init__(self, act_bits: int = 8, act_eps: float = 1e-5, rms_eps: float = 1e-5) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.funcs: dict[tuple[str, str], onnx.FunctionProto] = {}
        self.n = 0
        self.act_bits, self.act_eps, self.rms_eps = act_bits, act_eps, rms_eps

    def _name(self, p: str) -> str:
        self.n += 1
        return f"{p}{self.n}"

    def _fused(self, op: str, inputs: list[str], attrs: dict[str, object]) -> str:
        f = function_proto(op, attrs)
        self.funcs.setdefault((op, f.overload), f)
        out = self._name(op.lower() + "_out")
        node = oh.make_node(op, inputs, [out], name=self._name(op), domain=DOMAIN, **attrs)
        node.overload = f.overload
        self.nodes.append(node)
        return out

    def bitlinear(self, x: str, codes: np.ndarray, alpha: np.ndarray | float) -> str:
        w = self._name("w")
        a = self._name("alpha")
        self.inits.append(nh.from_array(codes.astype(np.int8), w))
        self.inits.append(nh.from_array(np.asarray(alpha, np.float32), a))
        return self._fused("BitLinear", [x, w, a], {"act_bits": self.act_bits, "act_eps": self.act_eps,
                                                     "convention": "multiply"})

    def rmsnorm(self, x: str, gamma: np.ndarray) -> str:
        g = self._name("gamma")
        self.inits.append(nh.from_array(gamma.astype(np.float32), g))
        return self._fused("RMSNorm", [x, g], {"epsilon": self.rms_eps})

    def relu2(self, x: str) -> str:
        return self._fused("Relu2", [x], {})

    def model(self, inputs: list[tuple[str, list[int]]], outputs: list[tuple[str, list[int]]]) -> onnx.ModelProto:
        g = oh.make_graph(self.nodes, "fused", [oh.make_tensor_value_info(n, F, s) for n, s in inputs],
                          [oh.make_tensor_value_info(n, F, s) for n, s in outputs], self.inits)
        return oh.make_model(g, opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid(DOMAIN, 1)],
                             ir_version=10, functions=list(self.funcs.values()))


def ternary(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.integers(-1, 2, (n, k)).astype(np.int8)


# --- numpy oracles (from docs/ARCHITECTURE.md) ------------------------------------------------------


def np_bitlinear(x: np.ndarray, w: np.ndarray, alpha: np.ndarray | float, act_bits: int = 8,
                 eps: float = 1e-5) -> np.ndarray:
    x = x.astype(np.float64)
    qp, qn = 2.0 ** (act_bits - 1) - 1, -(2.0 ** (act_bits - 1))
    m = np.maximum(np.abs(x).max(axis=-1, keepdims=True), eps)
    sx = qp / m
    xq = np.clip(np.round(x * sx), qn, qp)  # np.round: ties to even
    return (xq @ w.astype(np.float64).T) / sx * np.asarray(alpha, np.float64)


def np_rmsnorm(x: np.ndarray, gamma: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * gamma


def np_relu2(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0) ** 2


def chain_model(seed: int = 0, d: int = 32, n: int = 48, seq: int = 8, per_channel: bool = False
                ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> RMSNorm -> BitLinear(n) -> Relu2 -> BitLinear(d) -> y; also returns the weights for oracles."""
    rng = np.random.default_rng(seed)
    g = FusedGraph()
    gamma = rng.uniform(0.5, 1.5, d).astype(np.float32)
    w1, w2 = ternary(rng, n, d), ternary(rng, d, n)
    a1 = rng.uniform(0.5, 2.0, n).astype(np.float32) if per_channel else np.float32(rng.uniform(0.5, 2.0))
    a2 = rng.uniform(0.5, 2.0, d).astype(np.float32) if per_channel else np.float32(rng.uniform(0.5, 2.0))
    h = g.rmsnorm("x", gamma)
    h = g.bitlinear(h, w1, a1)
    h = g.relu2(h)
    y = g.bitlinear(h, w2, a2)
    model = g.model([("x", [1, seq, d])], [(y, [1, seq, d])])
    return model, {"gamma": gamma, "w1": w1, "w2": w2, "a1": np.asarray(a1), "a2": np.asarray(a2)}


def np_chain(x: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    h = np_rmsnorm(x, p["gamma"])
    h = np_bitlinear(h, p["w1"], p["a1"])
    h = np_relu2(h)
    return np_bitlinear(h, p["w2"], p["a2"])


def mlp_model(seed: int = 0, d: int = 32, hidden: int = 64, seq: int = 8, alpha: float = 300.0
              ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The BitNet MLP: down(sub_norm(relu2(gate(n)) * up(n))), n = norm(x); big gate/up Alphas overflow fp16."""
    rng = np.random.default_rng(seed)
    g = FusedGraph()
    p = {"g0": rng.uniform(0.5, 1.5, d).astype(np.float32), "g1": rng.uniform(0.5, 1.5, hidden).astype(np.float32),
         "wg": ternary(rng, hidden, d), "wu": ternary(rng, hidden, d), "wd": ternary(rng, d, hidden),
         "ag": np.float32(alpha), "au": np.float32(alpha), "ad": np.float32(0.05)}
    n = g.rmsnorm("x", p["g0"])
    gate = g.bitlinear(n, p["wg"], p["ag"])
    up = g.bitlinear(n, p["wu"], p["au"])
    r = g.relu2(gate)
    prod = "prod"
    g.nodes.append(oh.make_node("Mul", [r, up], [prod], name="mlp_mul"))
    s = g.rmsnorm(prod, p["g1"])
    y = g.bitlinear(s, p["wd"], p["ad"])
    return g.model([("x", [1, seq, d])], [(y, [1, seq, d])]), p


def np_mlp(x: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    n = np_rmsnorm(x, p["g0"])
    h = np_relu2(np_bitlinear(n, p["wg"], p["ag"])) * np_bitlinear(n, p["wu"], p["au"])
    return np_bitlinear(np_rmsnorm(h, p["g1"]), p["wd"], p["ad"])
