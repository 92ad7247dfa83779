"""Bad checkpoint folders: ModelLoadError (exit 2) with one line naming the file/tensor, found vs expected."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import ml_dtypes  # noqa: F401  (numpy bfloat16 for safetensors' reader)
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import save_file

from bitnet_coreml.cli import main
from bitnet_coreml.errors import EXIT_BAD_INPUT, InputError, ModelLoadError
from bitnet_coreml.frontend.hf_checkpoint import load_checkpoint
from tests.frontend.test_hf_fixtures import Tiny, make_checkpoint, pack_codes

ST = "model.safetensors"
Q = "model.layers.0.self_attn.q_proj.weight"


def _good(tmp_path: Path, **kw: object) -> Path:
    folder = tmp_path / "ckpt"
    make_checkpoint(folder, Tiny(layers=1, **kw), seed=0)  # type: ignore[arg-type]
    return folder


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    with safe_open(str(folder / ST), "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(folder: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    t = _tensors(folder)
    edit(t)
    save_file(t, str(folder / ST))


def _config(folder: Path, edit: Callable[[dict], None]) -> None:  # type: ignore[type-arg]
    c = json.loads((folder / "config.json").read_text())
    edit(c)
    (folder / "config.json").write_text(json.dumps(c))


def _expect(folder: Path, *needles: str) -> None:
    """load_checkpoint raises ModelLoadError with every needle; the CLI prints exactly one line, exit 2."""
    with pytest.raises(ModelLoadError) as ei:
        load_checkpoint(folder, seq_len=4)
    msg = ei.value.one_line()
    for n in needles:
        assert n in msg, (n, msg)
    res = CliRunner().invoke(main, ["inspect", str(folder), "--seq-len", "4"])
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in lines[0]


def test_good_checkpoint_loads(tmp_path: Path) -> None:
    # the baseline every other case breaks in one way
    assert load_checkpoint(_good(tmp_path), seq_len=4).graph.outputs[0].name == "logits"


def test_missing_config(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_checkpoint(folder, seq_len=4)
    res = CliRunner().invoke(main, ["inspect", str(folder)])
    assert res.exit_code == EXIT_BAD_INPUT and "config.json" in res.output


def test_config_not_json(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    (folder / "config.json").write_text("{not json")
    _expect(folder, "config.json", "not valid JSON")


@pytest.mark.parametrize(("edit", "needles"), [
    (lambda c: c.update(model_type="llama"), ("model_type = 'llama'", "expected 'bitnet'")),
    (lambda c: c.pop("quantization_config"), ("quantization_config is missing",)),
    (lambda c: c["quantization_config"].update(linear_class="fancy"), ("linear_class = 'fancy'", "autobitlinear")),
    (lambda c: c["quantization_config"].update(quant_method="gptq"), ("quant_method = 'gptq'",)),
    (lambda c: c.update(hidden_act="silu"), ("hidden_act = 'silu'", "relu2")),
    (lambda c: c.update(num_key_value_heads=3), ("num_attention_heads = 4", "num_key_value_heads = 3")),
    (lambda c: c.update(rope_scaling={"rope_type": "linear", "factor": 2.0}), ("rope_type = 'linear'",)),
    (lambda c: c.pop("hidden_size"), ("hidden_size", "missing")),
])
def test_bad_config(tmp_path: Path, edit: Callable[[dict], None], needles: tuple[str, ...]) -> None:  # type: ignore[type-arg]
    folder = _good(tmp_path)
    _config(folder, edit)
    _expect(folder, "config.json", *needles)


def test_missing_tensor(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    _rewrite(folder, lambda t: t.pop("model.layers.0.mlp.ffn_sub_norm.weight"))
    _expect(folder, "missing tensor 'model.layers.0.mlp.ffn_sub_norm.weight'", "[48]")


def test_missing_weight_scale(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    _rewrite(folder, lambda t: t.pop("model.layers.0.mlp.up_proj.weight_scale"))
    _expect(folder, "missing tensor 'model.layers.0.mlp.up_proj.weight_scale'")


def test_misshaped_tensor(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    _rewrite(folder, lambda t: t.update({Q: t[Q][:, :16].copy()}))
    _expect(folder, str(folder / ST), Q, "shape [8, 16]", "expected [8, 32]")


def test_misshaped_embedding(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    _rewrite(folder, lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:50].copy()}))
    _expect(folder, "model.embed_tokens.weight", "shape [50, 32]", "expected [96, 32]")


def test_packed_rows_not_multiple_of_4(tmp_path: Path) -> None:
    folder = _good(tmp_path, inter=30)  # the packed gate/up weights then have 7 rows for 30 outputs
    _expect(folder, "mlp.gate_proj.weight", "30 output rows", "multiple of 4")


def test_truncated_safetensors(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    data = (folder / ST).read_bytes()
    (folder / ST).write_bytes(data[: len(data) - 100])
    _expect(folder, str(folder / ST), "not a valid safetensors file")


def test_garbage_header(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    (folder / ST).write_bytes(b"\xff" * 64)
    _expect(folder, str(folder / ST), "not a valid safetensors file")


def test_no_safetensors_only_pickle(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    (folder / ST).unlink()
    (folder / "pytorch_model.bin").write_bytes(b"PK")
    _expect(folder, "no *.safetensors files", "pytorch_model.bin")


def test_index_names_missing_shard(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    make_checkpoint(folder, Tiny(layers=1, shards=2), seed=0)
    (folder / "model-00002-of-00002.safetensors").unlink()
    _expect(folder, "model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing")


def test_index_cannot_escape_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    make_checkpoint(folder, Tiny(layers=1, shards=2), seed=0)
    (tmp_path / "evil.safetensors").write_bytes((folder / "model-00001-of-00002.safetensors").read_bytes())
    idx = folder / "model.safetensors.index.json"
    raw = json.loads(idx.read_text())
    raw["weight_map"] = {k: ("../evil.safetensors" if v.startswith("model-00001") else v) for k, v in raw["weight_map"].items()}
    idx.write_text(json.dumps(raw))
    _expect(folder, "../evil.safetensors", "plain file name")


def test_bitlinear_with_float_weights(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    _rewrite(folder, lambda t: t.update({Q: np.zeros((32, 32), np.float32)}))
    _expect(folder, Q, "F32[32, 32]", "packed uint8")


def test_zero_weight_scale(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight_scale"
    _rewrite(folder, lambda t: t.update({name: np.zeros((1,), np.float32)}))
    _expect(folder, name, "non-zero")


def test_untied_without_lm_head(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    _config(folder, lambda c: c.update(tie_word_embeddings=False))
    _expect(folder, "missing tensor 'lm_head.weight'", "tie_word_embeddings")


def test_bad_seq_len(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="seq_len"):
        load_checkpoint(_good(tmp_path), seq_len=0)


# --- errors found when a lazy weight is materialised (the data, not the header, is wrong) ----------


def test_packed_value_3_is_refused_on_read(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    bad = pack_codes(np.zeros((32, 32), np.int8))
    bad[0, 0] = 0b11  # 2-bit value 3: not a ternary code
    _rewrite(folder, lambda t: t.update({Q: bad}))
    m = load_checkpoint(folder, seq_len=4)
    w = m.graph.initializers["model.layers.0.self_attn.q_proj.codes"].const_value
    with pytest.raises(ModelLoadError, match="2-bit value 3"):
        w.numpy()


def test_offline_dense_non_ternary_is_refused_on_read(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    make_checkpoint(folder, Tiny(layers=1, linear_class="autobitlinear", packed=False), seed=0)
    w = np.zeros((32, 32), np.float32)
    w[0, :3] = [1.0, -1.0, 0.5]
    _rewrite(folder, lambda t: t.update({Q: w}))
    m = load_checkpoint(folder, seq_len=4)
    codes = m.graph.initializers["model.layers.0.self_attn.q_proj.codes"].const_value
    with pytest.raises(ModelLoadError, match="not ternary"):
        codes.numpy()
