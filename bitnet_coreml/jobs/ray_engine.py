"""The batch engine on Ray (``--engine ray``; the optional ``ray`` extra).

The job's pending item references become a Ray Dataset (``ray.data.from_items``), and
``map_batches`` runs them through an actor pool: each actor builds its predictor once from the
job's factory, loads each item, predicts and writes the output file atomically, exactly as a local
worker does (:func:`bitnet_coreml.jobs.batch.process_item`). The records stream back to the driver,
which appends them to the same manifest. So the output layout, resume and crash safety are the local
engine's; on a multi-machine cluster OUTDIR and the dataset must be on a filesystem every node
mounts at the same path.

References are fed in chunks so the driver's memory stays bounded for any dataset size; each chunk
is one streaming Ray Data execution.
"""

from __future__ import annotations

import json
import logging
import pickle
import warnings
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from bitnet_coreml.errors import ConfigError
from bitnet_coreml.jobs.batch import BatchOptions, Job, process_item
from bitnet_coreml.jobs.manifest import ItemRecord
from bitnet_coreml.jobs.predictors import PredictorFactory

log = logging.getLogger(__name__)

CHUNK = 20_000


class _PredictActor:
    """One Ray actor: a predictor loaded once, used for every batch it is given."""

    def __init__(self, factory: PredictorFactory, outdir: str) -> None:
        self.predictor = factory()
        self.outdir = Path(outdir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = [process_item(self.predictor, pickle.loads(blob), self.outdir) for blob in batch["ref"]]
        return {"record": np.asarray([json.dumps(asdict(r)) for r in records], dtype=object)}


def _import_ray() -> Any:
    try:
        import ray  # optional extra
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'bitnet-coreml[ray]'") from None
    return ray


def run_ray(job: Job, options: BatchOptions) -> dict[str, Any]:
    """Run the job's pending items on Ray; joins a running Ray or starts a local one (and stops it)."""
    ray = _import_ray()
    quiet = logging.INFO if options.verbose else logging.ERROR
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": options.verbose,
                                  "logging_level": quiet}
        if options.ray_address:
            kwargs["address"] = options.ray_address
        else:
            kwargs["num_cpus"] = options.workers
        ray.init(**kwargs)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the CLI has its own progress bar
        # Ray (and Ray Data, which configures its loggers when imported, so this comes after) log INFO and
        # WARNING lines to stderr; they are the user's only with --verbose.
        for name in ("ray", "ray.data", "ray.data._internal.execution.streaming_executor"):
            logging.getLogger(name).setLevel(quiet)
        pending = job.pending()
        while chunk := list(islice(pending, CHUNK)):
            _run_chunk(ray, job, options, chunk)
        return {"ray": {"address": options.ray_address or "local", "actors": options.workers}}
    finally:
        if started:
            ray.shutdown()


def _run_chunk(ray: Any, job: Job, options: BatchOptions, chunk: list[Any]) -> None:
    ds = ray.data.from_items([{"ref": pickle.dumps(ref)} for ref in chunk])
    with warnings.catch_warnings():
        # Ray 2.60 deprecates actor options as extra keywords (max_restarts below) and names no successor.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        out = _map(ds, ray, job, options)
    for row in out.iter_rows():
        d = json.loads(row["record"])
        job.record(ItemRecord.from_dict(d))


def _map(ds: Any, ray: Any, job: Job, options: BatchOptions) -> Any:
    return ds.map_batches(
        _PredictActor,
        fn_constructor_args=(job.factory, str(job.outdir)),
        compute=ray.data.ActorPoolStrategy(size=options.workers),
        batch_size=1,  # one item per call: a record reaches the manifest as soon as its item is done
        batch_format="numpy",
        num_cpus=1,
        # No actor restarts (a failed item is recorded and redone by a rerun); with restarts, Ray's core
        # worker logs an error line on stderr for every actor whose arguments live in the object store.
        max_restarts=0,
    )
