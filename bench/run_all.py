"""Run every benchmark in one go (what `make bench` runs) and keep a log of the output.

Each benchmark compares against its named peer or baseline in the same run and prints ratios; this
script only runs them in sequence and tees their output to ``bench/_work/bench-<timestamp>.log``.
Benchmarks whose inputs are missing say so and are skipped, never faked.
"""

from __future__ import annotations

import datetime as _dt
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "_work"
M200 = WORK / "bitnet_200m.onnx"

# (name, argv after the interpreter, inputs that must exist)
BENCHES: list[tuple[str, list[str], list[Path]]] = [
    ("inspect vs onnx.load", ["bench/bench_inspect.py", str(M200)], [M200]),
    ("check vs inspect", ["bench/bench_check.py", str(M200)], [M200]),
    ("report vs verify", ["bench/bench_report.py", str(M200)], [M200]),
    ("convert vs onnx2coreml+palettize", ["bench/bench_convert.py", str(M200), "--sizes", "50m,200m"], [M200]),
    ("reference executor vs ONNX Runtime (bundled)", ["bench/bench_executor.py", "--onnx", "models/bitnet_offline.onnx"], []),
    ("reference executor vs ONNX Runtime (200M)", ["bench/bench_executor.py", "--onnx", str(M200)], [M200]),
    ("fallback overhead", ["bench/bench_fallback.py"], []),
    ("batch job overhead", ["bench/bench_batch.py"], []),
    ("HF 2B checkpoint import/convert", ["bench/bench_hf_2b.py"], []),
    ("generate decode vs transformers (200M)", ["bench/bench_generate.py"], [WORK / "hf-200m"]),
    ("stateful package vs stateless (200M shape)", ["bench/bench_stateful.py"], []),
]


def main() -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    log_path = WORK / f"bench-{_dt.datetime.now():%Y%m%d-%H%M%S}.log"
    failed = 0
    with open(log_path, "w") as log:
        for name, argv, needs in BENCHES:
            header = f"\n=== {name}: python {' '.join(argv)}\n"
            sys.stdout.write(header)
            log.write(header)
            missing = [str(p) for p in needs if not p.exists()]
            if missing:
                msg = f"skipped: missing {', '.join(missing)} (make bench-models)\n"
                sys.stdout.write(msg)
                log.write(msg)
                continue
            proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            if proc.wait() != 0:
                failed += 1
                log.write(f"exit code {proc.returncode}\n")
    print(f"\nlog: {log_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
