"""Benchmark: convert a TQ2_0 GGUF shaped like microsoft/bitnet-b1.58-2B-4T vs the checkpoint path, same run.

Writes, once, into ``bench/_work/``: the random 2B-shaped checkpoint of ``bench_hf_2b.py``
(``bitnet-2b-shaped/``) and ``bitnet-2b-shaped-tq2_0.gguf``, the same model as a GGUF file written
with the ``gguf`` package's own writer and TQ2_0 quantiser (every BitLinear weight ``code / s``
quantised block by block; the embedding BF16, the checkpoint's bytes; norms F32; a byte-level BPE
vocabulary of 128256 tokens with its merges, so the metadata is as large as a real file's). Then it
measures, each in a fresh process (wall time and the kernel's peak RSS, ``os.wait4``):

* ``import``: ``load(source, seq_len)`` of the GGUF file and of the checkpoint folder;
* ``convert``: ``bitnet-coreml convert SOURCE -o OUT --seq-len N --target macos`` of both,

and prints the GGUF / checkpoint ratios (the goal: convert in < 2 min and < 4 GB, no slower than
the checkpoint path). ``--llama`` adds ``llama-2b-shaped-tq2_0.gguf``, the same weights as llama.cpp
writes a ``llama``-architecture file (no sub-norms, q/k rows permuted by ``LlamaModel.permute``): the
weight-only import with its q/k un-permutation, measured in the same run.

Usage: ``.venv/bin/python bench/bench_gguf_2b.py [--seq-len 128] [--stages import,convert] [--rounds 1] [--llama]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _measure import run_measured  # noqa: E402
from bench_hf_2b import FOLDER, SHAPE, WORK, write_checkpoint  # noqa: E402

sys.path.insert(0, str(ROOT / "models"))
from gguf_meta import add_bitnet_metadata, add_bpe_tokenizer, add_hparams, permute  # noqa: E402

GGUF = WORK / "bitnet-2b-shaped-tq2_0.gguf"
LLAMA_GGUF = WORK / "llama-2b-shaped-tq2_0.gguf"
_PROJ = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}
_NORM = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
         "self_attn.attn_sub_norm": "attn_sub_norm", "mlp.ffn_sub_norm": "ffn_sub_norm"}


def bpe_vocab(size: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """A valid byte-level BPE vocabulary of ``size`` tokens: 256 bytes, merges of existing tokens, 2 specials."""
    from tokenizers import pre_tokenizers

    rng = np.random.default_rng(seed)
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    seen, merges = set(tokens), []
    while len(tokens) < size - 2:
        a, b = tokens[int(rng.integers(0, len(tokens)))], tokens[int(rng.integers(0, min(len(tokens), 4096)))]
        if len(a) + len(b) > 12 or a + b in seen:
            continue
        seen.add(a + b)
        tokens.append(a + b)
        merges.append(f"{a} {b}")
    return [*tokens, "<|begin_of_text|>", "<|end_of_text|>"], merges


def write_gguf(folder: Path, dest: Path, arch: str = "bitnet") -> None:
    """The checkpoint ``folder`` as a TQ2_0 GGUF (gguf's writer and quantiser), tensor by tensor; ``arch="llama"``:
    as a llama-architecture file (no sub-norms, q/k rows permuted as llama.cpp's converter does)."""
    import gguf
    from gguf.quants import quantize

    from bitnet_coreml.frontend.hf_safetensors import CheckpointTensors
    from bitnet_coreml.frontend.hf_tensors import unpack_indices

    if dest.is_file():
        return
    cfg = json.loads((folder / "config.json").read_text())
    store = CheckpointTensors(folder)
    tmp = dest.with_name(dest.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    (add_bitnet_metadata if arch == "bitnet" else add_hparams)(w, cfg)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    norms = _NORM if arch == "bitnet" else {h: g for h, g in _NORM.items() if "sub_norm" not in h}
    tokens, merges = bpe_vocab(cfg["vocab_size"])
    add_bpe_tokenizer(w, tokens, merges, set(tokens[-2:]), tokens[-2], tokens[-1], "llama-bpe")
    Q = gguf.GGMLQuantizationType
    plan: list[tuple[str, str, Q]] = [("token_embd.weight", "model.embed_tokens.weight", Q.BF16),
                                      ("output_norm.weight", "model.norm.weight", Q.F32)]
    for i in range(cfg["num_hidden_layers"]):
        plan += [(f"blk.{i}.{g}.weight", f"model.layers.{i}.{h}.weight", Q.F32) for h, g in norms.items()]
        plan += [(f"blk.{i}.{g}.weight", f"model.layers.{i}.{h}.weight", Q.TQ2_0) for h, g in _PROJ.items()]

    def data(hf: str, qtype: Q) -> np.ndarray:
        if qtype == Q.BF16:
            return store.read(hf).view(np.uint8)
        if qtype == Q.F32:
            return store.read_as(hf, np.float32)
        s = float(store.read_as(hf.replace(".weight", ".weight_scale"), np.float32).reshape(()))
        dense = (unpack_indices(store.read(hf)).astype(np.float32) - 1.0) / np.float32(s)  # bitlinear divides
        if arch == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight")):
            dense = permute(dense, heads, heads if "q_proj" in hf else kv)
        return quantize(dense, qtype)

    for name, hf, qtype in plan:
        info = store.info(hf)
        assert info is not None
        rows, cols = (info.shape[0], info.shape[-1]) if len(info.shape) == 2 else (1, info.shape[0])
        if info.dtype == "U8":
            rows *= 4  # packed [out/4, in]
        if qtype == Q.F32:
            w.add_tensor_info(name, info.shape, np.dtype(np.float32), 4 * rows * cols)
            continue
        row_bytes = 2 * cols if qtype == Q.BF16 else cols // 256 * 66  # gguf's writer takes byte shapes
        w.add_tensor_info(name, (rows, row_bytes), np.dtype(np.uint8), rows * row_bytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _name, hf, qtype in plan:
        w.write_tensor_data(data(hf, qtype))
    w.close()
    os.replace(tmp, dest)


def import_stage(source: Path, seq_len: int) -> None:
    from bitnet_coreml.frontend import load

    t0 = time.perf_counter()
    load(source, seq_len=seq_len)
    print(json.dumps({"import_s": round(time.perf_counter() - t0, 2)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--stages", default="import,convert")
    ap.add_argument("--rounds", type=int, default=1, help="alternate gguf / checkpoint this many times")
    ap.add_argument("--mem-cap-gb", type=float, default=16.0, help="address-space cap per run (prlimit --as); 0: none")
    ap.add_argument("--convert-args", default="--target macos")
    ap.add_argument("--llama", action="store_true", help="also the llama-architecture GGUF of the same weights")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--source", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage == "write":
        write_checkpoint(FOLDER)
        write_gguf(FOLDER, GGUF)
        if args.llama:
            write_gguf(FOLDER, LLAMA_GGUF, "llama")
        return
    if args.stage == "import":
        import_stage(Path(args.source), args.seq_len)
        return
    sources = [("gguf", GGUF), *([("llama", LLAMA_GGUF)] if args.llama else []), ("checkpoint", FOLDER)]
    if not all(p.exists() for _, p in sources) or not (FOLDER / "model.safetensors.index.json").is_file():
        w = run_measured([sys.executable, __file__, "--stage", "write", *(["--llama"] if args.llama else [])],
                         quiet=False)
        if w.returncode != 0:
            raise SystemExit(f"writing the benchmark models failed (exit {w.returncode})")
        print(f"wrote {FOLDER} and {GGUF} in {w.wall_s:.0f} s")
    print(f"GGUF {GGUF.stat().st_size / 1e9:.2f} GB, checkpoint "
          f"{sum(p.stat().st_size for p in FOLDER.iterdir()) / 1e9:.2f} GB; shape {SHAPE}; seq_len {args.seq_len}; "
          f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for _ in range(args.rounds):
        for st in [s for s in args.stages.split(",") if s]:
            for label, src in sources:
                if st == "convert":
                    out = WORK / f"bitnet-2b-shaped-{label}.mlpackage"
                    argv = [str(Path(sys.executable).with_name("bitnet-coreml")), "convert", str(src), "-o", str(out),
                            "--seq-len", str(args.seq_len), *args.convert_args.split()]
                else:
                    argv = [sys.executable, __file__, "--stage", st, "--source", str(src), "--seq-len",
                            str(args.seq_len)]
                if args.mem_cap_gb and shutil.which("prlimit"):
                    argv = ["prlimit", f"--as={int(args.mem_cap_gb * 1e9)}", *argv]
                r = run_measured(argv, quiet=st == "convert")
                if r.returncode != 0:
                    print(f"{st} {label}: FAILED (exit {r.returncode})")
                    continue
                results.setdefault((st, label), []).append((r.wall_s, r.peak_rss_mb, r.cpu_s))
                print(f"{st:>8} {label:>10}: wall {r.wall_s:7.1f} s   CPU {r.cpu_s:7.1f} s   peak RSS "
                      f"{r.peak_rss_mb:8.0f} MB", flush=True)
    print(f"load average at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())} (1 / 5 / 15 min); "
          "ratios: best wall and CPU, worst peak RSS over the rounds")
    for st in [s for s in args.stages.split(",") if s]:
        for label, _ in sources[:-1]:
            g, c = results.get((st, label)), results.get((st, "checkpoint"))
            if g and c:
                gw, gm, gc = min(x[0] for x in g), max(x[1] for x in g), min(x[2] for x in g)
                cw, cm, cc = min(x[0] for x in c), max(x[1] for x in c), min(x[2] for x in c)
                print(f"{st:>8} {label} / checkpoint: wall {gw:.1f} / {cw:.1f} s = x{gw / cw:.2f}, CPU {gc:.1f} / "
                      f"{cc:.1f} s = x{gc / cc:.2f}, peak RSS {gm:.0f} / {cm:.0f} MB = x{gm / cm:.2f}")


if __name__ == "__main__":
    main()
