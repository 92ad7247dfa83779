"""The op-support table (``bitnet_coreml.opsupport``): data-driven unit rules, user rows, limits from the database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitnet_coreml.check.capabilities import load_capabilities
from bitnet_coreml.convert import ConvertOptions
from bitnet_coreml.errors import ConfigError
from bitnet_coreml.opsupport import MATCHERS, op_label, op_support
from tests.check.test_cli import _run

MODELS = Path(__file__).resolve().parents[2] / "models"
# The fused mlp_block after the default passes, in graph order (what `check` lists): 9 nodes.
MLP_OPS = ["bitnet_coreml::RMSNorm", "bitnet_coreml::BitLinear", "bitnet_coreml::BitLinear", "bitnet_coreml::Relu2",
           "Mul", "bitnet_coreml::RMSNorm", "bitnet_coreml::BitLinear", "Add", "Identity"]


def _check(mlp: str, *extra: str) -> dict:  # type: ignore[type-arg]
    code, out, err = _run("check", mlp, "--target", "macos", "--chip", "M1", "--json", *extra)
    assert code == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def _caps(tmp_path: Path, text: str) -> str:
    p = tmp_path / "caps.toml"
    p.write_text(text)
    return str(p)


def test_a_user_row_moves_ops_off_the_ane(mlp: str, tmp_path: Path) -> None:
    base = _check(mlp)
    assert [u["op_type"] for u in base["units"]] == MLP_OPS
    assert {u["unit"] for u in base["units"]} == {"ANE"} and base["score"] == 1.0
    caps = _caps(tmp_path, """
[[unit_rule]]
id = "our_relu2_gpu"
match = "op"
ops = ["bitnet_coreml::Relu2", "Mul"]
excludes = ["ANE"]
reason = "our lab saw Relu2 and Mul leave the ANE"
source = "lab run 2026-12"
""")
    d = _check(mlp, "--capabilities", caps)
    moved = [(u["op_type"], u["unit"], u["rule"], u["reason"]) for u in d["units"] if u["unit"] != "ANE"]
    # by hand: the Relu2 and the one Mul of the 9 nodes go to the GPU; the rest stay
    assert moved == [("bitnet_coreml::Relu2", "GPU", "our_relu2_gpu", "our lab saw Relu2 and Mul leave the ANE"),
                     ("Mul", "GPU", "our_relu2_gpu", "our lab saw Relu2 and Mul leave the ANE")]
    assert d["unit_counts"] == {"ANE": 7, "GPU": 2, "CPU": 0}
    assert d["score"] == pytest.approx(7 / 9, abs=1e-6)  # M1, every other factor 1: score = f_ane
    assert d["capability_files"][-1] == caps


def test_a_dtype_row_sends_every_float_op_to_the_cpu(mlp: str, tmp_path: Path) -> None:
    caps = _caps(tmp_path, """
[[unit_rule]]
id = "no_float"
match = "dtype"
dtypes = ["FLOAT"]
excludes = ["ANE", "GPU"]
reason = "float tensors stay on the CPU"
source = "test"
""")
    d = _check(mlp, "--capabilities", caps)
    # every node of the block reads or writes a float tensor
    assert {u["unit"] for u in d["units"]} == {"CPU"} and d["score"] == 0.0
    assert d["units"][0]["reason"].startswith("float tensors stay on the CPU (value ") and "dtype FLOAT" in \
        d["units"][0]["reason"]
    assert d["fallback_plan"][0]["compute_units"] == "CPU_AND_GPU"


def test_a_user_row_overrides_a_bundled_row_by_id(tmp_path: Path) -> None:
    db = load_capabilities(_caps(tmp_path, "[[unit_rule]]\nid = 'gather_cpu'\nexcludes = ['ANE']\n"))
    r = db.unit_rules["gather_cpu"]
    assert r.unit == "GPU" and r.match == "op" and "Gather" in r.ops  # the other fields are the bundled row's
    assert op_support("Gather", db).units == ("GPU", "CPU")
    db2 = load_capabilities(_caps(tmp_path, "[[unit_rule]]\nid = 'f64'\nmatch = 'dtype'\ndtypes = ['DOUBLE']\n"
                                  "excludes = ['ANE', 'GPU']\nreason = 'r'\nsource = 's'\n"))
    assert op_support("Add", db2).limits["dtypes_off"] == {"ANE": ["DOUBLE"], "GPU": ["DOUBLE"]}
    assert op_support("Gather").units == ("CPU",)


def test_an_attribute_row_reads_float_attributes_and_a_zero_threshold(tmp_path: Path) -> None:
    import onnx_ir as ir

    from bitnet_coreml.opsupport import expected_unit

    db = load_capabilities(_caps(tmp_path, "[[unit_rule]]\nid = 'leaky'\nmatch = 'attribute_above'\n"
                                 "ops = ['LeakyRelu']\nattribute = 'alpha'\nabove = 0\nexcludes = ['ANE']\n"
                                 "reason = 'r'\nsource = 's'\n"))
    x = ir.val("x", ir.DataType.FLOAT16, ir.Shape([1, 4]))

    def unit(alpha: float) -> tuple[str, str]:
        n = ir.node("LeakyRelu", [x], attributes={"alpha": alpha}, name="l")
        n.outputs[0].shape, n.outputs[0].dtype = ir.Shape([1, 4]), ir.DataType.FLOAT16
        u = expected_unit(n, db)
        return u.unit, u.reason

    assert unit(0.01) == ("GPU", "r (alpha [0.01])")  # 0.01 > 0: float attribute, threshold 0 is a value
    assert unit(-0.5)[0] == "ANE"


def test_the_table_names_what_does_not_lower() -> None:
    det = op_support("Det")
    assert not det.lowers and det.mil_ops == ()
    bl = op_support("bitnet_coreml::BitLinear")
    assert bl.lowers and "constexpr_lut_to_dense" in bl.mil_ops and bl.const_inputs == (1, 2)
    assert bl.fp16_hazard and op_support("bitnet_coreml::Relu2").fp16_hazard
    gather = op_support("Gather")
    assert gather.units == ("CPU",) and gather.why["ANE"] == "gather/embedding lookups fall off the ANE"
    assert gather.limits["max_dimension"] == 16384 and "split_by_converter" in gather.limits
    conv = op_support("Conv")
    assert conv.units == ("ANE", "GPU", "CPU") and {"dilated_conv_gpu", "large_channels_gpu"} <= set(conv.unit_rules)
    assert (conv.limits["max_channels"], conv.limits["max_conv_kernel_width"], conv.limits["max_rank"]) == (65536, 13, 5)
    assert op_support("com.example::MyOp").units == ("CPU",)  # a custom layer


@pytest.mark.parametrize("name", ["bitnet_packed", "bitnet_bigvocab"])
def test_every_mil_op_of_a_program_is_in_the_table(name: str) -> None:
    # the oracle: the MIL program coremltools' builder holds after lowering a real export
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not generated (make models)")
    from bitnet_coreml.frontend import load
    from bitnet_coreml.lower.program import BuildOptions, build_program
    from bitnet_coreml.passes import run_default_passes

    m = load(path)
    run_default_passes(m)
    table = set().union(*(op_support(op_label(n)).mil_ops for n in m.graph))
    built = build_program(m, BuildOptions(precision="fp16", ios=17))
    ops = {op.op_type for op in built.program.functions["main"].operations}
    assert ops and ops <= table, sorted(ops - table)


@pytest.mark.parametrize("text, needle", [
    ("[[unit_rules]]\nid = 'x'\n", "[[unit_rules]] row 0: unknown section 'unit_rules'"),
    ("[[unit_rule]]\nid = 'x'\nmatch = 'by_magic'\nexcludes = ['ANE']\nreason = 'r'\nsource = 's'\n",
     "unit_rule 'x': unknown matcher match = 'by_magic'; known: op, "),
    ("[[unit_rule]]\nid = 'x'\nmatch = 'op'\nexcludes = ['ANE']\nreason = 'r'\nsource = 's'\n",
     "unit_rule 'x': matcher 'op' needs 'ops'"),
    ("[[unit_rule]]\nid = 'x'\nmatch = 'dynamic_shape'\nexcludes = ['CPU']\nreason = 'r'\nsource = 's'\n",
     "unit_rule 'x': excludes = ['CPU']; give one or more of ANE, GPU"),
    ("[[unit_rule]]\nid = 'x'\nmatch = 'dynamic_shape'\nreason = 'r'\nsource = 's'\n",
     "unit_rule 'x': give excludes"),
    ("[[unit_rule]]\nid = 'x'\nmatch = 'fp32'\nexcludes = ['ANE']\nunit = 'CPU'\nreason = 'r'\nsource = 's'\n",
     "unit = 'CPU' contradicts excludes = ['ANE']"),
])
def test_a_bad_row_is_exit_2_naming_the_file_and_the_row(mlp: str, tmp_path: Path, text: str, needle: str) -> None:
    caps = _caps(tmp_path, text)
    code, out, err = _run("check", mlp, "--target", "macos", "--capabilities", caps)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"error: {caps}: ") and needle in err, err
    with pytest.raises(ConfigError):
        load_capabilities(caps)


def test_every_bundled_row_names_a_matcher_from_the_vocabulary() -> None:
    db = load_capabilities()
    assert {r.match for r in db.unit_rules.values()} <= set(MATCHERS)
    assert all(r.excludes and "CPU" not in r.excludes for r in db.unit_rules.values())


def test_limits_come_from_the_database(tmp_path: Path) -> None:
    caps = _caps(tmp_path, "[limits.max_dimension]\nvalue = 4096\nsource = 'test'\n")
    assert ConvertOptions().resolved_split_limit() == 16384  # the bundled limits.max_dimension
    assert ConvertOptions(capabilities=(caps,)).resolved_split_limit() == 4096
    assert ConvertOptions(capabilities=(caps,), split_limit=0).resolved_split_limit() == 0


def test_info_ops_prints_the_table_with_user_rows(tmp_path: Path) -> None:
    caps = _caps(tmp_path, "[[unit_rule]]\nid = 'softmax_gpu'\nmatch = 'op'\nops = ['Softmax']\nexcludes = ['ANE']\n"
                           "reason = 'ours'\nsource = 's'\n")
    code, out, _ = _run("info", "--ops", "--json", "--capabilities", caps)
    d = json.loads(out)
    assert code == 0 and [r["id"] for r in d["unit_rules"]][-1] == "softmax_gpu"
    ops = {o["op"]: o for o in d["ops"]}
    assert "Det" not in ops and ops["bitnet_coreml::BitLinear"]["lowers"]  # the ops the converter lowers
    assert ops["Softmax"]["units"] == ["GPU", "CPU"] and ops["Softmax"]["why"] == {"ANE": "ours"}
    assert ops["Gather"]["units"] == ["CPU"] and ops["Add"]["units"] == ["ANE", "GPU", "CPU"]
    code, out, _ = _run("info", "--ops")
    assert code == 0 and "softmax_gpu" not in out and "gather_cpu" in out and "constexpr_lut_to_dense" in out
