"""Parity of a converted package against its source graph.

The source runs in ONNX Runtime; the package runs in the project's numpy reference executor (any
OS) and on each requested compute unit through the runtime (``units``; default: the Core ML units
this machine has, none off macOS). A unit runs exactly as ``predict`` runs it: a
:class:`~bitnet_coreml.runtime.Predictor` with that unit alone, so a Core ML unit is probed in a
subprocess first and transient errors are retried. A requested unit that cannot answer (unavailable
when asked for by name, probe killed, load or prediction failed) fails parity (exit 1) and is named
in ``unit_failures``; it is never only logged. Every output is compared with cosine
similarity, relative L2 and max-abs; logits-like outputs (float, rank >= 2, last axis >= 2) also
with top-1 agreement (argmax equal) and top-5 agreement (the reference's argmax is among the
package's five best). When the input ``.npz`` also holds arrays named like the outputs (the bundled
models carry torch's logits), the package is compared with those too.

A Hugging Face checkpoint folder is built at the package's sequence length (its ``input_ids`` input
is ``[1, S]``) unless ``seq_len`` is given.

Thresholds default by the package's precision (fp16: cosine >= 0.999, top-1 >= 0.98; fp32: cosine
>= 0.9999, top-1 >= 0.995) and are configurable; :class:`ParityError` (exit 1) below them. For fp16
packages the top-1 gate counts a mismatch only where the reference's top two logits are more than
``TIE_FP16_STEPS`` fp16 steps apart (``top1_resolvable``); strict top-1 is always reported beside it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitnet_coreml.errors import InputError, ModelLoadError, ParityError
from bitnet_coreml.vocab import COREML_UNITS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Thresholds:
    """Minimum cosine and top-1/top-5 agreement; maximum relative L2 (None: not checked)."""

    cosine: float = 0.999
    top1: float = 0.98
    top5: float | None = None
    rel_l2: float | None = None

    @staticmethod
    def for_precision(precision: str) -> Thresholds:
        return Thresholds(cosine=0.9999, top1=0.995) if precision == "fp32" else Thresholds()


@dataclass
class Comparison:
    output: str
    reference: str
    runner: str
    cosine: float
    rel_l2: float
    max_abs: float
    top1: float | None = None
    top5: float | None = None
    top1_resolvable: float | None = None
    passed: bool = True
    failures: list[str] = field(default_factory=list)


@dataclass
class ParityReport:
    source: str
    package: str
    precision: str
    thresholds: Thresholds
    comparisons: list[Comparison] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unit_failures: list[str] = field(default_factory=list)  # requested compute units that did not answer

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons) and bool(self.comparisons) and not self.unit_failures

    def failures(self) -> list[str]:
        """One phrase per failure: each failing comparison, each requested unit that did not answer."""
        return [f"{c.runner} vs {c.reference} on {c.output!r}: {'; '.join(c.failures)}"
                for c in self.comparisons if not c.passed] + list(self.unit_failures)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "package": self.package, "precision": self.precision,
                "thresholds": asdict(self.thresholds), "passed": self.passed,
                "comparisons": [asdict(c) for c in self.comparisons], "skipped": list(self.skipped),
                "unit_failures": list(self.unit_failures)}


# --- metrics -----------------------------------------------------------------------------------------


# A top-1 mismatch counts only when the reference's top two logits are further apart than this many
# fp16 steps at the row's magnitude: closer than that, the package's storage format cannot order them
# and either answer is right (random-init models have many such near-ties; trained ones few).
TIE_FP16_STEPS = 2


def _fp16_step(x: np.ndarray) -> np.ndarray:
    """Spacing of fp16 numbers at magnitude ``x`` (elementwise)."""
    x = np.maximum(np.abs(x), 2.0**-14)
    return 2.0 ** (np.floor(np.log2(x)) - 10)


def metrics(ref: np.ndarray, got: np.ndarray, *, fp16_ties: bool = False) -> dict[str, float | None]:
    """cosine, relative L2, max-abs, and for logits-like arrays top-1 / top-5 agreement.

    ``top1`` is strict argmax agreement. ``top1_resolvable`` (with ``fp16_ties``) also accepts the
    package's argmax when its reference logit is within ``TIE_FP16_STEPS`` fp16 steps of the reference
    maximum: a gap fp16 cannot represent is a tie, not an error. Both are reported; fp16 packages are
    gated on the second.
    """
    r = np.asarray(ref, np.float64)
    g = np.asarray(got, np.float64)
    if r.shape != g.shape:
        raise ParityError(f"output shapes differ: reference {list(r.shape)}, package {list(g.shape)}")
    rf, gf = r.reshape(-1), g.reshape(-1)
    nr, ng = np.linalg.norm(rf), np.linalg.norm(gf)
    if nr == 0 and ng == 0:
        cos = 1.0
    elif nr == 0 or ng == 0 or not np.isfinite(gf).all():
        cos = 0.0
    else:
        cos = float(rf @ gf / (nr * ng))
    out: dict[str, float | None] = {
        "cosine": cos,
        "rel_l2": float(np.linalg.norm(rf - gf) / nr) if nr > 0 else float(np.linalg.norm(gf)),
        "max_abs": float(np.max(np.abs(rf - gf))) if rf.size else 0.0,
        "top1": None, "top5": None, "top1_resolvable": None,
    }
    if r.ndim >= 2 and r.shape[-1] >= 2:
        r2, g2 = r.reshape(-1, r.shape[-1]), g.reshape(-1, g.shape[-1])
        ra = r2.argmax(-1)
        ga = g2.argmax(-1)
        out["top1"] = float(np.mean(ra == ga))
        if fp16_ties:
            rows = np.arange(r2.shape[0])
            rmax = r2[rows, ra]
            tol = TIE_FP16_STEPS * _fp16_step(rmax)
            out["top1_resolvable"] = float(np.mean((ra == ga) | (r2[rows, ga] >= rmax - tol)))
        k = min(5, r.shape[-1])
        top = np.argpartition(-g2, k - 1, axis=-1)[:, :k]
        out["top5"] = float(np.mean((top == ra[:, None]).any(-1)))
    return out


def _judge(c: Comparison, t: Thresholds) -> None:
    if c.cosine < t.cosine:
        c.failures.append(f"cosine {c.cosine:.6f} < {t.cosine}")
    if t.rel_l2 is not None and c.rel_l2 > t.rel_l2:
        c.failures.append(f"relative L2 {c.rel_l2:.4g} > {t.rel_l2}")
    top1 = c.top1_resolvable if c.top1_resolvable is not None else c.top1
    if top1 is not None and top1 < t.top1:
        what = "top-1 agreement outside fp16 ties" if c.top1_resolvable is not None else "top-1 agreement"
        c.failures.append(f"{what} {top1:.4f} < {t.top1} (strict top-1 {c.top1:.4f})")
    if c.top5 is not None and t.top5 is not None and c.top5 < t.top5:
        c.failures.append(f"top-5 agreement {c.top5:.4f} < {t.top5}")
    c.passed = not c.failures


# --- running -------------------------------------------------------------------------------------------


def package_meta(package: Path) -> tuple[dict[str, str], Any]:
    """(user metadata, model spec) of ``package``, without loading it for prediction. A chunked model folder:
    its first piece's (which takes the model's inputs), with the last piece's output names."""
    from bitnet_coreml.package.chunked import is_chunked, open_chunked
    from bitnet_coreml.package.reader import read_package_spec

    if is_chunked(package):
        pieces = open_chunked(package).pieces
        meta, spec = package_meta(pieces[0])
        meta["bitnet_coreml.output_names"] = package_meta(pieces[-1])[0].get("bitnet_coreml.output_names", "{}")
        return meta, spec
    spec = read_package_spec(package).spec  # read-only (MLModel(path) rewrites Manifest.json)
    return {str(k): str(v) for k, v in spec.description.metadata.userDefined.items()}, spec


def package_seq_len(package: Path, spec: Any, in_names: Mapping[str, str]) -> int:
    """The sequence length S a checkpoint was converted at: the package's ``input_ids`` input is ``[1, S]``."""
    name = in_names.get("input_ids", "input_ids")
    for inp in spec.description.input:
        if inp.name != name:
            continue
        shape = [int(d) for d in inp.type.multiArrayType.shape]
        if len(shape) != 2 or shape[0] != 1 or shape[1] < 1:
            raise InputError(f"{package}: input {name!r} has shape {shape}; a checkpoint's input_ids is [1, S] "
                             "(pass --seq-len)")
        return shape[1]
    have = ", ".join(i.name for i in spec.description.input) or "none"
    raise InputError(f"{package}: has no input {name!r} to read the sequence length from (inputs: {have}); "
                     "pass --seq-len")


def _load_inputs(inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | None, model: Any
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(feeds by graph input name, extra arrays of the .npz such as expected logits)."""
    from bitnet_coreml.lower.fp16 import random_calibration

    names = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
    if inputs is None:
        return random_calibration(model, seed=1), {}
    if isinstance(inputs, Mapping):
        data = {k: np.asarray(v) for k, v in inputs.items()}
        where = "inputs"
    else:
        where = str(inputs)
        from bitnet_coreml._files import load_npz

        data = load_npz(inputs, "--input")
    missing = [n for n in names if n not in data]
    if missing:
        raise InputError(f"{where}: lacks input(s) {', '.join(missing)}; it has {', '.join(data) or 'nothing'}")
    feeds = {n: data[n] for n in names}
    extra = {k: v for k, v in data.items() if k not in feeds}
    return feeds, extra


def _executor(package: Path) -> Any:
    from bitnet_coreml.executor.chunked import open_executor

    return open_executor(str(package))


def package_feeds(feeds: Mapping[str, np.ndarray], in_names: Mapping[str, str], specs: Any) -> dict[str, np.ndarray]:
    out = {}
    for onnx_name, arr in feeds.items():
        mil = in_names.get(onnx_name, onnx_name)
        a = np.asarray(arr)
        if a.dtype == np.int64:
            a = a.astype(np.int32)
        spec = specs.get(mil) if specs is not None else None
        dt = getattr(spec, "dtype", None)
        if dt is not None and a.dtype != dt:
            a = a.astype(dt)
        out[mil] = a
    return out


def runner_name(unit: Any) -> str:
    """A unit's runner name in the report: ``coreml:CPU_AND_NE`` for a Core ML unit, else the unit's name."""
    coreml = unit.kind.coreml_name
    return f"coreml:{coreml}" if coreml else str(unit.name)


def unit_runs(package: Path, feed_list: list[dict[str, np.ndarray]], units: Sequence[Any] | None,
              report: ParityReport) -> dict[str, dict[str, np.ndarray]]:
    """Outputs per requested compute unit, each run through the runtime's :class:`Predictor` alone.

    ``units`` None: the Core ML units (ane, gpu, cpu); one this machine lacks is noted in
    ``report.skipped``. Named units are requested: one that is unavailable or fails is a
    ``report.unit_failures`` entry. Bad input and bugs propagate.
    """
    from bitnet_coreml.errors import RuntimeFailure
    from bitnet_coreml.package.chunked import is_chunked
    from bitnet_coreml.runtime import FallbackStrategy, Predictor, make_units
    from bitnet_coreml.runtime.monitor import read_platform
    from bitnet_coreml.runtime.package_io import read_package

    requested = units is not None
    if is_chunked(package):  # the device runs each piece; verify chains them in the reference executor
        if requested:
            raise InputError(f"--units: {package} is a chunked model folder; its parity runs on the reference "
                             "executor only (convert each piece's package to check it on a compute unit)")
        report.skipped.append(f"compute units: not run: {package} is a chunked model folder "
                              "(the reference executor chains its pieces)")
        return {}
    chain = make_units(list(COREML_UNITS) if units is None else units)
    info, plat = read_package(package), read_platform()
    runs: dict[str, dict[str, np.ndarray]] = {}
    strategy = FallbackStrategy(validate_first_use=False)  # verify compares every unit itself
    for unit in chain:
        why = unit.unavailable(plat, info)
        if why is not None and not requested:
            report.skipped.append(f"{runner_name(unit)}: not run: {why.one_line()}")
            continue
        try:
            with Predictor(package, strategy, units=[unit]) as p:
                outs = [p.predict(f, source="verify inputs").outputs for f in feed_list]
        except RuntimeFailure as e:  # this unit did not answer (after its retries): parity fails
            report.unit_failures.append(f"{runner_name(unit)}: {e.one_line()}")
            continue
        runs[runner_name(unit)] = stack(outs)
    return runs


RANDOM_DRAWS = 4


def feeds_for(model: Any, inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | None
              ) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The inputs parity runs on: the given ones, or ``RANDOM_DRAWS`` random draws; plus the .npz's extra arrays."""
    from bitnet_coreml.lower.fp16 import random_calibration

    if inputs is None:
        # Agreement rates over one random 16-token input move in steps of 6%; several draws make the
        # top-1 gate mean something on models with a fixed short sequence.
        return [random_calibration(model, seed=1 + i) for i in range(RANDOM_DRAWS)], {}
    feeds, extra = _load_inputs(inputs, model)
    return [feeds], extra


def compare(report: ParityReport, runs: Mapping[str, Mapping[str, np.ndarray]], ort_out: Mapping[str, np.ndarray],
            extra: Mapping[str, np.ndarray], out_names: Mapping[str, str]) -> None:
    """Compare every runner's outputs with ONNX Runtime's (and the .npz's expected arrays) into ``report``."""
    t = report.thresholds
    for runner, outs in runs.items():
        for onnx_name, ref in ort_out.items():
            mil = out_names.get(onnx_name, onnx_name)
            if mil not in outs:
                report.skipped.append(f"{runner}: output {onnx_name!r} not produced by the package")
                continue
            refs = [("onnxruntime", ref)]
            if onnx_name in extra and np.shape(extra[onnx_name]) == np.shape(ref):
                refs.append(("expected (npz)", extra[onnx_name]))
            for ref_name, ref_arr in refs:
                m = metrics(ref_arr, outs[mil], fp16_ties=report.precision != "fp32")
                c = Comparison(onnx_name, ref_name, runner, m["cosine"] or 0.0, m["rel_l2"] or 0.0,
                               m["max_abs"] or 0.0, m["top1"], m["top5"], m["top1_resolvable"])
                _judge(c, t)
                report.comparisons.append(c)


def stack(outs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-draw outputs along the batch axis (one draw: unchanged)."""
    if len(outs) == 1:
        return dict(outs[0])
    return {k: np.concatenate([np.asarray(o[k]) for o in outs], axis=0) for k in outs[0]}


def verify(source: str | os.PathLike[str], package: str | os.PathLike[str],
           inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | None = None,
           thresholds: Thresholds | None = None, *, raise_on_failure: bool = True,
           seq_len: int | None = None, allow_dequant: bool = False, steps: int | None = None,
           units: Sequence[Any] | None = None) -> ParityReport:
    """Compare ``package`` with ``source``; see the module docstring.

    ``units``: compute units (names, :class:`~bitnet_coreml.runtime.ComputeUnit` values or
    :class:`~bitnet_coreml.runtime.Unit` objects) the package must also answer on; default: the Core ML
    units this machine has.
    """
    from bitnet_coreml.frontend import builds_graph, load
    from bitnet_coreml.lower.fp16 import run_ort

    pkg = Path(package)
    if not pkg.exists():
        raise ModelLoadError(f"{pkg}: no such package")
    meta, spec = package_meta(pkg)
    from bitnet_coreml.package.stateful import META as STATEFUL_META

    if STATEFUL_META in meta:  # prefill + teacher-forced decode steps: see verify_stateful.py
        if units is not None:
            raise InputError(f"--units {','.join(str(getattr(u, 'name', u)) for u in units)}: {pkg} is stateful; "
                             "its parity runs on the reference executor only (generate runs it on the units)")
        from bitnet_coreml.verify_stateful import verify_stateful

        return verify_stateful(source, pkg, inputs, thresholds, raise_on_failure=raise_on_failure,
                               allow_dequant=allow_dequant, **({"steps": steps} if steps else {}))
    precision = meta.get("bitnet_coreml.precision", "fp16")
    in_names = json.loads(meta.get("bitnet_coreml.input_names", "{}"))
    out_names = json.loads(meta.get("bitnet_coreml.output_names", "{}"))
    t = thresholds or Thresholds.for_precision(precision)

    if seq_len is None and builds_graph(source):
        # a checkpoint's graph is built at a fixed length: build it at the one the package was converted at
        seq_len = package_seq_len(pkg, spec, in_names)
        log.info("%s: sequence length %d read from the package's input_ids", pkg, seq_len)
    model = load(source, seq_len=seq_len, allow_dequant=allow_dequant)
    feed_list, extra = feeds_for(model, inputs)
    from bitnet_coreml.passes.ort import ort_errors

    with ort_errors(str(source), input_at_fault=True):
        ort_out = stack([run_ort(model, f) for f in feed_list])
    del model

    ex = _executor(pkg)
    pfeed_list = [package_feeds(f, in_names, ex.input_specs) for f in feed_list]
    report = ParityReport(str(source), str(pkg), precision, t)
    runs = {"reference-executor": stack([ex.predict(pf) for pf in pfeed_list])}
    runs.update(unit_runs(pkg, pfeed_list, units, report))
    compare(report, runs, ort_out, extra, out_names)
    if raise_on_failure and not report.passed:
        raise ParityError(f"{pkg}: parity failed: {' | '.join(report.failures()) or 'no outputs compared'}")
    return report
