"""Small BitNet GGUF files for the tests, written with the ``gguf`` package's own writer and quantisers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import quantize

Q = GGMLQuantizationType
_DROP = object()


def ternary_weight(rng: np.random.Generator, n: int, k: int, scales: str) -> np.ndarray:
    """float32 ``[n, k]`` = code * scale, codes in {-1, 0, 1}; ``scales``: one scale (``tensor``), one per row
    (``row``), one per 256-block (``block``), or one per half of the input columns (``shards``: TriLM's
    model-parallel shards of a row-parallel layer). Scales are powers of two, so fp16 holds them exactly."""
    codes = rng.integers(-1, 2, size=(n, k)).astype(np.float32)
    if scales == "tensor":
        s = np.full((n, k // 256), 2.0 ** -5, np.float32)
    elif scales == "row":
        s = np.repeat((2.0 ** -rng.integers(3, 8, size=(n, 1))).astype(np.float32), k // 256, axis=1)
    elif scales == "shards":
        s = np.where(np.arange(k // 256) < max(1, k // 512), 2.0 ** -4, 2.0 ** -6)[None, :].repeat(n, 0)
        s = s.astype(np.float32)
    else:
        s = (2.0 ** -rng.integers(3, 8, size=(n, k // 256))).astype(np.float32)
    return (codes.reshape(n, k // 256, 256) * s[:, :, None]).reshape(n, k)


def write_bitnet_gguf(path: Path, *, hidden: int = 256, ff: int = 256, layers: int = 1, heads: int = 2,
                      kv_heads: int = 1, vocab: int = 64, qtype: GGMLQuantizationType = Q.TQ2_0,
                      scales: str = "tensor", emb_type: GGMLQuantizationType = Q.F32, seed: int = 0,
                      out_type: GGMLQuantizationType | None = None,
                      meta: dict[str, Any] | None = None, extra_tensors: dict[str, np.ndarray] | None = None,
                      tied: bool = True, arch: str = "bitnet") -> Path:
    """A random BitNet model as llama.cpp's ``bitnet`` architecture stores it (``arch="llama"``: a llama
    decoder, without the sub-norms and the ``hidden_act`` key; its q/k rows are not permuted here).

    ``meta`` overrides metadata values (``drop(key)`` removes a key); values are written with the
    type of the default (int -> uint32, float -> float32, str -> string)."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    kv: dict[str, Any] = {
        f"{arch}.context_length": 128, f"{arch}.embedding_length": hidden, f"{arch}.block_count": layers,
        f"{arch}.feed_forward_length": ff, f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": kv_heads, f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
    }
    if arch == "bitnet":
        kv["bitnet.hidden_act"] = "relu2"
    kv.update(meta or {})
    for key, val in kv.items():
        if val is _DROP:
            continue
        if isinstance(val, bool):
            w.add_key_value(key, val, GGUFValueType.BOOL)
        elif isinstance(val, int):
            w.add_key_value(key, val, GGUFValueType.UINT32 if val >= 0 else GGUFValueType.INT32)
        elif isinstance(val, float):
            w.add_key_value(key, val, GGUFValueType.FLOAT32)
        elif isinstance(val, str):
            w.add_key_value(key, val, GGUFValueType.STRING)
        else:
            w.add_array(key, val)
    if kv.get("general.architecture", None) is _DROP:
        w.kv_data[0].pop("general.architecture", None)

    def add(name: str, arr: np.ndarray, t: GGMLQuantizationType = Q.F32) -> None:
        if t == Q.F32:
            w.add_tensor(name, arr.astype(np.float32))
        elif t == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        elif t in _K_SCALES:
            w.add_tensor(name, kquant_blocks(rng, arr.shape, t), raw_dtype=t)
        else:
            w.add_tensor(name, quantize(arr.astype(np.float32), t), raw_dtype=t)

    add("token_embd.weight", rng.normal(0, 0.5, size=(vocab, hidden)).astype(np.float32), emb_type)
    add("output_norm.weight", np.exp(0.3 * rng.normal(size=hidden)).astype(np.float32))
    if not tied:
        add("output.weight", rng.normal(0, 0.1, size=(vocab, hidden)).astype(np.float32), out_type or emb_type)
    d = hidden // heads
    shapes = {"attn_q": (hidden, hidden), "attn_k": (kv_heads * d, hidden), "attn_v": (kv_heads * d, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (ff, hidden), "ffn_up": (ff, hidden),
              "ffn_down": (hidden, ff)}
    for i in range(layers):
        norms = (("attn_norm", hidden), ("ffn_norm", hidden), ("attn_sub_norm", hidden), ("ffn_sub_norm", ff))
        for norm, size in norms if arch == "bitnet" else norms[:2]:
            add(f"blk.{i}.{norm}.weight", np.exp(0.3 * rng.normal(size=size)).astype(np.float32))
        for name, (n, k) in shapes.items():
            add(f"blk.{i}.{name}.weight", ternary_weight(rng, n, k, scales), qtype)
    for name, arr in (extra_tensors or {}).items():
        add(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# where the fp16 super-block scales of a K-quant block sit (gguf-py's dequantize_blocks): Q4_K d, dmin first;
# Q6_K d last. gguf-py cannot quantise K-quants, so the tests fill the blocks with random codes instead.
_K_SCALES = {Q.Q4_K: (144, (0, 2)), Q.Q6_K: (210, (208,))}


def kquant_blocks(rng: np.random.Generator, shape: tuple[int, ...], t: GGMLQuantizationType) -> np.ndarray:
    """Random but valid ``t`` blocks (uint8 ``[rows, K/256 * block bytes]``) for a tensor of ``shape``: random
    codes and sub-scales, fp16 super-block scales of 2**-8 (what llama-quantize stores ``token_embd`` /
    ``output`` of a TQ model as; the oracle of their values is gguf's own dequantiser)."""
    size, scale_at = _K_SCALES[t]
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows * cols // 256, size), dtype=np.uint8)
    for at in scale_at:
        blocks[:, at:at + 2] = np.frombuffer(np.float16(2.0 ** -8).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def drop() -> Any:
    """Marker for ``meta``: leave this key out of the file."""
    return _DROP
