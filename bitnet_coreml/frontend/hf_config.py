"""``config.json`` of a Hugging Face BitNet checkpoint, read into a validated frozen dataclass.

Only the fields the graph needs are kept. Anything that would change the computation and that the
importer does not implement (another ``model_type``, a non-default RoPE scaling, an activation
other than relu2, a quantisation method other than bitnet) is refused with a message naming the key,
the value found and the values allowed, so a checkpoint is never imported on a guess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitnet_coreml._files import inside, load_json
from bitnet_coreml.errors import ModelLoadError

LINEAR_CLASSES = ("autobitlinear", "bitlinear")
QUANT_MODES = ("offline", "online")
HIDDEN_ACTS = ("relu2", "silu")
# transformers' defaults (BitNetConfig / BitNetQuantConfig), used when a key is absent
_DEFAULT_ROPE_THETA = 500000.0
_DEFAULT_RMS_EPS = 1e-5
_DEFAULT_QUANT_RMS_EPS = 1e-6


@dataclass(frozen=True)
class QuantConfig:
    """``quantization_config``: which BitLinear variant the checkpoint was saved from."""

    linear_class: str = "bitlinear"
    quantization_mode: str = "offline"
    use_rms_norm: bool = False
    rms_norm_eps: float = _DEFAULT_QUANT_RMS_EPS
    modules_to_not_convert: tuple[str, ...] = ()
    # bits of the per-token absmax activation quantisation in front of every ternary linear; 0: none
    # (weight-only ternary linears, as TriLM / llama-architecture GGUF files with TQ1_0/TQ2_0 weights)
    act_bits: int = 8

    @property
    def divides(self) -> bool:
        """Packed ``bitlinear`` divides by weight_scale; ``autobitlinear`` multiplies (mlx-lm's rule)."""
        return self.linear_class != "autobitlinear"

    @property
    def online(self) -> bool:
        """Weights ternarised at run time: only AutoBitLinear has an online mode (BitLinear is always packed)."""
        return self.quantization_mode == "online" and self.linear_class == "autobitlinear"


@dataclass(frozen=True)
class BitNetConfig:
    """The architecture of a BitNet checkpoint (the subset of ``BitNetConfig`` the graph depends on)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool
    torch_dtype: str
    quant: QuantConfig
    max_position_embeddings: int = 2048
    hidden_act: str = "relu2"  # the gate's activation: relu2 (transformers' BitNet) or silu (llama.cpp's bitnet)
    # BitNet's attn_sub_norm / ffn_sub_norm before o_proj / down_proj; False for a llama decoder
    sub_norms: bool = True

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{key} = {v!r}; expected a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads = {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads = {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = {self.head_dim} is odd; rotary embeddings need an even head_dim")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ValueError(f"rms_norm_eps = {self.rms_norm_eps!r}; expected a positive number")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"rope_theta = {self.rope_theta!r}; expected a positive number")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act = {self.hidden_act!r}; allowed: {', '.join(HIDDEN_ACTS)}")


def _num(d: dict[str, Any], key: str, default: float | None = None) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{key} = {v!r}; expected a number")
    return float(v)


def _int(d: dict[str, Any], key: str, default: int | None = None) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{key} = {v!r}; expected an integer" + (" (missing)" if key not in d else ""))
    return v


def _rope_theta(raw: dict[str, Any]) -> float:
    """``rope_theta`` from the top level (older configs) or from ``rope_parameters`` (transformers 5)."""
    for key in ("rope_parameters", "rope_scaling"):
        rp = raw.get(key)
        if rp is None:
            continue
        if not isinstance(rp, dict):
            raise ValueError(f"{key} = {rp!r}; expected an object")
        kind = rp.get("rope_type", rp.get("type", "default"))
        if kind != "default":
            raise ValueError(f"{key}.rope_type = {kind!r}; only 'default' RoPE is supported")
        if "rope_theta" in rp:
            return _num(rp, "rope_theta")
    return _num(raw, "rope_theta", _DEFAULT_ROPE_THETA)


def _quant(raw: dict[str, Any]) -> QuantConfig:
    q = raw.get("quantization_config")
    if q is None:
        raise ValueError("quantization_config is missing; a BitNet checkpoint declares "
                         "{quant_method: 'bitnet', linear_class, quantization_mode}")
    if not isinstance(q, dict):
        raise ValueError(f"quantization_config = {q!r}; expected an object")
    method = q.get("quant_method")
    if method != "bitnet":
        raise ValueError(f"quantization_config.quant_method = {method!r}; only 'bitnet' is supported")
    lc = q.get("linear_class", "bitlinear")
    if lc not in LINEAR_CLASSES:
        raise ValueError(f"quantization_config.linear_class = {lc!r}; allowed: {', '.join(LINEAR_CLASSES)}")
    mode = q.get("quantization_mode", "offline")
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization_config.quantization_mode = {mode!r}; allowed: {', '.join(QUANT_MODES)}")
    skip = q.get("modules_to_not_convert") or []
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise ValueError(f"quantization_config.modules_to_not_convert = {skip!r}; expected a list of names")
    eps = q.get("rms_norm_eps")
    return QuantConfig(linear_class=lc, quantization_mode=mode, use_rms_norm=bool(q.get("use_rms_norm", False)),
                       rms_norm_eps=_DEFAULT_QUANT_RMS_EPS if eps is None else _num(q, "rms_norm_eps"),
                       modules_to_not_convert=tuple(skip))


def parse_config(raw: dict[str, Any]) -> BitNetConfig:
    """Validate a parsed ``config.json``; raises ``ValueError`` with a message naming the key."""
    mt = raw.get("model_type")
    if mt != "bitnet":
        raise ValueError(f"model_type = {mt!r}; expected 'bitnet' (a Hugging Face BitNet checkpoint)")
    act = raw.get("hidden_act", "relu2")
    if act != "relu2":
        raise ValueError(f"hidden_act = {act!r}; only 'relu2' (BitNet's activation) is supported")
    hidden = _int(raw, "hidden_size")
    heads = _int(raw, "num_attention_heads")
    kv = raw.get("num_key_value_heads")
    kv_heads = heads if kv is None else _int(raw, "num_key_value_heads")
    head_dim_raw = raw.get("head_dim")
    if head_dim_raw is None:
        if hidden % heads:
            raise ValueError(f"hidden_size = {hidden} is not a multiple of num_attention_heads = {heads} "
                             "and config has no head_dim")
        head_dim = hidden // heads
    else:
        head_dim = _int(raw, "head_dim")
    dtype = raw.get("torch_dtype", raw.get("dtype", "float32"))
    return BitNetConfig(
        vocab_size=_int(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size"),
        num_hidden_layers=_int(raw, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_num(raw, "rms_norm_eps", _DEFAULT_RMS_EPS),
        rope_theta=_rope_theta(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        torch_dtype=str(dtype),
        quant=_quant(raw),
        max_position_embeddings=_int(raw, "max_position_embeddings", 2048),
    )


def read_config(folder: Path) -> BitNetConfig:
    """Read and validate ``folder/config.json``; raises :class:`ModelLoadError` naming the file and key."""
    path = folder / "config.json"
    if not path.exists():
        raise ModelLoadError(f"{folder}: no config.json; expected a Hugging Face BitNet checkpoint folder")
    inside(folder, path, "config.json", error=ModelLoadError)
    raw = load_json(path, "config.json", error=ModelLoadError)
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    try:
        return parse_config(raw)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from e
