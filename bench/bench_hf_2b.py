"""Benchmark: import and convert a checkpoint shaped like microsoft/bitnet-b1.58-2B-4T, no torch.

Writes the random 2B-shaped checkpoint of ``_checkpoint.py`` into ``bench/_work/bitnet-2b-shaped/`` once, then measures each stage in a fresh process (wall time and
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

from _checkpoint import SHAPE, WORK, shaped_folder, write_checkpoint  # noqa: E402,F401
from _measure import run_measured  # noqa: E402

FOLDER = shaped_folder("2b")


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
