"""The tokenizer stored in a GGUF file, rebuilt as a Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``).

llama.cpp's converter stores the vocabulary as metadata: ``tokenizer.ggml.model`` (the algorithm),
``tokenizer.ggml.pre`` (the pre-tokenizer preset), ``tokens``, ``token_type``, ``merges`` and the
special ids. Rebuilt here:

* a file that carries ``tokenizer.huggingface.json`` (the original tokenizer.json) -> that, as is;
* ``gpt2`` (byte-level BPE, what Llama 3 and BitNet b1.58 2B-4T use): a ``BPE`` model over the tokens
  and merges, with the preset's pre-tokenizer (``gpt2``/``default``: GPT-2's byte-level regex;
  ``llama-bpe``/``llama3``: Llama 3's split regex then byte-level, with ``ignore_merges`` as Llama 3's
  tokenizer.json has), a byte-level decoder, control tokens as special added tokens, and the bos
  token prepended when ``add_bos_token`` is set (llama.cpp's default for BPE models);
* anything else (SentencePiece ``llama``, ``bert``, other presets) -> ``None`` with the reason: the
  model still converts, the package just carries no tokenizer.
"""

from __future__ import annotations

import json
from typing import Any

from gguf import TokenType

# Llama 3's pre-tokenizer split (the pattern of its tokenizer.json and of llama.cpp's LLAMA3 preset)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_PRESETS = ("gpt2", "default")
_LLAMA3_PRESETS = ("llama-bpe", "llama3")


def tokenizer_json(meta: dict[str, Any]) -> tuple[bytes | None, str]:
    """``(tokenizer.json bytes, how)`` from GGUF metadata, or ``(None, why not)``."""
    hf = meta.get("tokenizer.huggingface.json")
    if isinstance(hf, str):
        from tokenizers import Tokenizer  # noqa: PLC0415

        try:
            Tokenizer.from_str(hf)
        except Exception as e:  # tokenizers raises a bare Exception on a malformed JSON
            return None, f"tokenizer.huggingface.json is not a valid tokenizer ({' '.join(str(e).split())})"
        return hf.encode("utf-8"), "tokenizer.huggingface.json"
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        return None, "the file has no tokenizer (no tokenizer.ggml.model)"
    if model != "gpt2":
        return None, f"tokenizer.ggml.model = {model!r}: only 'gpt2' (byte-level BPE) is rebuilt"
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _GPT2_PRESETS + _LLAMA3_PRESETS:
        return None, (f"tokenizer.ggml.pre = {pre!r}: supported presets "
                      f"{', '.join(_GPT2_PRESETS + _LLAMA3_PRESETS)}")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        return None, "tokenizer.ggml.tokens is missing or not a list of strings"
    if not isinstance(merges, list) or not all(isinstance(m, str) and m.count(" ") == 1 for m in merges):
        return None, "tokenizer.ggml.merges is missing or not a list of 'left right' strings"
    return _bpe(meta, tokens, merges, pre).to_str().encode("utf-8"), f"gpt2 BPE, pre-tokenizer {pre!r}"


def _bpe(meta: dict[str, Any], tokens: list[str], merges: list[str], pre: str) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: PLC0415

    vocab = {t: i for i, t in enumerate(tokens)}
    llama3 = pre in _LLAMA3_PRESETS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],  # type: ignore[misc]
                               ignore_merges=llama3))
    if llama3:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None and len(types) == len(tokens):
        special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True)
                   if int(k) == TokenType.CONTROL]
        if special:
            tok.add_special_tokens(special)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", True) and isinstance(bos, int) and 0 <= bos < len(tokens):
        b = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b} $B",
                                                           special_tokens=[(b, bos)])
    return tok


def special_ids(meta: dict[str, Any]) -> dict[str, int]:
    """bos / eos / eot / pad / unk ids the file declares (for a generation config)."""
    out = {}
    for key in ("bos", "eos", "eot", "padding", "unknown"):
        v = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(v, int) and not isinstance(v, bool):
            out[key] = v
    return out


def generation_config(meta: dict[str, Any]) -> bytes:
    """A minimal ``generation_config.json`` with the file's bos/eos ids (what transformers writes)."""
    ids = special_ids(meta)
    cfg = {k: ids[s] for k, s in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding"))
           if s in ids}
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
