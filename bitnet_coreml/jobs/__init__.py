"""jobs stage: build pipelines (TOML, incremental) and batch prediction jobs (local, Ray).

* :func:`run_batch` / :class:`BatchOptions`: stream a dataset through a predictor, resumably.
* :func:`open_dataset`: the dataset layouts a job accepts.
* :class:`RuntimeFactory` / :class:`ReferenceFactory`: what each batch worker predicts with.
* :func:`load_pipeline` / :func:`run_pipeline`: ``pipelines/*.toml`` builds (what ``make convert`` runs).

Heavy parts (the pipeline runner, Ray) are imported on first use.
"""

from __future__ import annotations

from typing import Any

from bitnet_coreml.jobs.batch import BatchEvent, BatchOptions, run_batch
from bitnet_coreml.jobs.datasets import open_dataset
from bitnet_coreml.jobs.predictors import ItemPredictor, PredictorFactory, ReferenceFactory, RuntimeFactory

__all__ = [
    "BatchEvent",
    "BatchOptions",
    "ItemPredictor",
    "PredictorFactory",
    "ReferenceFactory",
    "RuntimeFactory",
    "load_pipeline",
    "open_dataset",
    "run_batch",
    "run_pipeline",
]


def __getattr__(name: str) -> Any:
    if name == "load_pipeline":
        from bitnet_coreml.jobs.spec import load_pipeline

        return load_pipeline
    if name == "run_pipeline":
        from bitnet_coreml.jobs.pipeline import run_pipeline

        return run_pipeline
    raise AttributeError(name)
