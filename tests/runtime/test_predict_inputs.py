"""``predict`` takes the arrays the package needs from a file (issue 19): the README's own example.

The bundled ``models/bitnet_offline.npz`` holds the model input and torch's logits for it, plus an
8-row evaluation set with torch's logits: torch is the independent oracle here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bitnet_coreml.cli import main

ROOT = Path(__file__).resolve().parents[2]
NPZ = ROOT / "models" / "bitnet_offline.npz"


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "bitnet.mlpackage"
    r = CliRunner().invoke(main, ["convert", str(ROOT / "models" / "bitnet_offline.onnx"), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    return out


def _agree(got: np.ndarray, want: np.ndarray) -> None:
    got, want = got.reshape(-1, got.shape[-1]).astype(np.float64), want.reshape(-1, want.shape[-1]).astype(np.float64)
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() > 0.999
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.99


def test_readme_predict_example_ignores_other_arrays_with_a_note(package: Path, tmp_path: Path) -> None:
    out = tmp_path / "logits.npz"
    r = CliRunner().invoke(main, ["predict", str(package), "--input", str(NPZ), "-o", str(out),
                                  "--units", "ane,gpu,cpu,reference", "--json"])
    assert r.exit_code == 0, r.output
    notes = json.loads(r.stdout)["notes"]
    assert any("ignored eval_input_ids, eval_logits, logits" in n for n in notes), notes
    with np.load(NPZ) as z, np.load(out) as got:
        _agree(got["logits"], z["logits"])
    strict = CliRunner().invoke(main, ["predict", str(package), "--input", str(NPZ), "--strict"])
    assert strict.exit_code == 2 and "unexpected eval_input_ids" in strict.stderr


def test_a_token_matrix_is_predicted_row_by_row(package: Path, tmp_path: Path) -> None:
    with np.load(NPZ) as z:
        ids, want = z["eval_input_ids"][:, 0, :], z["eval_logits"][:, 0]  # (8, 16) tokens, (8, 16, vocab)
    np.savez(tmp_path / "rows.npz", input_ids=ids)
    out = tmp_path / "y.npz"
    r = CliRunner().invoke(main, ["predict", str(package), "--input", str(tmp_path / "rows.npz"), "-o", str(out),
                                  "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["batch_size"] == 8
    with np.load(out) as got:
        assert got["logits"].shape == want.shape
        _agree(got["logits"], want)
