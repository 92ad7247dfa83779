"""Turn an executor source (``.mlpackage`` path, coremltools ``MLModel``, MIL ``Program``) into a MIL program."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bitnet_coreml._quiet import coremltools
from bitnet_coreml.errors import ModelLoadError
from bitnet_coreml.executor.blobs import LOAD_LOCK, load_lazily
from bitnet_coreml.executor.shared import SharedPackage, blob_keys, shared_package

__all__ = ["load_program", "load_shared"]

log = logging.getLogger(__name__)


class _SpecView:
    """The two things :func:`_program_from_mlmodel` needs from an ``MLModel``, for a spec read from disk."""

    def __init__(self, spec: Any, weights_dir: str) -> None:
        self._spec, self.weights_dir = spec, weights_dir

    def get_spec(self) -> Any:
        return self._spec


def _program_from_mlmodel(model: Any, where: str, keys: dict[str, Any] | None = None) -> tuple[Any, str | None]:
    from coremltools.converters.mil.frontend.milproto import load as milproto_load

    spec = model.get_spec()
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise ModelLoadError(
            f"{where}: is a Core ML {kind!r} model; the reference executor runs ML Programs only "
            f"(convert with convert_to='mlprogram')"
        )
    weights_dir = getattr(model, "weights_dir", None)
    if keys is not None:
        keys.update(blob_keys(spec))
    try:
        with LOAD_LOCK:  # (a lazy load elsewhere patches the proto loader while it runs: executor/blobs.py)
            prog = milproto_load.load(
                model_spec=spec, specification_version=spec.specificationVersion, file_weights_dir=weights_dir or ""
            )
    except Exception as e:
        # An MLModel fresh from ct.convert still holds the program it was serialised from; the proto
        # reader cannot express everything (variadic shapes), so use that program when there is one.
        held = getattr(model, "_mil_program", None)
        if held is not None:
            if keys is not None:
                keys.clear()  # names of the held program need not match the spec's: share nothing
            log.debug("%s: proto reload failed (%s); using the MLModel's own MIL program", where, e)
            return held, getattr(model, "function_name", None) or None
        raise ModelLoadError(f"{where}: cannot read the ML Program back into MIL: {type(e).__name__}: {e}") from e
    fn = getattr(model, "function_name", None) or spec.description.defaultFunctionName or None
    return prog, fn


def load_shared(source: Any) -> SharedPackage:
    """The :class:`SharedPackage` of ``source``: one per package path on disk (see executor/shared.py),
    a fresh one for an in-memory ``MLModel`` or MIL ``Program``."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return shared_package(source, _load_new)
    return _load_new(source)


def _load_new(source: Any) -> SharedPackage:
    keys: dict[str, Any] = {}
    if isinstance(source, (str, Path)) and Path(source).suffix == ".mlpackage" and Path(source).is_dir():
        from bitnet_coreml.package.reader import read_package_spec

        ps = read_package_spec(source)  # read-only: MLModel(path) would rewrite the package's Manifest.json
        if ps.spec.WhichOneof("Type") == "mlProgram":
            coremltools()
            try:
                lazy = load_lazily(ps.spec, ps.weights_dir)
            except Exception as e:  # noqa: BLE001 - anything the proto loader raises: the plain load reports it
                log.debug("%s: lazy load failed (%s); loading every weight", source, e)
                lazy = None
            if lazy is not None:
                prog, blobs = lazy
                keys.update(blob_keys(ps.spec))
                fn = ps.spec.description.defaultFunctionName or None
                return SharedPackage(prog, fn, str(source), keys, blobs=blobs)
    prog, fn, where = load_program(source, keys=keys)
    return SharedPackage(prog, fn, where, keys)


def load_program(source: Any, *, keys: dict[str, Any] | None = None) -> tuple[Any, str | None, str]:
    """Return ``(program, function name or None, description of the source)``; ``keys``, when given,
    receives the blob key of every weight per function (:func:`executor.shared.blob_keys`)."""
    ct = coremltools()
    from coremltools.converters.mil.mil import Program

    if isinstance(source, Program):
        return source, None, "MIL program"
    if isinstance(source, ct.models.MLModel):
        where = str(getattr(source, "package_path", None) or "in-memory MLModel")
        prog, fn = _program_from_mlmodel(source, where, keys)
        return prog, fn, where
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise ModelLoadError(f"{path}: no such package (expected an .mlpackage directory)")
        if path.suffix != ".mlpackage" or not path.is_dir():
            raise ModelLoadError(f"{path}: not an .mlpackage directory; the reference executor runs ML Program packages")
        from bitnet_coreml.package.reader import read_package_spec

        ps = read_package_spec(path)  # read-only: MLModel(path) would rewrite the package's Manifest.json
        prog, fn = _program_from_mlmodel(_SpecView(ps.spec, str(ps.weights_dir)), str(path), keys)
        return prog, fn, str(path)
    raise ModelLoadError(
        f"cannot execute a {type(source).__name__}; give an .mlpackage path, a coremltools MLModel or a MIL Program"
    )
