"""Write the GGUF fixtures (``models/gguf/``): one BitNet checkpoint, its TQ1_0 and TQ2_0 GGUF files, a tokenizer.

TQ1_0 / TQ2_0 blocks hold 256 weights of a row, so the GGUF fixtures need layers whose input sizes
are multiples of 256; the ``models/hf`` fixtures (hidden 64, intermediate 172) are not. This script
therefore writes one more checkpoint folder the same way ``make_hf_fixtures.py`` writes those
(transformers' ``save_pretrained`` of a random-init, ternarised ``BitNetForCausalLM``; ``logits.npz``
holds transformers' logits from the folder), shaped vocab 512, hidden 256, 2 layers, 4 heads / 2 KV
heads, intermediate 512, in the microsoft/bitnet-b1.58-2B-4T layout (bf16, packed uint8, bitlinear,
tied), briefly trained like the bundled ONNX models (``bitnet_export.train_qat`` on a seeded Markov
chain over all 512 ids) so its top-1 is decided with a margin. Its per-tensor ``weight_scale`` is rounded to a power of two before saving, so ``1/s`` is
exact in bf16, fp16 and fp32: the GGUF files (whose block scales are fp16) then hold the *same* model
as the checkpoint, and the GGUF path and the checkpoint path can be compared for identical outputs.

Then, with the ``gguf`` package's own writer and quantisers (``gguf.GGUFWriter``,
``gguf.quants.quantize``), it writes ``bitnet-tq1_0.gguf`` and ``bitnet-tq2_0.gguf``: every BitLinear
weight dequantised from the checkpoint (``code / s``) and quantised to TQ1_0 / TQ2_0, the embedding in
BF16 (the checkpoint's bytes), the norms in F32, hyperparameters as llama.cpp's ``bitnet`` keys plus
``bitnet.hidden_act = relu2`` (transformers' BitNet; llama.cpp's graph assumes SiLU), and a tokenizer.

The tokenizer: the fixtures have none, so a byte-level BPE of exactly 512 tokens (the model's vocab) is
trained with ``tokenizers`` on a seeded synthetic text and saved as ``tokenizer.json``; the GGUF files
carry it the way llama.cpp's converter stores a GPT-2-style BPE (``tokenizer.ggml.model = gpt2``,
tokens, token types, merges, bos/eos ids). ``prompts.json`` holds the round-trip test's prompts.
:func:`make_spm` adds a SentencePiece tokenizer (``tokenizer.ggml.model = llama``) with sentencepiece's own
encodings of those prompts (``--spm-only`` writes just that).

The llama-architecture fixtures (``llama-tq1_0.gguf``, ``llama-tq2_0.gguf``, ``llama-logits.npz``: a ternary
``LlamaForCausalLM``) are written by ``make_gguf_llama.py`` with the same tokenizer (``MANIFEST.json`` ``llama``).

Run via ``models/make_models.py`` (``make models``) or ``.venv-export/bin/python models/make_gguf_fixtures.py``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_hf_fixtures
from bitnet_export import ModelSpec, TrainSpec
from gguf_meta import add_bitnet_metadata, add_spm_tokenizer, add_tokenizer_bpe, close_atomic
from make_hf_fixtures import HFFixture, make_fixture

log = logging.getLogger("make_gguf_fixtures")

HERE = Path(__file__).resolve().parent
OUT = HERE / "gguf"
CHECKPOINT = "bitnet-tq-ckpt"
FIXTURE = HFFixture(
    folder=CHECKPOINT, linear_class="bitlinear", weights="packed", dtype="bfloat16", tie_word_embeddings=True,
    spec=ModelSpec(name=CHECKPOINT, form="packed", seed=20, vocab=512, hidden=256, layers=2, heads=4, kv_heads=2,
                   intermediate=512, seq=16),
    note="TQ-compatible shapes (in-features multiples of 256); weight_scale rounded to powers of two",
)
TRAIN = TrainSpec(states=512, seed=20)
TRAINING: dict[str, Any] = {}
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand\nnewlines  ",
    "Numbers 12345 and symbols #$%&*() stay exact.",
    "Unicode: naïve café, 日本語, emoji 🙂 and Ωmega.",
    "",
    "ternary weights go straight to two-bit lookup tables",
]
_WORDS = ("the of and to in is was for on that with as by at from his her an were which are this be has had "
          "not but they their one all been would will more other into some could time two first after new "
          "bitnet ternary weight scale block model layer token engine apple neural core package convert "
          "verify lookup table quant tensor graph").split()


def trained_float_model(spec: ModelSpec, **config_extra: Any) -> Any:
    """``random_float_model`` after the bundled models' training (log-normal gammas, QAT on a Markov chain).

    Random-init logits are near-flat and their argmax is noise (see ``bitnet_export``); the GGUF
    fixture's top-1 gate needs the confident predictions of a trained model, as the bundled ONNX
    models have. The linears stay float; ``make_hf_fixtures`` ternarises them as for every fixture.
    """
    from bitnet_export import train_float_model

    model, _, stats = train_float_model(spec, TRAIN, **config_extra)
    TRAINING.update(stats)
    return model


def pow2_scales(model: Any) -> None:
    """Round every BitLinear ``weight_scale`` to the nearest power of two (exact in bf16/fp16/fp32)."""
    import torch
    from transformers.integrations.bitnet import BitLinear

    for mod in model.modules():
        if isinstance(mod, BitLinear):
            with torch.no_grad():
                s = float(mod.weight_scale.float().reshape(()))
                mod.weight_scale.copy_(torch.tensor([2.0 ** round(np.log2(s))], dtype=mod.weight_scale.dtype))


def corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99999)))
        lines.append(" ".join(words).capitalize() + rng.choice([".", ",", "!", "?", ""]))
    return lines


def train_tokenizer(vocab: int) -> Any:
    """A byte-level BPE with exactly ``vocab`` tokens (256 bytes + merges + 2 special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab:
        raise RuntimeError(f"trained tokenizer has {tok.get_vocab_size()} tokens, expected {vocab}")
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos)])
    return tok


SPM_VOCAB = 400


def make_spm(root: Path) -> dict[str, Any]:
    """A SentencePiece tokenizer in a GGUF file (``tokenizer.ggml.model = llama``) and sentencepiece's own
    encodings of the prompts, the oracle of the importer's rebuilt ``tokenizers`` tokenizer.

    Trained with ``sentencepiece`` (BPE, byte fallback, identity normalisation, digits split: Llama's
    settings) on the synthetic corpus; ``spm-tokenizer.gguf`` holds only the vocabulary as llama.cpp's
    converter writes it (``gguf_meta.add_spm_tokenizer``), ``spm-expected.json`` the ids and decodes.
    """
    import gguf
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as d:
        text = Path(d) / "corpus.txt"
        text.write_text("\n".join(corpus()) + "\n", encoding="utf-8")
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(Path(d) / "spm"), model_type="bpe",
                                       vocab_size=SPM_VOCAB, byte_fallback=True, split_digits=True,
                                       normalization_rule_name="identity", remove_extra_whitespaces=False,
                                       add_dummy_prefix=True, allow_whitespace_only_pieces=True,
                                       character_coverage=1.0, num_threads=1, minloglevel=2)
        model = (Path(d) / "spm.model").read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=model)
    dest = root / "spm-tokenizer.gguf"
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{dest.name}-", dir=root)
    os.close(fd)
    w = gguf.GGUFWriter(tmp, "bitnet")
    w.add_name("sentencepiece tokenizer fixture")
    add_spm_tokenizer(w, sp)
    close_atomic(w, tmp, dest)
    expected = [{"prompt": p, "ids": sp.encode(p), "decoded": sp.decode(sp.encode(p))} for p in PROMPTS]
    (root / "spm-expected.json").write_text(json.dumps({"sentencepiece": spm.__version__, "bos": sp.bos_id(),
                                                        "prompts": expected}, ensure_ascii=False, indent=1) + "\n")
    return {"file": dest.name, "bytes": dest.stat().st_size, "vocab": sp.vocab_size(),
            "sentencepiece": spm.__version__}


def _read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    return json.loads((folder / "config.json").read_text()), load_file(str(folder / "model.safetensors"))


def _unpack(packed: Any) -> np.ndarray:
    """uint8 ``[out/4, in]`` -> int8 codes ``[out, in]`` (row block i in bits 2i..2i+1, value = code + 1)."""
    p = packed.numpy()
    return np.concatenate([((p >> (2 * i)) & 3).astype(np.int8) - 1 for i in range(4)], axis=0)


def write_gguf(folder: Path, tok: Any, qtype_name: str, dest: Path) -> dict[str, Any]:
    import gguf
    import torch

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    cfg, t = _read_checkpoint(folder)
    arch = "bitnet"
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{dest.name}-", dir=dest.parent)
    os.close(fd)
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name(f"{CHECKPOINT} {qtype_name}")
    add_bitnet_metadata(w, cfg)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_TQ1_0 if qtype_name == "TQ1_0" else gguf.LlamaFileType.MOSTLY_TQ2_0)
    add_tokenizer_bpe(w, tok, BOS, EOS)
    # tensors
    name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "self_attn.attn_sub_norm": "attn_sub_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
                 "mlp.ffn_sub_norm": "ffn_sub_norm"}
    emb = t["model.embed_tokens.weight"]
    w.add_tensor("token_embd.weight", emb.view(torch.int16).numpy().view(np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.add_tensor(name["model.norm.weight"], t["model.norm.weight"].float().numpy())
    stats = {"scales": set()}
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in per_layer.items():
            key = f"model.layers.{i}.{hf}.weight"
            if hf.endswith("norm"):
                w.add_tensor(f"blk.{i}.{gg}.weight", t[key].float().numpy())
                continue
            s = float(t[f"model.layers.{i}.{hf}.weight_scale"].float().reshape(()))
            dense = (_unpack(t[key]).astype(np.float32) / np.float32(s)).astype(np.float32)  # bitlinear divides by s
            stats["scales"].add(1.0 / s)
            w.add_tensor(f"blk.{i}.{gg}.weight", gguf.quants.quantize(dense, qtype), raw_dtype=qtype)
    close_atomic(w, tmp, dest)
    return {"file": dest.name, "bytes": dest.stat().st_size, "type": qtype_name,
            "block_scales": sorted(stats["scales"])}


def make_all(root: Path | None = None) -> dict[str, Any]:
    root = (root or OUT).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log.info("writing %s", CHECKPOINT)
    original = make_hf_fixtures.random_float_model
    make_hf_fixtures.random_float_model = trained_float_model  # this fixture is trained (see above)
    try:
        ckpt = make_fixture(FIXTURE, root, adjust=pow2_scales)
    finally:
        make_hf_fixtures.random_float_model = original
    ckpt["training"] = {"spec": TRAIN.to_dict(), **TRAINING}
    tok = train_tokenizer(FIXTURE.spec.vocab)
    tok_path = root / "tokenizer.json"
    tok.save(str(tok_path))
    (root / "prompts.json").write_text(json.dumps(PROMPTS, ensure_ascii=False, indent=1) + "\n")
    files = [write_gguf(root / CHECKPOINT, tok, q, root / f"bitnet-{q.lower()}.gguf") for q in ("TQ1_0", "TQ2_0")]
    from make_gguf_llama import make_all as make_llama

    manifest = {"checkpoint": ckpt, "gguf": files, "tokenizer": {"file": tok_path.name, "vocab": tok.get_vocab_size(),
                                                                 "bos": BOS, "eos": EOS},
                "sentencepiece": make_spm(root), "llama": make_llama(root)}
    (root / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")
    return manifest


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if sys.argv[1:] == ["--spm-only"]:  # just the SentencePiece fixture (its MANIFEST entry is make_all's)
        print(json.dumps(make_spm(OUT), indent=1))
    else:
        print(json.dumps(make_all(), indent=1, default=str))
