"""Generation benchmark: the reference executor's decode vs transformers' own CPU ``generate()``.

Same checkpoint (``bench/_work/hf-<size>``, made by ``make_bench_model.py --size 200m --checkpoint``),
same thread count, same prompt (64 token ids), same number of new tokens (greedy), each engine in its
own fresh process (transformers from the export venv), interleaved rounds, best round reported:

* ours: ``GenerationSession`` on the package ``convert --stateful --context 512 --prefill 64`` makes
  of the checkpoint (fp16), unit ``reference``, per decode engine: ``stored`` (the lean path: the
  package's stored decode table, no coremltools / MIL program, the prompt fed as decode steps; a
  package without a table gets one in a hard-linked copy, ``lm-<size>-stored.mlpackage``), ``fused``
  (the decode function translated at load, prefill in the interpreter) and ``interpreter``: time to
  first token (the 64-token prompt), decode tokens/s (the calls after the first token), peak RSS of
  the process, the RSS growth from loading the package and generating, and for ``stored`` the peak
  RSS against the goal of issue 15, <= 1.5x (package weight bytes + KV cache), with the heavy
  libraries the process loaded;
* transformers: ``BitNetForCausalLM.from_pretrained`` (the checkpoint's bf16, as a user gets it, and
  fp32) ``generate(max_new_tokens=1)`` for the time to first token and ``generate(max_new_tokens=N)``;
  decode tokens/s = (N - 1) / (t_N - t_1).

Also: the bytes the executor reads per decode call (every constant and state operand of every op of
the decode function, from the compiled program, not estimated) and this machine's memory read
bandwidth (numpy sum over 1 GiB, best of 5), i.e. how close decode runs to the physical limit.

    python bench/bench_generate.py [--size 200m] [--threads 1] [--new-tokens 32] [--rounds 2]
        [--engines stored,fused,interpreter] [--skip-transformers]

An engine ``E:K`` runs engine ``E`` on fused kernel ``K`` (``native`` / ``numba``: ``BITNET_COREML_KERNEL``),
e.g. ``--engines stored,stored:numba`` compares the C kernel with the numba one in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "_work"
EXPORT_PY = ROOT / ".venv-export" / "bin" / "python"
if not EXPORT_PY.exists():
    EXPORT_PY = Path("/work/main/.venv-export/bin/python")
PROMPT_TOKENS = 64

OURS = r"""
import json, os, resource, sys, time
import numpy as np, psutil
pkg, n, p, engine = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
from bitnet_coreml.generation import GenerationSession
base = psutil.Process().memory_info().rss
if engine != "stored":
    # the libraries' own memory, before any weight: coremltools, numba's LLVM with a cached kernel, a BLAS GEMM
    from bitnet_coreml._quiet import coremltools; coremltools()
    from bitnet_coreml.executor._fp16 import round_to_fp16; round_to_fp16(np.ones(8, np.float32))
    np.ones((64, 256), np.float32) @ np.ones((256, 64), np.float32)
libs = psutil.Process().memory_info().rss
ids = np.random.default_rng(0).integers(0, 32000, p).tolist()
t0 = time.perf_counter()
s = GenerationSession(pkg, units=["reference"], decode_engine=engine)
load = time.perf_counter() - t0
toks = list(s.generate(ids, max_new_tokens=n))
st = s.stats
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"coremltools", "numba", "llvmlite", "onnx", "onnxruntime",
                                                         "matplotlib", "rich", "tokenizers", "scipy"})
print(json.dumps({"ttft_s": st.ttft_s, "decode_tok_s": st.decode_tok_s, "prefill_tok_s": st.prefill_tok_s,
                  "decode_engine": st.decode_engine, "decode_note": st.decode_note, "heavy": heavy,
                  "load_s": load, "peak_rss": peak, "base_rss": base, "libs_rss": libs, "tokens": toks}))
"""

HF = r"""
import json, sys, time, resource
import torch
folder, n, p, threads, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
import numpy as np
from transformers import BitNetForCausalLM
kw = {} if dtype == "native" else {"dtype": getattr(torch, dtype)}
m = BitNetForCausalLM.from_pretrained(folder, **kw).eval()
ids = torch.tensor([np.random.default_rng(0).integers(0, 32000, p).tolist()])
att = torch.ones_like(ids)
with torch.no_grad():
    m.generate(ids, attention_mask=att, max_new_tokens=2, do_sample=False)  # warm-up (torch.compile of helpers)
    t = time.perf_counter(); m.generate(ids, attention_mask=att, max_new_tokens=1, do_sample=False); t1 = time.perf_counter() - t
    t = time.perf_counter(); out = m.generate(ids, attention_mask=att, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    tn = time.perf_counter() - t
print(json.dumps({"ttft_s": t1, "decode_tok_s": (n - 1) / max(tn - t1, 1e-9),
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "tokens": out[0, p:].tolist()}))
"""

BYTES = r"""
import json, sys
import numpy as np
from bitnet_coreml.executor import ReferenceExecutor
from bitnet_coreml.executor.half import HalfWeight
from bitnet_coreml.executor.ternary import TernaryWeight
ex = ReferenceExecutor(sys.argv[1], function_name="decode")
seen, ternary, half, dense = set(), 0, 0, 0
for step in ex._block.steps:
    for v in step.consts.values():
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, TernaryWeight):
            ternary += v.nbytes
        elif isinstance(v, HalfWeight):
            half += v.nbytes
        elif isinstance(v, np.ndarray):
            dense += v.nbytes
state = ex.make_state()
from bitnet_coreml.executor.fused import fuse
fused, _ = fuse(ex)  # the fused kernel's KV cache: fp16 on the C kernel, else fp16 values in float32
held = np.dtype(fused.state_dtype if fused is not None else np.float32).itemsize
sb = sum(v.size * held for v in state._values.values())  # as held between calls
kv = sum(state.read_state(n).nbytes for n in state.names)  # the package's own (fp16) cache size
print(json.dumps({"ternary_bytes": ternary, "half_bytes": half, "dense_bytes": dense, "state_bytes": sb,
                  "kv_bytes": kv}))
"""


def _env(threads: int, kernel: str = "") -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if kernel:
        env["BITNET_COREML_KERNEL"] = kernel
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[k] = str(threads)
    return env


def _run(argv: list[str], threads: int, kernel: str = "") -> dict:
    return json.loads(_run_text(argv, threads, kernel).strip().splitlines()[-1])


TABLE = r"""
import sys
from bitnet_coreml.executor.fused_store import write_table
print(write_table(sys.argv[1]))
"""


def _with_table(pkg: Path, threads: int) -> Path:
    """``pkg`` if it carries a stored decode table, else a hard-linked copy with one (the shared package untouched)."""
    sys.path.insert(0, str(ROOT))
    from bitnet_coreml.executor.fused_store import StaleTable, open_table

    try:
        if open_table(pkg) is not None:
            return pkg
    except StaleTable:
        pass
    out = pkg.with_name(pkg.stem + "-stored.mlpackage")
    try:
        if out.exists() and open_table(out) is not None:
            return out
    except StaleTable:
        pass
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(pkg, out, copy_function=os.link)  # the table and manifest are written as new files
    t = time.perf_counter()
    _run_text([sys.executable, "-c", TABLE, str(out)], threads)
    print(f"stored decode table written into {out.name} in {time.perf_counter() - t:.1f} s")
    return out


def _run_text(argv: list[str], threads: int, kernel: str = "") -> str:
    res = subprocess.run(argv, env=_env(threads, kernel), capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(argv[:3])}\n{res.stderr[-2000:]}")
    return res.stdout


def bandwidth_gbs() -> float:
    a = np.ones(1 << 27, dtype=np.float64)  # 1 GiB
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="200m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hf-dtypes", default="native,float32",
                    help="transformers runs to compare with (comma-separated); empty: none")
    ap.add_argument("--skip-transformers", action="store_true", help="no transformers runs (same as --hf-dtypes '')")
    ap.add_argument("--engines", default="stored,fused,interpreter",
                    help="decode engines of ours to run (GenerationSession decode_engine), comma-separated")
    args = ap.parse_args()
    folder = WORK / f"hf-{args.size}"
    if not (folder / "config.json").is_file():
        print(f"skipped: {folder} missing (.venv-export/bin/python bench/make_bench_model.py --size {args.size} "
              "--checkpoint)")
        return 0
    pkg = WORK / f"lm-{args.size}.mlpackage"
    if not pkg.exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bitnet_coreml.cli", "convert", str(folder), "-o", str(pkg), "--stateful",
                        "--context", "512", "--prefill", str(PROMPT_TOKENS)], check=True, env=_env(args.threads),
                       cwd=ROOT, stdout=subprocess.DEVNULL)
        print(f"converted {folder.name} -> {pkg.name} in {time.perf_counter() - t:.0f} s")
    if any(e.split(":")[0] == "stored" for e in args.engines.split(",")):
        pkg = _with_table(pkg, args.threads)
    n, p, th = args.new_tokens, PROMPT_TOKENS, args.threads
    dtypes = [] if args.skip_transformers else [d for d in args.hf_dtypes.split(",") if d]
    engines = [e for e in args.engines.split(",") if e]
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    hf: dict[str, list[dict]] = {d: [] for d in dtypes}
    for r in range(args.rounds):
        for e in engines:
            eng, _, kern = e.partition(":")
            runs[e].append(_run([sys.executable, "-c", OURS, str(pkg), str(n), str(p), eng], th, kern))
        for d in hf:
            hf[d].append(_run([str(EXPORT_PY), "-c", HF, str(folder), str(n), str(p), str(th), d], th))
        print(f"round {r + 1}: " + ", ".join(f"ours ({e} -> {v[-1]['decode_engine']}) {v[-1]['decode_tok_s']:.2f} tok/s"
                                             for e, v in runs.items())
              + "".join(f", transformers {d} {v[-1]['decode_tok_s']:.2f} tok/s" for d, v in hf.items()))
    bests = {e: max(v, key=lambda x: x["decode_tok_s"]) for e, v in runs.items()}
    best = bests[engines[0]]
    weights_bytes = sum(f.stat().st_size for f in (pkg / "Data" / "com.apple.CoreML" / "weights").rglob("*")
                        if f.is_file())
    reads = _run([sys.executable, "-c", BYTES, str(pkg)], th)
    per_token = reads["ternary_bytes"] + reads["half_bytes"] + reads["dense_bytes"] + reads["state_bytes"]
    bw = bandwidth_gbs()
    print(f"\n{args.size} checkpoint, context 512, prompt {p} tokens, {n} new tokens (greedy), {th} thread(s)")
    for b in bests.values():
        print(f"ours (reference executor, fp16 package, decode engine {b['decode_engine']}"
              f"{' - ' + b['decode_note'] if b['decode_note'] else ''}): TTFT {b['ttft_s'] * 1e3:.0f} ms, "
              f"prefill {b['prefill_tok_s']:.1f} tok/s, decode {b['decode_tok_s']:.2f} tok/s = "
              f"{1e3 / b['decode_tok_s']:.1f} ms/call, load {b['load_s']:.1f} s, peak RSS {b['peak_rss'] / 2**20:.0f} MiB")
    if len(bests) > 1:
        print("decode speed-up of " + engines[0] + " over " + ", ".join(
            f"{e}: {best['decode_tok_s'] / b['decode_tok_s']:.2f}x" for e, b in bests.items() if e != engines[0]))
    for d, v in hf.items():
        b = max(v, key=lambda x: x["decode_tok_s"])
        print(f"transformers generate() ({d}): TTFT {b['ttft_s'] * 1e3:.0f} ms, decode {b['decode_tok_s']:.2f} tok/s, "
              f"peak RSS {b['peak_rss'] / 2**20:.0f} MiB -> ours/transformers decode "
              f"{best['decode_tok_s'] / b['decode_tok_s']:.2f}x")
    t_tok = 1.0 / best["decode_tok_s"]
    print(f"bytes read per decode call: {per_token / 1e6:.1f} MB (ternary 2-bit {reads['ternary_bytes'] / 1e6:.1f} MB, "
          f"fp16 {reads['half_bytes'] / 1e6:.1f} MB, other dense {reads['dense_bytes'] / 1e6:.1f} MB, KV state as held "
          f"{reads['state_bytes'] / 1e6:.1f} MB); "
          f"at {best['decode_tok_s']:.2f} tok/s that is {per_token / t_tok / 1e9:.2f} GB/s; machine read bandwidth "
          f"{bw:.1f} GB/s -> the memory-bound limit is {bw * 1e9 / per_token:.1f} tok/s, decode runs at "
          f"{(per_token / t_tok / 1e9) / bw:.0%} of it")
    kv = reads["kv_bytes"]
    # the rows about the program-loading path (libraries preloaded): the first engine other than "stored"
    prog = next((b for e, b in bests.items() if e.split(":")[0] != "stored"), None)
    if prog is not None:
        grow = prog["peak_rss"] - prog["base_rss"]
        print(f"peak RSS {prog['peak_rss'] / 2**20:.0f} MiB, decode engine {prog['decode_engine']} (interpreter + "
              f"libraries before loading: {prog['base_rss'] / 2**20:.0f} MiB; growth {grow / 2**20:.0f} MiB) vs package "
              f"weights {weights_bytes / 2**20:.0f} MiB + KV cache {kv / 2**20:.1f} MiB: growth / (weights + KV) = "
              f"{grow / (weights_bytes + kv):.2f}x, peak / (weights + KV) = "
              f"{prog['peak_rss'] / (weights_bytes + kv):.2f}x (goal <= 1.5x)")
    for e, b in bests.items():
        if e.split(":")[0] != "stored":
            continue
        goal = 1.5 * (weights_bytes + kv)
        print(f"lean path ({e}: the stored table, decode engine {b['decode_engine']}): peak RSS {b['peak_rss'] / 2**20:.0f} MiB "
              f"vs package weights {weights_bytes / 2**20:.0f} MiB + KV cache {kv / 2**20:.1f} MiB: "
              f"{b['peak_rss'] / (weights_bytes + kv):.2f}x (goal <= 1.5x = {goal / 2**20:.0f} MiB: "
              f"{'met' if b['peak_rss'] <= goal else 'not met'}); before the package was opened "
              f"{b['base_rss'] / 2**20:.0f} MiB; heavy libraries loaded: {', '.join(b['heavy']) or 'none'}")
    if prog is not None:
        over = prog["peak_rss"] - prog["libs_rss"]
        print(f"peak RSS above the interpreter with its libraries loaded (coremltools, numba's LLVM, BLAS: "
              f"{prog['libs_rss'] / 2**20:.0f} MiB before any weight): {over / 2**20:.0f} MiB = "
              f"{over / (weights_bytes + kv):.2f}x (weights + KV)")
    if hf:
        same = all(best["tokens"][: len(v[0]["tokens"])] == v[0]["tokens"] for v in hf.values())
        print(f"greedy tokens identical to transformers': {same} (random-init weights: near-ties make this "
              "informative only)")
    if len(bests) > 1:
        print("greedy tokens identical across our decode engines: "
              f"{all(b['tokens'] == best['tokens'] for b in bests.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
