"""Import a Hugging Face BitNet checkpoint folder (``config.json`` + safetensors) as an onnx-ir model.

The graph is built directly in its fused form (what ``passes.run_default_passes`` produces from an
ONNX export of the same model), for one fixed sequence length::

    input_ids int64 [1, S] -> Gather(embed) -> N x decoder layer -> RMSNorm -> lm_head -> logits f32 [1, S, V]

    decoder layer (pre-norm, as transformers' BitNetDecoderLayer):
      h = RMSNorm(x); q, k, v = BitLinear(h); RoPE(q, k); causal GQA attention; RMSNorm (attn_sub_norm)
      x = x + BitLinear_o(.)
      h = RMSNorm(x); x = x + BitLinear_down(RMSNorm_ffn(Relu2(BitLinear_gate(h)) * BitLinear_up(h)))

Weights are not read while building: BitLinear ``W`` are :class:`TernaryCodes` (lazy int8 codes that
also expose the packed uint8 source), the embedding / lm_head are :class:`CheckpointTensor` (lazy,
float32 declared by default, convertible straight to fp16; ``embed_dtype="float16"`` declares them fp16). Norm weights and ``weight_scale`` are tiny and are
read now, which also validates them. Every tensor's presence, dtype and shape is checked against
``config.json`` from the safetensors headers before the graph exists.

Attention groups query heads by their KV head instead of repeating K/V: ``q [1, H, S, d]`` is
reshaped to ``[1, Hkv, (H/Hkv)*S, d]`` (a free view: head ``h`` uses KV head ``h // (H/Hkv)``), so
every tensor stays rank 4 and K/V are never copied.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import onnx_ir as ir

from bitnet_coreml._files import check_budget
from bitnet_coreml.errors import InputError, ModelLoadError
from bitnet_coreml.frontend.hf_config import BitNetConfig, read_config
from bitnet_coreml.frontend.hf_graph import GraphBuilder
from bitnet_coreml.frontend.hf_safetensors import FLOAT_CODES, CheckpointTensors
from bitnet_coreml.frontend.hf_tensors import VALUES_PER_BYTE, CheckpointTensor, ScaledAlpha, TernaryCodes

__all__ = ["load_checkpoint", "MASK_VALUE", "rope_tables"]

log = logging.getLogger(__name__)

OPSET = 18
ACT_EPS = 1e-5
# Additive causal mask value: the most negative fp16 number, so the same constant is finite in an
# fp16 program and still makes exp() underflow to exactly 0 in fp32.
MASK_VALUE = float(np.finfo(np.float16).min)
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def should_convert(module: str, patterns: tuple[str, ...]) -> bool:
    """transformers' ``should_convert_module``: a pattern skips a module when it matches from the start
    up to a module boundary (as a regex) or is a suffix of the module's name."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for key in patterns:
        try:
            hit = re.match(rf"(?:{key}){boundary}", module) is not None
        except re.error:
            hit = False
        if hit or module.endswith(key):
            return False
    return True


def rope_tables(cfg: BitNetConfig, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin ``[S, head_dim]`` for positions 0..S-1 (default RoPE, computed in float32 as transformers)."""
    d = cfg.head_dim
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))))
    freqs = np.arange(seq_len, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float32)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def causal_mask(seq_len: int, groups: int) -> np.ndarray:
    """Additive mask ``[groups*S, S]`` matching the grouped query rows (row g*S+i is query position i)."""
    m = np.triu(np.full((seq_len, seq_len), MASK_VALUE, dtype=np.float32), k=1)
    return np.tile(m, (groups, 1))


class _Importer:
    def __init__(self, folder: Path, cfg: BitNetConfig, store: CheckpointTensors, seq_len: int,
                 embed_dtype: ir.DataType = ir.DataType.FLOAT) -> None:
        self.folder, self.cfg, self.store, self.S = folder, cfg, store, seq_len
        self.embed_dtype = embed_dtype
        self.g = GraphBuilder()

    # --- tensors ----------------------------------------------------------------------------------

    def _norm_weight(self, name: str, size: int) -> ir.Value:
        self.store.require(name, shapes=[(size,)], dtypes=FLOAT_CODES, what="RMSNorm weight")
        arr = self.store.read_as(name, np.float32)
        if not np.all(np.isfinite(arr)):
            raise ModelLoadError(f"{self.store.info(name).file}: tensor {name!r} has non-finite values")  # type: ignore[union-attr]
        return self.g.const(name, arr)

    def _linear_kind(self, name: str, n: int, k: int) -> str:
        """Validate a projection's weight header; return how its codes are stored."""
        q = self.cfg.quant
        info = self.store.info(name)
        if info is None:
            self.store.require(name, shapes=[(n // VALUES_PER_BYTE, k), (n, k)], what="BitLinear weight")
        assert info is not None
        if info.dtype == "U8":
            if n % VALUES_PER_BYTE:
                raise ModelLoadError(f"{info.file}: tensor {name!r} is packed uint8 but its layer has {n} output rows, "
                                     f"not a multiple of {VALUES_PER_BYTE}; a packed BitNet weight is [out/4, in]")
            self.store.require(name, shapes=[(n // VALUES_PER_BYTE, k)], what="packed BitLinear weight")
            return "online" if q.online else "packed"
        self.store.require(name, shapes=[(n, k)], dtypes=(*FLOAT_CODES, "I8"), what="BitLinear weight")
        if q.linear_class == "bitlinear":
            raise ModelLoadError(f"{info.file}: tensor {name!r} is {info.dtype}{list(info.shape)} but "
                                 "linear_class 'bitlinear' stores packed uint8 [out/4, in] weights")
        return "online" if q.online else "dense"

    def _weight_scale(self, prefix: str) -> float | None:
        name = f"{prefix}.weight_scale"
        info = self.store.info(name)
        q = self.cfg.quant
        if q.online and q.linear_class == "autobitlinear":
            return None  # AutoBitLinear(online_quant=True) has no weight_scale
        if info is None:
            raise ModelLoadError(f"{self.folder}: missing tensor {name!r} (BitLinear weight_scale, shape [1])")
        self.store.require(name, shapes=[(1,), ()], dtypes=FLOAT_CODES, what="weight_scale")
        v = float(self.store.read_as(name, np.float32).reshape(()))
        if not np.isfinite(v) or v == 0.0:
            raise ModelLoadError(f"{info.file}: tensor {name!r} = {v!r}; expected a finite non-zero scale")
        return v

    def bitlinear(self, x: ir.Value, prefix: str, n: int, k: int) -> ir.Value:
        cfg, q, g = self.cfg, self.cfg.quant, self.g
        wname = f"{prefix}.weight"
        if not should_convert(prefix, q.modules_to_not_convert):
            return self.plain_linear(x, wname, n, k)
        kind = self._linear_kind(wname, n, k)
        if q.use_rms_norm:
            x = g.fused("RMSNorm", [x, self._norm_weight(f"{prefix}.rms_norm.weight", k)],
                        {"epsilon": q.rms_norm_eps}, f"{prefix}.rms_norm")
        ws = self._weight_scale(prefix)
        factor = 1.0 if ws is None else (1.0 / ws if q.divides else ws)
        w, alpha = self._ternary(prefix, wname, kind, n, factor)
        y = g.fused("BitLinear", [x, w, alpha],
                    {"act_bits": q.act_bits, "act_eps": ACT_EPS, "convention": "divide" if q.divides else "multiply"},
                    prefix, shape=[1, self.S, n])
        if cfg.attention_bias and prefix.split(".")[-1] in _ATTN:
            b = f"{prefix}.bias"
            self.store.require(b, shapes=[(n,)], dtypes=FLOAT_CODES, what="bias")
            bias = self.store.read_as(b, np.float32)
            if ws is not None and not q.divides:
                # AutoBitLinear adds the bias inside F.linear, before multiplying by weight_scale
                bias = (bias * np.float32(ws)).astype(np.float32)
            y = g.op("Add", [y, g.const(b, bias)], shape=[1, self.S, n])
        return y

    def _ternary(self, prefix: str, wname: str, kind: str, n: int, factor: float) -> tuple[ir.Value, ir.Value]:
        """The BitLinear's ``W`` (ternary codes) and ``Alpha`` initializers for the weight ``wname``."""
        g = self.g
        codes = TernaryCodes(self.store, wname, kind, name=f"{prefix}.codes", out_features=n)
        w = g.initializer(codes)
        if kind == "packed":
            return w, g.const(f"{prefix}.alpha", np.asarray(np.float32(factor)))
        return w, g.initializer(ScaledAlpha(codes, factor, name=f"{prefix}.alpha"))

    def plain_linear(self, x: ir.Value, wname: str, n: int, k: int, weight: ir.Value | None = None,
                     dtype: ir.DataType = ir.DataType.FLOAT, rows: int | None = None) -> ir.Value:
        """``x @ W^T`` for a float ``W [n, k]`` (lm_head, unconverted modules) as Gemm(transB=1) on 2-D.

        With an fp16 ``W`` the product runs in fp16 between two Casts (what an fp16 package computes).
        """
        g = self.g
        S = self.S if rows is None else rows
        if weight is None:
            self.store.require(wname, shapes=[(n, k)], dtypes=FLOAT_CODES, what="linear weight")
            weight = g.initializer(CheckpointTensor(self.store, wname, dtype=dtype))
        x2 = g.reshape(x, [S, k])
        half = weight.dtype == ir.DataType.FLOAT16
        if half:
            x2 = g.op("Cast", [x2], {"to": ir.DataType.FLOAT16}, shape=[S, k], dtype=ir.DataType.FLOAT16)
        y = g.op("Gemm", [x2, weight], {"transB": 1}, shape=[S, n], name=wname.removesuffix(".weight"),
                 dtype=weight.dtype or ir.DataType.FLOAT)
        if half:
            y = g.op("Cast", [y], {"to": ir.DataType.FLOAT}, shape=[S, n])
        return g.reshape(y, [1, S, n])

    # --- blocks -----------------------------------------------------------------------------------

    def rope(self, t: ir.Value, heads: int, cos: ir.Value, sin: ir.Value) -> ir.Value:
        """rotate-half RoPE on ``t [1, heads, S, d]``: t*cos + cat(-t2, t1)*sin."""
        g, d, S = self.g, self.cfg.head_dim, self.S
        half = [1, heads, S, d // 2]
        t1 = g.slice(t, 0, d // 2, half)
        t2 = g.slice(t, d // 2, d, half)
        rot = g.op("Concat", [g.op("Neg", [t2], shape=half), t1], {"axis": -1}, shape=[1, heads, S, d])
        full = [1, heads, S, d]
        return g.op("Add", [g.op("Mul", [t, cos], shape=full), g.op("Mul", [rot, sin], shape=full)], shape=full)

    def attention(self, h: ir.Value, p: str, cos: ir.Value, sin: ir.Value, mask: ir.Value) -> ir.Value:
        cfg, g, S = self.cfg, self.g, self.S
        H, Hkv, d, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        rep = cfg.kv_groups

        def heads(t: ir.Value, n: int) -> ir.Value:
            t = g.reshape(t, [1, S, n, d])
            return g.op("Transpose", [t], {"perm": [0, 2, 1, 3]}, shape=[1, n, S, d])

        q = heads(self.bitlinear(h, f"{p}.q_proj", H * d, D), H)
        k = heads(self.bitlinear(h, f"{p}.k_proj", Hkv * d, D), Hkv)
        v = heads(self.bitlinear(h, f"{p}.v_proj", Hkv * d, D), Hkv)
        q = self.rope(q, H, cos, sin)
        k = self.rope(k, Hkv, cos, sin)
        k, v = self.keys_values(k, v, p)
        T = int(k.shape[2])  # type: ignore[index, arg-type]  # keys attended to: S, or the cache's context
        # Scale q before the product (same result as scaling the scores; smaller numbers in fp16).
        # The attention nodes are named: the stateless graph and the stateful functions' graphs then
        # name them alike, and the fp16-safety plan (measured on the first) keeps the same ones in fp32.
        q = g.op("Mul", [q, g.const(f"{p}.scaling", np.asarray(np.float32(d ** -0.5)))], shape=[1, H, S, d],
                 name=f"{p}.q_scaled")
        qg = g.reshape(q, [1, Hkv, rep * S, d])
        kt = g.op("Transpose", [k], {"perm": [0, 1, 3, 2]}, shape=[1, Hkv, d, T])
        scores = g.op("MatMul", [qg, kt], shape=[1, Hkv, rep * S, T], name=f"{p}.scores")
        scores = g.op("Add", [scores, mask], shape=[1, Hkv, rep * S, T], name=f"{p}.masked_scores")
        probs = g.op("Softmax", [scores], {"axis": -1}, shape=[1, Hkv, rep * S, T], name=f"{p}.probs")
        o = g.op("MatMul", [probs, v], shape=[1, Hkv, rep * S, d], name=f"{p}.context")
        o = g.reshape(o, [1, H, S, d])
        o = g.op("Transpose", [o], {"perm": [0, 2, 1, 3]}, shape=[1, S, H, d])
        o = g.reshape(o, [1, S, H * d])
        if cfg.sub_norms:
            o = g.fused("RMSNorm", [o, self._norm_weight(f"{p}.attn_sub_norm.weight", H * d)],
                        {"epsilon": cfg.rms_norm_eps}, f"{p}.attn_sub_norm", shape=[1, S, H * d])
        return self.bitlinear(o, f"{p}.o_proj", D, H * d)

    def mlp(self, h: ir.Value, p: str) -> ir.Value:
        cfg, g, S = self.cfg, self.g, self.S
        D, F = cfg.hidden_size, cfg.intermediate_size
        gate = self.bitlinear(h, f"{p}.gate_proj", F, D)
        up = self.bitlinear(h, f"{p}.up_proj", F, D)
        if cfg.hidden_act == "silu":
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], shape=[1, S, F])], shape=[1, S, F], name=f"{p}.act")
        else:
            act = g.fused("Relu2", [gate], {}, f"{p}.act", shape=[1, S, F])
        m = g.op("Mul", [act, up], shape=[1, S, F])
        if not cfg.sub_norms:
            return self.bitlinear(m, f"{p}.down_proj", D, F)
        m = g.fused("RMSNorm", [m, self._norm_weight(f"{p}.ffn_sub_norm.weight", F)],
                    {"epsilon": cfg.rms_norm_eps}, f"{p}.ffn_sub_norm", shape=[1, S, F])
        return self.bitlinear(m, f"{p}.down_proj", D, F)

    def build(self) -> ir.Model:
        cfg, g, S = self.cfg, self.g, self.S
        D, V = cfg.hidden_size, cfg.vocab_size
        if cfg.num_attention_heads * cfg.head_dim != D:
            raise ModelLoadError(f"{self.folder / 'config.json'}: num_attention_heads*head_dim = "
                                 f"{cfg.num_attention_heads * cfg.head_dim} != hidden_size = {D}; BitNet's attn_sub_norm "
                                 "has hidden_size weights, so they must match")
        ids = self.inputs()
        emb_name = "model.embed_tokens.weight"
        self.store.require(emb_name, shapes=[(V, D)], dtypes=FLOAT_CODES, what="embedding")
        emb = g.initializer(CheckpointTensor(self.store, emb_name, dtype=self.embed_dtype))
        x = g.op("Gather", [emb, ids], {"axis": 0}, shape=[1, S, D], name="model.embed_tokens",
                 dtype=self.embed_dtype)
        if self.embed_dtype != ir.DataType.FLOAT:
            x = g.op("Cast", [x], {"to": ir.DataType.FLOAT}, shape=[1, S, D])
        cos, sin, mask = self.positions()
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            h = g.fused("RMSNorm", [x, self._norm_weight(f"{p}.input_layernorm.weight", D)],
                        {"epsilon": cfg.rms_norm_eps}, f"{p}.input_layernorm", shape=[1, S, D])
            x = g.op("Add", [x, self.attention(h, f"{p}.self_attn", cos, sin, mask)], shape=[1, S, D],
                     name=f"{p}.attn_residual")
            h = g.fused("RMSNorm", [x, self._norm_weight(f"{p}.post_attention_layernorm.weight", D)],
                        {"epsilon": cfg.rms_norm_eps}, f"{p}.post_attention_layernorm", shape=[1, S, D])
            x = g.op("Add", [x, self.mlp(h, f"{p}.mlp")], shape=[1, S, D], name=f"{p}.mlp_residual")
        x = g.fused("RMSNorm", [x, self._norm_weight("model.norm.weight", D)], {"epsilon": cfg.rms_norm_eps},
                    "model.norm", shape=[1, S, D])
        x, rows = self.head_rows(x)
        if "lm_head.weight" in self.store and not cfg.tie_word_embeddings:
            logits = self.plain_linear(x, "lm_head.weight", V, D, dtype=self.embed_dtype, rows=rows)
        elif cfg.tie_word_embeddings:
            logits = self.plain_linear(x, emb_name, V, D, weight=emb, rows=rows)
        else:
            raise ModelLoadError(f"{self.folder}: missing tensor 'lm_head.weight' (shape {[V, D]}) and "
                                 "tie_word_embeddings is false in config.json")
        g.output(logits, "logits", ir.DataType.FLOAT, [1, rows, V])
        return g.model(OPSET, doc=f"BitNet checkpoint {self.folder.name}, seq_len {S}", metadata=self.metadata())

    # --- hooks a stateful import (frontend/hf_stateful.py) overrides ---------------------------

    def inputs(self) -> ir.Value:
        """The graph inputs; returns the token ids."""
        return self.g.input("input_ids", ir.DataType.INT64, [1, self.S])

    def positions(self) -> tuple[ir.Value, ir.Value, ir.Value]:
        """RoPE cos, sin ``[1, 1, S, d]`` and the additive attention mask for positions 0..S-1."""
        g, cfg, S = self.g, self.cfg, self.S
        cos_np, sin_np = rope_tables(cfg, S)
        cos = g.const("rope.cos", cos_np.reshape(1, 1, S, cfg.head_dim))
        sin = g.const("rope.sin", sin_np.reshape(1, 1, S, cfg.head_dim))
        return cos, sin, g.const("attn.causal_mask", causal_mask(S, cfg.kv_groups))

    def keys_values(self, k: ir.Value, v: ir.Value, prefix: str) -> tuple[ir.Value, ir.Value]:
        """The keys and values ``[1, Hkv, T, d]`` attention reads (here: this call's own, T = S)."""
        return k, v

    def head_rows(self, x: ir.Value) -> tuple[ir.Value, int]:
        """The final hidden states the lm_head projects, and how many rows they are."""
        return x, self.S

    def metadata(self) -> dict[str, str]:
        q = self.cfg.quant
        return {"bitnet_coreml.source": "hf_checkpoint", "bitnet_coreml.seq_len": str(self.S),
                "bitnet_coreml.fused": "1", "bitnet_coreml.linear_class": q.linear_class,
                "bitnet_coreml.quantization_mode": q.quantization_mode}


EMBED_DTYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16}


def load_checkpoint(path: str | os.PathLike[str], *, seq_len: int = 64, embed_dtype: str = "float32") -> ir.Model:
    """Import the BitNet checkpoint folder ``path`` as a fused onnx-ir model for ``seq_len`` tokens.

    ``embed_dtype`` is the dtype the (bf16) embedding and lm_head are declared in: ``"float32"`` (exact
    widening; the default) or ``"float16"`` (half the memory for an fp16 package: the embedding is
    gathered in fp16 and cast up, the lm_head Gemm runs in fp16 between Casts; bf16 -> fp16 keeps every
    value of magnitude 6e-5..65504 exactly).

    Raises :class:`ModelLoadError` (exit 2) for a missing/invalid config, a wrong model_type, missing or
    mis-shaped tensors, a packed layer whose row count is not a multiple of 4, or a corrupt safetensors file.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: not a folder; expected a Hugging Face BitNet checkpoint folder with config.json")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise InputError(f"seq_len (--seq-len) = {seq_len!r}; expected a positive integer")
    if embed_dtype not in EMBED_DTYPES:
        raise InputError(f"embed_dtype = {embed_dtype!r}; allowed: {', '.join(EMBED_DTYPES)}")
    cfg = read_config(folder)
    # the attention scores [heads, S, S] (fp32) are the largest activation a sequence length implies
    check_budget(4 * cfg.num_attention_heads * seq_len * seq_len,
                 f"--seq-len {seq_len}: attention scores [{cfg.num_attention_heads}, {seq_len}, {seq_len}] fp32")
    if seq_len > cfg.max_position_embeddings:
        log.warning("seq_len %d exceeds max_position_embeddings %d of %s", seq_len, cfg.max_position_embeddings, folder)
    store = CheckpointTensors(folder)
    model = _Importer(folder, cfg, store, seq_len, EMBED_DTYPES[embed_dtype]).build()
    log.debug("imported %s: %d layers, seq_len %d, %s/%s", folder, cfg.num_hidden_layers, seq_len,
              cfg.quant.linear_class, cfg.quant.quantization_mode)
    return model
