"""The size sweep (``bench --sweep``): one shape family from 4 KiB up, cost per byte against the
caches.

Every selected op, layout (NCHW, NHWC), dtype and thread count on (N, 64, H, W) inputs whose byte
size doubles from ``--sweep-min`` to ``--sweep-max``, each checked and timed as in the table; the
cost per byte of each size is reported next to the median cost per byte of the sizes past the L2
cache, with the machine's cache sizes marked: a cache boundary the kernels fall off shows as a
step in that ratio.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from . import machine
from .cases import (
    IMPLS,
    SWEEP_CHANNELS,
    SWEEP_MAX_SIDE,
    SWEEP_MIN_BYTES,
    BenchError,
    data_dtype,
    sweep_shape,
    sweep_sizes,
)
from .measure import BenchConfig, measure_rows, start_run, write_outputs
from .plot import plot_sweep
from .report import SHARED_DEFINITIONS, Series, format_sweep_header, format_sweep_table, series_key
from .timing import SWEEP_MAX_TIME_S
from .units import fmt_bytes, shape_text

# Peak memory of a sweep step, in units of bytes(x): x, dy, one output, a peer's output and the
# temporaries of the peers and of the reference check (the NumPy textbook allocates more).
SWEEP_MEMORY_FACTOR = 5
SWEEP_MEMORY_FACTOR_NUMPY = 9

SWEEP_DEFINITIONS = {
    "time": "median seconds per call",
    "ns_per_byte": "median time / bytes(x), in ns",
    "ns_per_element": "median time / x.size, in ns",
    "cost_ratio": "ns_per_byte / the median ns_per_byte of the same series (op, layout, "
    "dtype, threads, implementation) over the sizes larger than baseline_above_bytes "
    "(the L2 cache); the largest size alone when no size is that large",
    "cache": "the smallest cache that holds x (the op also touches y, or dy and dx, each "
    "as large as x)",
    **SHARED_DEFINITIONS,
}


def run_sweep(
    config: BenchConfig, out: TextIO | None = None, progress: TextIO | None = None
) -> dict[str, Any]:
    """The size sweep (``bench --sweep``): every selected op, layout (NCHW, NHWC), dtype and thread
    count on (N, 64, H, W) inputs of ``sweep_sizes(config.sweep_min, config.sweep_max)`` bytes,
    each checked against the reference and timed as in :func:`bnkernel.bench.run.run_bench`.
    Prints one table per series with the cost per byte and its ratio to the series' median cost
    per byte past L2, the cache sizes marked between rows; writes the JSON / plot files asked for;
    returns the report."""
    out = sys.stdout if out is None else out
    progress = sys.stderr if progress is None else progress
    if config.max_time is None:
        config = dataclasses.replace(config, max_time=SWEEP_MAX_TIME_S)
    sizes = sweep_sizes(config.sweep_min, config.sweep_max)
    if not sizes:
        raise BenchError(
            f"--sweep-min {fmt_bytes(config.sweep_min)} is larger than --sweep-max "
            f"{fmt_bytes(config.sweep_max)}"
        )
    for n, what in ((config.sweep_min, "--sweep-min"), (config.sweep_max, "--sweep-max")):
        if n < SWEEP_MIN_BYTES or n & (n - 1):
            raise BenchError(f"{what} {n}: expected a power of two of at least 4 KiB")
    layouts = [lay for lay in config.layouts if lay in ("NCHW", "NHWC")]
    if not layouts:
        raise BenchError(
            "--sweep times 4-D (N, 64, H, W) inputs: choose --layouts NCHW and/or NHWC"
        )
    check_sweep_memory(config.sweep_max, config.numpy)
    threads_list, torch = start_run(config, progress)
    caches = machine.cache_sizes(machine.CACHE_SYSFS)
    threshold, threshold_source = machine.baseline_threshold(caches)
    report: dict[str, Any] = {
        "config": config.to_json() | {"threads": threads_list, "layouts": layouts, "shapes": []},
        "machine": machine.machine_info(torch),
        "caches": [c.to_json() for c in caches],
        "caches_source": machine.CACHE_SYSFS if caches else None,
        "sweep": {
            "sizes": sizes,
            "channels": SWEEP_CHANNELS,
            "shapes": {dt: [shape_text(sweep_shape(n, dt)) for n in sizes] for dt in config.dtypes},
            "shape_rule": f"(N, {SWEEP_CHANNELS}, H, W): H = W doubling up to {SWEEP_MAX_SIDE}, "
            "then N doubling",
            "baseline_above_bytes": threshold,
            "baseline": threshold_source,
            "series": [],
        },
        "definitions": dict(SWEEP_DEFINITIONS),
        "copy_bandwidth": [],
        "results": [],
    }
    specs = [
        (sweep_shape(n, dt), lay, dt) for n in sizes for lay in layouts for dt in config.dtypes
    ]
    rows = measure_rows(
        config, report, specs, threads_list, torch, out, progress, format_sweep_header,
        size_in_progress=True,
    )  # fmt: skip
    for row in rows:
        row["cache"] = machine.fits_in(row["bytes"], caches)
        report["results"].append(row)
    report["sweep"]["series"] = add_sweep_ratios(report["results"], threshold)
    out.write(format_sweep_table(report))
    out.flush()
    write_outputs(config, report, progress, plot_sweep)
    return report


def check_sweep_memory(max_bytes: int, numpy: bool) -> None:
    """Refuse, before any work, a sweep whose largest step would not fit in the machine's RAM."""
    factor = SWEEP_MEMORY_FACTOR_NUMPY if numpy else SWEEP_MEMORY_FACTOR
    phys = machine.physical_memory()
    need = factor * max_bytes
    if phys is not None and need > phys:
        raise BenchError(
            f"--sweep-max {fmt_bytes(max_bytes)} needs about {fmt_bytes(need)} of memory "
            f"({factor} x bytes(x){' with the NumPy textbook' if numpy else ''}), more than this "
            f"machine's {fmt_bytes(phys)}: choose a smaller --sweep-max"
        )


def add_sweep_ratios(rows: Sequence[dict[str, Any]], threshold: int) -> list[dict[str, Any]]:
    """Add ``ns_per_byte``, ``ns_per_element`` and ``cost_ratio`` to every implementation's result
    in ``rows`` (and bnkernel's at the row's top level), each series (op, layout, dtype, threads)
    against the median ns per byte of its sizes larger than ``threshold`` (its largest size when
    none is); returns the series with their baselines."""
    groups: dict[Series, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(series_key(r), []).append(r)
    series = []
    for (op, layout, dtype, threads), group in groups.items():
        group = sorted(group, key=lambda r: r["bytes"])
        past = [r for r in group if r["bytes"] > threshold] or group[-1:]
        entry: dict[str, Any] = {
            "op": op,
            "layout": layout,
            "dtype": dtype,
            "threads": threads,
            "baseline_bytes": [r["bytes"] for r in past],
            "baseline_ns_per_byte": {},
        }
        for impl in IMPLS:
            if not any(r.get(impl) is not None for r in group):
                continue
            for r in group:
                res = r.get(impl)
                if res is not None:
                    res["ns_per_byte"] = res["median_s"] / r["bytes"] * 1e9
                    res["ns_per_element"] = res["median_s"] / (r["bytes"] / _itemsize(r)) * 1e9
            base_vals = [r[impl]["ns_per_byte"] for r in past if r.get(impl) is not None]
            base = float(statistics.median(base_vals)) if base_vals else math.nan
            entry["baseline_ns_per_byte"][impl] = base
            for r in group:
                res = r.get(impl)
                if res is not None:
                    res["cost_ratio"] = res["ns_per_byte"] / base if base > 0 else math.nan
        for r in group:
            for key in ("ns_per_byte", "ns_per_element", "cost_ratio"):
                r[key] = r["bnkernel"][key]
        series.append(entry)
    return series


def _itemsize(row: dict[str, Any]) -> int:
    return int(data_dtype(row["dtype"]).itemsize)
