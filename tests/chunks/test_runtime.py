"""`predict` and `batch` over a chunked folder: one predictor per piece (each with its own fallback chain), the
last piece's outputs equal to the unchunked package's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bitnet_coreml.runtime.chunked import ChunkedPredictor, open_predictor, read_info
from tests.chunks.conftest import run_cli


def test_predict_cli_on_a_folder(tiny: dict[str, Path], tmp_path: Path) -> None:
    ids = np.random.default_rng(5).integers(0, 512, size=(3, 16))
    np.savez(tmp_path / "in.npz", input_ids=ids)
    outs = {}
    for key in ("full", "3"):
        code, out, err = run_cli("predict", tiny[key], "-i", tmp_path / "in.npz", "-o", tmp_path / f"{key}.npz",
                                 "--units", "cpu,reference", "--json")
        assert code == 0, err
        outs[key] = json.loads(out)
    assert np.array_equal(np.load(tmp_path / "full.npz")["logits"], np.load(tmp_path / "3.npz")["logits"])
    doc = outs["3"]
    assert doc["unit"] == "reference"
    assert [n for n in doc["notes"] if n.startswith("piece ")] == [
        "piece 0 (embedding) answered on reference", "piece 1 (layers 0-1) answered on reference",
        "piece 2 (lm_head) answered on reference"]
    assert [p["holds"] for p in doc["recovery_stats"]["pieces"]] == ["embedding", "layers 0-1", "lm_head"]


def test_predictor_api(tiny: dict[str, Path]) -> None:
    p = open_predictor(tiny["2"])
    assert isinstance(p, ChunkedPredictor)
    assert list(p.info.inputs) == ["input_ids"] and p.info.output_names == ("logits",)
    assert read_info(tiny["2"]).inputs.keys() == p.info.inputs.keys()
    p.close()


def test_batch_over_a_folder(tiny: dict[str, Path], tmp_path: Path) -> None:
    ids = np.random.default_rng(6).integers(0, 512, size=(4, 1, 16))
    np.savez(tmp_path / "data.npz", input_ids=ids)
    for key in ("full", "2"):
        code, out, err = run_cli("batch", tiny[key], tmp_path / "data.npz", "-o", tmp_path / f"job{key}",
                                 "--workers", 1, "--json")
        assert code == 0, err
    files = sorted((tmp_path / "jobfull" / "outputs").rglob("*.npz"))
    assert len(files) == 4
    for f in files:
        a = np.load(f)["logits"]
        b = np.load(tmp_path / "job2" / "outputs" / f.relative_to(tmp_path / "jobfull" / "outputs"))["logits"]
        assert np.array_equal(a, b)
