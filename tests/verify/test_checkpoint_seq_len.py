"""verify() on a Hugging Face checkpoint folder builds the graph at the package's sequence length."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bitnet_coreml.errors import InputError

CKPT = Path(__file__).resolve().parents[2] / "models" / "hf" / "bitnet-tiny-packed"
pytestmark = pytest.mark.skipif(not CKPT.is_dir(), reason="bundled checkpoint models/hf/bitnet-tiny-packed missing")


@pytest.fixture(scope="module")
def package16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bitnet_coreml.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("seq16") / "tiny16.mlpackage"
    # fp32: this random-weight checkpoint's logits are near ties, so fp16 rounding flips some argmaxes
    # (top-1 0.97 at seq_len 64) whatever the sequence length; fp32 isolates the sequence-length logic
    convert(CKPT, out, ConvertOptions(seq_len=16, precision="fp32", check=False))
    return out


def test_seq_len_is_read_from_the_package(package16: Path) -> None:
    from bitnet_coreml.verify import verify

    rep = verify(CKPT, package16)  # no seq_len: the default (64) would not fit the package's [1, 16] input
    assert rep.passed and rep.comparisons
    assert {c.output for c in rep.comparisons} == {"logits"}
    assert all(c.cosine > 0.9999 and c.top1 == 1.0 for c in rep.comparisons)
    # the same inputs as an explicit --seq-len 16 run (random_calibration with a fixed seed): identical metrics
    explicit = verify(CKPT, package16, seq_len=16)
    assert [(c.cosine, c.top1) for c in explicit.comparisons] == [(c.cosine, c.top1) for c in rep.comparisons]


def test_npz_inputs_of_length_16(package16: Path, tmp_path: Path) -> None:
    from bitnet_coreml.verify import verify

    cfg = json.loads((CKPT / "config.json").read_text())
    ids = np.random.default_rng(3).integers(0, cfg["vocab_size"], (1, 16)).astype(np.int64)
    np.savez(tmp_path / "in.npz", input_ids=ids)
    rep = verify(CKPT, package16, tmp_path / "in.npz")
    assert rep.passed and rep.comparisons


def test_cli_without_seq_len(package16: Path) -> None:
    from bitnet_coreml.cli import main

    r = CliRunner().invoke(main, ["verify", str(CKPT), str(package16), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["passed"] is True


def test_package_without_input_ids_needs_seq_len(tmp_path: Path) -> None:
    from bitnet_coreml._quiet import coremltools
    from bitnet_coreml.verify import verify

    ct = coremltools()
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec((1, 4))])
    def prog(x):  # type: ignore[no-untyped-def]
        return mb.relu(x=x, name="y")

    pkg = tmp_path / "x.mlpackage"
    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16).save(str(pkg))
    with pytest.raises(InputError, match=r"no input 'input_ids'.*inputs: x.*--seq-len"):
        verify(CKPT, pkg)
