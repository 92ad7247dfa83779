"""Benchmark: the 2B-shaped checkpoint as a chunked model for iOS (``convert --chunks auto``), vs one package.

Uses the checkpoint ``bench_hf_2b.py`` writes (hidden 2560, 30 layers, vocab 128256, tied bf16 embedding;
written once into ``bench/_work/bitnet-2b-shaped/``). Each step runs in a fresh process (wall time, CPU time
and the kernel's peak RSS, ``os.wait4``):

* ``check``:    ``check FOLDER --target ios --json``: one file does not fit the iOS 1 GB rule; the count it
                suggests (``suggested_chunks``)
* ``chunks``:   ``convert FOLDER -o OUT --target ios --chunks auto`` with fp16 embeddings (no ``--embed-bits``)
* baseline:     ``convert FOLDER -o ONE.mlpackage --target macos`` in the same run: the same model as one
                package (macOS allows 2 GiB per file), the conversion the chunked one is compared with

Then it reads ``OUT/model.json`` and prints every piece's weight file against the 1 GB rule, whether the count
``auto`` chose equals ``check``'s suggestion, and the ratios chunked / one package.

Usage: ``.venv/bin/python bench/bench_chunks.py [--seq-len 128] [--no-baseline]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _measure import run_measured  # noqa: E402
from bench_hf_2b import FOLDER, WORK  # noqa: E402

IOS_LIMIT = 1_000_000_000  # the capability database's ios package_bytes (ANE_FACTS: iPhone ANE 1 GB per file)


def _cli() -> list[str]:
    return [sys.executable, "-m", "bitnet_coreml.cli"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--no-baseline", action="store_true", help="skip the one-package conversion")
    args = ap.parse_args()
    if not (FOLDER / "model.safetensors.index.json").is_file():
        w = run_measured([sys.executable, str(HERE / "bench_hf_2b.py"), "--stage", "write"], quiet=False)
        if w.returncode != 0:
            raise SystemExit(f"writing {FOLDER} failed (exit {w.returncode})")
    seq = ["--seq-len", str(args.seq_len)]

    r = subprocess.run([*_cli(), "check", str(FOLDER), "--target", "ios", *seq, "--json"], capture_output=True,
                       text=True)
    doc = json.loads(r.stdout)
    suggested = (doc.get("suggested_chunks") or {}).get("count")
    print(f"check --target ios: exit {r.returncode}; one file {doc['size']['total_bytes']:,} B vs the limit "
          f"{doc['size']['package_limit_bytes']:,} B; suggested chunks: {suggested} "
          f"({'; '.join((doc.get('suggested_chunks') or {}).get('pieces', []))})")

    out = WORK / "bitnet-2b-shaped-ios-chunks"
    if out.exists():
        shutil.rmtree(out)
    c = run_measured([*_cli(), "convert", str(FOLDER), "-o", str(out), "--target", "ios", "--chunks", "auto", *seq],
                     quiet=False)
    if c.returncode != 0:
        raise SystemExit(f"convert --chunks auto failed (exit {c.returncode})")
    m = json.loads((out / "model.json").read_text())
    print(f"convert --target ios --chunks auto: wall {c.wall_s:.1f} s, CPU {c.cpu_s:.1f} s, peak RSS "
          f"{c.peak_rss_mb:.0f} MB; {len(m['pieces'])} pieces (auto chose {m['chunks']['count']}, check suggested "
          f"{suggested}: {'same' if suggested == m['chunks']['count'] else 'DIFFERENT'})")
    for k, p in enumerate(m["pieces"]):
        ok = "passes" if p["weight_bytes"] <= IOS_LIMIT else "FAILS"
        print(f"  piece {k} {p['path']}: {p['label']}: weight file {p['weight_bytes']:,} B, package "
              f"{p['bytes']:,} B ({ok} the 1 GB iOS rule)")
    if args.no_baseline:
        return
    one = WORK / "bitnet-2b-shaped-one.mlpackage"
    b = run_measured([*_cli(), "convert", str(FOLDER), "-o", str(one), "--target", "macos", *seq], quiet=False)
    if b.returncode != 0:
        raise SystemExit(f"baseline convert failed (exit {b.returncode})")
    print(f"baseline, one package (--target macos): wall {b.wall_s:.1f} s, CPU {b.cpu_s:.1f} s, peak RSS "
          f"{b.peak_rss_mb:.0f} MB")
    print(f"ratio chunked / one package: wall x{c.wall_s / b.wall_s:.2f}, CPU x{c.cpu_s / b.cpu_s:.2f}, "
          f"peak RSS x{c.peak_rss_mb / b.peak_rss_mb:.2f}")


if __name__ == "__main__":
    main()
