"""Check the committed example models against MANIFEST.json and their oracles, without torch.

Runs in the runtime venv (onnx, onnxruntime, numpy, safetensors):

    .venv/bin/python models/check_models.py

For every ONNX model: the files exist, the input/output names, dtypes and shapes and the op histogram
are the ones MANIFEST.json recorded at generation time, and ONNX Runtime on the file reproduces
torch's logits stored in ``<name>.npz`` over ``input_ids`` and the evaluation set ``eval_input_ids``
(cosine >= 0.999, argmax agreement >= 0.99 over all positions). For every
Hugging Face fixture: config.json says ``model_type: bitnet`` with the recorded quantization_config,
the safetensors header has the recorded tensors, and logits.npz has the right shapes.
Prints one line per item and exits 1 on any mismatch.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
MIN_COSINE = 0.999
MIN_ARGMAX = 0.99


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


def check_onnx(name: str, entry: dict[str, Any]) -> list[str]:
    import onnx
    import onnxruntime as ort

    problems: list[str] = []
    path = HERE / entry["file"]
    for fname in entry["files_bytes"]:
        if not (HERE / fname).is_file():
            problems.append(f"{fname}: missing")
    if problems:
        return problems
    proto = onnx.load(str(path), load_external_data=False)
    hist = dict(Counter(n.op_type for n in proto.graph.node))
    if hist != entry["graph"]["op_histogram"]:
        problems.append(f"{path.name}: op histogram {hist} != manifest {entry['graph']['op_histogram']}")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_io = [[i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]]
    want_io = [[i["name"] for i in entry["graph"]["inputs"]], [o["name"] for o in entry["graph"]["outputs"]]]
    if got_io != want_io:
        problems.append(f"{path.name}: I/O names {got_io} != manifest {want_io}")
    data = np.load(HERE / f"{name}.npz")
    ids, ref = data["input_ids"], data["logits"]
    if list(ids.shape) != entry["graph"]["inputs"][0]["shape"] or ids.dtype != np.int64:
        problems.append(f"{name}.npz: input_ids {ids.dtype}{list(ids.shape)} does not match the graph input")
    out = sess.run(None, {got_io[0][0]: ids})[0]
    if out.shape != ref.shape:
        return [*problems, f"{path.name}: ORT output shape {out.shape} != oracle {ref.shape}"]
    if "eval_input_ids" in data.files:
        eval_ids, eval_ref = data["eval_input_ids"], data["eval_logits"]
        if eval_ids.shape[1:] != ids.shape or eval_ref.shape[1:] != ref.shape:
            return [*problems, f"{name}.npz: eval set {eval_ids.shape} / {eval_ref.shape} does not match {ids.shape}"]
        out = np.stack([out, *(sess.run(None, {got_io[0][0]: x})[0] for x in eval_ids)])
        ref = np.stack([ref, *eval_ref])
    else:
        problems.append(f"{name}.npz: no eval_input_ids / eval_logits (regenerate with make_models.py)")
    cos = _cosine(ref, out)
    agree = float(np.mean(ref.reshape(-1, ref.shape[-1]).argmax(-1) == out.reshape(-1, out.shape[-1]).argmax(-1)))
    print(f"{path.name:<24} ORT vs torch: max_abs {np.abs(ref - out).max():.2e} cosine {cos:.6f} argmax {agree:.3f}")
    if cos < MIN_COSINE or agree < MIN_ARGMAX:
        problems.append(f"{path.name}: ORT vs torch cosine {cos:.6f} argmax {agree:.3f} below {MIN_COSINE}/{MIN_ARGMAX}")
    return problems


def check_hf(folder: str, entry: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    root = HERE / folder
    for fname in entry["files_bytes"]:
        if not (root / fname).is_file():
            problems.append(f"{folder}/{fname}: missing")
    if problems:
        return problems
    cfg = json.loads((root / "config.json").read_text())
    if cfg.get("model_type") != "bitnet" or cfg.get("quantization_config") != entry["quantization_config"]:
        problems.append(f"{folder}/config.json: model_type {cfg.get('model_type')!r}, "
                        f"quantization_config {cfg.get('quantization_config')} != manifest")
    # The safetensors header: 8-byte little-endian length, then JSON (no torch needed, bf16 included).
    raw = (root / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    tensors = {k: [v["dtype"], v["shape"]] for k, v in header.items() if k != "__metadata__"}
    if len(tensors) != entry["tensor_count"]:
        problems.append(f"{folder}/model.safetensors: {len(tensors)} tensors, manifest {entry['tensor_count']}")
    for key, want in entry["tensors_sample"].items():
        if tensors.get(key) != want:
            problems.append(f"{folder}/model.safetensors: {key} is {tensors.get(key)}, manifest {want}")
    if ("lm_head.weight" in tensors) != entry["has_lm_head"]:
        problems.append(f"{folder}/model.safetensors: lm_head.weight presence != manifest")
    data = np.load(root / "logits.npz")
    vocab = cfg["vocab_size"]
    for key in ("logits", "logits_native"):
        if data[key].shape != (*data["input_ids"].shape, vocab) or data[key].dtype != np.float32:
            problems.append(f"{folder}/logits.npz: {key} {data[key].dtype}{data[key].shape}")
    print(f"{folder:<40} {entry['linear_class']:<14} {entry['weights']:<8} {len(tensors)} tensors "
          + ("ok" if not problems else "MISMATCH"))
    return problems


def main() -> int:
    manifest = json.loads((HERE / "MANIFEST.json").read_text())
    problems: list[str] = []
    failed = 0
    items = [(check_onnx, k, v) for k, v in manifest["onnx"].items()]
    items += [(check_hf, k, v) for k, v in manifest.get("hf", {}).items()]
    for check, key, entry in items:
        found = check(key, entry)
        failed += bool(found)
        problems += found
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    print(f"{len(items) - failed} passed, {failed} failed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
