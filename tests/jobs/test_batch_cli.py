"""``bitnet-coreml batch`` end to end on a real .mlpackage (built here with the MIL builder).

The package computes ``y = relu(x) * 3 + 0.5`` in fp32; the oracle is the same formula in numpy. The
CLI runs through the runtime predictor, whose fallback chain ends at the reference executor on Linux.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bitnet_coreml.cli import main
from bitnet_coreml.jobs._io import sha256_file
from tests.jobs.helpers import build_relu_package


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_relu_package(tmp_path_factory.mktemp("pkg") / "tiny.mlpackage", (2, 8))


def _oracle(x: np.ndarray) -> np.ndarray:
    return np.maximum(x.astype(np.float32), 0) * np.float32(3.0) + np.float32(0.5)


def _dataset(tmp: Path, n: int, seed: int = 0) -> tuple[Path, np.ndarray]:
    xs = np.random.default_rng(seed).standard_normal((n, 2, 8)).astype(np.float32)
    path = tmp / "ds.npz"
    np.savez(path, x=xs)
    return path, xs


def test_batch_cli_outputs_match_the_oracle(tmp_path: Path, package: Path) -> None:
    ds, xs = _dataset(tmp_path, 6)
    out = tmp_path / "out"
    args = ["batch", str(package), str(ds), "-o", str(out), "--units", "reference", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["job"]["complete"] and summary["run"]["units"] == {"reference": 6}
    for line in (out / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        with np.load(out / rec["file"]) as z:
            np.testing.assert_allclose(z["y"], _oracle(xs[rec["index"]]), rtol=1e-6)
    # Rerun = resume: nothing left to do.
    again = json.loads(CliRunner().invoke(main, args).stdout)
    assert (again["run"]["processed"], again["run"]["skipped_done"]) == (0, 6)


def test_batch_cli_bad_inputs_are_exit_2(tmp_path: Path, package: Path) -> None:
    ds, _ = _dataset(tmp_path, 2)
    r = CliRunner().invoke(main, ["batch", str(tmp_path / "nope.mlpackage"), str(ds), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "nope.mlpackage" in r.stderr
    r = CliRunner().invoke(main, ["batch", str(package), str(tmp_path / "x.csv"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "x.csv" in r.stderr
    r = CliRunner().invoke(main, ["batch", str(package), str(ds), "-o", str(tmp_path / "o"), "--units", "tpu"])
    assert r.exit_code == 2 and "tpu" in r.stderr


def test_batch_cli_records_failing_items_and_exits_3(tmp_path: Path, package: Path) -> None:
    with open(tmp_path / "ds.jsonl", "w") as f:
        f.write(json.dumps({"id": "good", "x": np.ones((2, 8)).tolist()}) + "\n")
        f.write(json.dumps({"id": "bad-shape", "x": np.ones((3, 8)).tolist()}) + "\n")
    r = CliRunner().invoke(main, ["batch", str(package), str(tmp_path / "ds.jsonl"), "-o", str(tmp_path / "o"),
                                  "--units", "reference", "--json"])
    assert r.exit_code == 3, r.output
    recs = {json.loads(x)["id"]: json.loads(x) for x in (tmp_path / "o" / "manifest.jsonl").read_text().splitlines()}
    assert recs["good"]["status"] == "ok" and recs["bad-shape"]["status"] == "error"
    with np.load(tmp_path / "o" / recs["good"]["file"]) as z:
        np.testing.assert_allclose(z["y"], _oracle(np.ones((2, 8))), rtol=1e-6)


@pytest.mark.slow
def test_cli_killed_with_sigkill_then_resumed_equals_clean_run(tmp_path: Path, package: Path) -> None:
    ds, xs = _dataset(tmp_path, 60, seed=5)
    exe = [sys.executable, "-m", "bitnet_coreml.cli", "batch", str(package), str(ds), "--units", "reference",
           "--workers", "2", "--no-progress", "-o"]
    assert subprocess.run(exe + [str(tmp_path / "clean")], capture_output=True).returncode == 0
    manifest = tmp_path / "crashed" / "manifest.jsonl"
    rng = random.Random(11)
    kills = 0
    for _ in range(3):
        done = manifest.read_bytes().count(b"\n") if manifest.exists() else 0
        if done >= 50:
            break
        target = rng.randint(done + 1, 50)
        p = subprocess.Popen(exe + [str(tmp_path / "crashed")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while p.poll() is None and (not manifest.exists() or manifest.read_bytes().count(b"\n") < target):
            time.sleep(0.005)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            kills += 1
        p.wait(60)
    assert kills >= 1
    assert subprocess.run(exe + [str(tmp_path / "crashed")], capture_output=True).returncode == 0
    clean = [json.loads(x) for x in (tmp_path / "clean" / "manifest.jsonl").read_text().splitlines()]
    crashed = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert [(r["id"], r["sha256"]) for r in crashed] == [(r["id"], r["sha256"]) for r in clean]
    assert len({r["id"] for r in crashed}) == 60
    for r in crashed:
        assert sha256_file(tmp_path / "crashed" / r["file"]) == r["sha256"]
