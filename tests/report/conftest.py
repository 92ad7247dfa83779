"""One converted bundled model and its report (HTML + JSON), shared by the report tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from bitnet_coreml.cli import main

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "bitnet_offline.onnx"
NPZ = ROOT / "models" / "bitnet_offline.npz"


def run_cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


@dataclass
class Built:
    package: Path
    html: Path
    data: dict  # type: ignore[type-arg]


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    d = tmp_path_factory.mktemp("report")
    pkg = d / "bitnet.mlpackage"
    code, _, err = run_cli("convert", MODEL, "-o", pkg, "--target", "macos", "--chip", "M1",
                           "--calibration", NPZ, "--json")
    assert code == 0, err
    html = d / "bitnet.report.html"
    code, out, err = run_cli("report", pkg, "--source", MODEL, "--input", NPZ, "-o", html, "--json")
    assert code == 0, err
    return Built(pkg, html, json.loads(out))


@pytest.fixture(scope="session")
def chunked(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The bundled model converted as a folder of two pieces (``convert --chunks 2 --report``: the page), and the
    report's data (``report FOLDER --json``, on the same source and input as the convert's report)."""
    d = tmp_path_factory.mktemp("report_chunked")
    folder = d / "bitnet2"
    html = d / "bitnet2.report.html"
    code, _, err = run_cli("convert", MODEL, "-o", folder, "--chunks", 2, "--target", "macos", "--chip", "M1",
                           "--calibration", NPZ, "--report", html, "--json")
    assert code == 0, err
    code, out, err = run_cli("report", folder, "--source", MODEL, "--input", NPZ, "--json")
    assert code == 0, err
    return Built(folder, html, json.loads(out))
