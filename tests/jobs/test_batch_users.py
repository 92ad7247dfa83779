"""What a data engineer trips over in ``batch`` (issue 19): thread budgets, token matrices, extra
arrays, restart, SIGTERM, plain progress lines and an ETA from this run's items.

The package computes ``y = relu(x) * 3 + 0.5`` for one ``[1, 8]`` row; the oracle is that formula.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bitnet_coreml.cli import main
from bitnet_coreml.jobs import BatchOptions, run_batch
from tests.jobs.helpers import ThreadProbeFactory, build_relu_package, make_inputs, write_folder


@pytest.fixture(scope="module")
def row_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_relu_package(tmp_path_factory.mktemp("pkg") / "row.mlpackage", (1, 8))


def _oracle(x: np.ndarray) -> np.ndarray:
    return np.maximum(x.astype(np.float32), 0) * np.float32(3.0) + np.float32(0.5)


def _run(*args: str) -> object:
    return CliRunner().invoke(main, ["batch", *args])


def test_two_workers_split_the_cores_instead_of_each_taking_all(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    write_folder(tmp_path / "ds", make_inputs(4))
    run_batch(ThreadProbeFactory(), tmp_path / "ds", tmp_path / "out", BatchOptions(workers=2))
    want = max(1, cores // 2)
    for f in sorted((tmp_path / "out" / "outputs").glob("*.npz")):
        with np.load(f) as z:
            assert int(z["omp_env"].reshape(-1)[0]) == want
            assert z["blas"].tolist() and all(int(t) == want for t in z["blas"]), z["blas"]


def test_token_matrix_rows_fit_a_batch_one_package_and_extra_arrays_are_ignored(tmp_path: Path,
                                                                                row_package: Path) -> None:
    xs = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)  # (N, 8): no per-row batch axis
    np.savez(tmp_path / "ds.npz", x=xs, labels=np.arange(5))
    r = _run(str(row_package), str(tmp_path / "ds.npz"), "-o", str(tmp_path / "o"), "--units", "reference",
             "--workers", "1", "--json")
    assert r.exit_code == 0, r.output
    for line in (tmp_path / "o" / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        with np.load(tmp_path / "o" / rec["file"]) as z:
            np.testing.assert_allclose(z["y"], _oracle(xs[rec["index"]][None]), rtol=1e-6)
    strict = _run(str(row_package), str(tmp_path / "ds.npz"), "-o", str(tmp_path / "s"), "--units", "reference",
                  "--workers", "1", "--strict", "--json")
    assert strict.exit_code == 3
    assert "labels" in json.loads(strict.stdout)["run"]["failures"][0]["error"]


def test_workers_default_is_one_per_core(tmp_path: Path, row_package: Path) -> None:
    np.savez(tmp_path / "ds.npz", x=np.zeros((2, 8), np.float32))
    r = _run(str(row_package), str(tmp_path / "ds.npz"), "-o", str(tmp_path / "o"), "--units", "reference", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["workers"] == len(os.sched_getaffinity(0))
    bad = _run(str(row_package), str(tmp_path / "ds.npz"), "-o", str(tmp_path / "p"), "--workers", "0")
    assert bad.exit_code == 2 and "auto" in bad.stderr


def test_restart_discards_an_earlier_job(tmp_path: Path, row_package: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 8), np.float32))
    np.savez(tmp_path / "b.npz", x=np.ones((3, 8), np.float32))
    base = [str(row_package), "-o", str(tmp_path / "o"), "--units", "reference", "--workers", "1", "--json"]
    assert _run(base[0], str(tmp_path / "a.npz"), *base[1:]).exit_code == 0
    other = _run(base[0], str(tmp_path / "b.npz"), *base[1:])
    assert other.exit_code == 2 and "--restart" in other.stderr
    fresh = _run(base[0], str(tmp_path / "b.npz"), *base[1:], "--restart")
    assert fresh.exit_code == 0, fresh.output
    s = json.loads(fresh.stdout)
    assert (s["resumed"], s["run"]["ok"], s["job"]["items"]) == (False, 3, 3)
    assert len((tmp_path / "o" / "manifest.jsonl").read_text().splitlines()) == 3


def test_progress_is_plain_log_lines_without_a_terminal(tmp_path: Path, row_package: Path) -> None:
    np.savez(tmp_path / "ds.npz", x=np.zeros((3, 8), np.float32))
    r = _run(str(row_package), str(tmp_path / "ds.npz"), "-o", str(tmp_path / "o"), "--units", "reference",
             "--workers", "1")
    assert r.exit_code == 0, r.output
    lines = [x for x in r.stderr.splitlines() if x.startswith("batch: ")]
    assert lines and lines[-1].startswith("batch: 3/3 done"), r.stderr


def test_eta_counts_only_items_predicted_in_this_run() -> None:
    from bitnet_coreml.commands.batch import _eta
    from bitnet_coreml.jobs.batch import BatchEvent

    # 1000 items, 900 done by an earlier run (skipped in 0 s), 50 predicted now in 10 s: 50 left at 5/s = 10 s.
    ev = BatchEvent(total=1000, completed=950, ok=50, failed=0, skipped=900, to_do=100)
    assert _eta(ev, 10.0) == "0:00:10"


def test_sigterm_is_handled_like_ctrl_c(tmp_path: Path, row_package: Path) -> None:
    np.savez(tmp_path / "ds.npz", x=np.zeros((4000, 8), np.float32))
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "-m", "bitnet_coreml.cli", "batch", str(row_package),
                          str(tmp_path / "ds.npz"), "-o", str(out), "--units", "reference", "--workers", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline and (
            not manifest.exists() or manifest.read_bytes().count(b"\n") < 5):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "terminated" in err and "resume" in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and 0 < summary["job"]["ok"] < 4000


@pytest.mark.parametrize("fmt", ["npz-shards", "parquet"])
def test_combined_outputs_one_file_per_shard_and_still_resumable(tmp_path: Path, fmt: str) -> None:
    from bitnet_coreml.jobs.shards import read_shard
    from tests.jobs.helpers import AffineFactory, affine, write_batch_npz

    if fmt == "parquet":
        pytest.importorskip("pyarrow", reason="parquet output needs pyarrow (the ray or parquet extra)")
    xs = make_inputs(7, shape=(2, 3), seed=4)
    xs[4] = np.full((2, 3), np.nan, np.float32)  # fails: its shard (items 3-5) stays per-item files
    write_batch_npz(tmp_path / "ds.npz", xs)
    opts = BatchOptions(workers=1, output_format=fmt, shard_size=3)
    s = run_batch(AffineFactory(), tmp_path / "ds.npz", tmp_path / "o", opts)
    suffix = ".npz" if fmt == "npz-shards" else ".parquet"
    assert s["shards"]["files"] == [f"outputs/shard-00000{suffix}", f"outputs/shard-00002{suffix}"]
    files = sorted(p.name for p in (tmp_path / "o" / "outputs").iterdir())
    assert files == sorted([f"shard-00000{suffix}", f"shard-00002{suffix}", "3.npz", "5.npz"])
    for name, rows in ((f"shard-00000{suffix}", [0, 1, 2]), (f"shard-00002{suffix}", [6])):
        shard = read_shard(tmp_path / "o" / "outputs" / name)
        assert shard["index"].tolist() == rows and shard["ids"].tolist() == [str(i) for i in rows]
        np.testing.assert_allclose(shard["y"], np.stack([affine(xs[i], 2.0, 1.0)["y"] for i in rows]), rtol=1e-6)
    # Resume: combined items are verified through their shard and skipped; the failed one is retried.
    again = run_batch(AffineFactory(), tmp_path / "ds.npz", tmp_path / "o", opts)
    assert (again["run"]["skipped_done"], again["run"]["processed"]) == (6, 1)
    # A shard damaged on disk makes its items redo; the shard is rebuilt with the same bytes.
    shard0 = tmp_path / "o" / "outputs" / f"shard-00000{suffix}"
    good = shard0.read_bytes()
    shard0.write_bytes(b"garbage")
    fixed = run_batch(AffineFactory(), tmp_path / "ds.npz", tmp_path / "o", opts)
    assert fixed["run"]["ok"] == 3 and shard0.read_bytes() == good


def test_per_item_outputs_can_be_combined_later(tmp_path: Path) -> None:
    from tests.jobs.helpers import AffineFactory, write_batch_npz

    write_batch_npz(tmp_path / "ds.npz", make_inputs(4, shape=(2, 3)))
    run_batch(AffineFactory(), tmp_path / "ds.npz", tmp_path / "o", BatchOptions(workers=1))
    s = run_batch(AffineFactory(), tmp_path / "ds.npz", tmp_path / "o",
                  BatchOptions(workers=1, output_format="npz-shards", shard_size=4))
    assert s["run"]["processed"] == 0 and s["shards"]["written_now"] == 1
    assert sorted(p.name for p in (tmp_path / "o" / "outputs").iterdir()) == ["shard-00000.npz"]


def test_cli_output_format_npz_shards(tmp_path: Path, row_package: Path) -> None:
    xs = np.random.default_rng(5).standard_normal((4, 8)).astype(np.float32)
    np.savez(tmp_path / "ds.npz", x=xs)
    r = _run(str(row_package), str(tmp_path / "ds.npz"), "-o", str(tmp_path / "o"), "--units", "reference",
             "--workers", "1", "--output-format", "npz-shards", "--shard-size", "2", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["shards"]["files"] == ["outputs/shard-00000.npz", "outputs/shard-00001.npz"]
    with np.load(tmp_path / "o" / "outputs" / "shard-00001.npz") as z:
        np.testing.assert_allclose(z["y"], _oracle(xs[2:4])[:, None, :], rtol=1e-6)
