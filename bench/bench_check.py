"""Benchmark: `check` vs `inspect` on the same model, in the same run (fresh processes, best of N).

Goal (issue 5): check's wall time <= 1.1x inspect's on the ~200M-parameter export. Both load the
model and run the default passes; check adds the size estimate, every rule (one pass over the float
weights for the fp16 range) and the report. The two commands run alternately (fresh processes) so
that load from other jobs on the machine hits both alike; best, median and per-pair ratios are shown.

    python bench/bench_check.py [bench/_work/bitnet_200m.onnx] [--repeat 3] [--target ios --chip A17Pro]

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
    ap.add_argument("--target", default="ios")
    ap.add_argument("--chip", default="A17Pro")
    args = ap.parse_args()
    path = Path(args.model)
    if not path.exists():
        raise SystemExit(f"{path} not found; make it with: python bench/make_bench_model.py --size 200m")
    size_mb = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.stem)) / 2**20
    inspect_argv = python_snippet(
        "from bitnet_coreml.commands.inspect import inspect_cmd; "
        f"inspect_cmd.main([{str(path)!r}, '--json'], standalone_mode=False)")
    # check exits with its verdict (0 fits / 1 violations); both count as a completed run here
    check_argv = python_snippet(
        "import sys\n"
        "from bitnet_coreml.commands.check import check\n"
        "try:\n"
        f"    check.main([{str(path)!r}, '--target', {args.target!r}, '--chip', {args.chip!r}, '--json'],"
        " standalone_mode=False)\n"
        "except SystemExit as e:\n"
        "    sys.exit(0 if e.code in (0, 1) else e.code)\n")
    runs = interleaved(args.repeat, {"inspect": inspect_argv, "check": check_argv})
    print(f"model: {path} ({size_mb:.0f} MiB on disk, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}), {args.repeat} interleaved runs each")
    runs.print_table()
    runs.print_ratios("check", "inspect", "goal <= 1.1x")


if __name__ == "__main__":
    main()
