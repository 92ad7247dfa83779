"""Benchmark: import and convert a checkpoint shaped like microsoft/bitnet-b1.58-2B-4T, no torch.

Writes random packed weights (uint8 ``[out/4, in]``, bf16 embedding / norms / weight_scale, tied
lm_head, sharded with ``model.safetensors.index.json`` like the real download) into
``bench/_work/bitnet-2b-shaped/`` once, then measures each stage in a fresh process (wall time and
the kernel's peak RSS, ``os.wait4``):

* ``import``:            ``load_checkpoint(folder, seq_len)`` (headers, norms, scales; weights stay lazy)
* ``import+passes``:     plus ``run_default_passes`` (what ``inspect`` / ``convert`` run next)
* ``materialise``:       import, then every BitLinear's int8 codes one layer at a time + the embedding
                         as fp16 (what a converter reads), to show the per-layer memory bound
* ``calibration``:       import (fp16 embedding), passes, split, then the fp16-safety analysis alone
                         (ONNX Runtime over the whole model with every float value as an output)
* ``convert``:           ``bitnet-coreml convert`` of the folder (the whole pipeline)
* ``convert-stages``:    ``convert()`` in one process, printing the peak RSS of each of its stages

Baseline in the same run (``--baseline``, needs ``.venv-export``): transformers'
``BitNetForCausalLM.from_pretrained`` of the same folder: only the *first* step of today's torch ->
ONNX export route (the export itself needs the model in memory several times over and is not run).

Usage: ``.venv/bin/python bench/bench_hf_2b.py [--seq-len 128] [--stages import,import+passes,materialise,convert-stages] [--baseline]``
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

WORK = HERE / "_work"
FOLDER = WORK / "bitnet-2b-shaped"
SHAPE = {"vocab_size": 128256, "hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 30,
         "num_attention_heads": 20, "num_key_value_heads": 5}
SHARDS = 2


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


# --- stages, each run in a fresh process ----------------------------------------------------------


def convert_stages(folder: Path, seq_len: int, extra: list[str], embed_dtype: str) -> None:
    """``convert()`` in this process, with the peak RSS of each of its stages (sampled every 0.2 s)."""
    import threading

    import psutil

    import bitnet_coreml.frontend as frontend
    from bitnet_coreml.convert import ConvertOptions, convert
    from bitnet_coreml.frontend.hf_checkpoint import load_checkpoint
    from bitnet_coreml.memory import mmap_large_allocations

    mmap_large_allocations()  # as the CLI does for convert (bitnet_coreml.memory)
    if embed_dtype != "auto":
        # convert() picks fp16 for fp16 builds itself; this forces a dtype to compare the two
        forced = embed_dtype
        frontend.load = lambda path, *, seq_len=None, **_: load_checkpoint(  # type: ignore[misc]
            path, seq_len=seq_len or 64, embed_dtype=forced)

    proc = psutil.Process()
    cur, peaks, marks = ["start"], {}, []
    t0 = time.perf_counter()

    def sample() -> None:
        while True:
            peaks[cur[0]] = max(peaks.get(cur[0], 0.0), proc.memory_info().rss / 1e6)
            time.sleep(0.2)

    def say(name: str) -> None:
        marks.append((cur[0], time.perf_counter() - t0, peaks.get(cur[0], 0.0)))
        cur[0] = name

    threading.Thread(target=sample, daemon=True).start()
    target = extra[extra.index("--target") + 1] if "--target" in extra else "ios"
    embed = int(extra[extra.index("--embed-bits") + 1]) if "--embed-bits" in extra else None
    try:
        convert(folder, WORK / "bitnet-2b-shaped-stages.mlpackage",
                ConvertOptions(target=target, seq_len=seq_len, embed_bits=embed), progress=say)
    finally:
        say("end")
        prev = 0.0
        for name, t, peak in marks[1:]:
            print(f"    {name:>30}: ends at {t:7.1f} s (+{t - prev:6.1f} s), peak RSS {peak:7.0f} MB", flush=True)
            prev = t


def stage(name: str, folder: Path, seq_len: int) -> None:
    from bitnet_coreml.frontend.hf_checkpoint import load_checkpoint

    t0 = time.perf_counter()
    m = load_checkpoint(folder, seq_len=seq_len, embed_dtype="float16" if name == "calibration" else "float32")
    info: dict[str, object] = {"import_s": time.perf_counter() - t0}
    if name == "import+passes":
        from bitnet_coreml.passes import run_default_passes

        t1 = time.perf_counter()
        run_default_passes(m)
        info["passes_s"] = time.perf_counter() - t1
    elif name == "calibration":
        from bitnet_coreml.lower.fp16 import make_fp16_safe, random_calibration
        from bitnet_coreml.lower.program import assign_node_names
        from bitnet_coreml.lower.split import split_large_dims
        from bitnet_coreml.passes import run_default_passes

        run_default_passes(m)
        assign_node_names(m.graph)
        split_large_dims(m)
        assign_node_names(m.graph)
        t1 = time.perf_counter()
        plan = make_fp16_safe(m, random_calibration(m))
        info.update(calibration_s=time.perf_counter() - t1, rescaled=len(plan.rescaled), fp32_nodes=len(plan.fp32_nodes))
    elif name == "materialise":
        t1 = time.perf_counter()
        n = 0
        for node in m.graph:
            if node.op_type == "BitLinear":
                codes = node.inputs[1].const_value.numpy()
                n += codes.size
                del codes
        emb = m.graph.initializers["model.embed_tokens.weight"].const_value.numpy_as(np.float16)
        info.update(materialise_s=time.perf_counter() - t1, ternary_params=n, embedding_params=int(emb.size))
    print(json.dumps(info))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--stages", default="import,import+passes,materialise,convert-stages")
    ap.add_argument("--mem-cap-gb", type=float, default=16.0,
                    help="address-space cap per stage (prlimit --as): a stage that needs more fails instead of "
                         "waking the OOM killer on a shared machine; 0 disables")
    ap.add_argument("--convert-args", default="--target macos",
                    help="extra arguments for `bitnet-coreml convert` (the iOS 1 GB package limit needs --embed-bits)")
    ap.add_argument("--embed-dtype", default="auto", choices=["auto", "float32", "float16"],
                    help="force the dtype the embedding / lm_head are imported in (load_checkpoint(embed_dtype=...)); "
                         "auto: what convert() picks (fp16 for fp16 builds)")
    ap.add_argument("--baseline", action="store_true", help="also time transformers' from_pretrained (.venv-export)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage == "write":
        write_checkpoint(FOLDER)
        return
    if args.stage == "convert-stages":
        convert_stages(FOLDER, args.seq_len, args.convert_args.split(), args.embed_dtype)
        return
    if args.stage:
        stage(args.stage, FOLDER, args.seq_len)
        return

    t0 = time.perf_counter()
    # written by a child process: a parent that held the embedding would inflate every child's
    # ru_maxrss (the forked copy counts before exec)
    if not (FOLDER / "model.safetensors.index.json").is_file():
        w = run_measured([sys.executable, __file__, "--stage", "write"], quiet=False)
        if w.returncode != 0:
            raise SystemExit(f"writing {FOLDER} failed (exit {w.returncode})")
    size = sum(p.stat().st_size for p in FOLDER.iterdir())
    print(f"checkpoint: {FOLDER} ({size / 1e9:.2f} GB, written/verified in {time.perf_counter() - t0:.1f}s)")
    print(f"seq_len {args.seq_len}; {os.cpu_count()} cores")
    results: dict[str, tuple[float, float]] = {}
    for st in [s for s in args.stages.split(",") if s]:
        if st == "convert-stages":
            argv = [sys.executable, __file__, "--stage", st, "--seq-len", str(args.seq_len),
                    f"--convert-args={args.convert_args}", "--embed-dtype", args.embed_dtype]
        elif st == "convert":
            out = WORK / "bitnet-2b-shaped.mlpackage"
            argv = [str(Path(sys.executable).with_name("bitnet-coreml")), "convert", str(FOLDER), "-o", str(out),
                    "--seq-len", str(args.seq_len), *args.convert_args.split()]
        else:
            argv = [sys.executable, __file__, "--stage", st, "--seq-len", str(args.seq_len)]
        if args.mem_cap_gb and shutil.which("prlimit"):
            argv = ["prlimit", f"--as={int(args.mem_cap_gb * 1e9)}", *argv]
        r = run_measured(argv, quiet=False)
        if r.returncode != 0:
            print(f"{st}: FAILED (exit {r.returncode})")
            continue
        results[st] = (r.wall_s, r.peak_rss_mb)
        print(f"{st:>14}: wall {r.wall_s:7.1f} s   peak RSS {r.peak_rss_mb:8.0f} MB")
    export_py = ROOT / ".venv-export" / "bin" / "python"
    if args.baseline and export_py.exists():
        code = ("import sys, torch\nfrom transformers import BitNetForCausalLM\n"
                "BitNetForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)\n")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        r = run_measured([str(export_py), "-c", code, str(FOLDER)], env=env)
        print(f"{'baseline':>14}: transformers from_pretrained (load only): wall {r.wall_s:.1f} s, "
              f"peak RSS {r.peak_rss_mb:.0f} MB, exit {r.returncode}")
        for st, (wall, rss) in results.items():
            print(f"{'ratio':>14}: {st} / baseline load: time x{wall / r.wall_s:.2f}, RSS x{rss / r.peak_rss_mb:.2f}")


if __name__ == "__main__":
    main()
