"""Run an onnx-ir model in ONNX Runtime (the oracle for every pass), whatever holds its weights.

Imported models keep their weights memory-mapped (external data, or references into the .onnx file
itself), which ``ir.to_proto`` would leave as external references ORT cannot resolve from bytes.
Small models are serialised with their data inlined; models over ~1.8 GB are written to a
temporary folder with external data, since a protobuf cannot exceed 2 GB.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort

_INLINE_LIMIT = 1_800_000_000
# ONNX Runtime's exception classes that mean "this graph (or these inputs) cannot run", as opposed to
# an engine failure: when the graph is the user's own source, they are the input's fault.
_GRAPH_ERRORS = ("InvalidGraph", "InvalidArgument", "InvalidProtobuf", "NoSuchFile", "Fail", "NotImplemented")


@contextlib.contextmanager
def ort_errors(what: str, *, input_at_fault: bool) -> Iterator[None]:
    """Classify ONNX Runtime's exceptions raised inside: out of memory is exit 3 (ResourceMemoryError);
    a graph ORT refuses is exit 2 naming ``what`` when ``input_at_fault`` (the user's own source graph);
    anything else propagates (a graph we rewrote that ORT refuses is our bug: the CLI's internal error)."""
    from bitnet_coreml.errors import ModelLoadError, ResourceMemoryError

    try:
        yield
    except Exception as e:
        if not type(e).__module__.startswith("onnxruntime"):
            raise
        text = " ".join(str(e).split())
        if "bad_alloc" in text or "Failed to allocate" in text or "exceeds the supported maximum" in text:
            raise ResourceMemoryError(f"{what}: ONNX Runtime ran out of memory ({text[:300]})") from e
        if input_at_fault and type(e).__name__ in _GRAPH_ERRORS:
            raise ModelLoadError(f"{what}: ONNX Runtime cannot run this graph ({text[:400]})") from e
        raise


def _nbytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def ort_session(model: ir.Model, threads: int | None = None) -> ort.InferenceSession:
    """An ORT CPU session on ``model`` (the model itself is not modified)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # fatal only: an ORT error is raised and reported in one line, not logged too
    if threads:
        opts.intra_op_num_threads = threads
    proto = ir.to_proto(model)
    if _nbytes(model) < _INLINE_LIMIT:

        for init in proto.graph.initializer:
            if init.data_location == 1:
                v = model.graph.initializers[init.name].const_value
                assert v is not None
                init.raw_data = v.tobytes()
                del init.external_data[:]
                init.data_location = 0
        return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    tmp = Path(tempfile.mkdtemp(prefix="bitnet-coreml-ort-"))
    try:
        path = tmp / "model.onnx"
        ir.save(model, path, external_data="model.data")
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    finally:
        # The session has read (or mapped) its initializers; on POSIX an unlinked file stays valid
        # for existing mappings, so the temporary copy can go at once.
        shutil.rmtree(tmp, ignore_errors=True)
