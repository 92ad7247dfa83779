"""Converting the same input twice, in two separate processes, gives byte-identical packages (issue 19).

Separate processes matter: protobuf writes map entries (the package metadata) in a per-process hash
order, so two conversions in one process can agree while two runs of the CLI do not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_cli_conversions_are_byte_identical(tmp_path: Path) -> None:
    outs = []
    for i, seed in enumerate(("1", "2")):  # different hash seeds, as two unrelated runs would have
        out = tmp_path / f"run{i}" / "bitnet.mlpackage"
        out.parent.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed}
        r = subprocess.run([sys.executable, "-m", "bitnet_coreml.cli", "convert",
                            str(ROOT / "models" / "bitnet_offline.onnx"), "-o", str(out), "--json"],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(_files(out))
    assert sorted(outs[0]) == sorted(outs[1])
    differing = [name for name in outs[0] if outs[0][name] != outs[1][name]]
    assert not differing, f"files differ between runs: {differing}"


def test_convert_verify_takes_test_inputs_and_names_the_failing_metric(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bitnet_coreml.cli import main

    out = tmp_path / "bv4.mlpackage"
    npz = ROOT / "models" / "bitnet_bigvocab.npz"
    r = CliRunner().invoke(main, ["convert", str(ROOT / "models" / "bitnet_bigvocab.onnx"), "-o", str(out),
                                  "--embed-bits", "4", "--verify", "--input", str(npz)])
    # 4-bit embeddings cost accuracy on this model: the failure names the metric and its threshold.
    assert r.exit_code == 1, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: parity failed:") and "cosine" in line and "< 0.999" in line
    # The test inputs were used: the stored expected logits of the .npz appear as a reference.
    r = CliRunner().invoke(main, ["convert", str(ROOT / "models" / "bitnet_bigvocab.onnx"), "-o", str(out),
                                  "--embed-bits", "4", "--verify", "--input", str(npz), "--json"])
    refs = {c["reference"] for c in __import__("json").loads(r.stdout)["parity"]["comparisons"]}
    assert any("npz" in ref for ref in refs), refs
    bad = CliRunner().invoke(main, ["convert", str(ROOT / "models" / "bitnet_bigvocab.onnx"), "-o", str(out),
                                    "--input", str(npz)])
    assert bad.exit_code == 2 and "--verify" in bad.stderr
