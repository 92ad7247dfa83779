"""The pass pipelines on onnx-ir's pass infrastructure: named pipelines, per-pass reports, the fused fast
path, and pass errors surfacing as the pass's own error with onnx-ir's PassError kept.

Oracles: the mlp block's structure written by hand (3 BitLinear, 2 RMSNorm, 1 relu2), the counts of
fused ops in the rewritten graph, and onnx-ir's own classes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx_ir as ir
import pytest

from bitnet_coreml.errors import STAGE_ATTR, InputError
from bitnet_coreml.passes import (
    DOMAIN,
    PIPELINES,
    GraphPass,
    pipeline_for,
    run_default_passes,
    run_pass_pipeline,
)
from bitnet_coreml.passes import pipeline as pl
from tests.passes.graphs import mlp_block

TINY = Path(__file__).resolve().parents[2] / "models" / "hf" / "bitnet-tiny-packed"


def _model() -> ir.Model:
    return ir.serde.deserialize_model(mlp_block())


def test_every_pass_is_an_onnx_ir_in_place_pass() -> None:
    for name, passes in PIPELINES.items():
        assert passes, name
        for cls in passes:
            p = cls()
            assert isinstance(p, ir.passes.InPlacePass) and isinstance(p, GraphPass) and p.in_place
    assert [c.name for c in PIPELINES["default"]] == [
        "inline_foreign_functions", "shape_inference", "check_sizes", "fold_constants", "native_space_depth",
        "fuse_bitlinear", "fuse_rmsnorm", "fuse_relu2", "cleanup"]


def test_default_pipeline_reports_what_each_pass_changed() -> None:
    model = _model()
    rep = run_default_passes(model)
    assert rep.pipeline == "default" and rep.note is None
    by = {p.name: p for p in rep.passes}
    assert list(by) == [c.name for c in PIPELINES["default"]]
    fused = sum(1 for n in model.graph if n.domain == DOMAIN and n.op_type == "BitLinear")
    assert fused == 3 and by["fuse_bitlinear"].details["fused"] == 3 and by["fuse_bitlinear"].modified
    assert by["fuse_rmsnorm"].details == {"fused": 2} and by["fuse_relu2"].details == {"fused": 1}
    assert by["native_space_depth"].details == {"rewritten": 0} and not by["native_space_depth"].modified
    assert rep.bitlinear_count == 3
    d = rep.to_dict()
    assert d["pipeline"] == "default" and [p["name"] for p in d["passes"]] == list(by)
    assert "fuse_bitlinear fused=3" in rep.summary() and "fuse_rmsnorm fused=2" in rep.summary()


def test_a_pass_result_is_an_onnx_ir_pass_result() -> None:
    model = _model()
    run_pass_pipeline(model, "default", until="fold_constants")
    res = pl.FuseBitLinear()(model)
    assert isinstance(res, ir.passes.PassResult) and res.model is model and res.modified
    assert res.details["fused"] == 3  # type: ignore[attr-defined]


def test_until_stops_after_the_named_pass() -> None:
    rep = run_default_passes(_model(), until="fuse_bitlinear")
    assert [p.name for p in rep.passes][-1] == "fuse_bitlinear" and len(rep.passes) == 6
    with pytest.raises(InputError, match="pass 'fuse_everything'; allowed: inline_foreign_functions"):
        run_default_passes(_model(), until="fuse_everything")
    with pytest.raises(InputError, match="pass pipeline 'fastest'; allowed: default, fused"):
        run_pass_pipeline(_model(), "fastest")


@pytest.mark.skipif(not TINY.is_dir(), reason="bundled checkpoint models/hf/bitnet-tiny-packed missing")
def test_a_graph_imported_fused_runs_the_named_fast_path_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    from bitnet_coreml.frontend import load

    model = load(TINY, seq_len=8)
    assert pipeline_for(model)[0] == "fused"
    with caplog.at_level(logging.INFO, logger="bitnet_coreml.passes.pipeline"):
        rep = run_default_passes(model)
    assert rep.pipeline == "fused"
    assert [p.name for p in rep.passes] == ["shape_inference", "check_sizes", "cleanup"]
    skipped = ["inline_foreign_functions", "fold_constants", "native_space_depth", "fuse_bitlinear", "fuse_rmsnorm",
               "fuse_relu2"]
    assert rep.note is not None and all(s in rep.note for s in skipped) and "bitnet_coreml.fused=1" in rep.note
    assert any(r.getMessage() == rep.note for r in caplog.records)
    assert rep.to_dict()["note"] == rep.note


def test_a_pass_that_raises_a_project_error_keeps_it_and_onnx_irs_pass_error() -> None:
    model = _model()
    model.graph.inputs[0].shape = ir.Shape([1, -8, 32])
    with pytest.raises(InputError, match="negative dimension") as info:
        run_default_passes(model)
    ctx = info.value.__context__
    assert isinstance(ctx, ir.passes.PassError)  # onnx-ir's error is kept, not swallowed
    chain = []
    e: BaseException | None = ctx
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__
    assert any("'check_sizes' pass" in str(x) for x in chain)


def test_a_bug_in_a_pass_surfaces_as_itself_named_by_its_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: GraphPass, model: ir.Model) -> pl.DetailedResult:
        raise KeyError("no such node")

    monkeypatch.setattr(pl.FuseRelu2, "call", broken)
    with pytest.raises(KeyError) as info:
        run_default_passes(_model())
    assert getattr(info.value, STAGE_ATTR) == "graph pass fuse_relu2"
    assert isinstance(info.value.__context__, ir.passes.PassError)


@pytest.mark.skipif(not TINY.is_dir(), reason="bundled checkpoint models/hf/bitnet-tiny-packed missing")
def test_convert_result_names_the_pipeline(tmp_path: Path) -> None:
    from bitnet_coreml.convert import ConvertOptions, convert

    r = convert(TINY, tmp_path / "t.mlpackage", ConvertOptions(seq_len=8, check=False, precision="fp32"))
    assert r.passes["pipeline"] == "fused" and [p["name"] for p in r.passes["passes"]] == [
        "shape_inference", "check_sizes", "cleanup"]
    assert r.passes["note"] in r.notes
    assert r.to_dict()["passes"] == r.passes


def test_convert_json_and_table_carry_the_per_pass_stats(tmp_path: Path) -> None:
    import json

    import onnx
    from click.testing import CliRunner

    from bitnet_coreml.cli import main
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp_block(), src)  # unfused: three BitLinear layers to fuse
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "c.mlpackage"), "--no-check", "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)["passes"]
    assert doc["pipeline"] == "default" and doc["note"] is None
    assert next(p for p in doc["passes"] if p["name"] == "fuse_bitlinear")["fused"] == 3
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "d.mlpackage"), "--no-check"])
    assert r.exit_code == 0, r.stderr
    assert "default pipeline (9 passes)" in r.stdout and "fuse_bitlinear fused=3" in r.stdout
