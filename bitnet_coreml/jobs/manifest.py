"""The batch-job output folder: manifest, outputs and the job identity.

Layout of ``OUTDIR``::

    job.json          what this folder is for: predictor fingerprint, dataset (refuses a different job)
    manifest.jsonl    one JSON line per finished item, appended as each item finishes (see ManifestWriter)
    outputs/<id>.npz  one deterministic .npz per successful item (written to a temp name, then renamed)
    summary.json      statistics of the last run (written when a run completes)

Crash safety rests on ordering: an output file is renamed into place *before* its manifest line is
appended, and a line is only trusted on resume if the file it names still has the recorded sha256.
So after a kill at any instant an item is either recorded with a verified output (skipped on resume)
or not (redone, overwriting any stray file with identical bytes). A torn last line is cut off before
appending. When a run finishes, the manifest is rewritten (atomically) with exactly one line per
item in dataset order.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitnet_coreml.errors import InputError
from bitnet_coreml.jobs._io import atomic_write_bytes, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
OUTPUTS = "outputs"
JOB = "job.json"
SUMMARY = "summary.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ItemRecord:
    """One manifest line."""

    id: str
    index: int
    status: str  # "ok" or "error"
    file: str | None = None  # relative to OUTDIR
    sha256: str | None = None
    unit: str | None = None
    latency_ms: float | None = None
    error: str | None = None

    def to_json(self) -> str:
        # vars() rather than asdict(): no deep copy, and this runs once per item.
        return json.dumps(vars(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ItemRecord:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})  # type: ignore[arg-type]


def read_manifest(outdir: Path) -> dict[str, ItemRecord]:
    """Records by id (the last line for an id wins); unparsable lines are ignored with a warning."""
    path = outdir / MANIFEST
    records: dict[str, ItemRecord] = {}
    if not path.exists():
        return records
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                log.warning("%s:%d: torn last line (interrupted write) ignored", path, n)
                break
            try:
                rec = ItemRecord.from_dict(json.loads(line))
            except (ValueError, TypeError) as e:
                log.warning("%s:%d: unreadable manifest line ignored (%s)", path, n, e)
                continue
            records[rec.id] = rec
    return records


def verified_done(outdir: Path, records: dict[str, ItemRecord]) -> set[str]:
    """Ids whose recorded output still exists with its recorded checksum."""
    done: set[str] = set()
    hashes: dict[str, str | None] = {}  # a combined shard holds many items: hash it once
    for rec in records.values():
        if rec.status != "ok" or not rec.file or not rec.sha256:
            continue
        path = outdir / rec.file
        if rec.file not in hashes:
            try:
                hashes[rec.file] = sha256_file(path)
            except OSError:
                hashes[rec.file] = None
        ok = hashes[rec.file] == rec.sha256
        if ok:
            done.add(rec.id)
        else:
            log.warning("item %s: output %s is missing or corrupt; it will be redone", rec.id, path)
    return done


class ManifestWriter:
    """Appends records durably.

    Every record is written to the kernel before the next item is recorded, so a killed process
    (SIGKILL, Ctrl-C, a crash) never loses a finished record. ``fsync`` (which only matters if the
    machine itself goes down) runs at most every ``fsync_interval_s`` seconds and at close: it costs
    about 10 ms on this machine's disk, more than a small model's prediction. Even a record lost to
    a power cut is harmless: resume redoes that item, overwriting its output with identical bytes.
    ``fsync_interval_s=0`` syncs every record.
    """

    def __init__(self, outdir: Path, fsync_interval_s: float = 1.0) -> None:
        self.path = outdir / MANIFEST
        _cut_torn_tail(self.path)
        self._f = open(self.path, "ab")  # closed in close()
        self._interval = fsync_interval_s
        self._last_sync = time.monotonic()

    def append(self, rec: ItemRecord) -> None:
        self._f.write(rec.to_json().encode() + b"\n")
        self._f.flush()
        now = time.monotonic()
        if now - self._last_sync >= self._interval:
            os.fsync(self._f.fileno())
            self._last_sync = now

    def sync(self) -> None:
        """Make every record appended so far durable now."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut_torn_tail(path: Path) -> None:
    """Drop a partial last line left by a kill mid-write, so the next append starts a fresh line."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


def compact(outdir: Path) -> dict[str, ItemRecord]:
    """Rewrite the manifest with exactly one line per item, in dataset order; returns the records."""
    records = read_manifest(outdir)
    ordered = sorted(records.values(), key=lambda r: (r.index, r.id))
    atomic_write_bytes(outdir / MANIFEST, b"".join(r.to_json().encode() + b"\n" for r in ordered), fsync=True)
    return records


def claim_outdir(outdir: Path, job: dict[str, Any], restart: bool = False) -> bool:
    """Create or reopen ``outdir`` for ``job``; returns True when resuming an earlier run.

    Refuses a folder that holds another job's results (a different predictor or dataset), because
    mixing them would make the manifest lie. ``restart`` deliberately discards an earlier job's
    results in a batch-job folder (one with ``job.json``; any other folder is never emptied).
    """
    job = {"format": FORMAT_VERSION, **job}
    path = outdir / JOB
    if restart and path.exists():
        from bitnet_coreml.jobs._io import remove_path

        for name in (SUMMARY, MANIFEST, OUTPUTS, JOB):  # job.json last: a crash midway still reads as a job
            remove_path(outdir / name)
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError as e:
            raise InputError(f"{path}: unreadable job file ({e}); remove the folder or choose another -o") from e
        for key in ("format", "predictor", "dataset"):
            if old.get(key) != job.get(key):
                raise InputError(f"{outdir}: holds results of a different job ({key} was {old.get(key)!r},"
                                 f" now {job.get(key)!r}); choose another -o, or --restart to discard them")
        (outdir / OUTPUTS).mkdir(exist_ok=True)
        _remove_stray_temps(outdir / OUTPUTS)
        return True
    if outdir.exists() and any(p.name != ".lock" for p in outdir.iterdir()):
        raise InputError(f"{outdir}: folder exists and is not a batch-job folder (no {JOB}); choose an empty or new -o")
    (outdir / OUTPUTS).mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, job)
    return False


def _remove_stray_temps(folder: Path) -> None:
    for entry in os.scandir(folder):
        if entry.name.startswith(".tmp-"):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
