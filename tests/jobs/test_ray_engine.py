"""The Ray engine against the local engine on the same dataset, on a local Ray started by the test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bitnet_coreml.jobs import BatchOptions, run_batch
from tests.jobs.helpers import AffineFactory, make_inputs, read_outputs, write_batch_npz, write_jsonl

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install -e '.[ray]')")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_ray() -> object:
    # The actors unpickle the test's factory, so they need the repository on their path.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}})
    yield ray
    ray.shutdown()


def _manifest(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout", ["npz", pytest.param("jsonl", marks=pytest.mark.slow)])
def test_ray_gives_the_local_engines_outputs(tmp_path: Path, local_ray: object, layout: str) -> None:
    xs = make_inputs(24, seed=7)
    ds = tmp_path / f"ds.{layout}"
    write_batch_npz(ds, xs) if layout == "npz" else write_jsonl(ds, xs)
    local = run_batch(AffineFactory(), ds, tmp_path / "local")
    remote = run_batch(AffineFactory(), ds, tmp_path / "ray", BatchOptions(workers=2, engine="ray"))
    assert local["job"] == remote["job"] == {"items": 24, "ok": 24, "failed": 0, "complete": True}
    strip = [{k: v for k, v in r.items() if k != "latency_ms"} for r in _manifest(tmp_path / "local")]
    assert strip == [{k: v for k, v in r.items() if k != "latency_ms"} for r in _manifest(tmp_path / "ray")]
    assert sorted(os.listdir(tmp_path / "local" / "outputs")) == sorted(os.listdir(tmp_path / "ray" / "outputs"))
    assert read_outputs(tmp_path / "ray").keys() == read_outputs(tmp_path / "local").keys()


@pytest.mark.slow
def test_ray_resumes_a_partial_job(tmp_path: Path, local_ray: object) -> None:
    xs = make_inputs(10, seed=8)
    write_batch_npz(tmp_path / "ds.npz", xs)
    out = tmp_path / "out"
    run_batch(AffineFactory(), tmp_path / "ds.npz", out, BatchOptions(workers=2, engine="ray"))
    before = {r["id"]: r["sha256"] for r in _manifest(out)}
    for name in ("3.npz", "7.npz"):
        (out / "outputs" / name).unlink()
    s = run_batch(AffineFactory(), tmp_path / "ds.npz", out, BatchOptions(workers=2, engine="ray"))
    assert (s["run"]["ok"], s["run"]["skipped_done"]) == (2, 8)
    assert {r["id"]: r["sha256"] for r in _manifest(out)} == before


@pytest.mark.slow
def test_ray_logs_stay_off_stderr_unless_verbose(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.jobs.helpers import build_relu_package

    pkg = build_relu_package(tmp_path / "row.mlpackage", (1, 8))
    import numpy as np

    np.savez(tmp_path / "ds.npz", x=np.zeros((4, 8), np.float32))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "bitnet_coreml.cli", "batch", str(pkg), str(tmp_path / "ds.npz"),
                        "-o", str(tmp_path / "o"), "--engine", "ray", "--workers", "1", "--units", "reference",
                        "--no-progress", "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    noise = [line for line in r.stderr.splitlines() if line.strip()]
    assert not noise, noise[:10]
