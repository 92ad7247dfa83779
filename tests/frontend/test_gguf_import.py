"""GGUF import: fixtures vs transformers' logits, vs the checkpoint path, vs gguf's own dequantiser.

Oracles: torch's logits stored with the fixture checkpoint (``models/gguf/bitnet-tq-ckpt/logits.npz``,
transformers' forward of the folder the GGUF files were written from), ``gguf.quants.dequantize``
(llama.cpp's reference decoding of TQ1_0 / TQ2_0), the independent 2-bit packer of the lowering, the
checkpoint importer on the same model, and the fixture's original ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from bitnet_coreml.errors import ModelLoadError
from bitnet_coreml.frontend import load
from bitnet_coreml.frontend.gguf_file import GGUFFile
from bitnet_coreml.frontend.gguf_ternary import GGUFTernary, analyse_scales
from bitnet_coreml.lower.bitnet import pack_ternary_2bit
from tests.frontend.gguf_util import Q, drop, write_bitnet_gguf
from tests.frontend.test_hf_fixtures import argmax_agreement, cosine

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "models" / "gguf"
CKPT = FIX / "bitnet-tq-ckpt"
FILES = {"TQ1_0": FIX / "bitnet-tq1_0.gguf", "TQ2_0": FIX / "bitnet-tq2_0.gguf"}
pytestmark = pytest.mark.skipif(not CKPT.is_dir(), reason="models/gguf fixtures missing (make models)")


@pytest.mark.parametrize("qtype", list(FILES))
def test_dequantised_weights_equal_ggufs_dequantiser_bit_for_bit(qtype: str) -> None:
    gf = GGUFFile(FILES[qtype])
    ternary = [n for n, t in gf.tensors.items() if t.type_name == qtype]
    assert len(ternary) == 14
    for name in ternary:
        ours = GGUFTernary(gf, name).dequantized()
        ref = dequantize(raw(FILES[qtype], name), gf.tensors[name].type).astype(np.float32)
        assert ours.shape == ref.shape
        np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32), err_msg=name)


@pytest.mark.parametrize("qtype", list(FILES))
def test_lut_bytes_match_the_lowerings_packer(qtype: str) -> None:
    gf = GGUFFile(FILES[qtype])
    name = "blk.1.ffn_down.weight"
    t = GGUFTernary(gf, name)
    ref = dequantize(raw(FILES[qtype], name), gf.tensors[name].type)
    codes = np.sign(ref).astype(np.int8)
    np.testing.assert_array_equal(t.codes(), codes)
    np.testing.assert_array_equal(t.lut2_bytes(), pack_ternary_2bit(codes))


def raw(path: Path, name: str) -> np.ndarray:
    """A tensor's data as gguf's own ``GGUFReader`` maps it (the oracle for our reading of the file)."""
    return next(t.data for t in GGUFReader(path).tensors if t.name == name)


@pytest.mark.parametrize("qtype", list(FILES))
def test_scan_and_ggufs_reader_agree(qtype: str) -> None:
    gf, reader = GGUFFile(FILES[qtype]), GGUFReader(FILES[qtype])
    assert {t.name: (t.tensor_type, int(t.data_offset), tuple(reversed(t.shape.tolist()))) for t in reader.tensors} \
        == {n: (t.type, t.offset, t.shape) for n, t in gf.tensors.items()}
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert sorted(fields) == sorted(gf.metadata)
    for key, value in fields.items():
        ours = gf.metadata[key]
        assert (ours.tolist() if isinstance(ours, np.ndarray) else ours) == pytest.approx(value), key


@pytest.mark.parametrize("qtype", list(FILES))
def test_packed_source_equals_the_checkpoints_packed_bytes(qtype: str) -> None:
    """What the fp16 analysis feeds ONNX Runtime: the checkpoint's own uint8 [N/4, K] layout."""
    from safetensors.numpy import load_file

    ckpt = load_file(str(CKPT / "model.safetensors"))
    gf = GGUFFile(FILES[qtype])
    for i, (hf, gg) in enumerate((("self_attn.k_proj", "attn_k"), ("mlp.down_proj", "ffn_down"))):
        t = GGUFTernary(gf, f"blk.{i}.{gg}.weight")
        assert t.is_packed
        np.testing.assert_array_equal(t.packed_source(), ckpt[f"model.layers.{i}.{hf}.weight"])


def _same_model(a: ir.Model, b: ir.Model) -> None:
    assert [(n.op_type, n.name) for n in a.graph] == [(n.op_type, n.name) for n in b.graph]
    assert sorted(a.graph.initializers) == sorted(b.graph.initializers)
    for name, v in a.graph.initializers.items():
        w = b.graph.initializers[name]
        assert v.const_value is not None and w.const_value is not None
        np.testing.assert_array_equal(v.const_value.numpy(), w.const_value.numpy(), err_msg=name)


@pytest.mark.parametrize("qtype", list(FILES))
def test_gguf_and_checkpoint_give_the_same_in_memory_model(qtype: str) -> None:
    _same_model(load(FILES[qtype], seq_len=16), load(CKPT, seq_len=16))


def test_fp16_package_matches_torch_and_equals_the_checkpoint_package(tmp_path: Path) -> None:
    from bitnet_coreml.convert import ConvertOptions, convert
    from bitnet_coreml.executor import ReferenceExecutor

    z = np.load(CKPT / "logits.npz")
    ids, ref = z["input_ids"], z["logits"]
    out = {}
    for label, src in (("gguf", FILES["TQ2_0"]), ("ckpt", CKPT)):
        pkg = tmp_path / f"{label}.mlpackage"
        convert(src, pkg, ConvertOptions(precision="fp16", seq_len=ids.shape[1], check=False))
        out[label] = np.asarray(ReferenceExecutor(pkg).predict({"input_ids": ids.astype(np.int32)})["logits"],
                                dtype=np.float32)
    assert cosine(out["gguf"], ref) >= 0.999 and argmax_agreement(out["gguf"], ref) >= 0.98
    np.testing.assert_array_equal(out["gguf"], out["ckpt"])
    # the package carries the GGUF's tokenizer, which tokenizes like the fixture's original tokenizer.json
    from tokenizers import Tokenizer

    from bitnet_coreml.package.assets import read_assets

    assets = read_assets(tmp_path / "gguf.mlpackage")
    packaged = Tokenizer.from_str(assets["tokenizer.json"].decode())
    original = Tokenizer.from_file(str(FIX / "tokenizer.json"))
    for p in json.loads((FIX / "prompts.json").read_text()):
        assert packaged.encode(p).ids == original.encode(p).ids
    assert json.loads(assets["generation_config.json"]) == {"bos_token_id": original.token_to_id("<|begin_of_text|>"),
                                                            "eos_token_id": original.token_to_id("<|end_of_text|>")}
    assert read_assets(tmp_path / "ckpt.mlpackage") == {}  # nothing invented for a folder without a tokenizer


def test_config_comes_from_metadata_like_config_json() -> None:
    from bitnet_coreml.frontend.gguf_model import config_from_metadata
    from bitnet_coreml.frontend.hf_config import read_config

    gf = GGUFFile(FILES["TQ2_0"])
    g, c = config_from_metadata(gf.metadata, gf.tensors), read_config(CKPT)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                "max_position_embeddings", "hidden_act"):
        assert getattr(g, key) == pytest.approx(getattr(c, key)), key


def test_tokenizer_round_trip_matches_the_original() -> None:
    from tokenizers import Tokenizer

    from bitnet_coreml.frontend.gguf_tokenizer import tokenizer_json

    original = Tokenizer.from_file(str(FIX / "tokenizer.json"))
    prompts = json.loads((FIX / "prompts.json").read_text())
    for f in FILES.values():
        data, how = tokenizer_json(GGUFFile(f).metadata)
        assert data is not None, how
        rebuilt = Tokenizer.from_str(data.decode())
        for p in prompts:
            a, b = original.encode(p).ids, rebuilt.encode(p).ids
            assert a == b, p
            assert rebuilt.decode(b) == original.decode(a)
            assert rebuilt.decode(b, skip_special_tokens=True) == p


def test_sentencepiece_tokenizer_matches_sentencepiece() -> None:
    """A SentencePiece vocabulary (``tokenizer.ggml.model = llama``, as llama.cpp's converter writes one) rebuilt as
    a ``tokenizers`` tokenizer encodes and decodes the prompts exactly as sentencepiece itself did (stored ids)."""
    from tokenizers import Tokenizer

    from bitnet_coreml.frontend.gguf_tokenizer import tokenizer_json

    data, how = tokenizer_json(GGUFFile(FIX / "spm-tokenizer.gguf").metadata)
    assert data is not None and how == "SentencePiece BPE", how
    rebuilt = Tokenizer.from_str(data.decode())
    expected = json.loads((FIX / "spm-expected.json").read_text())
    assert len(expected["prompts"]) >= 6
    for e in expected["prompts"]:
        ids = rebuilt.encode(e["prompt"]).ids
        assert ids == [expected["bos"], *e["ids"]], e["prompt"]  # llama.cpp adds bos to SentencePiece models
        assert rebuilt.decode(ids, skip_special_tokens=True) == e["decoded"] == e["prompt"]


# --- block scales ------------------------------------------------------------------------------------


def test_scale_layouts() -> None:
    d = np.array([[2.0, 2.0], [2.0, 0.0]], np.float32)
    t = analyse_scales(d)
    assert t.kind == "tensor" and float(t.alpha) == 2.0
    r = analyse_scales(np.array([[2.0, 2.0], [4.0, 0.0]], np.float32))
    assert r.kind == "row" and r.alpha.tolist() == [2.0, 4.0]
    assert analyse_scales(np.array([[2.0, 4.0], [4.0, 4.0]], np.float32)).kind == "block"


@pytest.mark.parametrize("qtype", [Q.TQ1_0, Q.TQ2_0])
def test_negative_and_zero_block_scales_dequantise_exactly(tmp_path: Path, qtype: Q) -> None:
    p = write_bitnet_gguf(tmp_path / "m.gguf", qtype=qtype, scales="row", seed=3)
    data = bytearray(p.read_bytes())
    info = GGUFFile(p).tensors["blk.0.ffn_up.weight"]
    size = 54 if qtype == Q.TQ1_0 else 66
    for block, value in ((0, -0.25), (3, 0.0), (5, -0.0)):  # d is the last 2 bytes of a block
        at = info.offset + block * size + size - 2
        data[at:at + 2] = np.float16(value).tobytes()
    p.write_bytes(bytes(data))
    gf = GGUFFile(p)
    t = GGUFTernary(gf, "blk.0.ffn_up.weight")
    ref = dequantize(raw(p, "blk.0.ffn_up.weight"), qtype).astype(np.float32)
    np.testing.assert_array_equal(t.dequantized(), ref)
    assert t.scales.kind == "row"  # the one flipped block takes |d| = 0.25 of its own row
    codes = t.codes().astype(np.float32)
    np.testing.assert_array_equal(codes * t.scales.alpha[:, None], ref)  # BitLinear: W * Alpha per row


@pytest.mark.parametrize("qtype", [Q.TQ1_0, Q.TQ2_0])
def test_2bit_layouts_with_flipped_and_zero_blocks_match_numpy(tmp_path: Path, qtype: Q) -> None:
    """Both 2-bit layouts (the package's LUT bytes, the fp16 analysis' packed feed) against numpy packings of
    gguf's dequantised codes, on rows of several blocks with negative and zero block scales."""
    p = write_bitnet_gguf(tmp_path / "m.gguf", qtype=qtype, hidden=512, ff=1024, scales="row", seed=5)
    data = bytearray(p.read_bytes())
    name = "blk.0.ffn_down.weight"  # [512, 1024]: 4 blocks per row
    info = GGUFFile(p).tensors[name]
    size = 54 if qtype == Q.TQ1_0 else 66
    for block in (1, 6, 9, 1000, 2047):  # alternately negative and zero
        at = info.offset + block * size + size - 2
        data[at:at + 2] = np.float16(-0.5 if block % 2 else 0.0).tobytes()
    p.write_bytes(bytes(data))
    t = GGUFTernary(GGUFFile(p), name)
    idx = (np.sign(dequantize(raw(p, name), qtype)) + 1).astype(np.uint8)  # [N, K] indices = code + 1
    np.testing.assert_array_equal(t.lut2_bytes(), pack_ternary_2bit(idx.view(np.int8) - np.int8(1)))
    quarter = idx.shape[0] // 4
    packed = sum((idx[i * quarter:(i + 1) * quarter].astype(np.uint16) << (2 * i) for i in range(4)),
                 np.zeros((quarter, idx.shape[1]), np.uint16))
    np.testing.assert_array_equal(t.packed_source(), packed.astype(np.uint8))
    if qtype == Q.TQ2_0:  # the fp16 analysis' feed: the mapped blocks, unpacked by ONNX Runtime
        np.testing.assert_array_equal(ort_unpacked(t), idx.astype(np.float32) - 1.0)


def ort_unpacked(t: GGUFTernary) -> np.ndarray:
    """The float codes ONNX Runtime computes from ``t.calibration_feed()`` (its bytes and its nodes)."""
    import onnxruntime as ort

    feed = t.calibration_feed()
    assert feed is not None
    blocks, unpack = feed
    nodes: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value], suffix: str, **attrs: object) -> ir.Value:
        nodes.append(ir.node(op, inputs, attributes=attrs, name=suffix))
        nodes[-1].outputs[0].name = suffix
        return nodes[-1].outputs[0]

    x = ir.Value(name="blocks", type=ir.TensorType(ir.DataType.UINT8), shape=ir.Shape(blocks.shape))
    y = unpack(add, x)
    model = ir.Model(ir.Graph([x], [y], nodes=nodes, opset_imports={"": 18}), ir_version=9)
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"blocks": np.ascontiguousarray(blocks)})[0]


def test_per_row_scales_become_a_per_channel_alpha(tmp_path: Path) -> None:
    p = write_bitnet_gguf(tmp_path / "m.gguf", scales="row")
    m = load(p, seq_len=8)
    for node in (n for n in m.graph if n.op_type == "BitLinear"):
        w, alpha = node.inputs[1].const_value, node.inputs[2].const_value  # type: ignore[union-attr]
        assert alpha.shape == ir.Shape([int(w.shape[0])])
        ref = dequantize(raw(p, w.source_name), w.qtype)
        np.testing.assert_array_equal(w.numpy().astype(np.float32) * alpha.numpy()[:, None], ref)


def test_block_scales_need_allow_dequant_and_then_verify(tmp_path: Path) -> None:
    from bitnet_coreml.convert import ConvertOptions, convert
    from bitnet_coreml.verify import verify

    p = write_bitnet_gguf(tmp_path / "m.gguf", scales="block", hidden=512, ff=512, heads=4, kv_heads=2)
    with pytest.raises(ModelLoadError, match="distinct block scales within rows.*--allow-dequant"):
        load(p, seq_len=8)
    m = load(p, seq_len=8, allow_dequant=True)
    assert len(json.loads(m.metadata_props["bitnet_coreml.gguf.dense_fallback"])) == 7
    pkg = tmp_path / "m.mlpackage"
    convert(p, pkg, ConvertOptions(precision="fp32", seq_len=8, check=False, allow_dequant=True))
    rep = verify(p, pkg, raise_on_failure=False, allow_dequant=True)
    assert rep.passed, rep.to_dict()


# --- other types, metadata -----------------------------------------------------------------------------


def test_other_types_refused_or_dequantised(tmp_path: Path) -> None:
    p = write_bitnet_gguf(tmp_path / "m.gguf", emb_type=Q.Q8_0)
    with pytest.raises(ModelLoadError, match=r"'token_embd.weight' \(embedding\) has type Q8_0.*--allow-dequant"):
        load(p, seq_len=8)
    m = load(p, seq_len=8, allow_dequant=True)
    emb = m.graph.initializers["model.embed_tokens.weight"].const_value
    np.testing.assert_array_equal(emb.numpy(), dequantize(raw(p, "token_embd.weight"), Q.Q8_0))  # type: ignore[union-attr]


@pytest.mark.parametrize(("meta", "message"), [
    ({"bitnet.block_count": drop()}, "'bitnet.block_count' is missing"),
    ({"bitnet.attention.layer_norm_rms_epsilon": drop()}, "layer_norm_rms_epsilon' is missing"),
    ({"bitnet.embedding_length": 255}, "embedding_length = 255 is not a multiple of"),
    ({"bitnet.attention.head_count_kv": 3}, "not a multiple of num_key_value_heads = 3"),
    ({"bitnet.rope.dimension_count": 64}, "rope.dimension_count = 64; expected 128"),
    ({"bitnet.vocab_size": 65}, "vocab_size = 65 but token_embd.weight has 64 rows"),
    ({"bitnet.rope.scaling.type": "yarn"}, "only unscaled RoPE"),
    ({"bitnet.hidden_act": "gelu"}, "hidden_act = 'gelu'; allowed: relu2, silu"),
    ({"general.architecture": "qwen2"}, "general.architecture = 'qwen2'; supported: bitnet"),
    ({"bitnet.block_count": 2}, "block_count = 2 but the file holds only 13 tensors"),
])
def test_bad_metadata_is_one_line(tmp_path: Path, meta: dict, message: str) -> None:  # type: ignore[type-arg]
    p = write_bitnet_gguf(tmp_path / "m.gguf", meta=meta)
    with pytest.raises(ModelLoadError) as e:
        load(p, seq_len=8)
    assert message in e.value.one_line() and str(p) in e.value.one_line()


def test_unknown_tensor_is_refused(tmp_path: Path) -> None:
    p = write_bitnet_gguf(tmp_path / "m.gguf", extra_tensors={"blk.0.mystery.weight": np.ones(4, np.float32)})
    with pytest.raises(ModelLoadError, match="'blk.0.mystery.weight' are not part of a 1-layer BitNet"):
        load(p, seq_len=8)


def test_silu_default_follows_llama_cpp(tmp_path: Path) -> None:
    p = write_bitnet_gguf(tmp_path / "m.gguf", meta={"bitnet.hidden_act": drop()}, tied=False)
    ops = [n.op_type for n in load(p, seq_len=8).graph]
    assert "Sigmoid" in ops and "Relu2" not in ops
    assert "lm_head" in {n.name for n in load(p, seq_len=8).graph if n.op_type == "Gemm"}


def test_pipeline_takes_a_gguf_source_with_seq_len_and_allow_dequant(tmp_path: Path) -> None:
    from bitnet_coreml.jobs.buildstate import BuildState
    from bitnet_coreml.jobs.spec import load_pipeline

    p = tmp_path / "p.toml"
    p.write_text(f'[[model]]\nname = "m"\nsource = "{FILES["TQ2_0"]}"\nseq_len = 16\nallow_dequant = true\n'
                 'targets = [{ os = "macOS", min_os = "14" }]\n')
    entry = load_pipeline(p).models[0]
    assert entry.seq_len == 16 and entry.allow_dequant
    assert BuildState(tmp_path / "out").input_files(entry) == [FILES["TQ2_0"]]  # no ONNX external-data lookup


def test_stateful_gguf_graphs_equal_the_checkpoints() -> None:
    from bitnet_coreml.frontend.hf_stateful import load_stateful_function

    for tokens in (16, 1):
        _same_model(load_stateful_function(FILES["TQ1_0"], tokens=tokens, context=32),
                    load_stateful_function(CKPT, tokens=tokens, context=32))


@pytest.mark.slow
def test_stateful_gguf_package_prefill_matches_torch(tmp_path: Path) -> None:
    from bitnet_coreml.convert import ConvertOptions, convert
    from bitnet_coreml.executor import ReferenceExecutor

    z = np.load(CKPT / "logits.npz")
    ids, ref = z["input_ids"].astype(np.int32), z["logits"]
    pkg = tmp_path / "s.mlpackage"
    convert(FILES["TQ2_0"], pkg, ConvertOptions(stateful=True, context=32, prefill=16, check=False))
    ex = ReferenceExecutor(pkg)
    got = ex.function("prefill").predict({"input_ids": ids, "position": np.array([0], np.int32)}, ex.make_state())
    logits = np.asarray(got["logits"], dtype=np.float32)
    assert cosine(logits, ref) >= 0.999 and argmax_agreement(logits, ref) >= 0.98


@pytest.mark.parametrize("layout", ["lut2_bytes", "packed_source", "lut_indices"])
def test_tq2_0_value_3_is_not_ternary(tmp_path: Path, layout: str) -> None:
    p = write_bitnet_gguf(tmp_path / "m.gguf")
    data = bytearray(p.read_bytes())
    info = GGUFFile(p).tensors["blk.0.attn_v.weight"]
    data[info.offset + 66 + 5] = 0x30  # the one block of row 1 (hidden 256): one field of 3
    p.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="block 0 of row 1 holds the 2-bit value 3"):
        getattr(GGUFTernary(GGUFFile(p), "blk.0.attn_v.weight"), layout)()


def test_scan_is_reused_only_while_the_header_is_unchanged(tmp_path: Path) -> None:
    from bitnet_coreml.frontend.gguf_file import scan

    p = write_bitnet_gguf(tmp_path / "m.gguf")
    first = scan(p)
    assert scan(p) is first  # unchanged: the importer and the tokenizer share one scan
    data = bytearray(p.read_bytes())
    at = data.index(b"bitnet.context_length") + len(b"bitnet.context_length") + 4  # after the value type
    assert int.from_bytes(data[at:at + 4], "little") == 128
    data[at:at + 4] = (256).to_bytes(4, "little")  # same size, one header value changed
    p.write_bytes(bytes(data))
    again = scan(p)
    assert again is not first and again.metadata["bitnet.context_length"] == 256
