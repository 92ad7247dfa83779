"""The chart process: it draws exactly the charts the parent would, from the data the report ends with."""

from __future__ import annotations

import json
from typing import Any

from bitnet_coreml.report.data import collect
from bitnet_coreml.report.html import chart_jobs, charts
from bitnet_coreml.report.worker import ChartWorker
from tests.report.conftest import MODEL, NPZ, Built


def test_the_chart_process_draws_what_the_parent_draws(built: Built) -> None:
    jobs = chart_jobs(built.data)
    assert {"bytes", "memory", "units", "fp16", "parity", "timing"} <= set(jobs)
    here = charts(built.data)
    with ChartWorker() as worker:
        worker.submit(jobs)
        drawn = worker.results(jobs)
    assert set(drawn) == set(jobs)  # every chart came from the child, none from the fallback
    assert drawn == here


def test_a_chart_sent_with_other_data_is_drawn_again(built: Built) -> None:
    jobs = chart_jobs(built.data)
    stale = json.loads(json.dumps(built.data["size"]))
    stale["weight_bytes"] *= 3
    staler = {**stale, "weight_bytes": stale["weight_bytes"] * 2}
    with ChartWorker() as worker:
        worker.submit({"memory": ("memory_chart", (stale,))})
        worker.submit({"memory": ("memory_chart", (staler,))})
        drawn = worker.results(jobs)
    assert drawn["memory"] == charts(built.data)["memory"]


def test_without_the_chart_process_the_parent_draws_everything(built: Built) -> None:
    jobs = chart_jobs(built.data)
    with ChartWorker() as worker:
        assert worker._proc is not None
        worker._proc.kill()
        worker._proc.wait()
        worker.submit(jobs)
        page_charts = charts(built.data, worker)
    assert page_charts == charts(built.data)


def test_progress_hands_over_each_section_as_the_report_ends_with_it(built: Built) -> None:
    parts: list[dict[str, Any]] = []
    data = collect(built.package, MODEL, NPZ, progress=lambda part: parts.append(json.loads(json.dumps(part))))
    seen = {k for p in parts for k in p}
    assert {"units", "fp16", "size", "summary", "timing", "parity"} <= seen
    for part in parts:
        for key, section in part.items():
            if key == "summary":
                assert section["bytes_by_kind"] == data["summary"]["bytes_by_kind"]
            else:
                assert section == data[key], key
    # every chart drawn early is drawn from the final data: the jobs of the parts equal the final jobs
    final = chart_jobs(data)
    for part in parts:
        for name, job in chart_jobs(part).items():
            assert json.dumps(job) == json.dumps(final[name]), name
