"""The committed example models still match MANIFEST.json and reproduce torch's logits in ORT."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_check_models_script_passes() -> None:
    res = subprocess.run([sys.executable, str(MODELS / "check_models.py")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 failed" in res.stdout
