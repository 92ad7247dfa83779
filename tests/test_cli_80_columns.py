"""Human output at 80 columns (issue 19 items 7 and 11): no number or id cut short, failures name the
metric and threshold, `info` short, one name per node, no internal words.

Run with COLUMNS=80, as a user's terminal would be.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bitnet_coreml.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "models" / "bitnet_offline.onnx")


class _Result:
    def __init__(self, r: Any) -> None:
        self.returncode, self.stdout, self.stderr = r.exit_code, r.stdout, r.stderr


def _cli(*args: str) -> _Result:
    return _Result(CliRunner().invoke(main, list(args), env={"COLUMNS": "80"}))


def _no_cuts(text: str) -> None:
    assert "…" not in text, text
    assert all(len(line) <= 80 for line in text.splitlines()), max(text.splitlines(), key=len)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "bitnet.mlpackage"
    assert _cli("convert", MODEL, "-o", str(out), "--json").returncode == 0
    return out


def test_parity_tables_keep_every_number_whole(package: Path) -> None:
    r = _cli("verify", MODEL, str(package), "--input", str(ROOT / "models" / "bitnet_offline.npz"))
    assert r.returncode == 0, r.stderr
    _no_cuts(r.stdout)
    doc = json.loads(_cli("verify", MODEL, str(package), "--input", str(ROOT / "models" / "bitnet_offline.npz"),
                          "--json").stdout)
    for c in doc["comparisons"]:
        assert f"{c['cosine']:.6f}" in r.stdout


def test_a_failed_verify_names_the_metric_and_threshold(package: Path) -> None:
    r = _cli("verify", MODEL, str(package), "--min-cosine", "0.9999999")
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert re.search(r"^error: parity failed: .*cosine 0\.\d+ < 0\.9999999", line), line


def test_check_and_info_fit_80_columns_without_internal_words() -> None:
    r = _cli("check", MODEL, "--target", "ios", "--chip", "A17Pro")
    assert r.returncode == 0, r.stderr
    _no_cuts(r.stdout)
    info = _cli("info")
    assert info.returncode == 0
    _no_cuts(info.stdout)
    assert len(info.stdout.splitlines()) <= 100
    for out in (r.stdout, info.stdout):
        assert "ANE_FACTS" not in out and not re.search(r"\bseed\b", out), out


def test_one_name_per_node_in_check_and_convert(package: Path) -> None:
    check = json.loads(_cli("check", MODEL, "--json").stdout)
    nodes = {f["node"] for f in check["fixed"] if f["node"] and f["rule"].startswith("fp16")}
    assert nodes
    meta = json.loads(_cli("inspect", str(package), "--json").stdout)["metadata"]
    converted = meta["bitnet_coreml.check"]
    for n in nodes:
        assert n in converted, (n, converted[:300])


def test_batch_help_names_the_job_folder() -> None:
    r = _cli("batch", "--help")
    assert "JOBDIR" in r.stdout and "OUTDIR" not in r.stdout
