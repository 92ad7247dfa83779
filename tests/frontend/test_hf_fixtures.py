"""Tiny BitNet checkpoints written with numpy + safetensors, and a numpy forward pass as the oracle.

The writer follows the documented Hugging Face layout (BITNET_FORMATS.md / transformers'
``integrations/bitnet.py``): packed uint8 ``[out/4, in]`` with row block i in bits 2i..2i+1 and value
code+1, ``weight_scale`` of shape [1], optional sharding with ``model.safetensors.index.json``.

The reference forward is written from transformers' ``modeling_bitnet.py`` and works on the *logical*
weights the writer started from (codes before packing, float weights as stored), so it shares no
code with the importer. The tests in this file check the helpers themselves against hand-computed values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NP_DTYPE = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


@dataclass(frozen=True)
class Tiny:
    vocab: int = 96
    hidden: int = 32
    inter: int = 48
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    rope_theta: float = 10000.0
    eps: float = 1e-5
    tie: bool = True
    linear_class: str = "bitlinear"  # or autobitlinear
    mode: str = "offline"  # or online
    packed: bool = True  # autobitlinear offline may be stored packed or as float codes
    dtype: str = "F32"  # storage dtype of float tensors
    shards: int = 1
    use_rms_norm: bool = False
    skip: tuple[str, ...] = ()  # quantization_config.modules_to_not_convert: plain float nn.Linear
    bias: bool = False  # config.attention_bias: q/k/v/o carry a bias added after the BitLinear
    extra_config: dict[str, object] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Projection -> (out, in)."""
        d = self.head_dim
        return {"self_attn.q_proj": (self.heads * d, self.hidden), "self_attn.k_proj": (self.kv_heads * d, self.hidden),
                "self_attn.v_proj": (self.kv_heads * d, self.hidden), "self_attn.o_proj": (self.hidden, self.heads * d),
                "mlp.gate_proj": (self.inter, self.hidden), "mlp.up_proj": (self.inter, self.hidden),
                "mlp.down_proj": (self.hidden, self.inter)}

    def config(self) -> dict[str, object]:
        c: dict[str, object] = {
            "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "vocab_size": self.vocab,
            "hidden_size": self.hidden, "intermediate_size": self.inter, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "hidden_act": "relu2",
            "max_position_embeddings": 256, "rms_norm_eps": self.eps, "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie, "attention_bias": self.bias,
            "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[self.dtype],
            "quantization_config": {"quant_method": "bitnet", "linear_class": self.linear_class,
                                    "quantization_mode": self.mode, "use_rms_norm": self.use_rms_norm,
                                    "rms_norm_eps": 1e-6, "modules_to_not_convert": list(self.skip) or None},
        }
        c.update(self.extra_config)
        return c


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """int8 codes [N, K] -> uint8 [N/4, K], as transformers' ``pack_weights`` (N a multiple of 4)."""
    n = codes.shape[0]
    r = n // 4
    u = (codes.astype(np.int16) + 1).astype(np.uint8)
    out = np.zeros((r, *codes.shape[1:]), dtype=np.uint8)
    for i in range(4):
        out |= (u[i * r:(i + 1) * r] << (2 * i)).astype(np.uint8)
    return out


def _stored(x: np.ndarray, dtype: str) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(NP_DTYPE[dtype])


def make_checkpoint(folder: Path, t: Tiny, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a random checkpoint; return the logical float32 weights for :func:`reference_logits`.

    Logical entries: ``<proj>.weight`` is what the module multiplies by (codes for packed / offline
    layers, the stored float weights for online), ``<proj>.weight_scale`` a float32 scalar.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, np.ndarray] = {}
    logical: dict[str, np.ndarray] = {}

    def put(name: str, stored: np.ndarray) -> None:
        files[name] = stored
        logical[name] = np.asarray(stored).astype(np.float32) if stored.dtype != np.uint8 else stored

    put("model.embed_tokens.weight", _stored(rng.normal(0, 1.0, (t.vocab, t.hidden)), t.dtype))
    for i in range(t.layers):
        p = f"model.layers.{i}"
        for nm, size in (("input_layernorm", t.hidden), ("post_attention_layernorm", t.hidden),
                         ("self_attn.attn_sub_norm", t.hidden), ("mlp.ffn_sub_norm", t.inter)):
            put(f"{p}.{nm}.weight", _stored(1.0 + 0.2 * rng.normal(size=size), t.dtype))
        for proj, (n, k) in t.shapes().items():
            w = f"{p}.{proj}.weight"
            if f"{p}.{proj}" in t.skip:
                put(w, _stored(rng.normal(0, 0.1, (n, k)), t.dtype))
                continue
            if t.use_rms_norm:
                put(f"{p}.{proj}.rms_norm.weight", _stored(1.0 + 0.2 * rng.normal(size=k), t.dtype))
            if t.mode == "online" and t.linear_class == "autobitlinear":  # BitLinear ignores the mode
                put(w, _stored(rng.normal(0, 0.05, (n, k)), t.dtype))
                continue
            codes = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=(n, k), p=[0.3, 0.4, 0.3])
            if t.packed:
                files[w] = pack_codes(codes)
            else:
                files[w] = _stored(codes, t.dtype)
            logical[w] = codes.astype(np.float32)
            if t.bias and proj.startswith("self_attn."):
                put(f"{p}.{proj}.bias", _stored(rng.normal(0, 0.5, size=n), t.dtype))
            ws = _stored(rng.uniform(0.5, 2.0, size=(1,)), t.dtype)
            files[f"{p}.{proj}.weight_scale"] = ws
            logical[f"{p}.{proj}.weight_scale"] = ws.astype(np.float32).reshape(())
    put("model.norm.weight", _stored(1.0 + 0.2 * rng.normal(size=t.hidden), t.dtype))
    if not t.tie:
        put("lm_head.weight", _stored(rng.normal(0, 0.2, (t.vocab, t.hidden)), t.dtype))

    (folder / "config.json").write_text(json.dumps(t.config(), indent=1))
    names = list(files)
    if t.shards <= 1:
        save_file(files, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for s in range(t.shards):
            fname = f"model-{s + 1:05d}-of-{t.shards:05d}.safetensors"
            part = {n: files[n] for n in names[s::t.shards]}
            save_file(part, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        total = int(sum(a.nbytes for a in files.values()))
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return logical


# --- the oracle: transformers' BitNet forward in numpy --------------------------------------------


def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)))


def _act_quant(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.float32(127.0) / np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(1e-5))
    return np.clip(np.rint(x * scale), -128, 127), scale


def _weight_quant(w: np.ndarray) -> np.ndarray:
    # WeightQuant in a float32 run: round(W*s).clip(-1, 1) / s with s = 1/max(mean|W|, 1e-5)
    scale = np.float32(1.0) / max(np.float32(np.abs(w).mean(dtype=np.float64)), np.float32(1e-5))
    return (np.clip(np.rint(w * scale), -1, 1) / scale).astype(np.float32)


def _linear(t: Tiny, lw: dict[str, np.ndarray], prefix: str, x: np.ndarray) -> np.ndarray:
    if prefix in t.skip:  # left as nn.Linear by the quantizer
        return x @ lw[f"{prefix}.weight"].T
    if t.use_rms_norm:
        x = _rmsnorm(x, lw[f"{prefix}.rms_norm.weight"], 1e-6)
    w = lw[f"{prefix}.weight"]
    b = lw.get(f"{prefix}.bias", np.float32(0))
    xq, sx = _act_quant(x)
    if t.linear_class == "bitlinear":  # BitLinear: (xq @ W^T) / (sx * weight_scale), then += bias
        return (xq @ w.T) / (sx * lw[f"{prefix}.weight_scale"]) + b
    if t.mode == "online":  # AutoBitLinear(online_quant): F.linear(x, WeightQuant(W), bias), no weight_scale
        return (xq / sx) @ _weight_quant(w).T + b
    return ((xq / sx) @ w.T + b) * lw[f"{prefix}.weight_scale"]  # AutoBitLinear: F.linear(.., bias) * weight_scale


def _rope(t: Tiny, s: int) -> tuple[np.ndarray, np.ndarray]:
    d = t.head_dim
    inv = 1.0 / (np.float32(t.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
    f = np.outer(np.arange(s, dtype=np.float32), inv.astype(np.float32))
    e = np.concatenate([f, f], -1)
    return np.cos(e).astype(np.float32), np.sin(e).astype(np.float32)


def _rotate_half(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], -1)


def reference_logits(t: Tiny, lw: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Logits [S, V] for one sequence, following modeling_bitnet.BitNetForCausalLM (eager attention)."""
    s, d, hq, hk = len(ids), t.head_dim, t.heads, t.kv_heads
    x = lw["model.embed_tokens.weight"][ids]
    cos, sin = _rope(t, s)
    mask = np.triu(np.full((s, s), -np.inf, dtype=np.float32), 1)
    for i in range(t.layers):
        p = f"model.layers.{i}"
        h = _rmsnorm(x, lw[f"{p}.input_layernorm.weight"], t.eps)
        q = _linear(t, lw, f"{p}.self_attn.q_proj", h).reshape(s, hq, d).transpose(1, 0, 2)
        k = _linear(t, lw, f"{p}.self_attn.k_proj", h).reshape(s, hk, d).transpose(1, 0, 2)
        v = _linear(t, lw, f"{p}.self_attn.v_proj", h).reshape(s, hk, d).transpose(1, 0, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = np.repeat(k, hq // hk, axis=0)  # repeat_kv: head h uses kv head h // groups
        v = np.repeat(v, hq // hk, axis=0)
        a = q @ k.transpose(0, 2, 1) * np.float32(d ** -0.5) + mask
        a = np.exp(a - a.max(-1, keepdims=True))
        a = a / a.sum(-1, keepdims=True)
        o = (a @ v).transpose(1, 0, 2).reshape(s, hq * d)
        o = _rmsnorm(o, lw[f"{p}.self_attn.attn_sub_norm.weight"], t.eps)
        x = x + _linear(t, lw, f"{p}.self_attn.o_proj", o)
        h = _rmsnorm(x, lw[f"{p}.post_attention_layernorm.weight"], t.eps)
        g = _linear(t, lw, f"{p}.mlp.gate_proj", h)
        u = _linear(t, lw, f"{p}.mlp.up_proj", h)
        m = _rmsnorm(np.maximum(g, 0) ** 2 * u, lw[f"{p}.mlp.ffn_sub_norm.weight"], t.eps)
        x = x + _linear(t, lw, f"{p}.mlp.down_proj", m)
    x = _rmsnorm(x, lw["model.norm.weight"], t.eps)
    head = lw["model.embed_tokens.weight"] if t.tie else lw["lm_head.weight"]
    return (x @ head.T).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def argmax_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.reshape(-1, a.shape[-1]).argmax(-1) == b.reshape(-1, b.shape[-1]).argmax(-1)))


VARIANTS = {
    "bitlinear-packed-f32": Tiny(),
    "bitlinear-packed-bf16-sharded-untied": Tiny(dtype="BF16", shards=3, tie=False),
    "autobitlinear-offline-dense-f16": Tiny(linear_class="autobitlinear", packed=False, dtype="F16"),
    "autobitlinear-offline-packed-mha": Tiny(linear_class="autobitlinear", kv_heads=4),
    "autobitlinear-online-bf16": Tiny(linear_class="autobitlinear", mode="online", dtype="BF16"),
    "bitlinear-packed-rmsnorm-mqa": Tiny(use_rms_norm=True, kv_heads=1, layers=3),
    "bitlinear-packed-skip-one": Tiny(skip=("model.layers.1.mlp.down_proj",)),
    "autobitlinear-offline-attention-bias": Tiny(linear_class="autobitlinear", bias=True),
    "bitlinear-online-mode-is-packed": Tiny(mode="online", bias=True),
}


def variant(name: str, **kw: object) -> Tiny:
    return replace(VARIANTS[name], **kw)  # type: ignore[arg-type]


# --- the helpers' own tests (hand-computed values) ------------------------------------------------


def test_pack_codes_matches_transformers_docstring_example() -> None:
    # transformers' unpack_weights docstring: these two bytes per column unpack to the rows below
    packed = np.array([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], dtype=np.uint8)
    codes = np.array([[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]], dtype=np.int8)
    np.testing.assert_array_equal(pack_codes(codes), packed)


def test_reference_attention_is_causal(tmp_path: Path) -> None:
    # changing a later token must not change earlier logits, and must change its own
    t = Tiny(layers=1)
    lw = make_checkpoint(tmp_path, t, 1)
    a = reference_logits(t, lw, np.array([1, 2, 3, 4, 5]))
    b = reference_logits(t, lw, np.array([1, 2, 3, 4, 9]))
    np.testing.assert_array_equal(a[:4], b[:4])
    assert not np.allclose(a[4], b[4])
