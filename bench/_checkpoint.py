"""The random BitNet checkpoints the benchmarks convert, written once into ``bench/_work/`` (no torch).

Random packed weights (uint8 ``[out/4, in]``, bf16 embedding / norms / weight_scale, tied lm_head,
sharded with ``model.safetensors.index.json`` like the real download) in the layout of
microsoft/bitnet-b1.58-2B-4T. Shapes: ``2b`` (that model's) and ``200m`` (the 200m row of
``make_bench_model.py``, which makes the same shape with transformers). Used by ``bench_hf_2b.py``,
``bench_gguf_2b.py`` and ``bench_stateful.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

WORK = Path(__file__).resolve().parent / "_work"
SHAPES: dict[str, dict[str, int]] = {
    "2b": {"vocab_size": 128256, "hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 30,
           "num_attention_heads": 20, "num_key_value_heads": 5},
    "200m": {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12,
             "num_attention_heads": 16, "num_key_value_heads": 4},
}
SHAPE = SHAPES["2b"]
SHARDS = 2


def shaped_folder(size: str) -> Path:
    """Where the checkpoint of shape ``size`` lives: ``bench/_work/bitnet-<size>-shaped``."""
    return WORK / f"bitnet-{size}-shaped"


def shaped_checkpoint(size: str, shards: int = SHARDS) -> Path:
    """The checkpoint of shape ``size``, written first if it is not there yet."""
    folder = shaped_folder(size)
    write_checkpoint(folder, shape=SHAPES[size], shards=shards)
    return folder


def config(shape: dict[str, int] | None = None) -> dict[str, object]:
    return {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", **(shape or SHAPE), "hidden_act": "relu2",
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": True, "torch_dtype": "bfloat16", "attention_bias": False,
            "bos_token_id": 128000, "eos_token_id": 128001,
            "quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear",
                                    "quantization_mode": "offline"}}


def _packed(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Random ternary codes packed as transformers does: row block i in bits 2i..2i+1, value code+1."""
    r = n // 4
    out = np.zeros((r, k), dtype=np.uint8)
    for i in range(4):
        out |= (rng.integers(0, 3, size=(r, k), dtype=np.uint8) << (2 * i)).astype(np.uint8)
    return out


def write_checkpoint(folder: Path, seed: int = 0, shape: dict[str, int] | None = None, shards: int = SHARDS) -> None:
    """Write a random checkpoint of ``shape`` (default the 2B shape, about 1.2 GB), shard by shard, atomically
    (temp dir + rename)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    if (folder / "model.safetensors.index.json").is_file():
        return
    rng = np.random.default_rng(seed)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    bf16 = ml_dtypes.bfloat16
    shape = shape or SHAPE
    h, f, n_layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    weight_map: dict[str, str] = {}
    total = 0
    per_shard = (n_layers + shards - 1) // shards
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        t: dict[str, np.ndarray] = {}
        if s == 0:
            emb = np.empty((shape["vocab_size"], h), dtype=bf16)
            for r in range(0, emb.shape[0], 8192):
                emb[r:r + 8192] = rng.normal(0, 0.02, size=(min(8192, emb.shape[0] - r), h)).astype(bf16)
            t["model.embed_tokens.weight"] = emb
        for i in range(s * per_shard, min(n_layers, (s + 1) * per_shard)):
            p = f"model.layers.{i}"
            for nm, size in (("input_layernorm", h), ("post_attention_layernorm", h),
                             ("self_attn.attn_sub_norm", h), ("mlp.ffn_sub_norm", f)):
                t[f"{p}.{nm}.weight"] = (1 + 0.1 * rng.standard_normal(size)).astype(bf16)
            for proj, (n, k) in shapes.items():
                t[f"{p}.{proj}.weight"] = _packed(rng, n, k)
                t[f"{p}.{proj}.weight_scale"] = np.asarray([rng.uniform(0.5, 2.0)]).astype(bf16)
        if s == shards - 1:
            t["model.norm.weight"] = (1 + 0.1 * rng.standard_normal(h)).astype(bf16)
        save_file(t, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        total += sum(a.nbytes for a in t.values())
        del t
    (tmp / "config.json").write_text(json.dumps(config(shape), indent=2))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if folder.exists():
        raise SystemExit(f"{folder} exists but is incomplete; remove it and re-run")
    os.replace(tmp, folder)
