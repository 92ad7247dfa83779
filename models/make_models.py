"""Regenerate the bundled example models: real ONNX exports of transformers' BitNetForCausalLM.

Usage (from the repository root; ``make models`` does this with the ``.venv-export`` venv):

    .venv-export/bin/python models/make_models.py [--only NAME ...] [--skip-hf] [--skip-gguf] [--skip-example-lm]

For every model in ``MODELS`` it builds a small ``BitNetForCausalLM``, trains it for a few hundred
steps with ternary weights in the loop on a seeded synthetic Markov corpus (``TRAIN``; see
bitnet_export.py: random-init logits are too flat for an argmax criterion to mean anything), and
writes ``models/<name>.onnx`` (plus ``<name>.onnx.data`` for external data) and ``models/<name>.npz``
with torch's outputs, the oracle for every parity test: ``input_ids`` (int64 ``[1, 16]``) and
``logits`` (float32 ``[1, 16, vocab]``), and an evaluation set from the same corpus,
``eval_input_ids`` (int64 ``[8, 1, 16]``) and ``eval_logits`` (float32 ``[8, 1, 16, vocab]``).
It then runs ONNX Runtime on the saved file over all 144 positions and refuses (exit 1) when ORT
does not reproduce torch (cosine < 0.999 or argmax agreement < 0.99), when the graph does not carry
the weight form the model is meant to show (op counts), or when replacing some RMSNorm gamma by ones
would leave torch's logits at cosine >= 0.9999 (a converter dropping it would go unnoticed).
Finally it writes the Hugging Face checkpoint fixtures (``models/hf/``, see make_hf_fixtures.py),
the GGUF fixtures (``models/gguf/``, see make_gguf_fixtures.py), trains the example language model
(``models/example-lm/``, see make_example_lm.py) and ``models/MANIFEST.json`` with every file's config,
I/O names, op histogram and parity numbers.

Everything is seeded: running it twice gives the same tensors and the same numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bitnet_export import (
    ModelSpec,
    TrainSpec,
    build_trained_model,
    chain_input_ids,
    export_onnx,
    gamma_drop_cosines,
    graph_facts,
    ort_logits,
    parity,
    torch_logits,
)

log = logging.getLogger("make_models")

HERE = Path(__file__).resolve().parent

# The default model (`make convert`, pipelines/default.toml) is bitnet_offline.onnx.
DEFAULT_MODEL = "bitnet_offline"

MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(name="bitnet_offline", form="offline", vocab=1024, hidden=128, layers=2, heads=4, kv_heads=2,
              intermediate=344, seed=0),
    # online / packed keep every linear in their weight form ("form" recipe); their default-export
    # twins (small weights folded by the exporter) are in the export-recipe matrix (make_export_matrix.py).
    ModelSpec(name="bitnet_online", form="online", vocab=512, hidden=64, layers=2, heads=4, kv_heads=2,
              intermediate=172, seed=1, recipe="form"),
    ModelSpec(name="bitnet_packed", form="packed", vocab=512, hidden=64, layers=2, heads=4, kv_heads=2,
              intermediate=172, seed=2, recipe="form"),
    ModelSpec(name="bitnet_external", form="offline", vocab=512, hidden=64, layers=1, heads=4, kv_heads=2,
              intermediate=172, seed=3, external_data=True),
    # vocab > 16384: the converter must split the lm_head / gather (ANE dimension limit).
    # hidden 16 keeps its two 17000-row tables small; 2 heads / 1 KV head is the MQA corner of GQA.
    ModelSpec(name="bitnet_bigvocab", form="offline", vocab=17000, hidden=16, layers=1, heads=2, kv_heads=1,
              intermediate=44, seed=4),
)

# Training of each model (models/bitnet_export.py: a seeded sparse Markov chain over `states` ids
# spread over the whole vocabulary, a few hundred steps of quantisation-aware training). The small
# vocabularies use every id, so uniformly random tokens (what `verify` feeds by default) are in the
# chain's support too; bitnet_bigvocab's hidden size 16 holds a few hundred states.
TRAIN: dict[str, TrainSpec] = {
    spec.name: TrainSpec(states=spec.vocab, seed=spec.seed) for spec in MODELS if spec.vocab <= 16384
}
TRAIN["bitnet_bigvocab"] = TrainSpec(states=256, lr=1e-2, seed=4)  # ids in all 256 bins of [0, 17000)

# ORT must reproduce torch on the trained models' confident logits (all 144 positions: 1.0 measured).
MIN_COSINE = 0.999
MIN_ARGMAX = 0.99
# Dropping any RMSNorm gamma (replacing it by ones) must move torch's logits below the converter's
# fp32 parity gate (cosine 0.9999), or the fixture could not catch a converter that drops one.
MAX_GAMMA_DROP_COSINE = 0.9999


def expected_form_ops(spec: ModelSpec) -> dict[str, int]:
    """Op counts that hold only if every BitNet linear kept the weight form the spec names."""
    # 7 BitNet linears per layer; q/k/v and gate/up share their input, and the optimizer's common
    # subexpression elimination merges their activation quantisation: 4 Round per layer.
    n_lin = 7 * spec.layers
    n_act = 4 * spec.layers
    if spec.form == "offline":
        return {"Round": n_act, "BitwiseAnd": 0}
    if spec.form == "online":
        return {"Round": n_act + n_lin, "BitwiseAnd": 0}  # + one WeightQuant per linear
    return {"Round": n_act, "BitwiseAnd": 4 * n_lin}  # 4 two-bit fields unpacked per linear


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, **arrays)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def make_one(spec: ModelSpec, out_dir: Path) -> tuple[dict[str, Any], dict[str, float]]:
    train = TRAIN[spec.name]
    t0 = time.perf_counter()
    model, chain, train_stats = build_trained_model(spec, train)
    t_train = time.perf_counter() - t0
    ids, eval_ids = chain_input_ids(spec, chain, train)
    logits = torch_logits(model, ids)
    eval_logits = np.stack([torch_logits(model, x) for x in eval_ids])
    path = out_dir / f"{spec.name}.onnx"
    t1 = time.perf_counter()
    export_onnx(model, ids, path, external_data=spec.external_data, output_name=spec.output_name,
                recipe=spec.recipe)
    t_export = time.perf_counter() - t1
    _save_npz(out_dir / f"{spec.name}.npz", input_ids=ids, logits=logits.astype(np.float32),
              eval_input_ids=eval_ids, eval_logits=eval_logits.astype(np.float32))

    facts = graph_facts(path)
    want = expected_form_ops(spec)
    got = {op: facts["op_histogram"].get(op, 0) for op in want}
    if got != want:
        raise RuntimeError(f"{path.name}: weight form {spec.form!r} not intact: op counts {got}, expected {want}")
    if [i["name"] for i in facts["inputs"]] != ["input_ids"]:
        raise RuntimeError(f"{path.name}: inputs {facts['inputs']}, expected one named input_ids")

    ort_all = np.stack([ort_logits(path, x) for x in [ids, *eval_ids]])
    par = parity(np.stack([logits, *eval_logits]), ort_all)
    if par["cosine"] < MIN_COSINE or par["argmax_agreement"] < MIN_ARGMAX:
        raise RuntimeError(f"{path.name}: ONNX Runtime does not reproduce torch: {par}")

    drops = gamma_drop_cosines(model, np.concatenate([ids[None], eval_ids]))
    worst = max(drops, key=lambda k: drops[k])
    if drops[worst] >= MAX_GAMMA_DROP_COSINE:
        raise RuntimeError(f"{path.name}: replacing {worst} by ones leaves cosine {drops[worst]:.6f} "
                           f">= {MAX_GAMMA_DROP_COSINE}: a converter that drops it would pass the fp32 gate")

    ref = np.concatenate([logits, *eval_logits]).reshape(-1, spec.vocab).astype(np.float64)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    files = [path, *(path.parent / loc for loc in facts["external_data"]), out_dir / f"{spec.name}.npz"]
    return {
        "file": path.name,
        "default": spec.name == DEFAULT_MODEL,
        "spec": spec.to_dict(),
        "training": {**train.to_dict(), "chain_states": len(chain.tokens),
                     "chain_max_token": int(chain.tokens.max()),
                     **{k: round(v, 4) for k, v in train_stats.items()}},
        "oracle": {"positions": int(ref.shape[0]), "top2_gap_min": round(float(gap.min()), 4),
                   "top2_gap_median": round(float(np.median(gap)), 4),
                   "logit_abs_max": round(float(np.abs(ref).max()), 3)},
        "gamma_drop_max_cosine": {"norm": worst, "cosine": round(drops[worst], 6)},
        "graph": facts,
        "ort_vs_torch": par,
        "files_bytes": {f.name: f.stat().st_size for f in files},
    }, {"train_s": t_train, "export_s": t_export}


def _write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=False)
        fh.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="model names to regenerate (default: all)")
    ap.add_argument("--skip-hf", action="store_true", help="do not rewrite the models/hf fixtures")
    ap.add_argument("--skip-gguf", action="store_true", help="do not rewrite the models/gguf fixtures")
    ap.add_argument("--skip-example-lm", action="store_true",
                    help="do not retrain the example language model (models/example-lm, ~15 CPU minutes)")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)

    out_dir: Path = args.out.resolve()
    manifest_path = out_dir / "MANIFEST.json"
    manifest: dict[str, Any] = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.setdefault("onnx", {})
    import onnx
    import onnxruntime
    import torch
    import transformers

    manifest["generated_with"] = {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
    }
    manifest["default_model"] = f"{DEFAULT_MODEL}.onnx"
    names = set(args.only or [m.name for m in MODELS])
    unknown = names - {m.name for m in MODELS}
    if unknown:
        print(f"unknown model(s) {sorted(unknown)}; known: {[m.name for m in MODELS]}", file=sys.stderr)
        return 2
    failed = False
    for spec in MODELS:
        if spec.name not in names:
            continue
        try:
            entry, times = make_one(spec, out_dir)
        except RuntimeError as exc:
            print(f"FAIL {exc}", file=sys.stderr)
            failed = True
            continue
        manifest["onnx"][spec.name] = entry
        p = entry["ort_vs_torch"]
        print(f"{entry['file']:<24} {spec.form:<8} {sum(entry['files_bytes'].values()) / 1e6:6.2f} MB  "
              f"ORT vs torch: max_abs {p['max_abs']:.2e} cosine {p['cosine']:.6f} "
              f"argmax {p['argmax_agreement']:.3f}  (train {times['train_s']:.1f} s, "
              f"export {times['export_s']:.1f} s; loss {entry['training']['loss_first']:.2f} -> "
              f"{entry['training']['loss_last']:.2f}, chain entropy {entry['training']['chain_entropy_nats']:.2f})")
    if not args.skip_hf:
        from make_hf_fixtures import make_all

        manifest["hf"] = {r["folder"]: r for r in make_all(out_dir / "hf")}
        for folder, r in manifest["hf"].items():
            print(f"{folder:<40} {r['linear_class']:<14} {r['weights']:<8} {r['dtype']:<9} "
                  f"native vs fp32 cosine {r['native_vs_fp32']['cosine']:.6f}")
        from make_stateful_fixtures import main as make_stateful  # models/hf_stateful: DynamicCache oracles

        make_stateful(out_dir)
    if not args.skip_gguf:
        from make_gguf_fixtures import make_all as make_gguf

        g = make_gguf(out_dir / "gguf")  # writes models/gguf/MANIFEST.json
        for f in [*g["gguf"], *g["llama"]["files"]]:
            print(f"gguf/{f['file']:<36} {f['type']:<6} {f['bytes'] / 1e6:6.2f} MB")
    if not args.skip_example_lm and not args.only:
        from make_example_lm import main as make_example_lm

        make_example_lm(["--out", str(out_dir)])
    _write_json(manifest_path, manifest)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
