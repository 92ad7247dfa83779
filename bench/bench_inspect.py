"""Benchmark: `inspect` vs a bare `onnx.load` of the same file, in the same run.

Goal (issue 2): inspect's wall time <= 1.5x onnx.load's, and its peak RSS <= 1.5x the file size.

    python bench/bench_inspect.py [bench/_work/bitnet_200m.onnx] [--repeat 3]

The model comes from `python bench/make_bench_model.py --size 200m` (not committed).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import interleaved, python_snippet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="bench/_work/bitnet_200m.onnx")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    path = Path(args.model)
    if not path.exists():
        raise SystemExit(f"{path} not found; make it with: python bench/make_bench_model.py --size 200m")
    size_mb = sum(f.stat().st_size for f in path.parent.iterdir() if f.name == path.name or f.name.startswith(path.name + ".")) / 2**20
    inspect_argv = python_snippet("from bitnet_coreml.commands.inspect import inspect_cmd; "
                                  f"inspect_cmd.main([{str(path)!r}, '--json'], standalone_mode=False)")
    runs = interleaved(args.repeat, {"onnx.load": python_snippet(f"import onnx; onnx.load({str(path)!r})"),
                                     "inspect": inspect_argv})
    onnx_load, inspect = runs.best("onnx.load"), runs.best("inspect")
    print(f"model: {path} ({size_mb:.0f} MiB on disk, {os.cpu_count()} cores)")
    print(f"{'':14}{'wall s':>10}{'peak RSS MiB':>15}")
    print(f"{'onnx.load':14}{onnx_load.wall_s:10.2f}{onnx_load.peak_rss_mb:15.0f}")
    print(f"{'inspect':14}{inspect.wall_s:10.2f}{inspect.peak_rss_mb:15.0f}")
    print(f"inspect / onnx.load wall: {inspect.wall_s / onnx_load.wall_s:.2f}x (goal <= 1.5x)")
    print(f"inspect peak RSS / file size: {inspect.peak_rss_mb / size_mb:.2f}x (goal <= 1.5x)")


if __name__ == "__main__":
    main()
