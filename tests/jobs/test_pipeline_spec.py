"""Pipeline files: every kind of mistake is exit 2 with one line naming the file, the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from bitnet_coreml.cli import main
from bitnet_coreml.errors import ConfigError
from bitnet_coreml.jobs.spec import load_pipeline

MODEL = '''
[[model]]
name = "m"
source = "m.onnx"
targets = [{ os = "macOS", min_os = "14", chip = "M1" }]
'''


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "m.onnx").write_bytes(b"not parsed at load time")
    (tmp_path / "inputs.npz").write_bytes(b"")
    p = tmp_path / "p.toml"
    p.write_text(text)
    return p


CASES = [
    ("unknown top-level key", 'outptu_dir = "out"\n' + MODEL, ["unknown key 'outptu_dir'", "allowed: version, output_dir"]),
    ("unknown model key", MODEL + 'precison = "fp16"\n', ["model[0]", "unknown key 'precison'", "allowed:"]),
    ("unknown defaults key", '[defaults]\nchek = "strict"\n' + MODEL, ["defaults", "unknown key 'chek'"]),
    ("wrong type", MODEL + "precision = 16\n", ["model 'm'.precision", "16", "allowed: fp16, fp32"]),
    ("bad value", MODEL + 'precision = "fp8"\n', ["model 'm'.precision", "'fp8'", "allowed: fp16, fp32"]),
    ("bad embed bits", MODEL + "embed_bits = 3\n", ["embed_bits", "allowed: 4, 6, 8"]),
    ("bad check policy", MODEL + 'check = "loose"\n', ["model 'm'.check", "allowed: strict, warn"]),
    ("missing source", MODEL.replace("m.onnx", "missing.onnx"), ["model 'm'.source", "'missing.onnx' does not exist"]),
    ("source not onnx", MODEL.replace("m.onnx", "inputs.npz"), ["model 'm'.source", "not an .onnx or .gguf file"]),
    ("impossible target", MODEL.replace('chip = "M1"', 'chip = "A17 Pro"'),
     ["targets[0].chip", "impossible target", "A17 Pro does not run macOS", "allowed chips for macOS"]),
    ("unknown chip", MODEL.replace('chip = "M1"', 'chip = "Z9"'), ["targets[0].chip", "unknown chip 'Z9'", "known chips"]),
    ("unknown os", MODEL.replace('os = "macOS"', 'os = "tvOS"'), ["targets[0].os", "'tvOS'", "allowed: iOS, macOS"]),
    ("os too old", MODEL.replace('min_os = "14"', 'min_os = "12"'), ["targets[0].min_os", "'12'", "allowed: macOS13, macOS14, macOS15, macOS26"]),
    ("min_os wrong type", MODEL.replace('min_os = "14"', "min_os = [14]"), ["targets[0].min_os", "allowed"]),
    ("empty targets", MODEL.replace('targets = [{ os = "macOS", min_os = "14", chip = "M1" }]', "targets = []"),
     ["model 'm'.targets", "empty"]),
    ("no targets", MODEL.replace('targets = [{ os = "macOS", min_os = "14", chip = "M1" }]', ""),
     ["model 'm'", "missing key 'targets'"]),
    ("unknown verify key", MODEL + "verify = { min_cos = 0.9 }\n", ["model 'm'.verify", "unknown key 'min_cos'"]),
    ("threshold out of range", MODEL + "verify = { min_top1 = 1.5 }\n", ["verify.min_top1", "1.5", "allowed: 0.0 to 1.0"]),
    ("bad output template", MODEL + 'output = "{nme}.mlpackage"\n', ["model 'm'.output", "unknown placeholder '{nme}'"]),
    ("output collision", MODEL + 'output = "same.mlpackage"\n' + MODEL.replace('name = "m"', 'name = "n"')
     + 'output = "same.mlpackage"\n', ["'same.mlpackage' is also the output of model 'm'"]),
    ("duplicate name", MODEL + MODEL, ["model 'm'", "name used twice"]),
    ("no models", 'output_dir = "out"\n', ["no [[model]] entries"]),
    ("bad version", "version = 2\n" + MODEL, ["version", "allowed: 1"]),
    ("not toml", "[[model]\nname=", ["not valid TOML"]),
    ("seq_len zero", MODEL + "seq_len = 0\n", ["model 'm'.seq_len", "0 is out of range", "positive integer"]),
    ("seq_len string", MODEL + 'seq_len = "16"\n', ["model 'm'.seq_len", "'16' is a string", "positive integer"]),
    ("seq_len boolean", MODEL + "seq_len = true\n", ["model 'm'.seq_len", "True is a boolean"]),
    ("seq_len float", '[defaults]\nseq_len = 16.0\n' + MODEL, ["model 'm'.seq_len", "16.0 is a number"]),
]


@pytest.mark.parametrize("name,text,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_pipeline_is_exit_2_with_one_clear_line(tmp_path: Path, name: str, text: str, needles: list[str]) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError):
        load_pipeline(path)
    result = CliRunner().invoke(main, ["pipeline", "run", str(path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}:")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_defaults_are_inherited_and_overridden(tmp_path: Path) -> None:
    path = _write(tmp_path, '''
output_dir = "build/out"
[defaults]
precision = "fp32"
check = "warn"
targets = [{ os = "iOS", min_os = "17", chip = "A17 Pro" }, { os = "macOS" }]
[defaults.verify]
min_cosine = 0.99
inputs = "inputs.npz"
''' + MODEL.replace('targets = [{ os = "macOS", min_os = "14", chip = "M1" }]', "") + '''
verify = { min_top1 = 0.5 }
[[model]]
name = "n"
source = "m.onnx"
precision = "fp16"
targets = [{ os = "ios" }]
''')
    p = load_pipeline(path)
    assert p.output_dir == tmp_path / "build" / "out"
    m, n = p.models
    assert (m.precision, m.check, n.precision) == ("fp32", "warn", "fp16")
    assert [t.label for t in m.targets] == ["ios17-a17pro", "macos"]
    assert m.verify.thresholds() == {"cosine": 0.99, "top1": 0.5}
    assert m.verify.inputs == tmp_path / "inputs.npz"
    assert [m.output_name(t) for t in m.targets] == ["m-ios17-a17pro.mlpackage", "m-macos.mlpackage"]
    assert m.targets[0].convert_min_os == "iOS17" and n.targets[0].convert_min_os is None


def test_bundled_pipelines_load() -> None:
    root = Path(__file__).resolve().parents[2] / "pipelines"
    for path in sorted(root.glob("*.toml")):
        p = load_pipeline(path)
        assert p.models and all(m.source.exists() for m in p.models)


def test_seq_len_applies_to_checkpoint_sources_only(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    path = _write(tmp_path, '[defaults]\nseq_len = 32\n' + MODEL + MODEL.replace('name = "m"', 'name = "c"')
                  .replace('"m.onnx"', '"ckpt"') + MODEL.replace('name = "m"', 'name = "d"').replace('"m.onnx"', '"ckpt"')
                  + "seq_len = 16\n")
    m, c, d = load_pipeline(path).models
    assert (m.seq_len, c.seq_len, d.seq_len) == (None, 32, 16)  # an ONNX file keeps its own shapes
    t = c.targets[0]
    # the sequence length is part of the build key, so changing it rebuilds; ONNX entries' keys lack it
    assert c.canonical(t, tmp_path)["seq_len"] == 32 and "seq_len" not in m.canonical(t, tmp_path)


def test_stateful_entries(tmp_path: Path) -> None:
    from bitnet_coreml.jobs.pipeline import _convert_options

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    lm = MODEL.replace('"m.onnx"', '"ckpt"').replace('"14"', '"15"')
    path = _write(tmp_path, lm + "stateful = { context = 256, prefill = 32 }\nverify = { enabled = false }\n")
    (entry,) = load_pipeline(path).models
    assert entry.stateful == {"context": 256, "prefill": 32, "prefill_logits": "all"}
    opts = _convert_options(entry, entry.targets[0])
    assert (opts.stateful, opts.context, opts.prefill, opts.prefill_logits) == (True, 256, 32, "all")
    assert entry.canonical(entry.targets[0], tmp_path)["stateful"]["context"] == 256
    (verified,) = load_pipeline(_write(tmp_path, lm + "stateful = { context = 256 }\n")).models
    assert verified.stateful is not None and verified.verify.enabled  # verify: prefill + decode steps
    for text, needle in [
        (MODEL + "stateful = { context = 256 }\nverify = { enabled = false }\n", "needs a Hugging Face checkpoint"),
        (lm + "stateful = { contxt = 256 }\nverify = { enabled = false }\n", "unknown key 'contxt'"),
        (lm + "stateful = { prefill = 0 }\nverify = { enabled = false }\n", "0 is out of range"),
    ]:
        with pytest.raises(ConfigError, match="stateful") as e:
            load_pipeline(_write(tmp_path, text))
        assert needle in str(e.value)


def test_capabilities_key_adds_chips_a_pipeline_can_name(tmp_path: Path) -> None:
    caps = tmp_path / "caps.toml"
    caps.write_text('schema_version = 1\n[[chip]]\nname = "M9"\nplatforms = ["macos"]\nane_generation = 6\n'
                    'source = "test row"\n')
    text = MODEL.replace('chip = "M1"', 'chip = "M9"')
    with pytest.raises(ConfigError, match=r'unknown chip .M9.*capabilities = \["FILE.toml"\]'):
        load_pipeline(_write(tmp_path, text))
    p = load_pipeline(_write(tmp_path, text.replace('[[model]]', '[[model]]\ncapabilities = ["caps.toml"]', 1)))
    assert p.models[0].targets[0].chip == "M9" and p.models[0].capabilities == (caps.resolve(),)
