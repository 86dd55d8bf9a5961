"""Measuring: the run's configuration, and each case checked against the reference, then timed.

:func:`measure_rows` is the run both the table (:mod:`.run`) and the sweep (:mod:`.sweep`) make:
the copy bandwidth, then per case and op the NumPy textbook once, then bnkernel and torch at each
thread count, a result row for each.
"""

from __future__ import annotations

import gc
import importlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TextIO

from .. import _core
from .accuracy import check_outputs
from .cases import (
    DEFAULT_SHAPES,
    LAYOUTS,
    OPS,
    SWEEP_MAX_BYTES,
    SWEEP_MIN_BYTES,
    BenchError,
    Case,
    default_dtypes,
    make_case,
    traffic_bytes,
)
from .peers import has_textbook, prepare
from .plot import require_matplotlib
from .report import row_line
from .timing import (
    PEER_MAX_TIME_S,
    CopyBandwidth,
    Timing,
    copy_bandwidth,
    copy_call,
    time_call,
    time_calls,
)
from .units import fmt_bytes, shape_text


@dataclass
class BenchConfig:
    """What ``python -m bnkernel bench`` runs (its options, parsed)."""

    shapes: list[tuple[int, ...]] = field(default_factory=lambda: list(DEFAULT_SHAPES))
    layouts: list[str] = field(default_factory=lambda: list(LAYOUTS))
    dtypes: list[str] = field(default_factory=default_dtypes)
    ops: list[str] = field(default_factory=lambda: list(OPS))
    threads: list[int] = field(default_factory=list)  # empty: bnkernel.get_num_threads()
    repeat: int = 10
    min_time: float = 0.1
    numpy: bool = True
    torch: bool = True
    copy_mib: float = 256.0
    json_path: str | None = None
    plot_path: str | None = None
    # a measurement stops after this many seconds once it has 3 samples (None: no cap)
    max_time: float | None = None
    # the size sweep (run_sweep): shapes are sweep_shape(size) for the sizes of sweep_sizes()
    sweep: bool = False
    sweep_min: int = SWEEP_MIN_BYTES
    sweep_max: int = SWEEP_MAX_BYTES

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["shapes"] = [shape_text(s) for s in self.shapes]
        return d


def import_optional(name: str) -> ModuleType | None:
    """The module ``name``, or None when it is not importable."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def start_run(config: BenchConfig, progress: TextIO) -> tuple[list[int], ModuleType | None]:
    """The thread counts to run, and torch (None when left out or not importable); fails at once,
    before any timing, on bad thread counts or a --plot without matplotlib."""
    threads_list = list(config.threads) or [int(_core.get_num_threads())]
    if any(t < 1 for t in threads_list):
        raise BenchError("threads: expected counts >= 1")
    if config.plot_path is not None:
        require_matplotlib()
    torch = import_optional("torch") if config.torch else None
    if config.torch and torch is None:
        progress.write("torch is not importable: the torch columns are left empty\n")
    return threads_list, torch


@contextmanager
def restoring_threads(torch: ModuleType | None) -> Iterator[None]:
    """On the way out, bnkernel follows OpenMP's thread setting again and torch gets back its
    thread count."""
    torch_threads0 = int(torch.get_num_threads()) if torch is not None else None
    try:
        yield
    finally:
        _core.set_num_threads(0)  # bnkernel.set_num_threads(None): follow OpenMP's setting again
        if torch is not None and torch_threads0 is not None:
            torch.set_num_threads(torch_threads0)


def measure_copy(
    config: BenchConfig, threads_list: Sequence[int], progress: TextIO
) -> dict[int, CopyBandwidth]:
    """The memory bandwidth (copy, read, write) at each thread count."""
    copy_bw: dict[int, CopyBandwidth] = {}
    nbytes_copy = max(8, int(config.copy_mib * (1 << 20)))
    for t in threads_list:
        progress.write(f"measuring memory bandwidth, {t} thread(s), {nbytes_copy >> 20} MiB\n")
        copy_bw[t] = copy_bandwidth(t, nbytes_copy)
    return copy_bw


def run_numpy(case: Case, op: str, config: BenchConfig) -> dict[str, Any]:
    """The NumPy textbook on ``case``: checked, then timed (capped at ~PEER_MAX_TIME_S)."""
    p = prepare(case, op, "numpy")
    check = check_outputs(case, op, p.outputs(), peer=True, who="numpy")
    timing = time_call(p.call, config.repeat, config.min_time, max_time=PEER_MAX_TIME_S)
    return {**timing.to_json(), "variant": p.variant, "check": check}


def add_numpy(row: dict[str, Any], np_result: Mapping[str, Any] | None) -> None:
    """Put the NumPy textbook's result (run once per case, not per thread count) into ``row``."""
    row["numpy"] = None if np_result is None else dict(np_result)
    if np_result is not None:
        row["speedup_vs_numpy"] = np_result["median_s"] / row["bnkernel"]["median_s"]


def measure(
    case: Case,
    op: str,
    threads: int,
    config: BenchConfig,
    torch: ModuleType | None,
    bw: CopyBandwidth,
    row_copy: Timing | None = None,
) -> dict[str, Any]:
    """bnkernel (and torch) on ``case`` with ``threads`` threads: checked, then timed in the same
    rounds as the copy of x (:func:`copy_call`, the row's bound) and torch's kernel, their calls
    interleaved (:func:`time_calls`), so that a slow period of a shared machine slows all three
    alike; one result row.  ``row_copy``: an already measured copy, used instead of timing one
    here."""
    _core.set_num_threads(threads)
    p = prepare(case, op, "bnkernel")
    check = check_outputs(case, op, p.outputs())
    calls: dict[str, Callable[[], object]] = {"bnkernel": p.call}
    if row_copy is None:
        calls["copy"] = copy_call(case.x)
    torch_row: dict[str, Any] = {}
    pt = None
    if torch is not None:
        torch.set_num_threads(threads)
        try:
            pt = prepare(case, op, "torch", torch)
            touts = pt.outputs()
        except (RuntimeError, TypeError, NotImplementedError) as e:  # a case torch cannot run
            first_line = (str(e).splitlines() or [""])[0]
            torch_row["torch_error"] = f"{type(e).__name__}: {first_line}"
            pt = None
        else:
            tcheck = check_outputs(case, op, touts, peer=True, who="torch")
            del touts
            calls["torch"] = pt.call
    timings = time_calls(calls, config.repeat, config.min_time, max_time=config.max_time)
    timing = timings["bnkernel"]
    if row_copy is None:
        row_copy = timings["copy"]
    t_op = timing.median
    copy_gbps = 2.0 * case.nbytes / row_copy.median / 1e9
    row: dict[str, Any] = {
        "shape": case.shape_text,
        "stored_shape": shape_text(case.x.shape),
        "layout": case.label,
        "axis": case.axis,
        "dtype": case.dtype.name,
        "op": op,
        "threads": threads,
        "bytes": case.nbytes,
        "traffic_bytes": traffic_bytes(op, case.nbytes),
        "bnkernel": {**timing.to_json(), "variant": p.variant, "check": check},
        "GBps": traffic_bytes(op, case.nbytes) / t_op / 1e9,
        "passes": t_op / (case.nbytes / (copy_gbps * 1e9)),
        "passes_range": [
            timing.min / (case.nbytes / (copy_gbps * 1e9)),
            max(timing.times) / (case.nbytes / (copy_gbps * 1e9)),
        ],
        "copy_GBps": copy_gbps,
        "copy": row_copy.to_json(),
        "passes_vs_memory": t_op / (case.nbytes / (bw.gbps * 1e9)),
        "memory_copy_GBps": bw.gbps,
        "torch": None,
        "speedup_vs_numpy": None,
        "speedup_vs_torch": None,
    }
    row.update(torch_row)
    if pt is not None:
        ttiming = timings["torch"]
        row["torch"] = {**ttiming.to_json(), "variant": pt.variant, "check": tcheck}
        row["speedup_vs_torch"] = ttiming.median / t_op
    return row


def measure_cases(
    config: BenchConfig,
    specs: Sequence[tuple[tuple[int, ...], str, str]],
    threads_list: Sequence[int],
    torch: ModuleType | None,
    copy_bw: Mapping[int, CopyBandwidth],
    progress: TextIO,
    *,
    size_in_progress: bool = False,
) -> Iterator[dict[str, Any]]:
    """Every (shape, layout, dtype) of ``specs``, every op of the config, every thread count: the
    result rows, in that order, each followed by its progress line (its size first with
    ``size_in_progress``).  A case's arrays are freed before the next case's are made."""
    total = len(specs) * len(config.ops) * len(threads_list)
    done = 0
    for shape, layout, dtype in specs:
        case = make_case(shape, layout, dtype)
        np_result = None
        for op in config.ops:
            np_result = run_numpy(case, op, config) if config.numpy and has_textbook(case) else None
            for t in threads_list:
                done += 1
                row = measure(case, op, t, config, torch, copy_bw[t])
                add_numpy(row, np_result)
                yield row
                size = f"{fmt_bytes(case.nbytes)}: " if size_in_progress else ""
                progress.write(f"[{done}/{total}] {size}{row_line(row)}\n")
                progress.flush()
        del case, np_result
        gc.collect()  # the next case's arrays do not coexist with these


def measure_rows(
    config: BenchConfig,
    report: dict[str, Any],
    specs: Sequence[tuple[tuple[int, ...], str, str]],
    threads_list: Sequence[int],
    torch: ModuleType | None,
    out: TextIO,
    progress: TextIO,
    header: Callable[[dict[str, Any], Mapping[int, CopyBandwidth], Any], str],
    *,
    size_in_progress: bool = False,
) -> Iterator[dict[str, Any]]:
    """A whole run: the copy bandwidth (into ``report``), the ``header`` printed, then the rows of
    :func:`measure_cases`; the thread settings are restored when the rows are done."""
    with restoring_threads(torch):
        copy_bw = measure_copy(config, threads_list, progress)
        report["copy_bandwidth"] = [b.to_json() for b in copy_bw.values()]
        out.write(header(report, copy_bw, torch))
        out.flush()
        yield from measure_cases(
            config, specs, threads_list, torch, copy_bw, progress, size_in_progress=size_in_progress
        )


def write_outputs(
    config: BenchConfig,
    report: dict[str, Any],
    progress: TextIO,
    plot: Callable[[dict[str, Any], str], None],
) -> None:
    """Write the report as JSON and plot it, where the config asks for either."""
    if config.json_path is not None:
        with open(config.json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        progress.write(f"wrote {config.json_path}\n")
    if config.plot_path is not None:
        plot(report, config.plot_path)
        progress.write(f"wrote {config.plot_path}\n")
