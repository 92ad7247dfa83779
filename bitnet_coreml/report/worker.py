"""Draw the report's charts in a child process while the parent loads and runs the package and the source.

Importing matplotlib and drawing the charts (about 1.6 s of CPU for the ~200M-parameter export) needs
nothing from the executor or ONNX Runtime but the charts' own data, and most of that is known before the
package runs (``collect``'s ``progress``). In a child process this work uses the machine's other core
instead of adding to the report's wall time. The child is a fresh interpreter that imports matplotlib at
once, then draws every chart it is sent: the chart's function and arguments as a JSON file in a private
temporary folder, the job's name on the child's stdin; the SVG comes back as a file beside it (temp name,
then rename). :meth:`ChartWorker.results` ends the child's input, waits for it, and returns the charts it
drew from exactly the arguments the final data gives. A chart it did not deliver (its data changed, the
child failed or could not start) is drawn by the parent (:func:`bitnet_coreml.report.html.charts`), so
the page never depends on the child: its SVG is the same either way (the charts are deterministic).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

Jobs = Mapping[str, tuple[str, tuple[Any, ...]]]  # chart -> (function of bitnet_coreml.report.charts, arguments)
WAIT_SECONDS = 600  # a child still drawing after this long is stopped; the parent draws what is missing

_CHILD = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "from bitnet_coreml.report.worker import main; main(sys.argv[2])")


class ChartWorker:
    """A child process drawing charts as their data becomes known (module docstring); a context manager."""

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="bitnet-coreml-charts-"))
        self._sent: dict[str, tuple[str, str]] = {}  # chart -> (job name, JSON of the job as sent)
        self._count = 0  # jobs sent: every job has its own name, even a chart sent again
        self._proc: subprocess.Popen[bytes] | None = None
        root = Path(__file__).resolve().parents[2]  # this bitnet_coreml's import root, first on the child's path
        try:
            with open(self._dir / "stderr", "wb") as err:
                self._proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(root), str(self._dir)],
                                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        except OSError as e:
            log.info("charts are drawn in this process: the chart process did not start (%s)", e)

    def submit(self, jobs: Jobs) -> None:
        """Send the child every chart of ``jobs`` not sent yet, or sent with other arguments."""
        if self._proc is None or self._proc.stdin is None or self._proc.stdin.closed:
            return
        for chart, (fn, args) in jobs.items():
            text = json.dumps({"fn": fn, "args": args})
            if chart in self._sent and self._sent[chart][1] == text:
                continue
            name = f"{chart}-{self._count}"
            self._count += 1
            (self._dir / f"{name}.json").write_text(text, encoding="utf-8")
            try:
                self._proc.stdin.write(name.encode() + b"\n")
                self._proc.stdin.flush()
            except OSError:  # the child is gone: the parent draws
                return
            self._sent[chart] = (name, text)

    def results(self, jobs: Jobs) -> dict[str, str]:
        """The SVG of every chart of ``jobs`` the child drew from exactly these arguments; ends the child."""
        self.submit(jobs)
        self._finish()
        out: dict[str, str] = {}
        for chart, (fn, args) in jobs.items():
            sent = self._sent.get(chart)
            svg = self._dir / f"{sent[0]}.svg" if sent else None
            if sent and sent[1] == json.dumps({"fn": fn, "args": args}) and svg is not None and svg.is_file():
                out[chart] = svg.read_text(encoding="utf-8")
        if len(out) < len(jobs):
            err = (self._dir / "stderr").read_text(errors="replace").strip().splitlines()
            log.info("charts drawn in this process: %s (chart process: %s)", ", ".join(sorted(set(jobs) - set(out))),
                     err[-1] if err else "no message")
        return out

    def _finish(self) -> None:
        if self._proc is None:
            return
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        try:
            self._proc.wait(timeout=WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            self._stop()

    def _stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def close(self) -> None:
        """Stop the child if it still runs and remove the temporary folder."""
        if self._proc is not None and self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        self._stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ChartWorker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def main(folder: str) -> None:
    """The child: import matplotlib, then draw each job named on stdin into ``<job>.svg`` in ``folder``."""
    from bitnet_coreml.report import charts

    charts.warm_up()
    where = Path(folder)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        try:
            job = json.loads((where / f"{name}.json").read_text(encoding="utf-8"))
            svg = getattr(charts, job["fn"])(*job["args"])
            tmp = where / f".{name}.svg.tmp"
            tmp.write_text(svg, encoding="utf-8")
            os.replace(tmp, where / f"{name}.svg")
        except Exception as e:  # noqa: BLE001 - the parent draws this chart again and meets the error itself
            print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
