"""Generate the large BitNet ONNX exports the benchmarks run on (into bench/_work/, never committed).

Same code path as the bundled models (models/bitnet_export.py: transformers' BitNetForCausalLM,
random init, ternarised), exported with ``torch.onnx.export(..., dynamo=True)``'s defaults (the
``default`` recipe: the exporter's optimizer on), i.e. the graph a user brings. Needs the export venv (``make models`` creates it):

    .venv-export/bin/python bench/make_bench_model.py --size 200m [--form offline|online|packed] [--verify]

Sizes (vocab 32000, sequence 1 x 64, Llama-like GQA with head_dim 64):

| size | hidden | layers | heads/kv | intermediate | params | offline ONNX |
|------|--------|--------|----------|--------------|--------|--------------|
| 50m  | 512    | 8      | 8/2      | 1408         | ~55 M  | ~220 MB      |
| 200m | 1024   | 12     | 16/4     | 2816         | ~200 M | ~830 MB      |
| 800m | 2048   | 16     | 32/8     | 5632         | ~850 M | ~3.4 GB, external data |

Writes ``bench/_work/bitnet_<size>[_<form>].onnx`` (offline form has no suffix), the same name with
``.npz`` (``input_ids`` + torch ``logits``) and ``.json`` (spec, sizes, op histogram, timings, and the
ONNX Runtime vs torch parity when ``--verify``).

``--checkpoint`` writes a Hugging Face checkpoint folder instead, ``bench/_work/hf-<size>/``, in the
microsoft/bitnet-b1.58-2B-4T layout (bf16, packed uint8 ternary weights, ``linear_class bitlinear``,
tied embeddings; same random init), for the generation benchmark (``bench/bench_generate.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))

from bitnet_export import (  # noqa: E402
    FORMS,
    ModelSpec,
    build_model,
    export_onnx,
    graph_facts,
    make_input_ids,
    ort_logits,
    parity,
    random_float_model,
    torch_logits,
)

SIZES: dict[str, dict[str, int]] = {
    "50m": dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1408),
    "200m": dict(hidden=1024, layers=12, heads=16, kv_heads=4, intermediate=2816),
    "800m": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=5632),
}
VOCAB = 32000
SEQ = 64
# protobuf cannot serialise a single file over 2 GiB: larger exports need external data.
PROTOBUF_LIMIT = 2**31


def param_count(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int) -> int:
    """Embedding + untied lm_head + per layer q, k, v, o, gate, up, down (norms are negligible)."""
    kv = kv_heads * (hidden // heads)
    return 2 * vocab * hidden + layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate)


def bench_spec(size: str, form: str, *, external: bool | None = None) -> ModelSpec:
    shape = SIZES[size]
    name = f"bitnet_{size}" if form == "offline" else f"bitnet_{size}_{form}"
    needs_external = param_count(vocab=VOCAB, **shape) * 4 >= PROTOBUF_LIMIT
    return ModelSpec(name=name, form=form, vocab=VOCAB, seq=SEQ, seed=100,
                     external_data=needs_external if external is None else (external or needs_external),
                     **shape)


def _write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        write(fh)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_checkpoint(spec: ModelSpec, folder: Path) -> int:
    """A packed bf16 checkpoint folder of ``spec``'s shape (random init), written atomically."""
    import shutil

    from make_hf_fixtures import checkpoint_layers

    t = time.perf_counter()
    model = random_float_model(spec, tie_word_embeddings=True)
    model.config.max_position_embeddings = 2048
    model = checkpoint_layers(model, dtype="bfloat16", linear_class="bitlinear", weights="packed")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"{folder}: {size / 1e6:.1f} MB in {time.perf_counter() - t:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate a benchmark BitNet ONNX export into bench/_work/.")
    ap.add_argument("--size", choices=sorted(SIZES), default="200m")
    ap.add_argument("--form", choices=FORMS, default="offline")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "_work")
    ap.add_argument("--external", action="store_true", help="save with external data even when < 2 GiB")
    ap.add_argument("--verify", action="store_true", help="run ONNX Runtime on the export and compare to torch")
    ap.add_argument("--checkpoint", action="store_true", help="write a Hugging Face checkpoint folder hf-<size>/")
    args = ap.parse_args(argv)

    spec = bench_spec(args.size, args.form, external=args.external or None)
    out_dir: Path = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        return write_checkpoint(spec, out_dir / f"hf-{args.size}")
    path = out_dir / f"{spec.name}.onnx"
    timings: dict[str, float] = {}

    t = time.perf_counter()
    model = build_model(spec)
    timings["build_s"] = time.perf_counter() - t
    ids = make_input_ids(spec)
    t = time.perf_counter()
    logits = torch_logits(model, ids)
    timings["torch_forward_s"] = time.perf_counter() - t
    _write_atomic(out_dir / f"{spec.name}.npz",
                  lambda fh: np.savez(fh, input_ids=ids, logits=logits.astype(np.float32)))
    t = time.perf_counter()
    names = export_onnx(model, ids, path, external_data=spec.external_data, output_name="logits", recipe=spec.recipe)
    timings["export_s"] = time.perf_counter() - t
    del model

    facts = graph_facts(path)
    files = [path, *(path.parent / loc for loc in facts["external_data"])]
    report: dict[str, object] = {
        "spec": spec.to_dict(),
        "params": param_count(spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.intermediate, spec.vocab),
        "files_bytes": {f.name: f.stat().st_size for f in files},
        "exporter_names": names,
        "graph": facts,
    }
    if args.verify:
        t = time.perf_counter()
        got = ort_logits(path, ids)
        timings["ort_forward_s"] = time.perf_counter() - t
        report["ort_vs_torch"] = parity(logits, got)
    report["timings"] = {k: round(v, 1) for k, v in timings.items()}
    _write_atomic(out_dir / f"{spec.name}.json", lambda fh: fh.write((json.dumps(report, indent=1) + "\n").encode()))

    total = sum(f.stat().st_size for f in files)
    print(f"{path}: {total / 1e6:.1f} MB in {len(files)} file(s); " +
          ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    if "ort_vs_torch" in report:
        print(f"ORT vs torch: {report['ort_vs_torch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
