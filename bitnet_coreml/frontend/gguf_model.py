"""Import a ``.gguf`` file (llama.cpp's ``bitnet`` or ``llama`` architecture, ternary linears) as the checkpoint
importer does.

The GGUF path reuses the Hugging Face checkpoint importer (``hf_checkpoint``) whole, so both give
the same in-memory model: the same fused graph, node and initializer names, lazy tensors and
metadata keys. Three pieces differ:

* **config**: :func:`config_from_metadata` reads the hyperparameters from the GGUF metadata
  (``bitnet.embedding_length``, ``bitnet.block_count``, ...) into the same validated
  :class:`BitNetConfig`, refusing anything missing or inconsistent with one line naming the key;
* **tensors**: :class:`GGUFTensors` is a :class:`CheckpointTensors` over the file whose names are
  the checkpoint's (``blk.N.attn_q.weight`` answers to ``model.layers.N.self_attn.q_proj.weight``;
  the table comes from gguf's own ``TENSOR_NAMES``). F32/F16/BF16 tensors are memory-mapped as
  they are; other ggml types are refused, or dequantised with gguf's dequantiser (and a warning)
  when ``allow_dequant`` is set;
* **ternary weights**: a TQ1_0/TQ2_0 weight becomes a :class:`GGUFTernary` (2-bit indices straight
  from the blocks) and its block scales become Alpha: scalar when one scale covers the tensor,
  ``[N]`` when it is constant per row. Scales that vary within a row cannot be a BitLinear Alpha;
  with ``allow_dequant`` the layer is built exactly as an unfused BitNet linear (activation
  quantisation, then a Gemm with the dequantised weight: fp16, 8x the 2-bit size), otherwise refused.

The optional llama.cpp per-tensor scales (``blk.N.attn_q.scale``, multiplied after the matmul)
stand in for the checkpoint's ``weight_scale`` (multiply convention). llama.cpp computes the
``bitnet`` feed-forward with SiLU; the metadata key ``bitnet.hidden_act`` (``silu`` or ``relu2``,
transformers' BitNet) overrides that: files written from transformers' BitNet checkpoints by
``models/make_gguf_fixtures.py`` carry ``relu2``. The lm_head is ``output.weight``, or the tied
embedding when the file has none (as llama.cpp does).

**llama** (``general.architecture = llama`` with TQ1_0/TQ2_0 linears: TriLM / Spectra, llama-quantize's
output for them): the same decoder without BitNet's two sub-norms, SiLU, and *weight-only* ternary
linears (no activation quantisation: ``BitLinear`` with ``act_bits = 0``, still 2-bit LUT weights).
llama.cpp's converter permutes the q/k rows of every head for its interleaved RoPE
(``convert_hf_to_gguf.py``, ``LlamaModel.permute``); :func:`unpermute_rows` gives the rows back in the
checkpoint's order, so the graph uses the same rotate-half RoPE as the checkpoint path.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType
from gguf.quants import dequantize

from bitnet_coreml.errors import InputError, ModelLoadError
from bitnet_coreml.frontend.gguf_file import GGUFFile
from bitnet_coreml.frontend.gguf_ternary import BLOCK, TERNARY_TYPES, GGUFTernary, column_groups
from bitnet_coreml.frontend.hf_checkpoint import ACT_EPS, EMBED_DTYPES, _Importer
from bitnet_coreml.frontend.hf_config import BitNetConfig, QuantConfig
from bitnet_coreml.frontend.hf_safetensors import CheckpointTensors, TensorInfo

__all__ = ["load_gguf", "config_from_metadata", "GGUFTensors", "ARCHITECTURES", "unpermute_rows"]

log = logging.getLogger(__name__)

BITNET, LLAMA = MODEL_ARCH_NAMES[MODEL_ARCH.BITNET], MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA]
ARCHITECTURES = (BITNET, LLAMA)
_GRAPHS = {BITNET: "llama.cpp's BitNet b1.58 graph", LLAMA: "a llama decoder with TQ1_0/TQ2_0 linears"}
_FLOAT_TYPES = {GGMLQuantizationType.F32: "F32", GGMLQuantizationType.F16: "F16", GGMLQuantizationType.BF16: "BF16"}
_DEFAULT_ROPE_BASE = 10000.0  # llama.cpp's default when rope.freq_base is absent
_NP_OF_CODE = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2")}
# A weight-only linear whose block scales vary within rows but are one value per row over runs of columns
# (TriLM's model-parallel shards) becomes the sum of up to this many 2-bit BitLinears, one per run
MAX_COLUMN_GROUPS = 16

# checkpoint name (per layer: "{p}" = model.layers.N) -> gguf's tensor kind
_LAYER_TENSORS: dict[str, MODEL_TENSOR] = {
    "input_layernorm.weight": MODEL_TENSOR.ATTN_NORM,
    "post_attention_layernorm.weight": MODEL_TENSOR.FFN_NORM,
    "self_attn.q_proj": MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj": MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj": MODEL_TENSOR.ATTN_OUT,
    "self_attn.attn_sub_norm.weight": MODEL_TENSOR.ATTN_SUB_NORM,
    "mlp.gate_proj": MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": MODEL_TENSOR.FFN_DOWN,
    "mlp.ffn_sub_norm.weight": MODEL_TENSOR.FFN_SUB_NORM,
}
_GLOBAL_TENSORS = {"model.embed_tokens.weight": MODEL_TENSOR.TOKEN_EMBD, "model.norm.weight": MODEL_TENSOR.OUTPUT_NORM,
                   "lm_head.weight": MODEL_TENSOR.OUTPUT}
_SUB_NORMS = (MODEL_TENSOR.ATTN_SUB_NORM, MODEL_TENSOR.FFN_SUB_NORM)  # BitNet's; a llama decoder has none
_PERMUTED = {"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads"}


def _layer_tensors(arch: str) -> dict[str, MODEL_TENSOR]:
    return {k: t for k, t in _LAYER_TENSORS.items() if arch == BITNET or t not in _SUB_NORMS}


def name_map(layers: int, arch: str = BITNET) -> dict[str, str]:
    """checkpoint tensor name -> GGUF tensor name, for a model of ``layers`` layers.

    The optional per-tensor ``.scale`` of a linear is llama.cpp's ``bitnet`` graph's; a ``llama`` file has none.
    """
    out = {hf: f"{TENSOR_NAMES[t]}.weight" for hf, t in _GLOBAL_TENSORS.items()}
    for i in range(layers):
        for suffix, t in _layer_tensors(arch).items():
            base = TENSOR_NAMES[t].format(bid=i)
            hf = f"model.layers.{i}.{suffix}"
            if suffix.endswith(".weight"):
                out[hf] = f"{base}.weight"
            else:
                out[f"{hf}.weight"] = f"{base}.weight"
                if arch == BITNET:
                    out[f"{hf}.weight_scale"] = f"{base}.scale"
    return out


def unpermute_rows(rows: int, heads: int) -> np.ndarray:
    """The file's row of each checkpoint row of a q/k weight ``[rows, K]`` that llama.cpp's converter permuted.

    ``convert_hf_to_gguf.py``, ``LlamaModel.permute(weights, n_head, n_head_kv)`` (q: ``n_head``; k: ``n_head_kv``)::

        weights.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(weights.shape)

    so file row ``h*d + 2i + j`` holds checkpoint row ``h*d + j*d/2 + i`` (head ``h``, ``d = rows / heads``): the
    rotate-half RoPE pairs (``i``, ``i + d/2``) become adjacent for llama.cpp's interleaved RoPE. Weight ``[order]``
    is the checkpoint's weight.
    """
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(0, 2, 1).reshape(-1)


# --- config --------------------------------------------------------------------------------------


def _get(meta: dict[str, Any], key: str, kind: type, default: Any = None) -> Any:
    v = meta.get(key, default)
    if v is None:
        raise ValueError(f"metadata {key!r} is missing")
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ValueError(f"metadata {key!r} = {v!r}; expected an integer")
    if kind is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"metadata {key!r} = {v!r}; expected a finite number")
        v = float(v)
    if kind is str and not isinstance(v, str):
        raise ValueError(f"metadata {key!r} = {v!r}; expected a string")
    return v


def config_from_metadata(meta: dict[str, Any], tensors: dict[str, Any]) -> BitNetConfig:
    """The model's :class:`BitNetConfig` from GGUF metadata; ``ValueError`` naming the key otherwise."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"general.architecture = {arch!r}; supported: "
                         f"{', '.join(f'{k} ({v})' for k, v in _GRAPHS.items())}")
    a = f"{arch}."
    experts = meta.get(a + "expert_count")
    if experts is not None and _get(meta, a + "expert_count", int) != 0:
        raise ValueError(f"metadata {a}expert_count = {experts}: mixture-of-experts models are not supported")
    hidden = _get(meta, a + "embedding_length", int)
    heads = _get(meta, a + "attention.head_count", int)
    if heads <= 0 or hidden % heads:
        raise ValueError(f"metadata {a}embedding_length = {hidden} is not a multiple of "
                         f"{a}attention.head_count = {heads}")
    head_dim = hidden // heads
    for key in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
        v = meta.get(a + key)
        if v is not None and _get(meta, a + key, int) != head_dim:
            raise ValueError(f"metadata {a}{key} = {v}; expected {head_dim} (embedding_length / head_count): "
                             "partial rotary or a separate head size is not supported")
    scaling = meta.get(a + "rope.scaling.type", "none")
    factor = meta.get(a + "rope.scaling.factor", 1.0)
    if scaling not in ("none", "linear") or (scaling == "linear" and factor != 1.0):
        raise ValueError(f"metadata {a}rope.scaling.type = {scaling!r} (factor {factor!r}); only unscaled RoPE "
                         "('none', or 'linear' with factor 1.0) is supported")
    emb = tensors.get(f"{TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD]}.weight")
    if emb is None:
        raise ValueError(f"tensor '{TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD]}.weight' is missing")
    vocab = int(emb.shape[0])
    declared = meta.get(a + "vocab_size")
    if declared is not None and _get(meta, a + "vocab_size", int) != vocab:
        raise ValueError(f"metadata {a}vocab_size = {declared} but token_embd.weight has {vocab} rows")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != vocab:
        raise ValueError(f"metadata tokenizer.ggml.tokens has {len(tokens)} entries but token_embd.weight has "
                         f"{vocab} rows")
    layers = _get(meta, a + "block_count", int)
    per_layer = len(_layer_tensors(arch))
    if layers > len(tensors) // per_layer:
        raise ValueError(f"metadata {a}block_count = {layers} but the file holds only {len(tensors)} tensors "
                         f"({per_layer} or more per layer)")
    ff = meta.get(a + "feed_forward_length")
    if isinstance(ff, np.ndarray):
        raise ValueError(f"metadata {a}feed_forward_length is an array (a size per layer); expected one integer")
    return BitNetConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_get(meta, a + "feed_forward_length", int),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=_get(meta, a + "attention.head_count_kv", int, heads),
        head_dim=head_dim,
        rms_norm_eps=_get(meta, a + "attention.layer_norm_rms_epsilon", float),
        rope_theta=_get(meta, a + "rope.freq_base", float, _DEFAULT_ROPE_BASE),
        tie_word_embeddings=f"{TENSOR_NAMES[MODEL_TENSOR.OUTPUT]}.weight" not in tensors,
        attention_bias=False,
        torch_dtype="gguf",
        # the GGUF weight is d * q and llama.cpp multiplies by the optional .scale: the multiply convention;
        # a llama graph's ternary linears are weight-only (its activations are not quantised)
        quant=QuantConfig(linear_class="autobitlinear", quantization_mode="offline",
                          act_bits=8 if arch == BITNET else 0),
        max_position_embeddings=_get(meta, a + "context_length", int),
        # llama.cpp's bitnet and llama graphs both use SiLU; bitnet.hidden_act (ours) may say relu2
        hidden_act=_get(meta, a + "hidden_act", str, "silu") if arch == BITNET else "silu",
        sub_norms=arch == BITNET,
    )


# --- tensors -------------------------------------------------------------------------------------


class GGUFTensors(CheckpointTensors):
    """The tensors of a GGUF file under their checkpoint names (see the module docstring)."""

    def __init__(self, gf: GGUFFile, cfg: BitNetConfig, arch: str = BITNET, *, allow_dequant: bool = False) -> None:
        self.folder = gf.path
        self.gf = gf
        self.allow_dequant = allow_dequant
        self._infos = {}
        self.gguf_name: dict[str, str] = {}
        self.dequantized: dict[str, str] = {}  # checkpoint name -> ggml type, for dequantised tensors
        # checkpoint name -> the file's row of each checkpoint row (llama q/k: unpermute_rows)
        self.row_order: dict[str, np.ndarray] = {}
        layers = cfg.num_hidden_layers
        for hf, gn in name_map(layers, arch).items():
            t = gf.tensors.get(gn)
            if t is None:
                continue
            if t.type in _FLOAT_TYPES:
                code = _FLOAT_TYPES[t.type]
            elif t.type in TERNARY_TYPES and len(t.shape) == 2 and hf.endswith("_proj.weight"):
                code = t.type.name
            else:
                code = "F32"
                self.dequantized[hf] = t.type.name
            self._infos[hf] = TensorInfo(hf, gf.path, code, t.shape, t.offset, t.offset + t.nbytes)
            self.gguf_name[hf] = gn
            heads = next((getattr(cfg, h) for p, h in _PERMUTED.items() if hf.endswith(f"{p}.weight")), None)
            if arch == LLAMA and heads is not None and len(t.shape) == 2 and t.shape[0] == heads * cfg.head_dim:
                self.row_order[hf] = unpermute_rows(t.shape[0], heads)  # other shapes: refused by require()
        unknown = sorted(set(gf.tensors) - set(self.gguf_name.values()))
        if unknown:
            raise ModelLoadError(f"{gf.path}: tensor(s) {', '.join(repr(u) for u in unknown[:5])}"
                                 f"{' ...' if len(unknown) > 5 else ''} are not part of a {layers}-layer "
                                 f"{'BitNet' if arch == BITNET else 'llama'} model; refusing to guess what they do")

    def ternary(self, name: str) -> bool:
        info = self._infos.get(name)
        return info is not None and info.dtype in {t.name for t in TERNARY_TYPES}

    def refuse_type(self, name: str, role: str) -> None:
        """Refuse a tensor whose ggml type needs dequantising, unless allowed (then warn)."""
        qtype = self.dequantized.get(name) or (self._infos[name].dtype if self.ternary(name) else None)
        if qtype is None:
            return
        gn = self.gguf_name[name]
        if not self.allow_dequant:
            raise ModelLoadError(f"{self.folder}: tensor {gn!r} ({role}) has type {qtype}; supported as they are: "
                                 f"F32, F16, BF16{'' if role == 'embedding' else ', TQ1_0, TQ2_0'} "
                                 "(--allow-dequant dequantises other types with gguf's dequantiser)")
        log.warning("%s: tensor %r (%s) has type %s: dequantised with gguf's dequantiser (--allow-dequant)",
                    self.folder, gn, role, qtype)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        info = self._infos[name]
        order = self.row_order.get(name)
        if order is not None:
            order = order if rows is None else order[rows[0]:rows[1]]
        if name not in self.dequantized and not self.ternary(name):
            return super().read(name, rows) if order is None else super().read(name)[order]
        gt = self.gf.tensors[self.gguf_name[name]]
        if rows is not None and rows[1] <= rows[0]:
            return np.zeros((0, *info.shape[1:]), dtype=np.float32)
        blocks = self.gf.blocks(gt.name, rows) if order is None else self.gf.blocks(gt.name)[order]
        out = dequantize(np.ascontiguousarray(blocks.reshape(blocks.shape[0], -1)), gt.type)
        r = rows[1] - rows[0] if rows else info.shape[0]
        return np.asarray(out, dtype=np.float32).reshape(r, *info.shape[1:])


# --- importer ------------------------------------------------------------------------------------


class _GGUFImporter(_Importer):
    """The checkpoint importer over :class:`GGUFTensors`; combinable with another importer subclass
    (``class X(_GGUFImporter, _StatefulImporter)``): it only overrides how a linear's weight is read."""

    store: GGUFTensors

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.block_scales: dict[str, str] = {}
        self.fallback: list[str] = []
        self._codes: dict[str, GGUFTernary] = {}

    def codes(self, wname: str, prefix: str) -> GGUFTernary:
        """The (one) :class:`GGUFTernary` of a TQ weight: its block scales are read once."""
        if wname not in self._codes:
            self._codes[wname] = GGUFTernary(self.store.gf, self.store.gguf_name[wname], name=f"{prefix}.codes",
                                             row_order=self.store.row_order.get(wname))
        return self._codes[wname]

    def _linear_kind(self, name: str, n: int, k: int) -> str:
        if self.store.ternary(name):
            self.store.require(name, shapes=[(n, k)], what="BitLinear weight")
            return "gguf"
        if name in self.store.dequantized:
            self.store.refuse_type(name, "BitLinear weight")
        return super()._linear_kind(name, n, k)

    def _weight_scale(self, prefix: str) -> float | None:
        if f"{prefix}.weight_scale" not in self.store:
            return None
        return super()._weight_scale(prefix)

    def _ternary(self, prefix: str, wname: str, kind: str, n: int, factor: float) -> tuple[ir.Value, ir.Value]:
        if kind != "gguf":
            return super()._ternary(prefix, wname, kind, n, factor)
        g = self.g
        codes = self.codes(wname, prefix)
        layout = codes.scales
        self.block_scales[prefix] = layout.describe()
        alpha = (layout.alpha.astype(np.float64) * factor).astype(np.float32)
        if not np.all(np.isfinite(alpha)):
            raise ModelLoadError(f"{self.store.folder}: tensor {self.store.gguf_name[wname]!r}: BitLinear scale is not "
                                 "finite after applying its .scale tensor")
        return g.initializer(codes), g.const(f"{prefix}.alpha", alpha)

    def bitlinear(self, x: ir.Value, prefix: str, n: int, k: int) -> ir.Value:
        wname = f"{prefix}.weight"
        if self.store.ternary(wname):
            codes = self.codes(wname, prefix)
            if codes.scales.kind == "block":
                groups = (column_groups(codes.scales.alpha, MAX_COLUMN_GROUPS) if self.cfg.quant.act_bits == 0
                          else None)
                if groups:
                    return self._grouped_linear(x, prefix, n, codes, groups)
                return self._dequant_linear(x, prefix, n, k, codes)
        elif wname in self.store.dequantized:
            self.store.refuse_type(wname, "BitLinear weight")
            return self._dequant_linear(x, prefix, n, k, None)
        return super().bitlinear(x, prefix, n, k)

    def _grouped_linear(self, x: ir.Value, prefix: str, n: int, whole: GGUFTernary,
                        groups: list[tuple[int, int]]) -> ir.Value:
        """A weight-only linear as the sum of 2-bit BitLinears over runs of input columns (exact: no activation
        quantisation), each with the per-tensor or per-row scale of its run (``column_groups``)."""
        g, S = self.g, self.S
        wname = f"{prefix}.weight"
        gn = self.store.gguf_name[wname]
        self.block_scales[prefix] = f"{whole.scales.describe()} ({len(groups)} column groups, 2-bit)"
        ws = self._weight_scale(prefix)
        y: ir.Value | None = None
        for b0, b1 in groups:
            c0, c1 = b0 * BLOCK, b1 * BLOCK
            part = GGUFTernary(self.store.gf, gn, name=f"{prefix}.cols_{c0}_{c1}.codes",
                               row_order=self.store.row_order.get(wname), cols=(b0, b1))
            assert part.scales.kind != "block", (gn, b0, b1)  # column_groups made every run one scale per row
            alpha = (part.scales.alpha.astype(np.float64) * (1.0 if ws is None else ws)).astype(np.float32)
            xs = g.slice(x, c0, c1, [1, S, c1 - c0])
            yg = g.fused("BitLinear", [xs, g.initializer(part), g.const(f"{prefix}.cols_{c0}_{c1}.alpha", alpha)],
                         {"act_bits": 0, "act_eps": ACT_EPS, "convention": "multiply"}, f"{prefix}.cols_{c0}_{c1}",
                         shape=[1, S, n])
            y = yg if y is None else g.op("Add", [y, yg], shape=[1, S, n])
        assert y is not None
        return y

    def _dequant_linear(self, x: ir.Value, prefix: str, n: int, k: int, codes: GGUFTernary | None) -> ir.Value:
        """The fallback: BitNet's activation quantisation, then ``x @ W^T`` with the dequantised weight."""
        g, S = self.g, self.S
        wname = f"{prefix}.weight"
        gn = self.store.gguf_name[wname]
        if codes is not None:
            if not self.store.allow_dequant:
                raise ModelLoadError(f"{self.store.folder}: tensor {gn!r} has {codes.scales.describe()}, which a "
                                     "BitLinear scale cannot carry; --allow-dequant builds this layer with a dense "
                                     "fp16 weight instead (exact, 8x the 2-bit size)")
            log.warning("%s: tensor %r has %s: built with a dense weight (--allow-dequant)", self.store.folder, gn,
                        codes.scales.describe())
            self.block_scales[prefix] = codes.scales.describe() + " (dense fallback)"
        self.fallback.append(prefix)
        tensor: Any = _DequantTensor(codes, self.store, wname, self.embed_dtype, name=f"{prefix}.dense")
        if self.cfg.quant.act_bits == 0:  # weight-only: the activations go in as they are
            return self.plain_linear(x, wname, n, k, weight=g.initializer(tensor))
        shape = [1, S, k]
        m = g.op("ReduceMax", [g.op("Abs", [x], shape=shape), g.ints([-1])], {"keepdims": 1}, shape=[1, S, 1])
        m = g.op("Clip", [m, g.const(f"{prefix}.act_eps", np.asarray(np.float32(1e-5)))], shape=[1, S, 1])
        sx = g.op("Div", [g.const(f"{prefix}.act_qp", np.asarray(np.float32(127.0))), m], shape=[1, S, 1])
        xq = g.op("Round", [g.op("Mul", [x, sx], shape=shape)], shape=shape)
        xq = g.op("Clip", [xq, g.const(f"{prefix}.act_qn", np.asarray(np.float32(-128.0))),
                           g.const(f"{prefix}.act_qmax", np.asarray(np.float32(127.0)))], shape=shape)
        xd = g.op("Div", [xq, sx], shape=shape, name=f"{prefix}.act_quant")
        y = self.plain_linear(xd, wname, n, k, weight=g.initializer(tensor))
        ws = self._weight_scale(prefix)
        if ws is not None:
            y = g.op("Mul", [y, g.const(f"{prefix}.scale", np.asarray(np.float32(ws)))], shape=[1, S, n])
        return y

    def metadata(self) -> dict[str, str]:
        types: dict[str, int] = {}
        for t in self.store.gf.tensors.values():
            types[t.type_name] = types.get(t.type_name, 0) + 1
        return {**super().metadata(), "bitnet_coreml.source": "gguf",
                "bitnet_coreml.gguf.architecture": str(self.store.gf.metadata.get("general.architecture")),
                "bitnet_coreml.gguf.tensor_types": json.dumps(dict(sorted(types.items()))),
                "bitnet_coreml.gguf.block_scales": json.dumps(dict(sorted(self.block_scales.items()))),
                "bitnet_coreml.gguf.dense_fallback": json.dumps(self.fallback),
                "bitnet_coreml.gguf.dequantized": json.dumps({self.store.gguf_name[k]: v
                                                             for k, v in self.store.dequantized.items()})}

class _DequantTensor(ir.LazyTensor):
    """A linear weight dequantised on demand (block-scaled ternary or another ggml type)."""

    def __init__(self, codes: GGUFTernary | None, store: GGUFTensors, name_hf: str, dtype: ir.DataType, *,
                 name: str) -> None:
        self.codes_tensor, self.store, self.name_hf = codes, store, name_hf
        np_dt = np.float16 if dtype == ir.DataType.FLOAT16 else np.float32
        info = store.info(name_hf)
        assert info is not None
        super().__init__(lambda: ir.tensor(self._values().astype(np_dt)), dtype=dtype, shape=ir.Shape(info.shape),
                         name=name)

    def _values(self) -> np.ndarray:
        if self.codes_tensor is not None:
            return self.codes_tensor.dequantized()
        return self.store.read(self.name_hf)


def open_gguf(path: str | os.PathLike[str], *, allow_dequant: bool = False) -> tuple[BitNetConfig, GGUFTensors]:
    """The config and the tensors of a GGUF file (everything an importer needs), validated."""
    p = Path(path)
    gf = GGUFFile(p)
    try:
        cfg = config_from_metadata(gf.metadata, gf.tensors)
    except ValueError as e:
        raise ModelLoadError(f"{p}: {e}") from e
    store = GGUFTensors(gf, cfg, gf.metadata["general.architecture"], allow_dequant=allow_dequant)
    for name, role in (("model.embed_tokens.weight", "embedding"), ("lm_head.weight", "lm_head")):
        if name in store:
            store.refuse_type(name, role)
    return cfg, store


def gguf_importer(base: type[_Importer]) -> type[_Importer]:
    """``base`` (the checkpoint importer or a subclass, e.g. the stateful one) reading a GGUF file."""
    if base is _Importer:
        return _GGUFImporter
    return type(f"_GGUF{base.__name__.lstrip('_')}", (_GGUFImporter, base), {})


def load_gguf(path: str | os.PathLike[str], *, seq_len: int = 64, embed_dtype: str = "float32",
              allow_dequant: bool = False) -> ir.Model:
    """Import the BitNet GGUF file ``path`` as a fused onnx-ir model for ``seq_len`` tokens.

    Same model (and arguments) as :func:`~bitnet_coreml.frontend.hf_checkpoint.load_checkpoint`;
    raises :class:`ModelLoadError` (exit 2) on a malformed or hostile file, missing or inconsistent
    metadata, missing or mis-shaped tensors, or a ggml type that needs ``allow_dequant``.
    """
    p = Path(path)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise InputError(f"seq_len = {seq_len!r}; expected a positive integer")
    if embed_dtype not in EMBED_DTYPES:
        raise InputError(f"embed_dtype = {embed_dtype!r}; allowed: {', '.join(EMBED_DTYPES)}")
    cfg, store = open_gguf(p, allow_dequant=allow_dequant)
    if seq_len > cfg.max_position_embeddings:
        log.warning("seq_len %d exceeds the context length %d of %s", seq_len, cfg.max_position_embeddings, p)
    model = _GGUFImporter(p, cfg, store, seq_len, EMBED_DTYPES[embed_dtype]).build()
    model.doc_string = f"BitNet GGUF {p.name}, seq_len {seq_len}"
    log.debug("imported %s: %d layers, seq_len %d", p, cfg.num_hidden_layers, seq_len)
    return model
