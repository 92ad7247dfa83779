"""Export-recipe matrix: one small trained BitNet model exported every way a user might (issue 12).

Usage (from the repository root; ``make export-matrix`` does this with the ``.venv-export`` venv):

    .venv-export/bin/python models/make_export_matrix.py [--only ROW ...]

Writes ``models/exports/``: one ONNX file (or folder) per row of ``ROWS``, torch's logits for each
model in ``<oracle>.npz`` (``input_ids`` int64 ``[1, 16]``, ``logits``, ``eval_input_ids``
``[E, 1, 16]``, ``eval_logits``; the oracle every test compares against), and ``MATRIX.json``: per
row the recipe, the files, the graph facts, ONNX Runtime vs torch, and what the converter is
expected to do with it (``convert``, possibly with ``--seq-len``, or ``refuse`` with exit 2 and the
reason). Recipes the exporter itself cannot produce are listed under ``not_exportable`` with the
error torch gives. ``tests/convert/test_export_matrix.py`` converts every row and compares with torch.

The models: ``tiny`` (vocab 128, hidden 32, 1 layer, 2 heads / 1 KV head, intermediate 96), trained
like the bundled models (models/bitnet_export.py, ``TrainSpec``) so its predictions are peaked, and
ternarised into each weight form; plus the default-exporter *twins* of the bundled ``bitnet_online``
and ``bitnet_packed`` (same training, same seed: torch's logits must equal the bundled ``.npz``
bit for bit, which the script checks, so the twins reuse that oracle). At the bundled size the
exporter's optimizer folds the WeightQuant / unpack of the small weights (q/k/v/o, <= 8192
elements) and leaves the large ones (gate/up/down): the mixed graph a user gets.

Everything is seeded; exit 1 if ONNX Runtime does not reproduce torch on a row it can run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bitnet_export import (
    LogitsWrapper,
    ModelSpec,
    TrainSpec,
    build_trained_model,
    chain_input_ids,
    eager_bitlinear_helpers,
    eager_quant_autograd,
    export_program,
    graph_facts,
    ort_logits,
    parity,
    strip_metadata,
    torch_logits,
)
from make_models import MODELS, TRAIN

log = logging.getLogger("make_export_matrix")

HERE = Path(__file__).resolve().parent
OUT = HERE / "exports"

TINY = dict(vocab=128, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=96, seed=10)
TINY_TRAIN = TrainSpec(states=128, eval_batches=3, seed=10)
# ORT must reproduce torch on every row it can run (fp16 exports: ORT's fp16 kernels round differently).
MIN_COSINE = {"float32": 0.9999, "float16": 0.999}
EXTERNAL_THRESHOLD = 1024  # bytes; onnx.save_model's size_threshold default


@dataclass(frozen=True)
class Row:
    """One export recipe: which model, how it is exported, and what the converter must do with it."""

    name: str
    model: str  # key of MODEL_MAKERS
    recipe: str  # what a user would write, for MATRIX.json and the README
    make: Callable[[Any, np.ndarray, Path], Path]  # (torch model, example ids, out dir) -> the .onnx
    dtype: str = "float32"  # the torch model's dtype (and the oracle's)
    expect: str = "convert"  # convert | refuse
    convert_args: tuple[str, ...] = ()
    refusal: str = ""  # for expect == "refuse": a phrase the one-line error contains
    notes: list[str] = field(default_factory=list)


# --- the models ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints progress lines and torchvision warnings; keep the script's output readable."""
    with warnings.catch_warnings(), open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        warnings.simplefilter("ignore")
        yield


_CACHE: dict[str, tuple[Any, np.ndarray, np.ndarray]] = {}


def _trained(spec: ModelSpec, train: TrainSpec) -> tuple[Any, np.ndarray, np.ndarray]:
    if spec.name not in _CACHE:
        model, chain, _ = build_trained_model(spec, train)
        ids, eval_ids = chain_input_ids(spec, chain, train)
        _CACHE[spec.name] = (model, ids, eval_ids)
    return _CACHE[spec.name]


def tiny(form: str) -> tuple[Any, np.ndarray, np.ndarray]:
    return _trained(ModelSpec(name=f"tiny_{form}", form=form, **TINY), TINY_TRAIN)  # type: ignore[arg-type]


def bundled_twin(name: str) -> tuple[Any, np.ndarray, np.ndarray]:
    (spec,) = [m for m in MODELS if m.name == name]
    return _trained(spec, TRAIN[name])


MODEL_MAKERS: dict[str, Callable[[], tuple[Any, np.ndarray, np.ndarray]]] = {
    "tiny_offline": lambda: tiny("offline"),
    "tiny_online": lambda: tiny("online"),
    "tiny_packed": lambda: tiny("packed"),
    "bitnet_online": lambda: bundled_twin("bitnet_online"),
    "bitnet_packed": lambda: bundled_twin("bitnet_packed"),
}
# Twins compare against the bundled oracle (models/<name>.npz); the tiny models get their own.
BUNDLED_ORACLES = {"bitnet_online", "bitnet_packed"}


def torch_model(key: str, dtype: str) -> tuple[Any, np.ndarray, np.ndarray]:
    import torch

    model, ids, eval_ids = MODEL_MAKERS[key]()
    if dtype != "float32":
        model = copy.deepcopy(model).to(getattr(torch, dtype))
    return model, ids, eval_ids


# --- the recipes -----------------------------------------------------------------------------------


def _dynamo(*, external_data: bool = True, **kw: Any) -> Callable[[Any, np.ndarray, Path], Path]:
    """``torch.onnx.export(..., dynamo=True, **kw)`` saved by the exporter (external data, its default)."""

    def make(model: Any, ids: np.ndarray, path: Path) -> Path:
        with _quiet():
            program = export_program(model, ids, **kw)
        strip_metadata(program.model, keep=())
        _save_program(program, path, external_data=external_data)
        return path

    return make


def _save_program(program: Any, path: Path, *, external_data: bool) -> None:
    """``ONNXProgram.save`` (the exporter's own writer) into a scratch folder, then rename."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        program.save(tmp / path.name, external_data=external_data)
        for f in tmp.iterdir():
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dynamic(model: Any, ids: np.ndarray, path: Path) -> Path:
    """Dynamic batch and sequence. The example has batch 2: torch specialises a size-1 dimension."""
    import torch

    example = np.concatenate([ids, ids[:, ::-1]])
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")},)
    return _dynamo(dynamic_shapes=dims)(model, example, path)


class MaskedLogitsWrapper(torch.nn.Module):
    """For the TorchScript exporter: pass an all-ones attention mask, so transformers does not look for
    packed sequences (``torch.diff``, which TorchScript cannot export in any opset)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Any) -> Any:
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits


def _torchscript(opset: int | None) -> Callable[[Any, np.ndarray, Path], Path]:
    def make(model: Any, ids: np.ndarray, path: Path) -> Path:
        import onnx
        import torch

        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
        try:
            kw = {} if opset is None else {"opset_version": opset}
            # transformers' WeightQuant / ActQuant forwards are torch.compile'd: jit.trace refuses them.
            with _quiet(), eager_quant_autograd(threads=torch.get_num_threads()), eager_bitlinear_helpers(), \
                    torch.no_grad():
                torch.onnx.export(MaskedLogitsWrapper(model).eval(), (torch.from_numpy(ids),), str(tmp / path.name),
                                  dynamo=False, input_names=["input_ids"], output_names=["logits"], **kw)
            proto = onnx.load(str(tmp / path.name))
            onnx.save(proto, str(tmp / path.name))  # one file, inline (the TorchScript exporter's layout)
            os.replace(tmp / path.name, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    return make


def _many_files(model: Any, ids: np.ndarray, path: Path) -> Path:
    """The default graph with every initializer of 1 KiB or more (onnx's default threshold) in its own
    file under ``weights/`` (the per-tensor layout of large exports), via onnx's external-data helpers.
    Smaller ones stay inline: ONNX Runtime's shape inference cannot read e.g. a Reduce's axes from a file."""
    import onnx
    from onnx import external_data_helper as edh

    folder = path.parent / path.stem
    with _quiet():
        program = export_program(model, ids)
    strip_metadata(program.model, keep=())
    proto = program.model_proto
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        (tmp / "weights").mkdir()
        for i, t in enumerate(proto.graph.initializer):
            if len(t.raw_data) < EXTERNAL_THRESHOLD:
                continue
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", t.name)
            edh.set_external_data(t, location=f"weights/{i:03d}_{safe}.bin")
        edh.write_external_data_tensors(proto, str(tmp))
        onnx.save(proto, str(tmp / "model.onnx"))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / "model.onnx"


def _postprocessed(kind: str) -> Callable[[Any, np.ndarray, Path], Path]:
    """The default graph after onnxsim, or after ONNX Runtime's basic graph optimisations."""

    def make(model: Any, ids: np.ndarray, path: Path) -> Path:
        import onnx

        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
        try:
            # inline weights: ORT's optimized_model_filepath cannot re-save external data it read
            src = _dynamo(external_data=False)(model, ids, tmp / "default.onnx")
            if kind == "onnxsim":
                import onnxsim

                simplified, ok = onnxsim.simplify(onnx.load(str(src)))
                if not ok:
                    raise RuntimeError("onnxsim could not validate the simplified model")
                onnx.save(simplified, str(tmp / path.name))
            else:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
                opts.optimized_model_filepath = str(tmp / path.name)
                ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
            os.replace(tmp / path.name, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    return make


def newest_opset(out: Path, failures: dict[str, dict[str, str]]) -> int:
    """The newest ai.onnx opset the exporter writes a valid BitNet graph for: from onnx's own maximum
    down, the first whose export declares that opset and loads in ONNX Runtime. Newer ones that fail
    are recorded in ``failures`` (the exporter converts its opset-18 graph up with onnx's version
    converter, which lacks adapters for some ops)."""
    import onnx
    import onnxruntime as ort

    model, ids, _ = torch_model("tiny_offline", "float32")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-opset-", dir=out))
    try:
        for v in range(int(onnx.defs.onnx_opset_version()), 18, -1):
            path = tmp / f"opset{v}.onnx"
            try:
                _dynamo(opset_version=v)(model, ids, path)
                got = {o.domain or "ai.onnx": o.version for o in onnx.load(str(path), load_external_data=False).opset_import}
                if got.get("ai.onnx") != v:
                    raise RuntimeError(f"the exporter wrote opset {got.get('ai.onnx')} instead")
                ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                return v
            except Exception as exc:  # noqa: BLE001 - torch / onnx / ORT raise many types; the message is the fact
                failures[f"dynamo_opset{v}"] = {"recipe": f"dynamo=True, opset_version={v}", "result": _first_line(exc)}
                log.info("opset %d: %s", v, failures[f"dynamo_opset{v}"]["result"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    raise RuntimeError("no opset above 18 exports")


def _first_line(exc: BaseException) -> str:
    first = next((ln for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {first[:240]}"


def rows(top: int) -> list[Row]:
    return [
        Row("dynamo_default", "tiny_offline", 'torch.onnx.export(m, (ids,), "m.onnx", dynamo=True)', _dynamo(),
            notes=["optimize=True and external_data=True are the exporter's defaults: m.onnx + m.onnx.data"]),
        Row("dynamo_default_online", "tiny_online", "dynamo=True (defaults), online AutoBitLinear", _dynamo()),
        Row("dynamo_default_packed", "tiny_packed", "dynamo=True (defaults), packed BitLinear", _dynamo()),
        Row("twin_bitnet_online", "bitnet_online", "dynamo=True (defaults), bundled bitnet_online config", _dynamo(),
            notes=["the exporter folds the WeightQuant of q/k/v/o (<= 8192 elements), not of gate/up/down"]),
        Row("twin_bitnet_packed", "bitnet_packed", "dynamo=True (defaults), bundled bitnet_packed config", _dynamo(),
            notes=["the exporter folds part of each unpack chain (its inputs <= 8192 elements)"]),
        Row("dynamo_raw", "tiny_offline", "dynamo=True, optimize=False", _dynamo(optimize=False),
            notes=["clamp is Min(Max(x, lo), hi), one activation quantiser per linear (no CSE)"]),
        Row("dynamo_raw_online", "tiny_online", "dynamo=True, optimize=False, online", _dynamo(optimize=False)),
        Row("dynamo_raw_packed", "tiny_packed", "dynamo=True, optimize=False, packed", _dynamo(optimize=False)),
        Row("dynamo_opset18", "tiny_offline", "dynamo=True, opset_version=18", _dynamo(opset_version=18)),
        Row(f"dynamo_opset{top}", "tiny_offline", f"dynamo=True, opset_version={top} (the newest onnx offers)",
            _dynamo(opset_version=top),
            notes=["from opset 23 on the exporter writes ONNX Attention (and RMSNormalization at 23)"]),
        Row("dynamo_opset23", "tiny_offline", "dynamo=True, opset_version=23", _dynamo(opset_version=23)),
        Row("torchscript_opset17", "tiny_offline", "dynamo=False, opset_version=17", _torchscript(17),
            notes=["needs the eager WeightQuant/ActQuant forwards and an explicit attention_mask (see not_exportable)"]),
        Row("torchscript_packed", "tiny_packed", "dynamo=False (its default opset), packed", _torchscript(None)),
        Row("fp16", "tiny_offline", "m.half(); dynamo=True (defaults)", _dynamo(), dtype="float16"),
        Row("bf16", "tiny_offline", "m.to(torch.bfloat16); dynamo=True (defaults)", _dynamo(), dtype="bfloat16",
            expect="refuse", refusal="reads the bfloat16 initializer",
            notes=["Core ML has no bfloat16 tensors and ONNX Runtime's CPU kernels cannot run the graph"]),
        Row("external_many_files", "tiny_offline", "default graph, one external file per tensor under weights/",
            _many_files),
        Row("dynamic", "tiny_offline", "dynamo=True, dynamic_shapes batch and sequence", _dynamic,
            convert_args=("--seq-len", "16"),
            notes=["convert needs --seq-len (a dynamic batch becomes 1); without it: exit 2"]),
        Row("onnxsim", "tiny_offline", "the default graph after onnxsim.simplify", _postprocessed("onnxsim")),
        Row("ort_basic", "tiny_offline", "the default graph after ORT_ENABLE_BASIC, optimized_model_filepath",
            _postprocessed("ort")),
    ]


def _probe_dynamo_opset17(model: Any, ids: np.ndarray, path: Path) -> str:
    """The dynamo exporter builds opset 18 and converts down; for BitNet the conversion fails and the
    exporter silently keeps 18. Returns the opset it wrote."""
    import onnx

    _dynamo(opset_version=17)(model, ids, path)
    return str({o.domain or "ai.onnx": o.version for o in onnx.load(str(path), load_external_data=False).opset_import})


def _probe_torchscript_plain(model: Any, ids: np.ndarray, path: Path) -> str:
    import torch

    with _quiet(), eager_bitlinear_helpers(), torch.no_grad():
        torch.onnx.export(LogitsWrapper(model).eval(), (torch.from_numpy(ids),), str(path), dynamo=False,
                          input_names=["input_ids"], output_names=["logits"])
    return "exported"


def _probe_torchscript_packed17(model: Any, ids: np.ndarray, path: Path) -> str:
    return str(_torchscript(17)(model, ids, path))


PROBES: dict[str, tuple[str, str, Callable[[Any, np.ndarray, Path], str]]] = {
    "dynamo_opset17": ("tiny_offline", "dynamo=True, opset_version=17", _probe_dynamo_opset17),
    "torchscript_as_is": ("tiny_offline", "dynamo=False with transformers' own BitNet layers and no mask",
                          _probe_torchscript_plain),
    "torchscript_packed_opset17": ("tiny_packed", "dynamo=False, opset_version=17, packed", _probe_torchscript_packed17),
}


def probe_not_exportable(out: Path) -> dict[str, dict[str, str]]:
    """Recipes torch cannot export for BitNet (or exports as something else): what it says."""
    found: dict[str, dict[str, str]] = {}
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-probe-", dir=out))
    try:
        for name, (key, recipe, fn) in PROBES.items():
            model, ids, _ = torch_model(key, "float32")
            try:
                with _quiet():
                    got = fn(model, ids, tmp / f"{name}.onnx")
                found[name] = {"recipe": recipe, "result": f"exported, opset {got}" if name == "dynamo_opset17" else got}
            except Exception as exc:  # noqa: BLE001 - torch raises many types; the message is the fact
                found[name] = {"recipe": recipe, "result": _first_line(exc)}
            log.info("probe %s: %s", name, found[name]["result"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return found


# --- writing ---------------------------------------------------------------------------------------


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, **arrays)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def oracle(key: str, dtype: str, out: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """Write (or, for twins, check) torch's logits of model ``key`` in ``dtype``. Returns (npz path
    relative to ``out``, all ids ``[N, 1, S]``, all logits ``[N, 1, S, V]``)."""
    model, ids, eval_ids = torch_model(key, dtype)
    logits = torch_logits(model, ids)
    eval_logits = np.stack([torch_logits(model, x) for x in eval_ids])
    all_ids = np.concatenate([ids[None], eval_ids])
    all_logits = np.concatenate([logits[None], eval_logits]).astype(np.float32)
    if key in BUNDLED_ORACLES:
        ref = np.load(HERE / f"{key}.npz")
        same = np.array_equal(ref["input_ids"], ids) and np.array_equal(ref["logits"], logits) \
            and np.array_equal(ref["eval_logits"], eval_logits)
        if not same:
            raise RuntimeError(f"{key}: the retrained model does not reproduce models/{key}.npz bit for bit")
        return f"../{key}.npz", all_ids, all_logits
    name = key if dtype == "float32" else f"{key}_{dtype}"
    _save_npz(out / f"{name}.npz", input_ids=ids, logits=logits.astype(np.float32),
              eval_input_ids=eval_ids, eval_logits=eval_logits.astype(np.float32))
    return f"{name}.npz", all_ids, all_logits


def make_row(row: Row, out: Path) -> dict[str, Any]:
    model, ids, _ = torch_model(row.model, row.dtype)
    path = row.make(model, ids, out / f"{row.name}.onnx")
    npz, all_ids, all_logits = oracle(row.model, row.dtype, out)
    facts = graph_facts(path)
    entry: dict[str, Any] = {
        "recipe": row.recipe, "model": row.model, "dtype": row.dtype, "file": str(path.relative_to(out)),
        "oracle": npz, "expect": row.expect, "convert_args": list(row.convert_args), "refusal": row.refusal,
        "notes": row.notes, "graph": facts,
    }
    if row.dtype == "bfloat16":
        entry["ort_vs_torch"] = "not run: ONNX Runtime's CPU provider has no bfloat16 kernels for this graph"
    else:
        got = np.stack([ort_logits(path, x) for x in all_ids])
        par = parity(all_logits, got)
        entry["ort_vs_torch"] = par
        if par["cosine"] < MIN_COSINE[row.dtype] or par["argmax_agreement"] < 0.95:
            raise RuntimeError(f"{row.name}: ONNX Runtime does not reproduce torch: {par}")
    files = [path, *(path.parent / loc for loc in facts["external_data"])]
    entry["files_bytes"] = sum(f.stat().st_size for f in files)
    return entry


def _write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="rows to regenerate (default: all, and the not-exportable probes)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    import onnx
    import onnxruntime
    import onnxsim
    import transformers

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    matrix_path = out / "MATRIX.json"
    matrix: dict[str, Any] = json.loads(matrix_path.read_text()) if matrix_path.exists() else {}
    matrix["generated_with"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                                "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                                "onnxsim": onnxsim.__version__}
    matrix["tiny"] = {"spec": TINY, "training": TINY_TRAIN.to_dict()}
    opset_failures: dict[str, dict[str, str]] = {}
    top = int(matrix.get("newest_opset", 0)) if args.only else newest_opset(out, opset_failures)
    matrix["newest_opset"] = top
    all_rows = rows(top)
    names = set(args.only or [r.name for r in all_rows])
    unknown = names - {r.name for r in all_rows}
    if unknown:
        print(f"unknown row(s) {sorted(unknown)}; known: {[r.name for r in all_rows]}", file=sys.stderr)
        return 2
    entries = matrix.setdefault("rows", {})
    failed = False
    for row in all_rows:
        if row.name not in names:
            continue
        try:
            entries[row.name] = make_row(row, out)
        except Exception as exc:  # noqa: BLE001 - report every row, then fail
            print(f"FAIL {row.name}: {_first_line(exc)}", file=sys.stderr)
            failed = True
            continue
        par = entries[row.name]["ort_vs_torch"]
        log.info("%-22s %-8s %s", row.name, row.dtype,
                 par if isinstance(par, str) else f"ORT vs torch cosine {par['cosine']:.9f} max-abs {par['max_abs']:.2g}")
        matrix["rows"] = {r.name: entries[r.name] for r in all_rows if r.name in entries}
        _write_json(matrix_path, matrix)  # after every row: a failure later keeps what was made
    if not args.only:
        matrix["not_exportable"] = {**opset_failures, **probe_not_exportable(out)}
    _write_json(matrix_path, matrix)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
