"""Run an onnx-ir model in ONNX Runtime (the oracle for every pass), whatever holds its weights.

Imported models keep their weights memory-mapped (external data, or references into the .onnx file
itself), which ``ir.to_proto`` would leave as external references ORT cannot resolve from bytes.
Small models are serialised with their data inlined; models over ~1.8 GB are written to a
temporary folder with external data, since a protobuf cannot exceed 2 GB.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort

_INLINE_LIMIT = 1_800_000_000


def _nbytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def ort_session(model: ir.Model, threads: int | None = None) -> ort.InferenceSession:
    """An ORT CPU session on ``model`` (the model itself is not modified)."""
    opts = ort.SessionOptions()
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
