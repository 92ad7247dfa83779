"""The hostile corpus: crafted inputs a hostile user would try, each run as the CLI under a 4 GB cap.

Every case must: exit 2, print exactly one line on stderr that names what is wrong (the expected
fragment below), never print "Traceback", open nothing under the folder holding the "outside" files
(an audit hook sees every Python-level open), leave nothing at its destination, and leave the input
package byte for byte unchanged. All cases run in one subprocess (restarted after a case that hangs)
with RLIMIT_AS = 4 GiB and a 30 s timer per case.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.hostile import _files as F
from tests.hostile import _onnx as O

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
CKPT = MODELS / "hf" / "bitnet-tiny-packed"
AS_LIMIT = 4 << 30
TIMEOUT_S = 30


@dataclass
class Case:
    id: str
    argv: list[str]
    expect: str  # a fragment the one error line must contain (the file, node, tensor or value at fault)
    dest: Path | None = None  # must not exist afterwards
    package: Path | None = None  # must be byte-identical afterwards
    digest: dict[str, str] = field(default_factory=dict)


@dataclass
class Env:
    root: Path
    outside: Path  # files here must never be opened
    secret: Path
    pkg: Path  # a good package, converted once
    good_npz: Path
    out: Path  # destinations live here

    def dir(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def dest(self, name: str) -> Path:
        return self.out / name


Builder = Callable[[Env], Case]
BUILDERS: dict[str, Builder] = {}


def case(fn: Builder) -> Builder:
    BUILDERS[fn.__name__] = fn
    return fn


def _convert(env: Env, model: Path, name: str, expect: str, *extra: str) -> Case:
    dest = env.dest(f"{name}.mlpackage")
    return Case(name, ["convert", str(model), "-o", str(dest), *extra], expect, dest=dest)


# --- ONNX -------------------------------------------------------------------------------------------

def _onnx_case(name: str, build: Callable[[Path], Path], expect: str) -> None:
    def fn(env: Env) -> Case:
        p = build(env.dir(name))
        return _convert(env, p, name, expect if expect else p.name)
    fn.__name__ = name
    case(fn)


_onnx_case("onnx_truncated", lambda d: O.truncated(d, MODELS / "bitnet_offline.onnx"), "truncated.onnx")
_onnx_case("onnx_garbage", O.garbage, "garbage.onnx")
_onnx_case("onnx_negative_dims", O.negative_dims, "'W'")
_onnx_case("onnx_absurd_dims", O.absurd_dims, "'W'")
_onnx_case("onnx_raw_short", O.raw_short, "'W'")
_onnx_case("onnx_raw_long", O.raw_long, "'W'")
_onnx_case("onnx_string_weights", O.string_weights, "'W'")
_onnx_case("onnx_empty_weights", O.empty_weights, "node name: mm")
_onnx_case("onnx_duplicate_initializers", O.duplicate_initializers, "'W'")
_onnx_case("onnx_cycle", O.cycle, "cycle")
_onnx_case("onnx_recursive_function", lambda d: O.recursive_function(d, False), "'F'")
_onnx_case("onnx_mutually_recursive_functions", lambda d: O.recursive_function(d, True), "recursive")
_onnx_case("onnx_nested_subgraphs", O.nested_subgraphs, "nested.onnx")
_onnx_case("onnx_unknown_domain", O.unknown_domain, "com.evil")
_onnx_case("onnx_huge_input", O.huge_input, "'x'")
_onnx_case("onnx_negative_input_dim", O.negative_input, "'x'")
_onnx_case("onnx_constant_of_shape_bomb", O.constant_of_shape_bomb, "bomb")
_onnx_case("onnx_tile_bomb", O.tile_bomb, "tile_bomb")
_onnx_case("onnx_ext_dotdot", lambda d: O.external(d, "dotdot", "../outside/secret.bin"), "'..'")
_onnx_case("onnx_ext_beyond_end", lambda d: O.external(d, "beyond", "w.bin", offset="32"), "w.bin")
_onnx_case("onnx_ext_absurd_length", lambda d: O.external(d, "len", "w.bin", length=str(1 << 62)), "w.bin")
_onnx_case("onnx_ext_nul_offset", lambda d: O.external(d, "nul", "w.bin", offset="0\x001"), "offset")
_onnx_case("onnx_ext_text_offset", lambda d: O.external(d, "text", "w.bin", offset="twelve"), "offset")
_onnx_case("onnx_ext_negative_offset", lambda d: O.external(d, "neg", "w.bin", offset="-64"), "offset")


@case
def onnx_ext_absolute(env: Env) -> Case:
    return _convert(env, O.external(env.dir("onnx_ext_absolute"), "abs", str(env.secret)), "onnx_ext_absolute",
                    "absolute")


@case
def onnx_ext_symlink(env: Env) -> Case:
    return _convert(env, O.external_symlink(env.dir("onnx_ext_symlink"), env.secret), "onnx_ext_symlink", "outside")


@case
def onnx_ext_in_function(env: Env) -> Case:
    p = O.external_in_function_constant(env.dir("onnx_ext_in_function"), env.secret)
    return _convert(env, p, "onnx_ext_in_function", "absolute")


@case
def onnx_calibration_wrong_shape(env: Env) -> Case:
    d = env.dir("onnx_calibration_wrong_shape")
    cal = F.npz(d / "cal.npz", x=np.zeros((3, 7), np.float32))
    return _convert(env, O.valid(d), "onnx_calibration_wrong_shape", "cal.npz", "--calibration", str(cal))


@case
def onnx_is_fifo(env: Env) -> Case:
    p = env.dir("onnx_fifo") / "model.onnx"
    os.mkfifo(p)
    return _convert(env, p, "onnx_is_fifo", "named pipe")


# --- checkpoint folders -----------------------------------------------------------------------------

def _ckpt_case(name: str, mutate: Callable[[Path, Env], Any], expect: str, seq_len: str = "8") -> None:
    def fn(env: Env) -> Case:
        folder = F.checkpoint(CKPT, env.root / name)
        mutate(folder, env)
        return _convert(env, folder, name, expect, "--seq-len", seq_len)
    fn.__name__ = name
    case(fn)


_ckpt_case("ckpt_missing_hidden_size", lambda f, e: F.edit_config(f, hidden_size=F.DROP), "hidden_size")
_ckpt_case("ckpt_zero_layers", lambda f, e: F.edit_config(f, num_hidden_layers=0), "num_hidden_layers")
_ckpt_case("ckpt_negative_heads", lambda f, e: F.edit_config(f, num_attention_heads=-4), "num_attention_heads")
_ckpt_case("ckpt_huge_vocab", lambda f, e: F.edit_config(f, vocab_size=10**12), "model.embed_tokens.weight")
_ckpt_case("ckpt_huge_layers", lambda f, e: F.edit_config(f, num_hidden_layers=10**9), "model.layers.2")
_ckpt_case("ckpt_string_hidden_size", lambda f, e: F.edit_config(f, hidden_size="64"), "hidden_size")
_ckpt_case("ckpt_float_eps_string", lambda f, e: F.edit_config(f, rms_norm_eps="tiny"), "rms_norm_eps")
_ckpt_case("ckpt_nested_config", lambda f, e: (f / "config.json").write_text(F.nested_json(100000)), "config.json")
_ckpt_case("ckpt_config_not_utf8", lambda f, e: (f / "config.json").write_bytes(b"\xff\xfe{\x00}"), "config.json")
_ckpt_case("ckpt_header_length_lie", lambda f, e: F.st_lie(f, "length"), "model.safetensors")
_ckpt_case("ckpt_header_offsets_lie", lambda f, e: F.st_lie(f, "offsets"), "model.safetensors")
_ckpt_case("ckpt_header_dtype_lie", lambda f, e: F.st_lie(f, "dtype"), "model.safetensors")
_ckpt_case("ckpt_header_huge_shape", lambda f, e: F.st_lie(f, "huge_shape"), "model.safetensors")
_ckpt_case("ckpt_seq_len_zero", lambda f, e: None, "seq-len", seq_len="0")
_ckpt_case("ckpt_seq_len_huge", lambda f, e: None, "seq-len", seq_len="1000000")


def _index_outside(folder: Path, env: Env) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "../outside/secret.safetensors"}}))


def _symlink_config(folder: Path, env: Env) -> None:
    target = env.outside / "config.json"
    target.write_text((folder / "config.json").read_text())
    (folder / "config.json").unlink()
    os.symlink(target, folder / "config.json")


def _symlink_shard(folder: Path, env: Env) -> None:
    target = env.outside / "model.safetensors"
    target.write_bytes((folder / "model.safetensors").read_bytes())
    (folder / "model.safetensors").unlink()
    os.symlink(target, folder / "model.safetensors")


def _nested_index(folder: Path, env: Env) -> None:
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ' + F.nested_json(100000) + "}")


def _fifo_config(folder: Path, env: Env) -> None:
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")


def _symlink_tokenizer(folder: Path, env: Env) -> None:
    target = env.outside / "tokenizer.json"
    target.write_text('{"secret": true}')
    os.symlink(target, folder / "tokenizer.json")


_ckpt_case("ckpt_index_outside", _index_outside, "secret.safetensors")
_ckpt_case("ckpt_symlinked_tokenizer", _symlink_tokenizer, "tokenizer.json")
_ckpt_case("ckpt_symlinked_config", _symlink_config, "config.json")
_ckpt_case("ckpt_symlinked_shard", _symlink_shard, "model.safetensors")
_ckpt_case("ckpt_nested_index", _nested_index, "index.json")
_ckpt_case("ckpt_config_fifo", _fifo_config, "named pipe")


# --- predict / batch data ---------------------------------------------------------------------------

def _predict(env: Env, name: str, data: Path, expect: str) -> Case:
    dest = env.dest(f"{name}.npz")
    return Case(name, ["predict", str(env.pkg), "-i", str(data), "-o", str(dest), "--units", "reference"], expect,
                dest=dest, package=env.pkg)


def _data_case(name: str, make: Callable[[Path], Path], expect: str) -> None:
    def fn(env: Env) -> Case:
        return _predict(env, name, make(env.dir(name)), expect)
    fn.__name__ = name
    case(fn)


_data_case("data_pickled", lambda d: F.pickled_npz(d / "x.npz"), "input_ids")
_data_case("data_wrong_dtype", lambda d: F.npz(d / "x.npz", input_ids=np.zeros((1, 8), np.float32)), "input_ids")
_data_case("data_wrong_shape", lambda d: F.npz(d / "x.npz", input_ids=np.zeros((3, 5), np.int32)), "input_ids")
_data_case("data_wrong_name", lambda d: F.npz(d / "x.npz", tokens=np.zeros((1, 8), np.int32)), "tokens")
_data_case("data_nan", lambda d: F.npz(d / "x.npz", input_ids=np.full((1, 8), np.nan, np.float32)), "input_ids")
_data_case("data_ids_out_of_range", lambda d: F.npz(d / "x.npz", input_ids=np.full((1, 8), 10**6, np.int32)),
           "out of range")
_data_case("data_not_npz", lambda d: (d / "x.npz").write_text("hello") and d / "x.npz", "x.npz")  # type: ignore[func-returns-value]
_data_case("data_npy_not_npz", lambda d: (np.save(d / "x.npy", np.zeros((1, 8), np.int32)), d / "x.npy")[1], "x.npy")
_data_case("data_huge_array", lambda d: F.huge_npz(d / "x.npz"), "input_ids")


@case
def data_fifo(env: Env) -> Case:
    p = env.dir("data_fifo") / "x.npz"
    os.mkfifo(p)
    return _predict(env, "data_fifo", p, "named pipe")


def _batch(env: Env, name: str, dataset: Path, expect: str) -> Case:
    dest = env.dest(f"{name}-job")
    return Case(name, ["batch", str(env.pkg), str(dataset), "-o", str(dest), "--units", "reference"], expect,
                dest=dest, package=env.pkg)


@case
def batch_broken_jsonl(env: Env) -> Case:
    p = env.dir("batch_broken_jsonl") / "d.jsonl"
    p.write_text('{"input_ids": [[1,2,3,4,5,6,7,8]]}\n{"input_ids": [[1,2,\n')
    return _batch(env, "batch_broken_jsonl", p, "d.jsonl")


@case
def batch_nested_jsonl(env: Env) -> Case:
    p = env.dir("batch_nested_jsonl") / "d.jsonl"
    p.write_text('{"input_ids": ' + F.nested_json(100000) + "}\n")
    return _batch(env, "batch_nested_jsonl", p, "d.jsonl")


@case
def batch_huge_npy_header(env: Env) -> Case:
    return _batch(env, "batch_huge_npy_header", F.huge_npy_folder(env.root / "batch_huge_npy"), "item0.npz")


@case
def batch_fifo(env: Env) -> Case:
    p = env.dir("batch_fifo") / "d.jsonl"
    os.mkfifo(p)
    return _batch(env, "batch_fifo", p, "named pipe")


# --- packages ---------------------------------------------------------------------------------------

def _pkg_case(name: str, mutate: Callable[[Path, Env], Any], expect: str) -> None:
    def fn(env: Env) -> Case:
        pkg = F.package_copy(env.pkg, env.root / name / "m.mlpackage")
        mutate(pkg, env)
        dest = env.dest(f"{name}.npz")
        return Case(name, ["predict", str(pkg), "-i", str(env.good_npz), "-o", str(dest), "--units", "reference"],
                    expect, dest=dest, package=pkg)
    fn.__name__ = name
    case(fn)


_pkg_case("pkg_manifest_dotdot", lambda p, e: F.manifest_path(p, "../../../outside/stolen.mlmodel"), "Manifest.json")
_pkg_case("pkg_manifest_absolute", lambda p, e: F.manifest_path(p, str(e.secret)), "Manifest.json")
_pkg_case("pkg_spec_symlink", lambda p, e: F.spec_symlink(p, e.outside), "model.mlmodel")
_pkg_case("pkg_truncated_weights", lambda p, e: F.truncate_weights(p), "weight.bin")
_pkg_case("pkg_garbage_spec", lambda p, e: F.garbage_spec(p), "model.mlmodel")
_pkg_case("pkg_nested_manifest", lambda p, e: (p / "Manifest.json").write_text(F.nested_json(100000)), "Manifest.json")


# --- pipeline and capability files ------------------------------------------------------------------

def _pipeline(env: Env, name: str, text: str | bytes, expect: str, dest: Path | None = None) -> Case:
    p = env.dir(name) / "p.toml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return Case(name, ["pipeline", "run", str(p)], expect, dest=dest)


@case
def pipeline_nested_toml(env: Env) -> Case:
    return _pipeline(env, "pipeline_nested_toml", "x = " + "[" * 100000 + "]" * 100000 + "\n", "p.toml")


@case
def pipeline_not_text(env: Env) -> Case:
    return _pipeline(env, "pipeline_not_text", bytes(range(256)) * 4, "p.toml")


@case
def pipeline_output_dir_is_file(env: Env) -> Case:
    d = env.dir("pipeline_output_dir_is_file")
    (d / "out").write_text("a file")
    text = (f'version = 1\noutput_dir = "out"\n[[model]]\nname = "m"\nsource = "{MODELS / "bitnet_offline.onnx"}"\n'
            'targets = [{ os = "macOS" }]\n')
    return _pipeline(env, "pipeline_output_dir_is_file", text, "output_dir: ")


@case
def pipeline_huge_format_width(env: Env) -> Case:
    text = (f'version = 1\noutput_dir = "{env.dest("pipeline_fmt")}"\n[[model]]\nname = "m"\n'
            f'source = "{MODELS / "bitnet_offline.onnx"}"\ntargets = [{{ os = "macOS" }}]\n'
            'output = "{name:>4000000000}.mlpackage"\n')
    return _pipeline(env, "pipeline_huge_format_width", text, "output", dest=env.dest("pipeline_fmt"))


def _caps(env: Env, name: str, content: bytes | None, expect: str) -> Case:
    p = env.dir(name) / "caps.toml"
    if content is None:
        os.mkfifo(p)
    else:
        p.write_bytes(content)
    return Case(name, ["check", str(MODELS / "bitnet_offline.onnx"), "--target", "ios", "--capabilities", str(p)],
                expect)


@case
def caps_negative_limit(env: Env) -> Case:
    return _caps(env, "caps_negative_limit", b"[limits.max_dimension]\nvalue = -5\n", "max_dimension")


@case
def caps_not_text(env: Env) -> Case:
    return _caps(env, "caps_not_text", bytes(range(256)) * 4, "caps.toml")


@case
def caps_fifo(env: Env) -> Case:
    return _caps(env, "caps_fifo", None, "named pipe")


@case
def caps_nested(env: Env) -> Case:
    return _caps(env, "caps_nested", b"x = " + b"[" * 100000 + b"]" * 100000 + b"\n", "caps.toml")


@case
def verify_input_fifo(env: Env) -> Case:
    p = env.dir("verify_input_fifo") / "x.npz"
    os.mkfifo(p)
    return Case("verify_input_fifo", ["verify", str(env.root / "tiny.onnx"), str(env.pkg), "--input", str(p)],
                "named pipe", package=env.pkg)


# --- running ----------------------------------------------------------------------------------------

def _tiny_onnx(path: Path) -> None:
    """input_ids [1, 8] -> Gather(embedding [32, 16]) -> MatMul [16, 32] -> logits: a package in seconds."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "emb")
    w = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"),
         helper.make_node("MatMul", ["h", "w"], ["logits"], name="head")], "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8, 32])], initializer=[emb, w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    path.write_bytes(m.SerializeToString())


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def run_corpus(cases: list[Case], work: Path) -> dict[str, dict[str, Any]]:
    """Run every case in as few runner processes as possible; a hung or crashed case ends its process."""
    results: dict[str, dict[str, Any]] = {}
    remaining = list(cases)
    attempt = 0
    while remaining:
        attempt += 1
        spec, out = work / f"spec{attempt}.json", work / f"results{attempt}.jsonl"
        spec.write_text(json.dumps({"timeout_s": TIMEOUT_S, "cases": [{"id": c.id, "argv": c.argv} for c in remaining]}))
        proc = subprocess.run([sys.executable, "-m", "tests.hostile.runner", str(spec), str(out)], cwd=REPO,
                              preexec_fn=_limit, capture_output=True, text=True,
                              timeout=TIMEOUT_S * len(remaining) + 120)
        got = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
        for r in got:
            results[r["id"]] = r
        done = {r["id"] for r in got}
        rest = [c for c in remaining if c.id not in done]
        if rest and not got or (rest and got[-1]["timeout"] is False):
            # the process died inside rest[0] (no record): blame it and go on with the others
            results[rest[0].id] = {"id": rest[0].id, "exit_code": f"crashed ({proc.returncode})", "stdout": "",
                                   "stderr": proc.stderr[-4000:], "opened": [], "timeout": False, "seconds": None}
            rest = rest[1:]
        remaining = rest
    return results


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Case], dict[str, dict[str, Any]], Env]:
    from bitnet_coreml.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("hostile")
    outside = root / "outside"
    outside.mkdir()
    secret = outside / "secret.bin"
    secret.write_bytes(np.eye(4, dtype=np.float32).tobytes() * 4)
    (outside / "secret.safetensors").write_bytes((CKPT / "model.safetensors").read_bytes())
    _tiny_onnx(root / "tiny.onnx")
    pkg = root / "good" / "tiny.mlpackage"
    pkg.parent.mkdir()
    convert(root / "tiny.onnx", pkg, ConvertOptions(precision="fp32", check=False))
    good = F.npz(root / "good" / "ids.npz", input_ids=np.arange(8, dtype=np.int32).reshape(1, 8))
    out = root / "dest"
    out.mkdir()
    env = Env(root, outside, secret, pkg, good, out)
    cases = {name: build(env) for name, build in BUILDERS.items()}
    for c in cases.values():
        if c.package is not None:
            c.digest = F.tree_digest(c.package)
    results = run_corpus(list(cases.values()), root)
    return cases, results, env


def test_corpus_size() -> None:
    assert len(BUILDERS) >= 40


@pytest.mark.parametrize("name", list(BUILDERS))
def test_hostile_input(corpus: tuple[dict[str, Case], dict[str, dict[str, Any]], Env], name: str) -> None:
    cases, results, env = corpus
    c, r = cases[name], results[name]
    lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
    summary = f"{name}: exit {r['exit_code']}, stderr {r['stderr'][-1500:]!r}"
    assert not r["timeout"], f"{name}: still running after {TIMEOUT_S} s"
    assert "Traceback" not in r["stderr"] + r["stdout"], summary
    assert r["exit_code"] == 2, summary
    assert len(lines) == 1 and lines[0].startswith("error: "), summary
    assert c.expect.lower() in lines[0].lower(), f"{name}: the error line does not name {c.expect!r}: {lines[0]}"
    outside = str(env.outside.resolve())
    read_outside = [p for p in r["opened"] if os.path.realpath(p).startswith(outside)]
    assert not read_outside, f"{name}: opened files outside the model's folder: {read_outside}"
    if c.dest is not None:
        assert not c.dest.exists(), f"{name}: left {c.dest} behind"
    leftovers = sorted(p.name for p in env.out.iterdir() if p.name.startswith(f".{name}"))
    assert not leftovers, f"{name}: left temporary files at the destination: {leftovers}"
    if c.package is not None:
        assert F.tree_digest(c.package) == c.digest, f"{name}: the input package changed"
