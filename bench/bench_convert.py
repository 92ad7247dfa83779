"""Benchmark: `bitnet-coreml convert` vs the peer pipeline (onnx2coreml fp16 + palettize "unique"), same run.

Goals (issue 4) on the ~200M-parameter export: our wall time <= 0.1x the peer's, peak RSS <= 0.5x,
package size <= the peer's. Also our convert time and peak RSS for the other sizes present.

    python bench/bench_convert.py [bench/_work/bitnet_200m.onnx] [--sizes 50m,200m,800m] [--no-peer]

Models come from `python bench/make_bench_model.py --size 200m` (not committed). The peer needs the
`bench` extra (`pip install -e '.[bench]'`: onnx2coreml==1.1.0). Each pipeline runs in a fresh
process; wall time and peak RSS come from the kernel (os.wait4).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import python_snippet

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent / "bitnet-coreml"

PEER = """
import sys, warnings
warnings.simplefilter("ignore")
import onnx2coreml, coremltools as ct
from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights
m = onnx2coreml.convert(sys.argv[1], compute_precision="fp16")
m = palettize_weights(m, OptimizationConfig(global_config=OpPalettizerConfig(mode="unique")))
m.save(sys.argv[2])
"""


@dataclass(frozen=True)
class Run:
    wall_s: float
    cpu_s: float  # user + system: the fairer number when other jobs share the cores
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str


def run(argv: list[str]) -> Run:
    """Run ``argv`` in a fresh process; wall, CPU time and peak RSS from the kernel (os.wait4)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return Run(wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024.0, os.waitstatus_to_exitcode(status),
                   out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def _src_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.parent.iterdir()
               if f.name == path.name or f.name.startswith(path.name + ".")) / 2**20


def ours(model: Path, out: Path, extra: list[str]) -> tuple[Run, dict[str, object]]:
    r = run([str(BIN), "convert", str(model), "-o", str(out), "--json", *extra])
    result = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr.strip().splitlines()[-1:]}
    return r, result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="bench/_work/bitnet_200m.onnx")
    ap.add_argument("--sizes", default="50m,200m,800m", help="other exports bench/_work/bitnet_<size>.onnx to time")
    ap.add_argument("--no-peer", action="store_true", help="skip the peer pipeline")
    ap.add_argument("--keep", action="store_true", help="keep the packages (in bench/_work/convert_out)")
    args = ap.parse_args()
    model = Path(args.model)
    if not model.exists():
        raise SystemExit(f"{model} not found; make it with: python bench/make_bench_model.py --size 200m")
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=ROOT / "bench" / "_work"))
    try:
        print(f"model: {model} ({_src_mb(model):.0f} MiB on disk, {os.cpu_count()} cores)")
        out = work / "ours.mlpackage"
        m, res = ours(model, out, [])
        checked = "with check"
        if m.returncode != 0:
            print(f"  ours with the pre-conversion check: exit {m.returncode}: {res.get('error')}; "
                  "measuring with --no-check")
            m, res = ours(model, out, ["--no-check"])
            checked = "--no-check"
        if m.returncode != 0:
            raise SystemExit(f"our convert failed: {res}")
        our_size = _size(out)
        print(f"{'':26}{'wall s':>9}{'CPU s':>9}{'peak RSS MiB':>14}{'package bytes':>15}")
        print(f"{'bitnet-coreml (' + checked + ')':26}{m.wall_s:9.2f}{m.cpu_s:9.2f}{m.peak_rss_mb:14.0f}{our_size:15,}")
        print(f"  stages: {json.dumps(res.get('seconds'))}")
        print(f"  weights {res['weight_bytes'] / 1e6:.1f} MB vs budget {res['weight_budget_bytes'] / 1e6:.1f} MB "
              f"(ratio {res['weight_bytes'] / res['weight_budget_bytes']:.4f}, goal <= 1.02)")
        if not args.no_peer:
            if importlib.util.find_spec("onnx2coreml") is None:
                print("peer: onnx2coreml not installed (pip install -e '.[bench]'); skipped")
            else:
                pout = work / "peer.mlpackage"
                p = run(python_snippet(PEER) + [str(model), str(pout)])
                if p.returncode != 0:
                    print(f"peer pipeline failed with exit {p.returncode} after {p.wall_s:.1f} s, "
                          f"peak RSS {p.peak_rss_mb:.0f} MiB: {p.stderr.strip().splitlines()[-1:]}")
                else:
                    psize = _size(pout)
                    print(f"{'onnx2coreml + palettize':26}{p.wall_s:9.2f}{p.cpu_s:9.2f}{p.peak_rss_mb:14.0f}{psize:15,}")
                    print(f"ours / peer: wall {m.wall_s / p.wall_s:.3f}x, CPU {m.cpu_s / p.cpu_s:.3f}x (goal <= 0.1x), "
                          f"peak RSS {m.peak_rss_mb / p.peak_rss_mb:.3f}x (goal <= 0.5x), "
                          f"package {our_size / psize:.4f}x (goal <= 1x)")
        for size in [s for s in args.sizes.split(",") if s]:
            other = model.parent / f"bitnet_{size}.onnx"
            if other.resolve() == model.resolve():
                continue
            if not other.exists():
                print(f"{size}: {other} not found (python bench/make_bench_model.py --size {size}); skipped")
                continue
            o, r = ours(other, work / f"ours_{size}.mlpackage", ["--no-check"])
            if o.returncode != 0:
                print(f"{size}: convert failed (exit {o.returncode}): {r}")
                continue
            print(f"{size:>6}: wall {o.wall_s:7.2f} s  CPU {o.cpu_s:7.2f} s  peak RSS {o.peak_rss_mb:7.0f} MiB  package "
                  f"{_size(work / f'ours_{size}.mlpackage') / 1e6:8.1f} MB  ({r['params_ternary']:,} ternary + "
                  f"{r['params_other']:,} other params; source {_src_mb(other):.0f} MiB)")
    finally:
        if args.keep:
            dest = ROOT / "bench" / "_work" / "convert_out"
            shutil.rmtree(dest, ignore_errors=True)
            work.rename(dest)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
