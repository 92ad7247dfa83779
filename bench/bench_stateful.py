"""Benchmark: stateful packages (``convert --stateful``) on the ~200M-parameter checkpoint shape.

Goals (issue 14), each against its baseline in the same run:

* executor decode step at position 448 <= 1.3x the step at position 16 (context 512: the cache is
  read, nothing is recomputed);
* executor decode per token <= 0.1x the stateless package re-run over a 64-token window (what an app
  without a cache pays per generated token);
* convert time of the stateful package <= 1.3x the stateless one's (fresh process each, best of N);
* weight bytes of the stateful package <= 1.02x the stateless one's.

The checkpoint is synthesised once into ``bench/_work/bitnet-200m-shaped/`` by ``_checkpoint.py``
(random packed ternary weights, bf16 embedding; the 200m row of ``make_bench_model.py``: hidden 1024,
12 layers, 16/4 heads, intermediate 2816, vocab 32000). No torch needed.

Usage: ``.venv/bin/python bench/bench_stateful.py [--rounds 2] [--steps 16] [--stage all|convert|executor]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _checkpoint import SHAPES, WORK, shaped_checkpoint, shaped_folder  # noqa: E402
from _measure import python_snippet, run_measured  # noqa: E402

FOLDER = shaped_folder("200m")
CONTEXT, PREFILL, WINDOW = 512, 64, 64
STATEFUL = WORK / "bitnet-200m-stateful.mlpackage"
STATELESS = WORK / "bitnet-200m-stateless.mlpackage"


def convert_argv(stateful: bool) -> list[str]:
    out = STATEFUL if stateful else STATELESS
    extra = ["--stateful", "--context", str(CONTEXT), "--prefill", str(PREFILL)] if stateful else [
        "--seq-len", str(WINDOW)]
    return [sys.executable, "-m", "bitnet_coreml.cli", "convert", str(FOLDER), "-o", str(out), "--json", *extra]


def bench_convert(rounds: int) -> dict[str, object]:
    times: dict[str, list[float]] = {"stateless": [], "stateful": []}
    rss: dict[str, float] = {}
    for _ in range(rounds):  # interleaved, so machine load hits both alike
        for name, st in (("stateless", False), ("stateful", True)):
            m = run_measured(convert_argv(st))
            if m.returncode != 0:
                raise SystemExit(f"convert ({name}) failed: {' '.join(convert_argv(st))}")
            times[name].append(m.wall_s)
            rss[name] = max(rss.get(name, 0.0), m.peak_rss_mb)
    from bitnet_coreml.package.writer import weight_bytes

    wb = {"stateless": weight_bytes(STATELESS), "stateful": weight_bytes(STATEFUL)}
    best = {k: min(v) for k, v in times.items()}
    return {"convert_s": times, "best_s": best, "convert_ratio": best["stateful"] / best["stateless"],
            "peak_rss_mb": rss, "weight_bytes": wb, "weight_ratio": wb["stateful"] / wb["stateless"]}


_EXECUTOR = r'''
import json, statistics, sys, time
import numpy as np
from bitnet_coreml.executor import ReferenceExecutor
from bitnet_coreml.executor.stateful import StatefulRun
steps, stateful, stateless, window = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
rng = np.random.default_rng(0)
t0 = time.perf_counter(); run = StatefulRun(stateful); load = time.perf_counter() - t0
out = {"load_s": load}
def step_times(start):
    ts = []
    for i in range(steps):
        ids = rng.integers(0, 32000, (1, 1)).astype(np.int32)
        t = time.perf_counter(); run.call("decode", ids, start + i); ts.append(time.perf_counter() - t)
    return ts
step_times(0)  # warm-up
# interleave the two positions so drift in machine load hits both alike
lo, hi = [], []
for r in range(2):
    lo += step_times(16); hi += step_times(448)
out["decode_16_s"] = statistics.median(lo); out["decode_448_s"] = statistics.median(hi)
t = time.perf_counter(); run.call("prefill", rng.integers(0, 32000, (1, 64)).astype(np.int32), 0)
out["prefill_64_s"] = time.perf_counter() - t
del run
ex = ReferenceExecutor(stateless)
ids = rng.integers(0, 32000, (1, window)).astype(np.int32)
ex.predict({"input_ids": ids})
ws = []
for _ in range(max(3, steps // 4)):
    t = time.perf_counter(); ex.predict({"input_ids": ids}); ws.append(time.perf_counter() - t)
out["stateless_window_s"] = statistics.median(ws)
print(json.dumps(out))
'''


def bench_executor(steps: int) -> dict[str, object]:
    import subprocess

    r = subprocess.run(python_snippet(_EXECUTOR) + [str(steps), str(STATEFUL), str(STATELESS), str(WINDOW)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"executor benchmark failed:\n{r.stderr[-2000:]}")
    d = json.loads(r.stdout.strip().splitlines()[-1])
    d["position_ratio_448_vs_16"] = d["decode_448_s"] / d["decode_16_s"]
    d["decode_vs_stateless_window"] = d["decode_16_s"] / d["stateless_window_s"]
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="convert rounds (interleaved; best of each)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per position and round")
    ap.add_argument("--stage", choices=["all", "convert", "executor"], default="all")
    args = ap.parse_args()
    t0 = time.perf_counter()
    shaped_checkpoint("200m", shards=1)
    print(f"checkpoint {FOLDER} ready ({time.perf_counter() - t0:.1f} s)", flush=True)
    res: dict[str, object] = {"shape": SHAPES["200m"], "context": CONTEXT, "prefill": PREFILL, "window": WINDOW}
    if args.stage in ("all", "convert") or not (STATEFUL.exists() and STATELESS.exists()):
        res["convert"] = bench_convert(args.rounds)
        c = res["convert"]
        print(f"convert: stateless {c['best_s']['stateless']:.2f} s, stateful {c['best_s']['stateful']:.2f} s -> "
              f"ratio {c['convert_ratio']:.3f} (goal <= 1.3); weights {c['weight_bytes']['stateless']:,} vs "
              f"{c['weight_bytes']['stateful']:,} B -> ratio {c['weight_ratio']:.4f} (goal <= 1.02)", flush=True)
    if args.stage in ("all", "executor"):
        e = bench_executor(args.steps)
        res["executor"] = e
        print(f"executor: decode step at 16 {e['decode_16_s'] * 1e3:.1f} ms, at 448 {e['decode_448_s'] * 1e3:.1f} ms "
              f"-> ratio {e['position_ratio_448_vs_16']:.3f} (goal <= 1.3); stateless 64-token window "
              f"{e['stateless_window_s'] * 1e3:.1f} ms -> decode/window {e['decode_vs_stateless_window']:.3f} "
              f"(goal <= 0.1); prefill of 64 {e['prefill_64_s'] * 1e3:.1f} ms; load {e['load_s']:.1f} s")
    print(json.dumps(res, indent=1, default=statistics.mean))
    return 0


if __name__ == "__main__":
    sys.exit(main())
