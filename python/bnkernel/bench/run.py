"""The benchmark table (``python -m bnkernel bench``): every shape, layout, dtype, op and thread
count, checked, then timed against the peers.

:func:`run_bench` hands a config with ``sweep`` set to :func:`bnkernel.bench.sweep.run_sweep`.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from .cases import layouts_for
from .machine import machine_info
from .measure import BenchConfig, measure_rows, start_run, write_outputs
from .plot import plot_report
from .report import SHARED_DEFINITIONS, format_header, format_table
from .sweep import run_sweep
from .units import shape_text


def run_bench(
    config: BenchConfig, out: TextIO | None = None, progress: TextIO | None = None
) -> dict[str, Any]:
    """Run the benchmark, print the table to ``out`` (progress lines to ``progress``), write the
    JSON / plot files the config asks for, and return the report (the JSON's content)."""
    if config.sweep:
        return run_sweep(config, out, progress)
    out = sys.stdout if out is None else out
    progress = sys.stderr if progress is None else progress
    threads_list, torch = start_run(config, progress)
    specs = [
        (shape, lay, dt)
        for shape in config.shapes
        for lay in layouts_for(shape, config.layouts)
        for dt in config.dtypes
    ]
    for shape in config.shapes:
        if not layouts_for(shape, config.layouts):
            progress.write(
                f"skipping {shape_text(shape)}: no selected layout applies "
                f"({'NC' if len(shape) == 2 else 'NCHW or NHWC'} needed)\n"
            )
    report: dict[str, Any] = {
        "config": config.to_json() | {"threads": threads_list},
        "machine": machine_info(torch),
        "definitions": {"time": "median seconds per call", **SHARED_DEFINITIONS},
        "copy_bandwidth": [],
        "results": [],
    }
    rows = measure_rows(config, report, specs, threads_list, torch, out, progress, format_header)
    report["results"].extend(rows)
    out.write(format_table(report["results"]))
    out.flush()
    write_outputs(config, report, progress, plot_report)
    return report
