"""Train the bundled example language model: a small BitNet decoder on Python standard-library source.

Usage (from the repository root; ``make models`` runs it with the ``.venv-export`` venv):

    .venv-export/bin/python models/make_example_lm.py [--steps N] [--out models]

What it writes (``models/example-lm/``, a Hugging Face checkpoint folder, and one fixture beside it):

- ``tokenizer.json`` (+ ``tokenizer_config.json``): a byte-level BPE tokenizer trained with the
  ``tokenizers`` library on the corpus, ``VOCAB`` tokens, ``<|endoftext|>`` (id 0) as BOS/EOS and
  document separator.
- ``config.json``, ``generation_config.json``, ``model.safetensors``: transformers'
  ``BitNetForCausalLM`` (``SPEC``) trained by quantisation-aware training (every linear but the tied
  lm_head runs as transformers' ``AutoBitLinear(online_quant=True)``: absmean ternary weights, 8-bit
  absmax activations, straight-through gradients), then written by ``save_pretrained`` in the
  microsoft/bitnet-b1.58-2B-4T layout: bf16, packed uint8 ternary weights, ``linear_class
  bitlinear``, tied embeddings.
- ``models/example_lm_reference.json``: transformers' own ``generate()`` on the folder as saved
  (``from_pretrained(dtype=float32)``, greedy, ``do_sample=False``, ``max_new_tokens=64``) for
  ``PROMPTS``: the prompt ids, the new ids, the decoded text and, per step, the top-1 minus top-2
  margin of the logits (what an fp16 executor must not eat). Tests compare against it without torch.

Corpus: ``CORPUS_FILES``, modules of the running interpreter's standard library (pure Python, present
on every CPython install, long-stable). The script records each file's sha256 and the Python version
in the reference; a different Python release may change a file and so the model (it says which).

Everything is seeded and runs on one torch thread, so a rerun on the same Python and torch gives the
same files. About ``--steps`` x 1.3 s of one CPU core (see models/README.md for the measured time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bitnet_export import (
    ModelSpec,
    eager_bitlinear_helpers,
    eager_quant_autograd,
    next_token_step,
    plain_linears,
    qat_linears,
    random_float_model,
)
from make_hf_fixtures import checkpoint_layers

log = logging.getLogger("make_example_lm")

HERE = Path(__file__).resolve().parent
FOLDER = "example-lm"
REFERENCE = "example_lm_reference.json"

# Pure-Python standard-library modules (stdlib root relative), 290 KB of source: small enough that
# the training budget covers it ~5 times, so the model learns its idioms and continues code plausibly.
CORPUS_FILES: tuple[str, ...] = tuple(f"{m}.py" for m in (
    "abc", "base64", "bisect", "cmd", "code", "colorsys", "contextlib", "copy", "fnmatch", "getopt", "glob",
    "heapq", "hmac", "keyword", "linecache", "netrc", "numbers", "operator", "queue", "reprlib", "sched",
    "secrets", "shlex", "string", "textwrap", "timeit", "weakref"))

EOS = "<|endoftext|>"
VOCAB = 2048
CONTEXT = 512  # max_position_embeddings: the context a stateful package of it gets by default
SPEC = ModelSpec(name="example-lm", form="packed", vocab=VOCAB, hidden=256, layers=4, heads=4, kv_heads=2,
                 intermediate=640, seq=128, seed=21, rope_theta=10000.0, rms_norm_eps=1e-5)
BATCH = 8
STEPS = 400
LR = 4e-3
PROMPTS: tuple[str, ...] = (
    "def __init__(self",
    "import os\nimport sys\n",
    "class ",
    "    def __repr__(self):\n",
    "        for i in range(",
    '    """Return the',
    "if __name__ == '__main__':\n",
    "        raise ValueError(",
)
MAX_NEW_TOKENS = 64


def corpus() -> tuple[list[str], dict[str, str]]:
    """The documents and {file: sha256} of CORPUS_FILES in this interpreter's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, hashes = [], {}
    for name in CORPUS_FILES:
        data = (root / name).read_bytes()
        hashes[name] = hashlib.sha256(data).hexdigest()
        texts.append(data.decode("utf-8"))
    return texts, hashes


def train_tokenizer(texts: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != VOCAB or tok.token_to_id(EOS) != 0:
        raise RuntimeError(f"tokenizer: vocab {tok.get_vocab_size()}, eos id {tok.token_to_id(EOS)}")
    return tok


def token_stream(tok: Any, texts: list[str]) -> np.ndarray:
    """Every document's ids followed by EOS, concatenated."""
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t).ids + [0]
    return np.asarray(ids, dtype=np.int64)


def train(model: Any, stream: np.ndarray, steps: int) -> dict[str, Any]:
    """QAT on random windows of the token stream (gammas train too: this is a real LM)."""
    qat_linears(model)
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(SPEC.seed + 3000)
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    with eager_quant_autograd():
        for step in range(steps):
            starts = rng.integers(0, len(stream) - SPEC.seq - 1, size=BATCH)
            ids = torch.from_numpy(np.stack([stream[s:s + SPEC.seq] for s in starts]))
            losses.append(next_token_step(model, opt, sched, ids))
            if step % 50 == 0 or step == steps - 1:
                log.info("step %d/%d loss %.3f (%.0f s)", step, steps, losses[-1], time.perf_counter() - t0)
    model.eval()
    plain_linears(model)
    model.requires_grad_(False)
    k = max(1, steps // 20)
    return {"steps": steps, "batch": BATCH, "seq": SPEC.seq, "lr": LR, "tokens_seen": steps * BATCH * SPEC.seq,
            "loss_first": round(float(np.mean(losses[:k])), 4), "loss_last": round(float(np.mean(losses[-k:])), 4),
            "train_s": round(time.perf_counter() - t0, 1)}


def save_tokenizer(tok: Any, folder: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   model_max_length=CONTEXT, clean_up_tokenization_spaces=False)
    fast.save_pretrained(folder)


def reference_generations(folder: Path) -> list[dict[str, Any]]:
    """transformers' generate() on the saved folder: greedy, fp32, MAX_NEW_TOKENS, per prompt.

    One torch thread: the reference is then bit-reproducible (the summation order of a matmul
    depends on the thread count).
    """
    from transformers import AutoTokenizer, BitNetForCausalLM

    tok = AutoTokenizer.from_pretrained(folder)  # what a transformers user gets from the folder
    model = BitNetForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.set_num_threads(1)
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        x = torch.tensor([ids], dtype=torch.int64)
        # BitLinear's helpers without torch.compile (same arithmetic; compiling them costs minutes)
        with torch.no_grad(), eager_bitlinear_helpers():
            res = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW_TOKENS,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
        new = res.sequences[0, len(ids):].tolist()
        margins, tops = [], []
        for step_logits in res.logits:
            top2 = torch.topk(step_logits[0].float(), 2).values
            margins.append(float(top2[0] - top2[1]))
            tops.append(float(top2[0]))
        out.append({"prompt": prompt, "prompt_ids": ids, "new_ids": new, "text": tok.decode(new),
                    "top1_logits": tops, "top2_margins": margins})
    return out


def _write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def remake_reference(out_dir: Path) -> dict[str, Any]:
    """Only the generate() reference, from the folder already written (no training)."""
    ref = json.loads((out_dir / REFERENCE).read_text())
    ref["generate"]["sequences"] = reference_generations(out_dir / FOLDER)
    _write_json(out_dir / REFERENCE, ref)
    return ref


def make(out_dir: Path, steps: int) -> dict[str, Any]:
    import tokenizers
    import transformers

    texts, hashes = corpus()
    old_ref = out_dir / REFERENCE
    if old_ref.exists():
        before = json.loads(old_ref.read_text()).get("corpus", {}).get("sha256", {})
        changed = sorted(k for k, v in hashes.items() if before.get(k) not in (None, v))
        if changed:
            log.warning("standard-library files differ from the recorded ones (another Python?): %s", changed)
    tok = train_tokenizer(texts)
    stream = token_stream(tok, texts)
    log.info("corpus: %d files, %d bytes, %d tokens", len(texts), sum(len(t.encode()) for t in texts), len(stream))
    model = random_float_model(SPEC, tie_word_embeddings=True)
    model.config.max_position_embeddings = CONTEXT
    with torch.no_grad():  # a real LM: norms start at 1 and train
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
    params = int(sum(p.numel() for p in model.parameters()))
    stats = train(model, stream, steps)
    model = checkpoint_layers(model, dtype="bfloat16", linear_class="bitlinear", weights="packed")
    model.generation_config.bos_token_id = 0
    model.generation_config.eos_token_id = 0
    model.config.bos_token_id = model.config.eos_token_id = 0

    final = out_dir / FOLDER
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{FOLDER}-", dir=out_dir))
    try:
        model.save_pretrained(tmp)
        save_tokenizer(tok, tmp)
        gens = reference_generations(tmp)
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref = {
        "folder": FOLDER,
        "spec": SPEC.to_dict(),
        "context": CONTEXT,
        "params": params,
        "training": stats,
        "corpus": {"python": sys.version.split()[0], "files": list(CORPUS_FILES), "sha256": hashes,
                   "bytes": sum(len(t.encode()) for t in texts), "tokens": int(len(stream))},
        "generated_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "tokenizers": tokenizers.__version__},
        "generate": {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False, "dtype": "float32",
                     "sequences": gens},
        "files_bytes": {p.name: p.stat().st_size for p in sorted(final.iterdir())},
    }
    _write_json(out_dir / REFERENCE, ref)
    return ref


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--reference-only", action="store_true",
                    help="rewrite only the generate() reference from the existing folder")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    ref = remake_reference(args.out.resolve()) if args.reference_only else make(args.out.resolve(), args.steps)
    t = ref["training"]
    print(f"{FOLDER}: {ref['params']} params, loss {t['loss_first']:.2f} -> {t['loss_last']:.2f} "
          f"in {t['train_s']:.0f} s, {sum(ref['files_bytes'].values()) / 1e6:.2f} MB")
    for g in ref["generate"]["sequences"]:
        print(repr(g["prompt"] + g["text"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
