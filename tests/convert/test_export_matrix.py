"""The export-recipe matrix (issue 12): every way torch exports BitNet converts and matches torch.

``models/exports/`` is written by ``models/make_export_matrix.py`` (export venv): one graph per
recipe (dynamo with and without its optimizer, TorchScript, opsets 17/18/23/newest, fp16 and bf16
models, external data in one or many files, dynamic axes, onnxsim, ONNX Runtime's basic
optimisations, the three weight forms under the exporter's defaults) and torch's logits for each model.
The oracle is torch (the ``.npz``), never the converter.

Gates (issue 12): fp32 packages of fp32 sources cosine >= 0.99999; fp16 packages (and anything made
from an fp16 source) cosine >= 0.999; top-1 >= 98% on the positions whose reference top-1/top-2
margin is at least 0.1x that row's standard deviation (a margin fp16 noise cannot flip). Every
BitNet linear must be fused: a graph converted as float MatMuls would match torch too.
Rows the converter cannot support are refused by the CLI with exit 2 and one line, no traceback,
nothing written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitnet_coreml.convert import ConvertOptions, convert

EXPORTS = Path(__file__).resolve().parents[2] / "models" / "exports"
MATRIX: dict[str, Any] = json.loads((EXPORTS / "MATRIX.json").read_text()) if (EXPORTS / "MATRIX.json").is_file() \
    else {"rows": {}}
ROWS: dict[str, dict[str, Any]] = MATRIX["rows"]
CONVERT = sorted(n for n, r in ROWS.items() if r["expect"] == "convert")
REFUSE = sorted(n for n, r in ROWS.items() if r["expect"] == "refuse")
# fp16 packages of every row are in the default suite only where fp16 says something the fp32 package
# does not: the default graphs, the fp16 source, the dynamic one, opset 17 (fused-op bodies for old opsets).
# The rest run under -m slow.
FP16_FAST = {"dynamo_default", "twin_bitnet_online", "twin_bitnet_packed", "fp16", "dynamic", "torchscript_opset17"}
MARGIN = 0.1  # x the row's standard deviation


def _params() -> list[Any]:
    out = []
    for name in CONVERT:
        for precision in ("fp32", "fp16"):
            marks = [pytest.mark.slow] if precision == "fp16" and name not in FP16_FAST else []
            out.append(pytest.param(name, precision, marks=marks, id=f"{name}-{precision}"))
    return out


def _linears(row: dict[str, Any]) -> int:
    """7 BitNet linears per layer (q, k, v, o, gate, up, down), from the config that made the model."""
    if row["model"].startswith("tiny"):
        return 7 * int(MATRIX["tiny"]["spec"]["layers"])
    manifest = json.loads((EXPORTS.parent / "MANIFEST.json").read_text())["onnx"]
    return 7 * int(manifest[row["model"]]["spec"]["layers"])


def _seq_len(args: list[str]) -> int | None:
    return int(args[args.index("--seq-len") + 1]) if "--seq-len" in args else None


def _oracle(row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(EXPORTS / row["oracle"])
    ids = np.concatenate([data["input_ids"][None], data["eval_input_ids"]])
    logits = np.concatenate([data["logits"][None], data["eval_logits"]])
    return ids, logits


def _gates(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, int]:
    """(cosine, top-1 agreement over decisive positions, number of decisive positions)."""
    r = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    g = got.reshape(-1, got.shape[-1]).astype(np.float64)
    cos = float(r.ravel() @ g.ravel() / (np.linalg.norm(r) * np.linalg.norm(g)))
    top2 = np.sort(r, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) >= MARGIN * r.std(axis=-1)
    agree = r.argmax(-1) == g.argmax(-1)
    return cos, float(agree[decisive].mean()), int(decisive.sum())


@pytest.mark.skipif(not ROWS, reason="no export matrix in models/exports (make export-matrix)")
@pytest.mark.parametrize(("name", "precision"), _params())
def test_recipe_converts_and_matches_torch(name: str, precision: str, tmp_path: Path) -> None:
    from bitnet_coreml.executor.executor import ReferenceExecutor

    row = ROWS[name]
    out = tmp_path / f"{name}.mlpackage"
    r = convert(EXPORTS / row["file"], out, ConvertOptions(precision=precision, check=False,
                                                          seq_len=_seq_len(row["convert_args"])))
    assert r.bitlinear_layers == _linears(row), "every BitNet linear must be fused"
    ids, ref = _oracle(row)
    ex = ReferenceExecutor(str(out))
    got = np.stack([ex.predict({"input_ids": x.astype(np.int32)})["logits"] for x in ids])
    assert got.shape == ref.shape
    cos, top1, decisive = _gates(ref, got)
    assert decisive >= 0.5 * ids.size, decisive  # trained models: most positions are decisive
    if precision == "fp32" and row["dtype"] == "float32":
        assert cos >= 0.99999, (cos, top1)
        assert top1 == 1.0, (cos, top1)
    else:
        assert cos >= 0.999, (cos, top1)
        assert top1 >= 0.98, (cos, top1)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "bitnet_coreml.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def _assert_refused(proc: subprocess.CompletedProcess[str], phrase: str, out: Path) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()


@pytest.mark.skipif(not REFUSE, reason="no refused rows in the export matrix")
@pytest.mark.parametrize("name", REFUSE)
def test_unsupported_recipe_is_refused_in_one_line(name: str, tmp_path: Path) -> None:
    row = ROWS[name]
    out = tmp_path / "m.mlpackage"
    _assert_refused(_cli("convert", str(EXPORTS / row["file"]), "-o", str(out)), row["refusal"], out)


@pytest.mark.skipif("dynamic" not in ROWS, reason="no dynamic row in the export matrix")
@pytest.mark.parametrize(("extra", "phrase"), [((), "--seq-len N"), (("--seq-len", "0"), "--seq-len 0 is out of range")])
def test_dynamic_axes_need_a_sequence_length(extra: tuple[str, ...], phrase: str, tmp_path: Path) -> None:
    out = tmp_path / "m.mlpackage"
    src = EXPORTS / ROWS["dynamic"]["file"]
    _assert_refused(_cli("convert", str(src), "-o", str(out), *extra), phrase, out)


@pytest.mark.skipif("dynamic" not in ROWS, reason="no dynamic row in the export matrix")
def test_dynamic_axes_convert_at_another_length(tmp_path: Path) -> None:
    """Causal: torch's logits for the first 8 tokens are the first 8 rows of its logits for 16."""
    from bitnet_coreml.executor.executor import ReferenceExecutor

    row = ROWS["dynamic"]
    out = tmp_path / "m8.mlpackage"
    convert(EXPORTS / row["file"], out, ConvertOptions(precision="fp32", check=False, seq_len=8))
    ids, ref = _oracle(row)
    ex = ReferenceExecutor(str(out))
    got = np.stack([ex.predict({"input_ids": x[:, :8].astype(np.int32)})["logits"] for x in ids])
    cos, top1, _ = _gates(ref[:, :, :8], got)
    assert cos >= 0.99999 and top1 == 1.0, (cos, top1)


def test_matrix_covers_the_issue() -> None:
    """The recipes issue 12 lists are all present (as rows, or as probes of what torch cannot export)."""
    if not ROWS:
        pytest.skip("no export matrix")
    want = {"dynamo_default", "dynamo_raw", "dynamo_opset18", "dynamo_opset23", "torchscript_opset17", "fp16", "bf16",
            "external_many_files", "dynamic", "onnxsim", "ort_basic", "dynamo_default_online", "dynamo_default_packed",
            "twin_bitnet_online", "twin_bitnet_packed"}
    assert want <= set(ROWS)
    assert {"dynamo_opset17", "torchscript_as_is"} <= set(MATRIX["not_exportable"])
    default = ROWS["dynamo_default"]
    assert default["graph"]["external_data"], "the exporter's default layout is external data"
    assert len(ROWS["external_many_files"]["graph"]["external_data"]) >= 8
    assert any(d == "sequence" for d in ROWS["dynamic"]["graph"]["inputs"][0]["shape"])
