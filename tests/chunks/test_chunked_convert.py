"""``convert --chunks``: the chained pieces compute the unchunked package's outputs bit for bit.

The oracle is the unchunked package run by the reference executor (same fp16 arithmetic, same order): a
chunked model is only right if every piece computes exactly its share, the boundary tensors carry the
residual stream without rounding, and the pieces are called in order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bitnet_coreml.executor import ReferenceExecutor
from bitnet_coreml.executor.chunked import ChunkedExecutor, open_executor
from bitnet_coreml.package.chunked import MANIFEST, open_chunked, piece_sha256
from tests.chunks.conftest import LM, ONNX, convert, run_cli


def _ids(vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(1, 16)).astype(np.int32)


@pytest.mark.parametrize("n", ["2", "3", "auto"])
def test_tiny_chunks_equal_unchunked(tiny: dict[str, Path], n: str) -> None:
    full = ReferenceExecutor(str(tiny["full"]))
    chunked = open_executor(str(tiny[n]))
    assert isinstance(chunked, ChunkedExecutor)
    assert len(chunked.pieces) == {"2": 2, "3": 3, "auto": 1}[n]  # auto: the tiny model fits one file
    for seed in range(8):
        x = {"input_ids": _ids(512, seed)}
        a, b = full.predict(x)["logits"], chunked.predict(x)["logits"]
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b), f"{n} chunks: max |diff| {np.abs(a - b).max()}"


def test_manifest_records_pieces_boundaries_and_hashes(tiny: dict[str, Path]) -> None:
    folder = tiny["3"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "chunk_00.mlpackage", "chunk_01.mlpackage", "chunk_02.mlpackage", MANIFEST]
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]  # nothing half-written left beside it
    m = json.loads((folder / MANIFEST).read_text())
    assert [p["path"] for p in m["pieces"]] == ["chunk_00.mlpackage", "chunk_01.mlpackage", "chunk_02.mlpackage"]
    for p in m["pieces"]:
        assert p["sha256"] == piece_sha256(folder / p["path"])
    # 2 layers, tied embedding, 3 pieces balanced by bytes: embedding | layers | lm_head
    assert [p["label"] for p in m["pieces"]] == ["embedding", "layers 0-1", "lm_head"]
    assert [b["name"] for b in m["boundaries"]] == ["hidden_states_0", "hidden_states_2"]
    for b in m["boundaries"]:
        assert b["dtype"] == "float16" and b["shape"] == {"main": [1, 16, 64]}
    assert m["functions"] == ["main"] and m["stateful"] is None
    assert m["pieces"][0]["functions"]["main"]["inputs"] == [{"name": "input_ids", "shape": [1, 16], "dtype": "int32"}]
    assert open_chunked(folder).pieces[0].name == "chunk_00.mlpackage"


@pytest.mark.parametrize(("src", "vocab", "n"), [(LM, 2048, "3"), (ONNX, 1024, "2")])
def test_other_bundled_models(tmp_path: Path, src: Path, vocab: int, n: str) -> None:
    full = convert(src, tmp_path / "full.mlpackage")
    folder = convert(src, tmp_path / "chunked", "--chunks", n)
    a_ex, b_ex = ReferenceExecutor(str(full)), ChunkedExecutor(folder)
    for seed in range(8):  # (a first version cast the stream up in the ONNX model's pieces: 1 input in 3 differed)
        x = {"input_ids": _ids(vocab, seed)}
        assert np.array_equal(a_ex.predict(x)["logits"], b_ex.predict(x)["logits"]), seed


def test_auto_follows_the_per_file_limit(tmp_path: Path) -> None:
    """With a per-file limit below the whole model, auto picks the fewest pieces that each fit it, and `check`
    (which fails the one-file model) suggests that count; `check --chunks auto` passes every piece."""
    caps = tmp_path / "small.toml"
    caps.write_text("[limits.package_bytes]\nios = 1200000\nmacos = 1200000\nseverity = \"error\"\n"
                    "source = \"test: a small per-file limit\"\n")
    folder = convert(LM, tmp_path / "lm", "--chunks", "auto", "--target", "ios", "--capabilities", caps)
    m = json.loads((folder / MANIFEST).read_text())
    # example-lm: a 2048 x 256 fp16 tied table (1 MB) read by the embedding and the lm_head, 0.7 MB of layers:
    # one piece is 1.76 MB, two are 1.4 MB each, three (embedding | layers | lm_head) fit
    assert m["chunks"]["count"] == 3
    assert [p["label"] for p in m["pieces"]] == ["embedding", "layers 0-3", "lm_head"]
    for p in m["pieces"]:
        assert p["weight_bytes"] <= 1200000, p
    code, out, err = run_cli("check", LM, "--seq-len", 16, "--target", "ios", "--capabilities", caps, "--json")
    assert code == 1, err
    doc = json.loads(out)
    assert [v["rule"] for v in doc["violations"]] == ["package_size"]
    assert doc["suggested_chunks"]["count"] == m["chunks"]["count"]
    assert doc["suggested_chunks"]["ranges"] == [p["units"] for p in m["pieces"]]
    code, out, err = run_cli("check", LM, "--seq-len", 16, "--target", "ios", "--capabilities", caps, "--chunks", "auto",
                             "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["chunks"]["count"] == 3 and doc["violations"] == []
    reports = doc["chunks"]["reports"]
    assert [r["ok"] for r in reports] == [True] * 3
    # each piece's estimate is the written piece's weight file (the size estimate's contract, check/size.py)
    assert [r["size"]["total_bytes"] for r in reports] == [p["weight_bytes"] for p in m["pieces"]]
    code, out, err = run_cli("check", LM, "--seq-len", 16, "--target", "ios", "--capabilities", caps, "--chunks", "2")
    assert code == 1, out  # two pieces of 1.4 MB: each over the limit


def test_a_piece_over_the_limit_leaves_nothing(tmp_path: Path) -> None:
    """--chunks 2 with a 1.2 MB limit: 1.4 MB pieces; the check refuses it, and without the check the written
    weight file is refused; either way nothing is left at OUT or beside it."""
    caps = tmp_path / "small.toml"
    caps.write_text("[limits.package_bytes]\nios = 1200000\nmacos = 1200000\nseverity = \"error\"\n"
                    "source = \"test: a small per-file limit\"\n")
    for extra, words in (((), "piece 0 (embedding + layers 0-1)"), (("--no-check",), "over the per-file limit")):
        out = tmp_path / f"lm{len(extra)}"
        code, _, err = run_cli("convert", LM, "-o", out, "--seq-len", 16, "--chunks", 2, "--target", "ios",
                               "--capabilities", caps, *extra)
        assert code == 1, err
        assert words in err and len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1, err
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")]


def test_output_refusals(tmp_path: Path) -> None:
    code, _, err = run_cli("convert", LM, "-o", tmp_path / "x.mlpackage", "--chunks", 2)
    assert code == 2 and "name the output without .mlpackage" in err
    (tmp_path / "data").mkdir()
    code, _, err = run_cli("convert", LM, "-o", tmp_path / "data", "--chunks", 2)
    assert code == 2 and "not a chunked model folder" in err
    code, _, err = run_cli("convert", LM, "-o", tmp_path / "y", "--chunks", "zero")
    assert code == 2 and "--chunks 'zero'" in err
    code, _, err = run_cli("convert", LM, "-o", tmp_path / "y", "--chunks", 7)
    assert code == 2 and "at most 6" in err


def test_result_reports_the_graph_passes(tmp_path: Path) -> None:
    """A chunked convert reports the graph passes the whole model went through, as the one-package convert does."""
    def passes(*extra: object) -> dict:
        name = "chunked" if extra else "one.mlpackage"
        code, out, err = run_cli("convert", ONNX, "-o", tmp_path / name, "--json", *extra)
        assert code == 0, err
        rep = json.loads(out)["passes"]
        return {**rep, "passes": [{k: v for k, v in p.items() if k != "seconds"} for p in rep["passes"]]}

    one, chunked = passes(), passes("--chunks", "2")
    assert chunked == one
    assert one["pipeline"] == "default" and any(p["name"] == "fuse_bitlinear" and p["fused"] for p in one["passes"])


def test_fp32_kept_nodes_in_chunks_are_built_as_in_one_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes the fp16-safety analysis keeps in fp32: every piece is built fp16 by the builder as the unchunked
    program is (no fp32 program through coremltools' fp16 cast pass), keeps those nodes in fp32, and the
    chained pieces still give the unchunked package's logits bit for bit."""
    import coremltools as ct
    from coremltools.proto import MIL_pb2

    import bitnet_coreml.lower.fp16 as fp16
    import bitnet_coreml.lower.program as program
    from tests.chunks.conftest import TINY

    kept = {f"model_layers_1_self_attn_{n}" for n in ("scores", "masked_scores", "probs")}
    measure, build = fp16.make_fp16_safe, program.build_program
    builds: list[bool] = []

    def plan_with_fp32_attention(model, feeds):  # type: ignore[no-untyped-def]
        plan = measure(model, feeds)
        assert kept <= {n.name for n in model.graph}
        plan.fp32_nodes |= kept
        return plan

    def recorded(model, options=None):  # type: ignore[no-untyped-def]
        builds.append(options.native_fp16)
        return build(model, options)

    monkeypatch.setattr(fp16, "make_fp16_safe", plan_with_fp32_attention)
    monkeypatch.setattr(program, "build_program", recorded)
    full = convert(TINY, tmp_path / "full.mlpackage")
    folder = convert(TINY, tmp_path / "two", "--chunks", 2)
    assert builds == [True, True, True]  # the one package, then each piece
    softmax = {}
    for piece in [full, *sorted(folder.glob("*.mlpackage"))]:
        spec = ct.models.MLModel(str(piece), skip_model_load=True).get_spec()
        ops = next(iter(spec.mlProgram.functions["main"].block_specializations.values())).operations
        softmax[piece.name] = sorted(op.outputs[0].type.tensorType.dataType for op in ops if op.type == "softmax")
    f16, f32 = MIL_pb2.DataType.FLOAT16, MIL_pb2.DataType.FLOAT32
    assert softmax.pop("full.mlpackage") == [f16, f32]  # layer 0 fp16, layer 1 fp32
    assert sorted(softmax.values()) == [[f16], [f32]], softmax  # one layer per piece
    a_ex, b_ex = ReferenceExecutor(str(full)), open_executor(str(folder))
    for seed in range(4):
        x = {"input_ids": _ids(512, seed)}
        a, b = a_ex.predict(x)["logits"], b_ex.predict(x)["logits"]
        assert np.array_equal(a, b), f"max |diff| {np.abs(a - b).max()}"
