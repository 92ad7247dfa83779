"""Combined batch outputs: one file per ``shard_size`` items (``--output-format npz-shards|parquet``).

Items are still predicted and written one file each (that is what makes a job crash-safe and
resumable, see :mod:`bitnet_coreml.jobs.manifest`); when a run ends, every shard whose items all
succeeded is combined into one file and its items' records are re-pointed at it:

* ``npz-shards``: ``outputs/shard-00000.npz`` with ``ids`` (item ids), ``index`` (dataset rows) and
  every output stacked along a new first axis (``logits`` of shape ``(items, 1, 16, vocab)``);
* ``parquet``: ``outputs/shard-00000.parquet``, one row per item: ``id``, ``index`` and one list
  column per output (flattened; the shape of one item's output is in the column's metadata).

The order of the steps keeps a kill at any instant harmless: the shard is written to a temporary
name and renamed into place, then the re-pointed records are appended to the manifest (so the
manifest's last word for an item is the shard, whose sha256 it records), and only then are the
per-item files removed. A kill between two steps leaves either valid per-item records (the shard is
rebuilt, byte-identically, at the next run's end) or per-item files nothing refers to (removed then).
A shard holding a failed item stays as per-item files until a rerun redoes that item.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bitnet_coreml.errors import ConfigError
from bitnet_coreml.jobs._io import atomic_write_bytes, npz_bytes, remove_path, sha256_bytes, sha256_file
from bitnet_coreml.jobs.manifest import OUTPUTS, ItemRecord, ManifestWriter

log = logging.getLogger(__name__)

OUTPUT_FORMATS = ("npz", "npz-shards", "parquet")
_SUFFIX = {"npz-shards": ".npz", "parquet": ".parquet"}


def check_format(output_format: str, shard_size: int) -> None:
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"output format {output_format!r}; allowed: {', '.join(OUTPUT_FORMATS)}")
    if shard_size < 1:
        raise ConfigError(f"shard size {shard_size}; allowed: an integer >= 1")
    if output_format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError("--output-format parquet needs pyarrow: pip install 'bitnet-coreml[parquet]'") from None


def shard_name(k: int, output_format: str) -> str:
    return f"{OUTPUTS}/shard-{k:05d}{_SUFFIX[output_format]}"


def combine(outdir: Path, records: dict[str, ItemRecord], total: int, output_format: str, shard_size: int,
            writer: ManifestWriter) -> int:
    """Combine every complete shard still held as per-item files; returns how many shards were written."""
    by_shard: dict[int, list[ItemRecord]] = {}
    for rec in records.values():
        by_shard.setdefault(rec.index // shard_size, []).append(rec)
    written = 0
    for k, recs in sorted(by_shard.items()):
        size = min(shard_size, total - k * shard_size)
        name = shard_name(k, output_format)
        if len(recs) != size or any(r.status != "ok" for r in recs) or all(r.file == name for r in recs):
            continue
        recs.sort(key=lambda r: r.index)
        if any(r.file == name for r in recs) and (outdir / name).is_file():
            # A kill while re-pointing records: the shard was complete before the first record named it.
            digest = sha256_file(outdir / name)
        else:
            data = _shard_bytes(outdir, recs, output_format)
            atomic_write_bytes(outdir / name, data, fsync=True)
            digest = sha256_bytes(data)
        old_files = [r.file for r in recs]
        for r in recs:
            new = replace(r, file=name, sha256=digest)
            writer.append(new)
            records[r.id] = new
        writer.sync()
        for f in old_files:
            if f and f != name:
                remove_path(outdir / f)
        written += 1
    _remove_unreferenced(outdir, records.values())
    return written


def _load(outdir: Path, rec: ItemRecord) -> dict[str, np.ndarray]:
    with np.load(outdir / str(rec.file), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _shard_bytes(outdir: Path, recs: list[ItemRecord], output_format: str) -> bytes:
    items = [_load(outdir, r) for r in recs]
    names = sorted(items[0])
    for r, item in zip(recs, items, strict=True):
        if sorted(item) != names or any(item[n].shape != items[0][n].shape for n in names):
            raise ConfigError(f"item {r.id}: its outputs differ in names or shapes from item {recs[0].id}; "
                              "combined output formats need equal shapes (use --output-format npz)")
    ids = np.asarray([r.id for r in recs])
    index = np.asarray([r.index for r in recs], dtype=np.int64)
    if output_format == "npz-shards":
        arrays = {n: np.stack([item[n] for item in items]) for n in names}
        return npz_bytes({"ids": ids, "index": index, **arrays})
    import pyarrow as pa  # optional
    import pyarrow.parquet as pq

    columns: dict[str, Any] = {"id": pa.array(ids.tolist(), pa.string()), "index": pa.array(index)}
    fields = [pa.field("id", pa.string()), pa.field("index", pa.int64())]
    for n in names:
        first = items[0][n]
        flat = np.stack([item[n].reshape(-1) for item in items])
        col = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), first.size)
        columns[n] = col
        fields.append(pa.field(n, col.type, metadata={"shape": json.dumps(list(first.shape)),
                                                       "dtype": str(first.dtype)}))
    table = pa.Table.from_arrays(list(columns.values()), schema=pa.schema(fields))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _remove_unreferenced(outdir: Path, records: Iterable[ItemRecord]) -> None:
    """Per-item files that a combined shard replaced (left by a kill before their removal)."""
    referenced = {r.file for r in records if r.file}
    folder = outdir / OUTPUTS
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        rel = f"{OUTPUTS}/{p.name}"
        if p.is_file() and not p.name.startswith("shard-") and not p.name.startswith(".") and rel not in referenced:
            p.unlink(missing_ok=True)


def read_shard(path: str | Path) -> dict[str, np.ndarray]:
    """A combined shard as arrays (``ids``, ``index`` and every output stacked), from either format."""
    p = Path(path)
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    import pyarrow.parquet as pq

    table = pq.read_table(p)
    out: dict[str, np.ndarray] = {"ids": np.asarray(table.column("id").to_pylist()),
                                  "index": table.column("index").to_numpy()}
    for field in table.schema:
        if field.name in ("id", "index"):
            continue
        shape = json.loads(field.metadata[b"shape"])
        flat = np.asarray(table.column(field.name).combine_chunks().flatten())
        out[field.name] = flat.astype(field.metadata[b"dtype"].decode()).reshape(len(table), *shape)
    return out
