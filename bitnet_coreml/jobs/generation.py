"""Generation batch jobs: ``bitnet-coreml batch STATEFUL.mlpackage PROMPTS.jsonl -o JOBDIR``.

The same job machinery as prediction batches (:mod:`bitnet_coreml.jobs.batch`: manifest, resume
with verified checksums, workers, progress, ``summary.json``); only the items differ. An item is one
line of a ``.jsonl`` file, a JSON object holding either ``"prompt"`` (text, encoded with the
package's tokenizer) or ``"ids"`` (token ids), and optionally an ``"id"``, ``"max_new_tokens"``,
``"stop"`` (a string or a list of strings) and the sampling keys of
:class:`~bitnet_coreml.generation.SamplingConfig` (``temperature``, ``top_k``, ``top_p``,
``repetition_penalty``, ``seed``). Every line is checked when the job opens (one bad line refuses
the whole file, exit 2, naming the file, line and key); a request that fails when it runs (a prompt
too long for the context) is recorded as that item's error and the job goes on.

Each worker holds one :class:`~bitnet_coreml.generation.GenerationSession` (the package loaded once)
and writes one ``outputs/<id>.json`` per item: the text, the prompt and new token ids, the stop
reason, the unit that answered and the timings. When the job ends, :func:`collect` writes
``generations.jsonl``: those documents, one a line, in the dataset's order (items that failed are
left out; they are listed in ``summary.json``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitnet_coreml._files import parse_json
from bitnet_coreml.errors import BitnetCoremlError, InputError
from bitnet_coreml.jobs._io import (
    atomic_write_bytes,
    atomic_write_json,
    remove_path,
    sha256_bytes,
    sha256_tree,
)
from bitnet_coreml.jobs.batch import BatchOptions, run_batch
from bitnet_coreml.jobs.datasets import ItemRef, JsonLines, safe_name
from bitnet_coreml.jobs.manifest import OUTPUTS, SUMMARY, ItemRecord, read_manifest

__all__ = ["GENERATIONS", "GenerationFactory", "PromptLines", "Request", "collect", "finish_generations",
           "parse_request", "run_generation_batch"]

GENERATIONS = "generations.jsonl"
_SAMPLING = {"temperature": (int, float), "top_k": (int,), "top_p": (int, float),
             "repetition_penalty": (int, float), "seed": (int,)}
KEYS = ("id", "prompt", "ids", "max_new_tokens", "stop", *_SAMPLING)


@dataclass(frozen=True)
class Request:
    """One validated line of a prompts file."""

    source: str | tuple[int, ...]
    max_new_tokens: int
    stop: tuple[str, ...]
    sampling: tuple[tuple[str, Any], ...]  # SamplingConfig keyword arguments


def _int_like(v: Any, types: tuple[type, ...]) -> bool:
    return isinstance(v, types) and not isinstance(v, bool)


def parse_request(obj: Any, where: str, max_new_tokens: int) -> Request:
    """The :class:`Request` of one parsed line; InputError naming ``where`` and the key otherwise."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object with \"prompt\" or \"ids\", found {type(obj).__name__}")
    unknown = sorted(set(obj) - set(KEYS))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(KEYS)}")
    if ("prompt" in obj) == ("ids" in obj):
        raise InputError(f"{where}: give exactly one of \"prompt\" (text) or \"ids\" (token ids)")
    source: str | tuple[int, ...]
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise InputError(f"{where}: \"prompt\" must be a non-empty string")
        source = obj["prompt"]
    else:
        ids = obj["ids"]
        if not isinstance(ids, list) or not ids or not all(_int_like(i, (int,)) and i >= 0 for i in ids):
            raise InputError(f"{where}: \"ids\" must be a non-empty list of token ids (integers >= 0)")
        source = tuple(ids)
    n = obj.get("max_new_tokens", max_new_tokens)
    if not _int_like(n, (int,)) or n < 1:
        raise InputError(f"{where}: \"max_new_tokens\" {n!r}; allowed: an integer >= 1")
    stop = obj.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise InputError(f"{where}: \"stop\" must be a non-empty string or a list of them")
    sampling = []
    for key, types in _SAMPLING.items():
        if key in obj:
            if not _int_like(obj[key], types):
                raise InputError(f"{where}: \"{key}\" {obj[key]!r}; allowed: a number"
                                 + (" (integer)" if types == (int,) else ""))
            sampling.append((key, obj[key]))
    from bitnet_coreml.generation.sampling import SamplingConfig

    try:
        SamplingConfig(**dict(sampling))
    except InputError as e:
        raise InputError(f"{where}: {e.one_line().removeprefix('--')}") from None
    return Request(source, int(n), tuple(stop), tuple(sampling))


class PromptLines(JsonLines):
    """A ``.jsonl`` prompts file (see the module docstring); every line is validated on opening."""

    kind = "prompts-jsonl"

    def __init__(self, path: Path, max_new_tokens: int = 64) -> None:
        if path.suffix != ".jsonl":
            raise InputError(f"dataset {path}: a stateful package runs generation batches over a .jsonl file of "
                             "prompts (one JSON object per line with \"prompt\" or \"ids\")")
        if not path.is_file():
            raise InputError(f"dataset {path}: no such file")
        self.max_new_tokens = max_new_tokens
        self.path = path
        self._count = 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    where = f"{path}:{lineno}"
                    parse_request(parse_json(line, where), where, max_new_tokens)
                    self._count += 1
        if not self._count:
            raise InputError(f"dataset {path}: no prompts (empty .jsonl)")

    def request(self, ref: ItemRef) -> Request:
        """The request of item ``ref`` (read again from its line, in the worker)."""
        _, path, offset, lineno = ref.locator
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        where = f"{path}:{lineno}"
        return parse_request(parse_json(line, where), where, self.max_new_tokens)


@dataclass(frozen=True)
class GenerationFactory:
    """Builds one :class:`_GenerationWorker` per batch worker (picklable)."""

    package: Path
    prompts: PromptLines
    units: tuple[str, ...] | None = None
    fp32: bool = False

    def fingerprint(self) -> str:
        # a job folder is tied to the package and to what changes the results besides the lines
        return (f"generate:package:{sha256_tree(self.package)}:max_new_tokens={self.prompts.max_new_tokens}"
                f":fp32={self.fp32}")

    def __call__(self) -> _GenerationWorker:
        from bitnet_coreml.generation import GenerationSession  # loaded per worker

        return _GenerationWorker(GenerationSession(self.package, units=self.units, fp32=self.fp32), self.prompts)


class _GenerationWorker:
    def __init__(self, session: Any, prompts: PromptLines) -> None:
        self.session = session
        self.prompts = prompts

    def predict(self, inputs: Any) -> Any:  # the ItemPredictor protocol; items go through process_item
        raise InputError("a generation worker takes prompt items (process_item), not input arrays")

    def process_item(self, ref: ItemRef, outdir: Path) -> ItemRecord:
        """Generate for one item and write ``outputs/<id>.json``; a failure becomes an error record."""
        from bitnet_coreml.generation.sampling import SamplingConfig

        rel = f"{OUTPUTS}/{safe_name(ref.id)}.json"
        s = self.session
        try:
            req = self.prompts.request(ref)
            sampling = SamplingConfig(**dict(req.sampling))
            t0 = time.perf_counter()
            new = list(s.generate(list(req.source) if isinstance(req.source, tuple) else req.source,
                                  max_new_tokens=req.max_new_tokens, sampling=sampling, stop=req.stop))
            seconds = time.perf_counter() - t0
            st = s.stats
            text = s.text.text if s.text is not None else None  # cut before a stop string (TextStream)
            doc = {"id": ref.id, "prompt": req.source if isinstance(req.source, str) else None,
                   "prompt_ids": s.tokens[:st.prompt_tokens], "new_ids": new, "text": text,
                   "stop_reason": st.stop_reason, "unit": st.unit, "ttft_s": st.ttft_s,
                   "prefill_tok_s": st.prefill_tok_s, "decode_tok_s": st.decode_tok_s, "seconds": seconds,
                   "sampling": vars(sampling), "recoveries": st.recoveries}
            data = (json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n").encode()
            atomic_write_bytes(outdir / rel, data)
            return ItemRecord(ref.id, ref.index, "ok", rel, sha256_bytes(data), str(st.unit),
                              round(seconds * 1000.0, 4))
        except Exception as e:  # noqa: BLE001 - one bad item must not stop the job: record it and go on
            message = e.one_line() if isinstance(e, BitnetCoremlError) else f"{type(e).__name__}: {e}"
            remove_path(outdir / rel)
            return ItemRecord(ref.id, ref.index, "error", error=" ".join(message.split())[:2000])

    def recovery_stats(self) -> dict[str, Any] | None:
        return self.session.get_recovery_stats().to_dict()


def collect(outdir: Path, prompts: PromptLines) -> int:
    """Write ``generations.jsonl`` (the finished items' documents in dataset order); returns their number."""
    records = read_manifest(outdir)
    lines = []
    for ref in prompts.refs():
        rec = records.get(ref.id)
        if rec is not None and rec.status == "ok" and rec.file:
            data = (outdir / rec.file).read_bytes()
            if sha256_bytes(data) == rec.sha256:
                lines.append(data if data.endswith(b"\n") else data + b"\n")
    atomic_write_bytes(outdir / GENERATIONS, b"".join(lines))
    return len(lines)


def run_generation_batch(package: str | os.PathLike[str], prompts: str | os.PathLike[str] | PromptLines,
                         outdir: str | os.PathLike[str], options: BatchOptions | None = None, *,
                         units: tuple[str, ...] | None = None, max_new_tokens: int = 64, fp32: bool = False,
                         progress: Any = None) -> dict[str, Any]:
    """Run (or resume) a generation job; returns the summary (also in ``OUTDIR/summary.json``)."""
    options = options or BatchOptions()
    if options.output_format != "npz":
        raise InputError(f"--output-format {options.output_format}: generation batches write one JSON document "
                         f"per item and {GENERATIONS}; the option applies to prediction batches")
    ds = prompts if isinstance(prompts, PromptLines) else PromptLines(Path(prompts), max_new_tokens)
    factory = GenerationFactory(Path(package), ds, units, fp32)
    return finish_generations(run_batch(factory, ds, outdir, options, progress), Path(outdir), ds)


def finish_generations(summary: dict[str, Any], outdir: Path, prompts: PromptLines) -> dict[str, Any]:
    """Write ``generations.jsonl`` after a job and record it in the summary (and ``summary.json``)."""
    summary["generations"] = {"file": str(outdir / GENERATIONS), "items": collect(outdir, prompts)}
    atomic_write_json(outdir / SUMMARY, summary)
    return summary
