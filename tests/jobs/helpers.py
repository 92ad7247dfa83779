"""Test predictors and dataset writers for the batch-job tests.

The predictors are plain numpy with a closed form, so every test can compute the expected output
itself (the oracle) instead of asking the code under test.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitnet_coreml.errors import OperationError


def affine(x: np.ndarray, scale: float, bias: float) -> dict[str, np.ndarray]:
    """The oracle: what AffineFactory's predictor must return."""
    x = np.asarray(x, dtype=np.float32)
    y = x * np.float32(scale) + np.float32(bias)
    return {"y": y, "total": np.asarray(y.sum(dtype=np.float32), dtype=np.float32)}


class _Affine:
    def __init__(self, scale: float, bias: float, delay_s: float) -> None:
        self.scale, self.bias, self.delay_s = scale, bias, delay_s
        self.pid = os.getpid()

    def predict(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
        x = inputs["x"]
        if np.isnan(x).any():
            raise OperationError("input x holds NaN")
        if self.delay_s:
            time.sleep(self.delay_s)
        return affine(x, self.scale, self.bias), "cpu"


@dataclass(frozen=True)
class AffineFactory:
    scale: float = 2.0
    bias: float = 1.0
    delay_s: float = 0.0

    def fingerprint(self) -> str:
        return f"affine:{self.scale}:{self.bias}"

    def __call__(self) -> _Affine:
        return _Affine(self.scale, self.bias, self.delay_s)


@dataclass(frozen=True)
class BrokenFactory:
    def fingerprint(self) -> str:
        return "broken"

    def __call__(self) -> _Affine:
        from bitnet_coreml.errors import ModelLoadError

        raise ModelLoadError("package x.mlpackage: cannot load (test)")


def make_inputs(n: int, shape: tuple[int, ...] = (3, 4), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def write_folder(path: Path, xs: list[np.ndarray]) -> list[str]:
    path.mkdir(parents=True, exist_ok=True)
    ids = [f"item{i:04d}" for i in range(len(xs))]
    for item_id, x in zip(ids, xs, strict=True):
        np.savez(path / f"{item_id}.npz", x=x)
    return ids


def write_batch_npz(path: Path, xs: list[np.ndarray], compressed: bool = False) -> None:
    (np.savez_compressed if compressed else np.savez)(path, x=np.stack(xs))


def write_jsonl(path: Path, xs: list[np.ndarray], with_ids: bool = True) -> list[str]:
    ids = [f"row-{i}" for i in range(len(xs))]
    with open(path, "w") as f:
        for item_id, x in zip(ids, xs, strict=True):
            obj: dict[str, object] = {"x": x.tolist()}
            if with_ids:
                obj["id"] = item_id
            f.write(json.dumps(obj) + "\n")
    return ids


def read_outputs(outdir: Path) -> dict[str, dict[str, np.ndarray]]:
    """Outputs by item id, read through the manifest."""
    out = {}
    for line in (outdir / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["status"] == "ok":
            with np.load(outdir / rec["file"]) as z:
                out[rec["id"]] = {k: z[k] for k in z.files}
    return out


class _ThreadProbe:
    def predict(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
        from threadpoolctl import threadpool_info

        blas = [int(p["num_threads"]) for p in threadpool_info() if p.get("user_api") == "blas"]
        env = int(os.environ.get("OMP_NUM_THREADS", "0"))
        return {"blas": np.asarray(blas, dtype=np.int64), "omp_env": np.asarray(env)}, "cpu"


@dataclass(frozen=True)
class ThreadProbeFactory:
    """A predictor that reports the BLAS thread count and OMP_NUM_THREADS of the worker it runs in."""

    def fingerprint(self) -> str:
        return "thread-probe"

    def __call__(self) -> _ThreadProbe:
        return _ThreadProbe()


def build_relu_package(path: Path, shape: tuple[int, ...]) -> Path:
    """A real fp32 .mlpackage computing ``y = relu(x) * 3 + 0.5`` for one input ``x`` of ``shape``."""
    from coremltools.converters.mil import Builder as mb

    from bitnet_coreml._quiet import coremltools

    ct = coremltools()

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=ct.target.iOS16)
    def prog(x):  # type: ignore[no-untyped-def]
        return mb.add(x=mb.mul(x=mb.relu(x=x), y=np.float32(3.0)), y=np.float32(0.5), name="y")

    model = ct.convert(prog, convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
                       minimum_deployment_target=ct.target.iOS16)
    model.save(str(path))
    return path
