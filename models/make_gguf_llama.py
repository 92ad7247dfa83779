"""Write the llama-architecture GGUF fixtures (``models/gguf/llama-*``): a ternary LlamaForCausalLM as TQ1_0 / TQ2_0.

What TriLM / Spectra models are once llama.cpp has converted and quantised them: a plain llama decoder
(RMSNorm, rotate-half RoPE, SiLU-gated MLP, no sub-norms) whose linears hold ``s * {-1, 0, 1}`` (one
scale per tensor) and whose activations are *not* quantised, stored as ``general.architecture = llama``.

The model: transformers' ``LlamaForCausalLM``, vocab 512 (the bundled ``models/gguf/tokenizer.json``),
hidden 256, 2 layers, 4 heads / 2 KV heads (GQA), intermediate 256, rope_theta 10000, untied lm_head
(the BitNet GGUF fixtures are tied). Briefly trained (the bundled models' Markov corpus,
``bitnet_export.markov_chain``) with weight-only ternary linears in the loop (absmean ternarisation,
straight-through gradient), so its top-1 is decided with a margin; RMSNorm gammas log-normal and frozen,
as the other fixtures. Then every linear becomes ``s * codes`` with ``s`` rounded to fp16 (the TQ block
scale ``d = max |w|`` is fp16, so the files hold exactly this model), the embedding is rounded to fp16
and the lm_head to bf16 (the types they are stored in): torch's logits of *that* model are the oracle.

The files are written as llama.cpp's converter and ``llama-quantize`` would: gguf's ``GGUFWriter`` with
the ``llama`` keys, q and k rows permuted by ``convert_hf_to_gguf.py``'s ``LlamaModel.permute`` (below),
linears quantised by gguf's own ``gguf.quants.quantize`` (layer 1's q_proj kept as F16 ``{-s, 0, s}``,
a float linear the importer must also un-permute), ``token_embd`` F16, ``output`` BF16, norms F32, and
the tokenizer as a GPT-2-style BPE. ``llama-logits.npz`` holds the oracle:

- ``input_ids`` / ``logits`` ``[1, 16]`` / ``[1, 16, 512]`` and ``eval_input_ids`` / ``eval_logits``
  (8 more rows): torch's forward, 144 positions;
- ``prompt`` ``[1, 8]`` and ``greedy_tokens`` ``[24]``: torch's greedy continuation of the prompt.

Run by ``make_gguf_fixtures.make_all`` (``make models``) or ``.venv-export/bin/python models/make_gguf_llama.py``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bitnet_export import TrainSpec, chain_entropy, markov_chain, next_token_step
from gguf_meta import add_hparams, add_tokenizer_bpe, close_atomic, permute
from make_hf_fixtures import _save_npz

log = logging.getLogger("make_gguf_llama")

HERE = Path(__file__).resolve().parent
CONFIG: dict[str, Any] = {
    "vocab_size": 512, "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "bos_token_id": 0, "eos_token_id": 1,
}
SEED = 31
SEQ = 16
TRAIN = TrainSpec(states=512, seed=SEED)
PROMPT, GREEDY = 8, 24
FLOAT_LINEAR = "model.layers.1.self_attn.q_proj.weight"  # stored F16 ({-s, 0, s}) instead of TQ
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _absmean_ternary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in {-1, 0, 1}, magnitude a = mean |w|): w ~ a * codes."""
    a = w.abs().mean().clamp(min=1e-5)
    return (w / a).round().clamp(-1, 1), a


class TernaryLinear(torch.nn.Linear):
    """Weight-only ternary linear for training: forward with ``a * codes``, gradient straight through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, a = _absmean_ternary(self.weight)
        q = codes * a
        return torch.nn.functional.linear(x, self.weight + (q - self.weight).detach())


def _linears(model: Any) -> list[tuple[str, torch.nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")]


def build_model() -> tuple[Any, Any, dict[str, Any]]:
    """The trained ternary LlamaForCausalLM (fp32), its Markov chain and the training summary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    gen = torch.Generator().manual_seed(SEED + 5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.exp(TRAIN.gamma_log_std * torch.randn(p.shape, generator=gen)))
    for name, lin in _linears(model):
        t = TernaryLinear(lin.in_features, lin.out_features, bias=False)
        with torch.no_grad():
            t.weight.copy_(lin.weight)
        model.set_submodule(name, t)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.endswith("norm.weight"))
    chain = markov_chain(CONFIG["vocab_size"], TRAIN)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=TRAIN.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=TRAIN.lr, total_steps=TRAIN.steps, pct_start=0.1)
    rng = np.random.default_rng(TRAIN.seed + 3000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reproducible bit for bit
    losses = []
    try:
        model.train()
        for _ in range(TRAIN.steps):
            losses.append(next_token_step(model, opt, sched, torch.from_numpy(chain.sample(rng, (TRAIN.batch, SEQ)))))
    finally:
        torch.set_num_threads(threads)
    model.eval().requires_grad_(False)
    # the stored model: linears a * codes with a in fp16, embedding in fp16, lm_head in bf16
    for name, lin in _linears(model):
        codes, a = _absmean_ternary(lin.weight)
        plain = torch.nn.Linear(lin.in_features, lin.out_features, bias=False)
        with torch.no_grad():
            plain.weight.copy_((codes + 0.0) * a.half().float())  # + 0.0: no -0.0 codes (round(-0.3) is -0.0)
        model.set_submodule(name, plain)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight.half().float())
        model.lm_head.weight.copy_(model.lm_head.weight.bfloat16().float())
    k = max(1, TRAIN.steps // 20)
    stats = {"loss_first": round(float(np.mean(losses[:k])), 4), "loss_last": round(float(np.mean(losses[-k:])), 4),
             "chain_entropy_nats": round(chain_entropy(chain), 4)}
    return model, chain, stats


def _logits(model: Any, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.float().numpy()


def write_gguf(model: Any, tok: Any, qtype_name: str, dest: Path) -> dict[str, Any]:
    """The model as llama.cpp's converter + llama-quantize store it (see the module docstring)."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads, kv = CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"]
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{dest.name}-", dir=dest.parent)
    os.close(fd)
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(f"ternary llama fixture {qtype_name}")
    add_hparams(w, CONFIG)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_TQ1_0 if qtype_name == "TQ1_0" else gguf.LlamaFileType.MOSTLY_TQ2_0)
    add_tokenizer_bpe(w, tok, "<|begin_of_text|>", "<|end_of_text|>")
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].astype(np.float16))
    types: dict[str, str] = {}
    for i in range(CONFIG["num_hidden_layers"]):
        for hf, gg in GGUF_NAMES.items():
            key = f"model.layers.{i}.{hf}.weight"
            arr = sd[key]
            if hf.endswith("layernorm"):
                w.add_tensor(f"blk.{i}.{gg}.weight", arr.astype(np.float32))
                continue
            if hf == "self_attn.q_proj":
                arr = permute(arr, heads, heads)
            elif hf == "self_attn.k_proj":
                arr = permute(arr, heads, kv)
            if key == FLOAT_LINEAR:
                w.add_tensor(f"blk.{i}.{gg}.weight", arr.astype(np.float16))
                types[key] = "F16"
                continue
            q = gguf.quants.quantize(arr.astype(np.float32), qtype)
            back = gguf.quants.dequantize(q, qtype).astype(np.float32)
            if not np.array_equal(back, arr):
                raise RuntimeError(f"{key}: {qtype_name} does not hold the ternary weight exactly")
            w.add_tensor(f"blk.{i}.{gg}.weight", q, raw_dtype=qtype)
            types[key] = qtype_name
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].astype(np.float32))
    lm = model.lm_head.weight.detach().bfloat16()
    w.add_tensor("output.weight", lm.view(torch.int16).numpy().view(np.uint8), raw_dtype=gguf.GGMLQuantizationType.BF16)
    close_atomic(w, tmp, dest)
    return {"file": dest.name, "bytes": dest.stat().st_size, "type": qtype_name,
            "linear_types": sorted(set(types.values()))}


def make_all(root: Path | None = None) -> dict[str, Any]:
    """Write ``llama-tq1_0.gguf``, ``llama-tq2_0.gguf`` and ``llama-logits.npz`` into ``root`` (models/gguf)."""
    from tokenizers import Tokenizer

    root = (root or HERE / "gguf").resolve()
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))  # the bundled fixtures' tokenizer (make_gguf_fixtures)
    if tok.get_vocab_size() != CONFIG["vocab_size"]:
        raise RuntimeError(f"tokenizer.json has {tok.get_vocab_size()} tokens, the model {CONFIG['vocab_size']}")
    model, chain, stats = build_model()
    rng = np.random.default_rng(SEED + 4000)
    ids = chain.sample(rng, (1, SEQ))
    eval_ids = chain.sample(rng, (TRAIN.eval_batches, 1, SEQ))
    prompt = chain.sample(rng, (1, PROMPT))
    logits = _logits(model, ids)
    eval_logits = np.stack([_logits(model, x) for x in eval_ids])
    seq = prompt
    for _ in range(GREEDY):
        nxt = _logits(model, seq)[0, -1].argmax()
        seq = np.concatenate([seq, [[nxt]]], axis=1)
    greedy = seq[0, PROMPT:].astype(np.int64)
    flat = np.concatenate([logits.reshape(-1, logits.shape[-1]), eval_logits.reshape(-1, logits.shape[-1])])
    top2 = np.sort(flat, axis=-1)[:, -2:]
    _save_npz(root / "llama-logits.npz", input_ids=ids.astype(np.int64), logits=logits.astype(np.float32),
              eval_input_ids=eval_ids.astype(np.int64), eval_logits=eval_logits.astype(np.float32),
              prompt=prompt.astype(np.int64), greedy_tokens=greedy)
    files = [write_gguf(model, tok, q, root / f"llama-{q.lower()}.gguf") for q in ("TQ1_0", "TQ2_0")]
    return {"config": CONFIG, "seed": SEED, "training": {**TRAIN.to_dict(), **stats}, "files": files,
            "oracle": {"file": "llama-logits.npz", "positions": int(flat.shape[0]),
                       "logit_abs_max": round(float(np.abs(flat).max()), 4),
                       "top2_gap_min": round(float((top2[:, 1] - top2[:, 0]).min()), 4),
                       "top2_gap_median": round(float(np.median(top2[:, 1] - top2[:, 0])), 4),
                       "greedy_tokens": greedy.tolist()}}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(make_all(), indent=1))
