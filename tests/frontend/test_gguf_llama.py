"""llama-architecture GGUF files with TQ1_0 / TQ2_0 linears (TriLM-style weight-only ternary models).

Oracles: torch's ``LlamaForCausalLM`` logits and greedy tokens stored with the fixtures
(``models/gguf/llama-logits.npz``, ``models/make_gguf_llama.py``), ``gguf.quants.dequantize`` over
``GGUFReader``'s view of the file, and llama.cpp's ``LlamaModel.permute`` (the converter's own formula,
re-applied to our un-permuted weights must give the file's rows back).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from bitnet_coreml.errors import ModelLoadError
from bitnet_coreml.executor import ReferenceExecutor
from bitnet_coreml.frontend import load
from bitnet_coreml.frontend.gguf_model import open_gguf
from tests.frontend.gguf_util import Q, drop, write_bitnet_gguf
from tests.frontend.test_hf_fixtures import argmax_agreement, cosine
from tests.support.packages import PackageCache

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "models" / "gguf"
FILES = {"TQ1_0": FIX / "llama-tq1_0.gguf", "TQ2_0": FIX / "llama-tq2_0.gguf"}
ORACLE = FIX / "llama-logits.npz"
HEADS, KV_HEADS = 4, 2
pytestmark = pytest.mark.skipif(not ORACLE.is_file(), reason="models/gguf llama fixtures missing (make models)")


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """``convert_hf_to_gguf.py`` ``LlamaModel.permute``, verbatim in numpy (the oracle of the un-permutation)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _oracle() -> tuple[np.ndarray, np.ndarray]:
    """All 144 oracle positions: ids ``[9, 1, 16]`` and torch's logits ``[9, 1, 16, V]``."""
    with np.load(ORACLE) as z:
        return (np.concatenate([z["input_ids"][None], z["eval_input_ids"]]),
                np.concatenate([z["logits"][None], z["eval_logits"]]))


def _run(pkg: Path, ids: np.ndarray) -> np.ndarray:
    ex = ReferenceExecutor(pkg)
    return np.stack([np.asarray(ex.predict({"input_ids": x.astype(np.int32)})["logits"], np.float32) for x in ids])


@pytest.mark.parametrize("qtype", list(FILES))
def test_weights_equal_ggufs_dequantiser_and_undo_llama_cpps_permutation(qtype: str) -> None:
    """Every linear as imported (un-permuted, decoded from the blocks) is gguf's dequantisation of the file,
    bit for bit, after llama.cpp's own permutation is applied to q/k again."""
    path = FILES[qtype]
    _, store = open_gguf(path)
    reader = {t.name: t for t in GGUFReader(path).tensors}
    m = load(path, seq_len=16)
    seen = set()
    for node in (n for n in m.graph if n.op_type == "BitLinear"):
        w, alpha = node.inputs[1].const_value, node.inputs[2].const_value  # type: ignore[union-attr]
        assert w is not None and alpha is not None
        hf = node.name + ".weight"
        t = reader[store.gguf_name[hf]]
        ref = dequantize(t.data, t.tensor_type).astype(np.float32)
        ours = w.numpy().astype(np.float32) * alpha.numpy().reshape(-1, 1)
        if hf.endswith("q_proj.weight"):
            ours = llama_cpp_permute(ours, HEADS, HEADS)
        elif hf.endswith("k_proj.weight"):
            ours = llama_cpp_permute(ours, HEADS, KV_HEADS)
        np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32), err_msg=hf)
        if t.tensor_type.name == qtype:
            codes = m.graph.initializers[w.name].const_value  # the GGUFTernary the lowering packs
            deq = codes.dequantized()  # type: ignore[union-attr]
            if hf.endswith(("q_proj.weight", "k_proj.weight")):
                deq = llama_cpp_permute(deq, HEADS, HEADS if "q_proj" in hf else KV_HEADS)
            np.testing.assert_array_equal(deq.view(np.uint32), ref.view(np.uint32), err_msg=hf)
        seen.add(t.tensor_type.name)
    assert seen == {qtype, "F16"}  # 13 TQ linears and layer 1's q_proj as F16 {-s, 0, s}


def test_llama_graph_has_no_sub_norms_and_weight_only_linears() -> None:
    m = load(FILES["TQ2_0"], seq_len=16)
    bl = [n for n in m.graph if n.op_type == "BitLinear"]
    assert len(bl) == 14 and {n.attributes["act_bits"].value for n in bl} == {0}
    assert sorted(n.name for n in m.graph if n.op_type == "RMSNorm") == [
        "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"]
    assert "Sigmoid" in {n.op_type for n in m.graph} and "lm_head" in {n.name for n in m.graph}  # SiLU, untied
    assert m.metadata_props["bitnet_coreml.gguf.architecture"] == "llama"
    _, store = open_gguf(FILES["TQ2_0"])  # the q/k rows llama.cpp's converter permuted, and only those
    assert set(store.row_order) == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "qk"}


@pytest.mark.parametrize("qtype", list(FILES))
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_package_matches_torch(converted: PackageCache, qtype: str, precision: str) -> None:
    ids, ref = _oracle()
    got = _run(converted.get(FILES[qtype], precision=precision, seq_len=16, check=False), ids)
    if precision == "fp32":
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
        assert argmax_agreement(got, ref) == 1.0
    else:
        assert cosine(got, ref) >= 0.999 and argmax_agreement(got, ref) >= 0.98


def test_without_undoing_the_permutation_the_logits_are_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: q/k rows taken in the file's (llama.cpp's interleaved-RoPE) order are a different model."""
    from bitnet_coreml.convert import ConvertOptions, convert
    from bitnet_coreml.frontend import gguf_model

    monkeypatch.setattr(gguf_model, "unpermute_rows", lambda rows, heads: np.arange(rows))
    ids, ref = _oracle()
    pkg = tmp_path / "wrong.mlpackage"
    convert(FILES["TQ2_0"], pkg, ConvertOptions(precision="fp32", seq_len=16, check=False))
    got = _run(pkg, ids[:1])
    assert np.abs(got - ref[:1]).max() > 1e-2 * np.abs(ref).max()  # 1000x the fp32 gate above


def test_stateful_package_generates_torchs_greedy_tokens(converted: PackageCache) -> None:
    from bitnet_coreml.executor.stateful import StatefulRun
    from bitnet_coreml.package.assets import read_assets

    with np.load(ORACLE) as z:
        prompt, greedy = z["prompt"], z["greedy_tokens"].tolist()
    pkg = converted.get(FILES["TQ2_0"], stateful=True, context=64, prefill=prompt.shape[1], check=False)
    run = StatefulRun(pkg)
    last = run.feed(prompt, function="prefill")[0, -1]
    tokens = []
    for _ in range(len(greedy)):
        tokens.append(int(last.argmax()))
        last = run.feed(np.array([[tokens[-1]]]))[0, -1]
    assert tokens == greedy
    assert "tokenizer.json" in read_assets(pkg)  # generate works from the GGUF alone
    # ... and so does the generate command (its own decode engine, from the package alone)
    r = subprocess.run([sys.executable, "-m", "bitnet_coreml.cli", "generate", str(pkg), "--ids",
                        ",".join(str(int(t)) for t in prompt[0]), "-n", str(len(greedy)), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["new_ids"] == greedy


def test_chunked_package_equals_the_single_package(converted: PackageCache) -> None:
    from bitnet_coreml.executor.chunked import ChunkedExecutor

    ids, _ = _oracle()
    one = converted.get(FILES["TQ1_0"], seq_len=16, check=False)
    chunks = converted.root / "llama-chunks"
    from bitnet_coreml.convert import ConvertOptions, convert

    if not chunks.exists():
        convert(FILES["TQ1_0"], chunks, ConvertOptions(seq_len=16, check=False, chunks="2"))
    x = {"input_ids": ids[0].astype(np.int32)}
    np.testing.assert_array_equal(ChunkedExecutor(chunks).predict(x)["logits"],
                                  ReferenceExecutor(one).predict(x)["logits"])


def test_block_scales_beyond_the_column_groups_fall_back_to_a_dense_weight_only_linear(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bitnet_coreml.convert import ConvertOptions, convert
    from bitnet_coreml.frontend import gguf_model
    from bitnet_coreml.verify import verify

    # random scales per block: 2 column groups per row at hidden 512; with a limit of 1 they are too many
    monkeypatch.setattr(gguf_model, "MAX_COLUMN_GROUPS", 1)
    p = write_bitnet_gguf(tmp_path / "m.gguf", arch="llama", scales="block", hidden=512, ff=512, heads=4, kv_heads=2)
    with pytest.raises(ModelLoadError, match="distinct block scales within rows.*--allow-dequant"):
        load(p, seq_len=8)
    m = load(p, seq_len=8, allow_dequant=True)
    assert len(json.loads(m.metadata_props["bitnet_coreml.gguf.dense_fallback"])) == 7
    assert not {"Round", "BitLinear"} & {n.op_type for n in m.graph}  # no activation quantisation
    pkg = tmp_path / "m.mlpackage"
    convert(p, pkg, ConvertOptions(precision="fp32", seq_len=8, check=False, allow_dequant=True))
    rep = verify(p, pkg, raise_on_failure=False, allow_dequant=True)
    assert rep.passed, rep.to_dict()


def test_sharded_scales_become_column_groups_of_2bit_linears(tmp_path: Path) -> None:
    """One scale per half of the input columns (TriLM's row-parallel shards): a sum of two weight-only
    BitLinears whose codes times scales are gguf's dequantisation of the file, bit for bit; no fallback."""
    from bitnet_coreml.convert import ConvertOptions, convert
    from bitnet_coreml.verify import verify

    p = write_bitnet_gguf(tmp_path / "m.gguf", arch="llama", scales="shards", hidden=512, ff=512, heads=4,
                          kv_heads=2)
    m = load(p, seq_len=8)
    assert json.loads(m.metadata_props["bitnet_coreml.gguf.dense_fallback"]) == []
    bl = [n for n in m.graph if n.op_type == "BitLinear"]
    assert len(bl) == 14 and {n.attributes["act_bits"].value for n in bl} == {0}
    _, store = open_gguf(p)
    reader = {t.name: t for t in GGUFReader(p).tensors}
    for prefix in sorted({n.name.rsplit(".cols_", 1)[0] for n in bl}):
        parts = sorted((n for n in bl if n.name.startswith(prefix + ".cols_")), key=lambda n: int(n.name.split("_")[-2]))
        assert [n.name.rsplit(".", 1)[1] for n in parts] == ["cols_0_256", "cols_256_512"]
        ours = np.concatenate([n.inputs[1].const_value.numpy().astype(np.float32)  # type: ignore[union-attr]
                               * n.inputs[2].const_value.numpy().reshape(-1, 1) for n in parts], axis=1)  # type: ignore[union-attr]
        t = reader[store.gguf_name[prefix + ".weight"]]
        ref = dequantize(t.data, t.tensor_type).astype(np.float32)
        if prefix.endswith(("q_proj", "k_proj")):
            ref = ref[store.row_order[prefix + ".weight"]]
        np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32), err_msg=prefix)
    pkg = tmp_path / "m.mlpackage"
    convert(p, pkg, ConvertOptions(precision="fp32", seq_len=8, check=False))
    rep = verify(p, pkg, raise_on_failure=False)
    assert rep.passed, rep.to_dict()


def test_llama_quantize_layout_needs_allow_dequant_for_its_k_quant_embedding_and_output(tmp_path: Path) -> None:
    """llama-quantize's TQ1_0/TQ2_0 files keep ``token_embd`` as Q4_K and ``output`` as Q6_K: refused with one
    line, dequantised by gguf's dequantiser with ``--allow-dequant`` (the 2-bit linears unchanged)."""
    from bitnet_coreml.convert import ConvertOptions, convert
    from bitnet_coreml.verify import verify

    p = write_bitnet_gguf(tmp_path / "m.gguf", arch="llama", heads=4, kv_heads=2, tied=False, emb_type=Q.Q4_K,
                          out_type=Q.Q6_K)
    with pytest.raises(ModelLoadError, match=r"'token_embd.weight' \(embedding\) has type Q4_K.*--allow-dequant"):
        load(p, seq_len=8)
    m = load(p, seq_len=8, allow_dequant=True)
    reader = {t.name: t for t in GGUFReader(p).tensors}
    for hf, gg, qt in (("model.embed_tokens.weight", "token_embd.weight", Q.Q4_K),
                       ("lm_head.weight", "output.weight", Q.Q6_K)):
        ours = m.graph.initializers[hf].const_value.numpy()  # type: ignore[union-attr]
        np.testing.assert_array_equal(ours, dequantize(reader[gg].data, qt), err_msg=gg)
    assert sum(n.op_type == "BitLinear" for n in m.graph) == 7
    pkg = tmp_path / "m.mlpackage"
    convert(p, pkg, ConvertOptions(precision="fp32", seq_len=8, check=False, allow_dequant=True))
    assert verify(p, pkg, raise_on_failure=False, allow_dequant=True).passed


@pytest.mark.parametrize(("meta", "extra", "message"), [
    ({"llama.block_count": drop()}, None, "'llama.block_count' is missing"),
    ({"llama.attention.head_count_kv": 3}, None, "not a multiple of num_key_value_heads = 3"),
    ({"llama.attention.head_count": [4, 4]}, None, "expected an integer"),
    ({"llama.rope.dimension_count": 32}, None, "rope.dimension_count = 32; expected 64"),
    ({"llama.rope.scaling.type": "yarn"}, None, "only unscaled RoPE"),
    ({"llama.rope.freq_base": -1.0}, None, "rope_theta = -1.0; expected a positive number"),
    ({"llama.expert_count": 8}, None, "llama.expert_count = 8: mixture-of-experts models are not supported"),
    ({"llama.vocab_size": 65}, None, "vocab_size = 65 but token_embd.weight has 64 rows"),
    ({"llama.block_count": 2}, None, "block_count = 2 but the file holds only 11 tensors"),
    ({"general.architecture": "qwen2"}, None, "general.architecture = 'qwen2'; supported: bitnet"),
    ({}, {"blk.0.attn_sub_norm.weight": np.ones(256, np.float32)}, "'blk.0.attn_sub_norm.weight' are not part of a "
                                                                    "1-layer llama model"),
    ({}, {"blk.0.attn_q.scale": np.ones(1, np.float32)}, "'blk.0.attn_q.scale' are not part of"),
    ({}, {"rope_freqs.weight": np.ones(32, np.float32)}, "'rope_freqs.weight' are not part of"),
])
def test_bad_llama_metadata_is_one_line(tmp_path: Path, meta: dict, extra: dict | None,  # type: ignore[type-arg]
                                        message: str) -> None:
    p = write_bitnet_gguf(tmp_path / "m.gguf", arch="llama", heads=4, kv_heads=2, meta=meta, extra_tensors=extra)
    with pytest.raises(ModelLoadError) as e:
        load(p, seq_len=8)
    assert message in e.value.one_line() and str(p) in e.value.one_line()


def test_cli_inspect_says_llama_and_refuses_with_exit_2(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "bitnet_coreml.cli", "inspect"]
    r = subprocess.run([*cli, str(FILES["TQ1_0"]), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["gguf"]["architecture"] == "llama"
    assert {b["act_bits"] for b in doc["bitlinear"]} == {0} and len(doc["bitlinear"]) == 14
    bad = write_bitnet_gguf(tmp_path / "m.gguf", arch="llama", meta={"llama.expert_count": 8})
    r = subprocess.run([*cli, str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "mixture-of-experts" in lines[0], r.stderr

