"""Parity of a stateful package (``convert --stateful``) against its stateless source.

A prompt of ``P`` tokens goes through ``prefill`` and ``N`` more tokens through ``decode`` one by one,
teacher-forced (the given tokens, not the package's own predictions), with one state carried across
the calls. The reference is ONNX Runtime on the stateless checkpoint graph over all ``P + N`` tokens
(one causal forward gives every position's logits). The prefill logits and every decode step are
compared; the decode comparison reports its *worst* step's cosine, so the threshold holds at every
step, and top-1 agreement over the steps. Arrays ``prefill_logits`` / ``decode_logits`` in the input
``.npz`` (``models/hf_stateful/*.npz``: transformers with its DynamicCache) are compared too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from bitnet_coreml.errors import InputError, ParityError
from bitnet_coreml.verify import Comparison, ParityReport, Thresholds, _judge, metrics, package_meta

DEFAULT_STEPS = 32


def _prompt(inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | None, n: int, vocab: int
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    if inputs is None:
        return np.random.default_rng(1).integers(0, vocab, (1, n)).astype(np.int64), {}
    if isinstance(inputs, Mapping):
        data = {k: np.asarray(v) for k, v in inputs.items()}
    else:
        try:
            with np.load(inputs) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise InputError(f"{inputs}: cannot read .npz: {e}") from e
    ids = data.get("input_ids")
    if ids is None:
        raise InputError(f"{inputs}: has no 'input_ids'; it has {', '.join(data) or 'nothing'}")
    ids = np.asarray(ids).reshape(1, -1)
    if ids.shape[1] < n:
        raise InputError(f"{inputs}: input_ids has {ids.shape[1]} tokens; prefill + steps needs {n}")
    return ids[:, :n].astype(np.int64), data


def _steps(ref: np.ndarray, got: np.ndarray, fp16: bool) -> dict[str, float | None]:
    """Metrics over the decode steps: worst-step cosine / rel L2 / max-abs, top-1/top-5 over the steps."""
    per = [metrics(ref[i:i + 1], got[i:i + 1], fp16_ties=fp16) for i in range(ref.shape[0])]
    out = metrics(ref, got, fp16_ties=fp16)
    out["cosine"] = min(float(m["cosine"]) for m in per)  # type: ignore[arg-type]
    out["rel_l2"] = max(float(m["rel_l2"]) for m in per)  # type: ignore[arg-type]
    return out


def verify_stateful(source: str | os.PathLike[str], package: str | os.PathLike[str],
                    inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | None = None,
                    thresholds: Thresholds | None = None, *, steps: int = DEFAULT_STEPS,
                    raise_on_failure: bool = True, allow_dequant: bool = False) -> ParityReport:
    """Compare a stateful ``package`` with its checkpoint ``source``; see the module docstring."""
    from bitnet_coreml.executor.stateful import StatefulRun
    from bitnet_coreml.frontend import builds_graph, load
    from bitnet_coreml.lower.fp16 import run_ort

    pkg = Path(package)
    meta, _spec = package_meta(pkg)
    precision = meta.get("bitnet_coreml.precision", "fp16")
    t = thresholds or Thresholds.for_precision(precision)
    if not builds_graph(source):
        raise InputError(f"{source}: a stateful package is verified against its source, a Hugging Face checkpoint "
                         "folder or a BitNet GGUF file")
    run = StatefulRun(pkg)
    info = run.info
    p, n = info.prefill, info.prefill + steps
    if steps < 1 or n > info.context:
        raise InputError(f"--steps {steps}: prefill ({p}) + steps must be 1..{info.context - p} to fit the context "
                         f"({info.context})")
    model = load(source, seq_len=n, allow_dequant=allow_dequant)
    vocab = int(model.graph.outputs[0].shape[-1])  # type: ignore[index,arg-type]
    ids, data = _prompt(inputs, n, vocab)
    ref = run_ort(model, {"input_ids": ids})["logits"][0].astype(np.float64)
    del model
    pre = run.call("prefill", ids[:, :p], 0)[0].astype(np.float64)
    dec = np.concatenate([run.call("decode", ids[:, i:i + 1], i)[0] for i in range(p, n)]).astype(np.float64)
    fp16 = precision == "fp16"
    pre_rows = slice(0, p) if info.prefill_logits == "all" else slice(p - 1, p)
    refs: list[tuple[str, np.ndarray, np.ndarray]] = [("onnxruntime (stateless source)", ref[pre_rows], ref[p:n])]
    if "prefill_logits" in data and "decode_logits" in data:
        tp = np.asarray(data["prefill_logits"], np.float64).reshape(-1, vocab)
        td = np.asarray(data["decode_logits"], np.float64).reshape(-1, vocab)
        if tp.shape[0] == p and td.shape[0] >= steps:
            refs.append(("npz (transformers DynamicCache)", tp[pre_rows], td[:steps]))
    report = ParityReport(str(source), str(pkg), precision, t)
    for name, rp, rd in refs:
        for label, m in ((f"logits[prefill {p}]", metrics(rp, pre, fp16_ties=fp16)),
                         (f"logits[decode x{steps}, worst step]", _steps(rd, dec, fp16))):
            c = Comparison(output=label, reference=name, runner="reference-executor",
                           cosine=float(m["cosine"]), rel_l2=float(m["rel_l2"]), max_abs=float(m["max_abs"]),  # type: ignore[arg-type]
                           top1=m["top1"], top5=m["top5"], top1_resolvable=m["top1_resolvable"])
            _judge(c, t)
            report.comparisons.append(c)
    if raise_on_failure and not report.passed:
        failed = [f"{c.reference} on {c.output}: {'; '.join(c.failures)}" for c in report.comparisons if not c.passed]
        raise ParityError(f"{pkg} fails parity with {source}: {' | '.join(failed)}")
    return report

