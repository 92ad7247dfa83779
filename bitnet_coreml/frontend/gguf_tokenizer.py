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
* ``llama`` (SentencePiece BPE, what Llama 2 and the 1bitLLM BitNet models use): a ``BPE`` model with
  byte fallback whose merges come from the pieces' scores the way transformers converts a
  SentencePiece model (every split of a piece into two pieces is a merge, ranked by the piece's
  score), the ``▁`` space normalisation with the dummy prefix (``add_space_prefix``, default true),
  SentencePiece's decoder, control tokens as special added tokens, bos prepended when
  ``add_bos_token`` (default true) and eos appended when ``add_eos_token``;
* anything else (``bert``, ``t5``, other presets) -> ``None`` with the reason: the model still
  converts, the package just carries no tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from gguf import TokenType

from bitnet_coreml.frontend.gguf_file import StringArray

# Llama 3's pre-tokenizer split (the pattern of its tokenizer.json and of llama.cpp's LLAMA3 preset)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_PRESETS = ("gpt2", "default")
_LLAMA3_PRESETS = ("llama-bpe", "llama3")


def tokenizer_json(meta: dict[str, Any]) -> tuple[bytes | None, str]:
    """``(tokenizer.json bytes, how)`` from GGUF metadata, or ``(None, why not)``."""
    build, how = tokenizer_builder(meta)
    return (None if build is None else build()), how


def tokenizer_builder(meta: dict[str, Any]) -> tuple[Callable[[], bytes] | None, str]:
    """``(a function building the tokenizer.json bytes, how)``, or ``(None, why not)``: the metadata is checked
    now, the vocabulary is built when the function is called (``convert`` calls it when it writes the package,
    after its memory peak: 128k tokens and merges cost ~0.4 s and ~30 MB)."""
    hf = meta.get("tokenizer.huggingface.json")
    if isinstance(hf, str):
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_str(hf)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on a malformed JSON
            return None, f"tokenizer.huggingface.json is not a valid tokenizer ({' '.join(str(e).split())})"
        return hf.encode, "tokenizer.huggingface.json"
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        return None, "the file has no tokenizer (no tokenizer.ggml.model)"
    if model == "llama":
        return _llama(meta)
    if model != "gpt2":
        return None, (f"tokenizer.ggml.model = {model!r}: rebuilt are 'gpt2' (byte-level BPE) and 'llama' "
                      "(SentencePiece BPE)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _GPT2_PRESETS + _LLAMA3_PRESETS:
        return None, (f"tokenizer.ggml.pre = {pre!r}: supported presets "
                      f"{', '.join(_GPT2_PRESETS + _LLAMA3_PRESETS)}")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not _strings(tokens):
        return None, "tokenizer.ggml.tokens is missing or not a list of strings"
    if not _strings(merges) or not _one_space(merges):
        return None, "tokenizer.ggml.merges is missing or not a list of 'left right' strings"
    return (lambda: _bpe(meta, tokens, merges, pre).to_str().encode("utf-8")), f"gpt2 BPE, pre-tokenizer {pre!r}"


def _strings(v: Any) -> bool:
    """A metadata value that is an array of strings (the scan keeps big ones as a :class:`StringArray`)."""
    return isinstance(v, StringArray) or (isinstance(v, list) and all(isinstance(t, str) for t in v))


def _one_space(merges: Sequence[str]) -> bool:
    """Every merge is ``left right``: one space (counted on the bytes for a :class:`StringArray`)."""
    if isinstance(merges, StringArray):
        return bool((merges.count_bytes(ord(" ")) == 1).all())
    return all(m.count(" ") == 1 for m in merges)


def _bpe(meta: dict[str, Any], tokens: Sequence[str], merges: Sequence[str], pre: str) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

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
        _finish(tok, meta, tokens, [int(k) for k in types], (TokenType.CONTROL,))
    else:
        _finish(tok, meta, tokens, [], ())
    return tok


def _finish(tok: Any, meta: dict[str, Any], tokens: Sequence[str], types: list[int], special_types: tuple[int, ...]) -> None:
    """Tokens of ``special_types`` become special added tokens; bos / eos are added as llama.cpp adds them."""
    from tokenizers import AddedToken

    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=False)
               if k in special_types]
    if special:
        tok.add_special_tokens(special)
    post = _bos_eos(meta, tokens, default_bos=True)
    if post is not None:
        tok.post_processor = post


_SPACE = "\u2581"  # SentencePiece's visible space


def _llama(meta: dict[str, Any]) -> tuple[Callable[[], bytes] | None, str]:
    tokens, scores, types = (meta.get(f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    if not _strings(tokens):
        return None, "tokenizer.ggml.tokens is missing or not a list of strings"
    if scores is None or len(scores) != len(tokens) or types is None or len(types) != len(tokens):
        return None, "tokenizer.ggml.scores / token_type are missing or not one per token"
    return (lambda: _spm(meta, tokens, [float(x) for x in scores], [int(t) for t in types]).to_str().encode("utf-8")), \
        "SentencePiece BPE"


def spm_merges(tokens: Sequence[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """The merges of a SentencePiece BPE vocabulary: every split of a piece into two pieces, highest piece
    score first (transformers' ``SentencePieceExtractor``; SentencePiece merges the best-scoring pair)."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (TokenType.NORMAL, TokenType.USER_DEFINED)}
    ranked = []
    for piece, i in vocab.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        ranked += [(-scores[i], vocab[a], vocab[b], a, b) for a, b in splits]
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


def _spm(meta: dict[str, Any], tokens: Sequence[str], scores: list[float], types: list[int]) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers

    unk = meta.get("tokenizer.ggml.unknown_token_id")
    unk_tok = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=spm_merges(tokens, scores, types),
                               unk_token=unk_tok, fuse_unk=True, byte_fallback=True))
    steps: list[Any] = [normalizers.Replace(" ", _SPACE)]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend(_SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1 if meta.get("tokenizer.ggml.add_space_prefix", True)
                                                    else 0, 0)])
    _finish(tok, meta, tokens, types, (TokenType.CONTROL, TokenType.UNKNOWN))
    return tok


def _bos_eos(meta: dict[str, Any], tokens: Sequence[str], *, default_bos: bool) -> Any:
    """The post-processor adding bos (``add_bos_token``, default ``default_bos``) and eos (``add_eos_token``,
    default false) as llama.cpp does; None when it adds neither."""
    from tokenizers import processors

    raw = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos")}
    ids = {k: v for k, v in raw.items() if isinstance(v, int)}
    use = {"bos": meta.get("tokenizer.ggml.add_bos_token", default_bos), "eos": meta.get("tokenizer.ggml.add_eos_token",
                                                                                      False)}
    ok = {k: bool(use[k]) and k in ids and 0 <= ids[k] < len(tokens) for k in ("bos", "eos")}
    if not any(ok.values()):
        return None
    pre = f"{tokens[ids['bos']]} " if ok["bos"] else ""
    post = f" {tokens[ids['eos']]}" if ok["eos"] else ""
    specials = [(tokens[ids[k]], ids[k]) for k in ("bos", "eos") if ok[k]]
    return processors.TemplateProcessing(single=f"{pre}$A{post}", pair=f"{pre}$A{post} {pre}$B{post}",
                                         special_tokens=specials)


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
