"""Batch engine: dataset layouts, manifest, failures, resume and crash safety.

The oracle is ``helpers.affine`` (numpy, written from the predictor's definition), never the engine.
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

from bitnet_coreml.errors import InputError, ModelLoadError
from bitnet_coreml.jobs import BatchOptions, open_dataset, run_batch
from bitnet_coreml.jobs._io import npz_bytes, sha256_file
from tests.jobs.helpers import (
    AffineFactory,
    BrokenFactory,
    affine,
    make_inputs,
    read_outputs,
    write_batch_npz,
    write_folder,
    write_jsonl,
)

N = 12


def _manifest(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / "manifest.jsonl").read_text().splitlines()]


def _assert_matches_oracle(outdir: Path, xs: list[np.ndarray], ids: list[str]) -> None:
    outs = read_outputs(outdir)
    assert list(outs) == ids
    for item_id, x in zip(ids, xs, strict=True):
        want = affine(x, 2.0, 1.0)
        assert set(outs[item_id]) == set(want)
        for k in want:
            assert outs[item_id][k].dtype == want[k].dtype
            np.testing.assert_array_equal(outs[item_id][k], want[k])
    for rec in _manifest(outdir):
        assert sha256_file(outdir / rec["file"]) == rec["sha256"]


@pytest.mark.parametrize("layout", ["folder", "npz", "npz-compressed", "jsonl", "jsonl-no-ids"])
def test_layouts_give_the_oracle_outputs(tmp_path: Path, layout: str) -> None:
    xs = make_inputs(N)
    if layout == "folder":
        ids = write_folder(tmp_path / "ds", xs)
        ds = tmp_path / "ds"
    elif layout.startswith("npz"):
        ds = tmp_path / "ds.npz"
        write_batch_npz(ds, xs, compressed=layout.endswith("compressed"))
        ids = [f"{i:02d}" for i in range(N)]
    else:
        ds = tmp_path / "ds.jsonl"
        ids = write_jsonl(ds, xs, with_ids=layout == "jsonl")
        if layout == "jsonl-no-ids":
            ids = [f"{i:02d}" for i in range(N)]
    summary = run_batch(AffineFactory(), ds, tmp_path / "out")
    assert summary["job"] == {"items": N, "ok": N, "failed": 0, "complete": True}
    assert summary["run"]["units"] == {"cpu": N}
    _assert_matches_oracle(tmp_path / "out", xs, ids)


def test_stored_npz_rows_are_read_by_offset_not_shipped(tmp_path: Path) -> None:
    # The driver must not carry item data for seekable (stored) members: that is what keeps memory flat.
    xs = make_inputs(4)
    write_batch_npz(tmp_path / "a.npz", xs)
    write_batch_npz(tmp_path / "b.npz", xs, compressed=True)
    assert all(r.inline is None for r in open_dataset(tmp_path / "a.npz").refs())
    assert all(r.inline is not None for r in open_dataset(tmp_path / "b.npz").refs())


def test_two_workers_match_one(tmp_path: Path) -> None:
    xs = make_inputs(N)
    ids = write_folder(tmp_path / "ds", xs)
    run_batch(AffineFactory(), tmp_path / "ds", tmp_path / "one")
    summary = run_batch(AffineFactory(), tmp_path / "ds", tmp_path / "two", BatchOptions(workers=2))
    assert summary["job"]["complete"]
    _assert_matches_oracle(tmp_path / "two", xs, ids)
    assert [r["sha256"] for r in _manifest(tmp_path / "one")] == [r["sha256"] for r in _manifest(tmp_path / "two")]


def test_failing_item_is_recorded_and_the_job_goes_on(tmp_path: Path) -> None:
    xs = make_inputs(5)
    xs[2][0, 0] = np.nan
    ids = write_folder(tmp_path / "ds", xs)
    with open(tmp_path / "ds.jsonl", "w") as f:  # a ragged array is one failed item, not a dead job
        f.write('{"id": "a", "x": [1.0, 2.0]}\n{"id": "c", "x": [[1], [2, 3]]}\n')
    with open(tmp_path / "broken.jsonl", "w") as f:  # a line that is not JSON: the dataset is refused whole (issue 12)
        f.write('{"id": "a", "x": [1.0, 2.0]}\n{"id": "b", "x": [1.0, \n')
    s = run_batch(AffineFactory(), tmp_path / "ds", tmp_path / "out")
    assert (s["run"]["ok"], s["run"]["failed"], s["job"]["complete"]) == (4, 1, False)
    rec = {r["id"]: r for r in _manifest(tmp_path / "out")}
    assert rec[ids[2]]["status"] == "error" and "NaN" in rec[ids[2]]["error"]
    assert not (tmp_path / "out" / "outputs" / f"{ids[2]}.npz").exists()
    # A rerun retries only the failed item.
    s2 = run_batch(AffineFactory(), tmp_path / "ds", tmp_path / "out")
    assert (s2["run"]["skipped_done"], s2["run"]["failed"]) == (4, 1)
    s3 = run_batch(AffineFactory(), tmp_path / "ds.jsonl", tmp_path / "out-jsonl")
    rec = {r["id"]: r for r in _manifest(tmp_path / "out-jsonl")}
    assert rec["a"]["status"] == "ok" and s3["run"]["failed"] == 1
    assert rec["c"]["status"] == "error" and "ds.jsonl:2" in rec["c"]["error"]
    with pytest.raises(InputError, match=r"broken\.jsonl:2: not valid JSON"):
        run_batch(AffineFactory(), tmp_path / "broken.jsonl", tmp_path / "out-broken")
    assert not (tmp_path / "out-broken").exists()


def test_resume_redoes_missing_corrupt_and_torn(tmp_path: Path) -> None:
    xs = make_inputs(N)
    ids = write_folder(tmp_path / "ds", xs)
    out = tmp_path / "out"
    run_batch(AffineFactory(), tmp_path / "ds", out)
    (out / "outputs" / f"{ids[1]}.npz").unlink()  # lost output
    with open(out / "outputs" / f"{ids[4]}.npz", "r+b") as f:  # corrupt output, same size
        f.seek(200)
        f.write(b"\xff\xff\xff\xff")
    lines = (out / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    # Drop the last record and leave half of it, as a kill mid-append would.
    (out / "manifest.jsonl").write_bytes(b"".join(lines[:-1]) + lines[-1][:30])
    (out / "outputs" / ".tmp-stray.npz.123").write_bytes(b"partial")
    s = run_batch(AffineFactory(), tmp_path / "ds", out)
    assert s["run"]["ok"] == 3 and s["run"]["skipped_done"] == N - 3
    assert not (out / "outputs" / ".tmp-stray.npz.123").exists()
    _assert_matches_oracle(out, xs, ids)
    assert len(_manifest(out)) == N


def test_refuses_another_jobs_folder(tmp_path: Path) -> None:
    write_folder(tmp_path / "ds", make_inputs(3))
    run_batch(AffineFactory(), tmp_path / "ds", tmp_path / "out")
    with pytest.raises(InputError, match="different job"):
        run_batch(AffineFactory(scale=3.0), tmp_path / "ds", tmp_path / "out")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not a batch-job folder"):
        run_batch(AffineFactory(), tmp_path / "ds", tmp_path / "other")


def test_bad_datasets_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(InputError, match="unknown layout"):
        open_dataset(tmp_path / "x.csv")
    np.savez(tmp_path / "rows.npz", a=np.zeros((3, 2)), b=np.zeros((4, 2)))
    with pytest.raises(InputError, match=r"rows.npz.*'b' has 4 rows"):
        open_dataset(tmp_path / "rows.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .npz files"):
        open_dataset(tmp_path / "empty")
    with open(tmp_path / "dup.jsonl", "w") as f:
        f.write('{"id": "a", "x": [1.0]}\n{"id": "a", "x": [2.0]}\n')
    with pytest.raises(InputError, match="'a' appears twice"):
        run_batch(AffineFactory(), tmp_path / "dup.jsonl", tmp_path / "out")


@pytest.mark.parametrize("workers", [1, 2])
def test_predictor_that_cannot_load_stops_the_job(tmp_path: Path, workers: int) -> None:
    write_folder(tmp_path / "ds", make_inputs(3))
    with pytest.raises(ModelLoadError, match="cannot load"):
        run_batch(BrokenFactory(), tmp_path / "ds", tmp_path / "out", BatchOptions(workers=workers))


def test_progress_events_count_up_to_total(tmp_path: Path) -> None:
    write_folder(tmp_path / "ds", make_inputs(4))
    events = []
    run_batch(AffineFactory(), tmp_path / "ds", tmp_path / "out", progress=events.append)
    assert [e.completed for e in events] == [0, 1, 2, 3, 4] and events[-1].total == 4
    events.clear()
    run_batch(AffineFactory(), tmp_path / "ds", tmp_path / "out", progress=events.append)
    assert events[-1].skipped == 4 and events[-1].completed == 4


def test_npz_outputs_are_deterministic_and_loadable(tmp_path: Path) -> None:
    arrays = {"b": np.arange(6, dtype=np.int32).reshape(2, 3), "a": np.float16(1.5) * np.ones(3, np.float16)}
    first = npz_bytes(arrays)
    time.sleep(1.1)  # np.savez would stamp a different time into the zip
    assert npz_bytes(arrays) == first
    (tmp_path / "o.npz").write_bytes(first)
    with np.load(tmp_path / "o.npz") as z:
        for k, v in arrays.items():
            np.testing.assert_array_equal(z[k], v)
            assert z[k].dtype == v.dtype


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_at_random_points_then_resume(tmp_path: Path, workers: int) -> None:
    """Kill the job (SIGKILL) several times mid-run, resume, and compare with an uninterrupted run."""
    n = 120
    xs = make_inputs(n, shape=(8, 16), seed=3)
    write_folder(tmp_path / "ds", xs)
    driver = str(Path(__file__).with_name("crash_driver.py"))

    def run(out: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, driver, str(tmp_path / "ds"), str(tmp_path / out),
                                 str(workers), "0.01"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    reference = run("clean")
    assert reference.wait(120) == 0, reference.stderr.read().decode() if reference.stderr else ""
    rng = random.Random(1234 + workers)
    manifest = tmp_path / "crashed" / "manifest.jsonl"
    kills = 0
    # Kill points spread over the job (manifest line counts), each followed by a random extra delay.
    for target in sorted(rng.sample(range(5, n - 10), 4)):
        done = manifest.read_bytes().count(b"\n") if manifest.exists() else 0
        if done >= target:
            continue
        p = run("crashed")
        while p.poll() is None and (not manifest.exists() or manifest.read_bytes().count(b"\n") < target):
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.02))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            kills += 1
        p.wait(60)
    p = run("crashed")
    assert p.wait(120) == 0, p.stderr.read().decode() if p.stderr else ""
    assert kills >= 2
    clean, crashed = _manifest(tmp_path / "clean"), _manifest(tmp_path / "crashed")
    assert len(crashed) == n and len({r["id"] for r in crashed}) == n  # each item exactly once
    assert [(r["id"], r["sha256"]) for r in crashed] == [(r["id"], r["sha256"]) for r in clean]
    files = sorted(os.listdir(tmp_path / "crashed" / "outputs"))
    assert files == sorted(os.listdir(tmp_path / "clean" / "outputs"))  # no strays, no temp files
    for r in crashed:
        assert sha256_file(tmp_path / "crashed" / r["file"]) == r["sha256"]
    # Outputs are right, not merely equal to each other.
    _assert_matches_oracle(tmp_path / "crashed", xs, [r["id"] for r in clean])


def test_second_job_on_a_busy_folder_is_refused(tmp_path: Path) -> None:
    from bitnet_coreml.jobs._io import lock_dir

    write_folder(tmp_path / "ds", make_inputs(2))
    fd = lock_dir(tmp_path / "out", "busy")  # as a running job holds it
    try:
        with pytest.raises(InputError, match="another batch job is running"):
            run_batch(AffineFactory(), tmp_path / "ds", tmp_path / "out")
    finally:
        os.close(fd)
    assert run_batch(AffineFactory(), tmp_path / "ds", tmp_path / "out")["job"]["complete"]
