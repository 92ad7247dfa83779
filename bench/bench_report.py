"""Benchmark: `report` vs `verify` on the same package, source and input, in the same run.

Goal (issue 17): writing the HTML report of the ~200M-parameter export takes <= 1.2x the wall time of
`verify` on it, and the page is under 2 MB. `report --source --input` runs everything verify runs
(ONNX Runtime on the source, the reference executor on the package, verify's comparisons) plus the
residual-stream captures, op timings, the source's sha256 (in a thread) and the charts; the check and
the per-op units come from the package. Both run as fresh processes, alternately (machine load drifts
hit both alike); best, median and per-pair ratios are shown, for wall time and for CPU time (user +
system, which the other processes on a shared machine inflate less).

    python bench/bench_report.py [bench/_work/bitnet_200m.onnx] [--repeat 3]

The export comes from `python bench/make_bench_model.py --size 200m` (with its .npz beside it); the
package is converted once into bench/_work/ (fp16, macOS M1, calibrated on the .npz).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import interleaved

CLI = [sys.executable, "-m", "bitnet_coreml.cli"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="bench/_work/bitnet_200m.onnx")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    src = Path(args.model)
    npz = src.with_suffix(".npz")
    if not src.exists() or not npz.exists():
        raise SystemExit(f"{src} (+ .npz) not found; make it with: python bench/make_bench_model.py --size 200m")
    pkg = src.with_suffix(".mlpackage")
    html = src.with_suffix(".report.html")
    if not pkg.exists():
        print(f"converting {src} -> {pkg} (once)", flush=True)
        subprocess.run([*CLI, "convert", str(src), "-o", str(pkg), "--target", "macos", "--chip", "M1",
                        "--calibration", str(npz), "--json"], check=True, stdout=subprocess.DEVNULL)
    verify_argv = [*CLI, "verify", str(src), str(pkg), "--input", str(npz), "--json"]
    report_argv = [*CLI, "report", str(pkg), "--source", str(src), "--input", str(npz), "-o", str(html)]
    # 1: verify ran to the end and its parity verdict is "below threshold"
    runs = interleaved(args.repeat, {"verify": verify_argv, "report": report_argv}, ok=(0, 1))
    size = html.stat().st_size
    print(f"package: {pkg} ({sum(f.stat().st_size for f in pkg.rglob('*') if f.is_file()) / 2**20:.0f} MiB), "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, {args.repeat} interleaved runs each")
    runs.print_table(cpu=True)
    runs.print_ratios("report", "verify", "goal <= 1.2x", cpu=True)
    print(f"report page: {html} {size:,} bytes ({size / 2**20:.2f} MiB; goal < 2 MB)")


if __name__ == "__main__":
    main()
