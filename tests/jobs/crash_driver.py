"""Runs one batch job from the command line, so a test can SIGKILL it (``python crash_driver.py ...``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bitnet_coreml.jobs import BatchOptions, run_batch
from tests.jobs.helpers import AffineFactory

if __name__ == "__main__":
    dataset, outdir, workers, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    summary = run_batch(AffineFactory(delay_s=delay), dataset, outdir, BatchOptions(workers=workers))
    sys.exit(0 if summary["job"]["complete"] else 3)
