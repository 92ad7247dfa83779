"""llama.cpp ``bitnet`` / ``llama`` metadata for ``gguf.GGUFWriter``, from a transformers ``config.json`` (no torch).

Shared by ``models/make_gguf_fixtures.py``, ``models/make_gguf_llama.py`` and ``bench/bench_gguf_2b.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def add_bitnet_metadata(w: Any, cfg: dict[str, Any]) -> None:
    """Hyperparameters as llama.cpp's converter writes them, plus ``bitnet.hidden_act`` (see docs/gguf.md)."""
    add_hparams(w, cfg)
    w.add_string("bitnet.hidden_act", cfg.get("hidden_act", "relu2"))


def add_hparams(w: Any, cfg: dict[str, Any]) -> None:
    """The ``{arch}.*`` hyperparameters llama.cpp's converter writes for a decoder (``TextModel`` /
    ``LlamaModel.set_gguf_parameters``), under the writer's architecture, from a transformers config."""
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 500000.0))))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])


def add_bpe_tokenizer(w: Any, tokens: list[str], merges: list[str], specials: set[str], bos: str, eos: str,
                      pre: str) -> None:
    """A GPT-2-style byte-level BPE as llama.cpp's converter stores it (model ``gpt2``)."""
    from gguf import TokenType

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if t in specials else TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index(bos))
    w.add_eos_token_id(tokens.index(eos))
    w.add_add_bos_token(True)


def add_spm_tokenizer(w: Any, sp: Any) -> None:
    """A SentencePiece model (``sentencepiece.SentencePieceProcessor``) as llama.cpp's converter stores it
    (``_create_vocab_sentencepiece``: model ``llama``, every piece with its score and type, the special ids)."""
    from gguf import TokenType

    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                     else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i)
                     else TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def add_tokenizer_bpe(w: Any, tok: Any, bos: str, eos: str) -> None:
    """A ``tokenizers`` byte-level BPE (the fixtures' ``tokenizer.json``) as llama.cpp's converter stores it."""
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = json.loads(tok.to_str())["model"]["merges"]
    add_bpe_tokenizer(w, tokens, [" ".join(m) if isinstance(m, list) else m for m in merges], {bos, eos}, bos, eos,
                      "gpt2")


def close_atomic(w: Any, tmp: str, dest: Path) -> None:
    """Write the GGUF file ``w`` was filling to ``tmp``, then move it to ``dest`` (never half-written)."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)


def permute(weights: Any, n_head: int, n_head_kv: int | None) -> Any:
    """llama.cpp's ``convert_hf_to_gguf.py`` ``LlamaModel.permute`` (same arithmetic, numpy or torch): the rows of
    each q (``n_head``) / k (``n_head_kv``) head reordered for llama.cpp's interleaved RoPE."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))
