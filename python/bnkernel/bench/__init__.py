"""The benchmarks of ``python -m bnkernel bench`` (and the timing and tolerances of ``check``).

Times bnkernel's four kernels (training forward with running statistics, inference forward,
training backward, frozen-statistics backward) on a table of shapes, layouts and dtypes, next to
the NumPy "textbook" implementation a user would write and, when it is importable, PyTorch's
kernels.  Every result is checked against the float64 reference (:mod:`bnkernel.reference`) before
it is timed, so a fast wrong kernel fails the benchmark instead of winning it.

Batch norm is memory-bound, so besides times the table reports

* achieved GB/s for the minimal traffic: forward = read x + write y (2 x bytes(x)), backward =
  read x + read dy + write dx (3 x bytes(x));
* passes over x: ``t / (bytes(x) / copy_bandwidth)``, where the copy bandwidth is that of a copy of
  x itself, measured in the same run at the same thread count with the kernels' own threads and
  store policy (``bnkernel._core.memory_pass``: streaming stores for outputs of 16 MiB or more), as
  ``2 * bytes / t_copy``; each row also gives the passes of its fastest and slowest samples.  A
  copy of x is 2 passes; the lower bound of a forward is 2 and of a backward 3.  The header gives
  the copy, read and write bandwidths of ``--copy-mib`` arrays at each thread count.

Peers are timed the way they run in a training loop: bnkernel with preallocated ``out=``; torch
through its ATen kernels with preallocated outputs where torch has a real out= kernel (else the
allocating call; the JSON says which); NumPy textbook code allocates, as such code does.

``--sweep`` runs the same measurements over one shape family, (N, 64, H, W), whose byte size
doubles from 4 KiB to ``--sweep-max`` (1 GiB by default), and reports the cost per byte of each
size next to the median cost per byte of the sizes past the L2 cache, with the machine's cache
sizes marked: a cache boundary the kernels fall off shows as a step in that ratio.

The modules, each importing only those above it in this list:

* :mod:`.units` (parsing, formatting) and :mod:`.timing` (the timer, the memory bandwidth);
* :mod:`.cases` (ops, layouts, shapes, the data), :mod:`.textbook` (the NumPy peer's code),
  :mod:`.peers` (the timed calls), :mod:`.accuracy` (the check against the reference);
* :mod:`.machine` (CPU, caches), :mod:`.report` (text), :mod:`.plot`;
* :mod:`.measure` (check, time, one row), :mod:`.sweep`, :mod:`.run` (the table);
* :mod:`.cli` (the options).

This package re-exports their public names.
"""

from __future__ import annotations

from .accuracy import (
    CHECK_CHANNELS,
    PEER_TOLERANCE,
    TOLERANCE,
    check_channel_subset,
    check_outputs,
    rel_err,
)
from .cases import (
    DEFAULT_SHAPES,
    DTYPES,
    IMPLS,
    LAYOUTS,
    OPS,
    QUICK_SHAPES,
    BenchCheckError,
    BenchError,
    Case,
    layouts_for,
    make_case,
    sweep_shape,
    sweep_sizes,
)
from .cli import add_arguments, config_from_args, main_from_args
from .machine import ASSUMED_L2_BYTES, CacheLevel, baseline_threshold, cache_sizes, fits_in
from .measure import BenchConfig
from .peers import Prepared, prepare
from .report import format_sweep_table, format_table
from .run import run_bench
from .sweep import run_sweep
from .timing import (
    SWEEP_MAX_TIME_S,
    CopyBandwidth,
    Timing,
    copy_bandwidth,
    time_call,
    time_calls,
)
from .units import parse_shape, parse_shapes, parse_size

__all__ = [
    "ASSUMED_L2_BYTES",
    "CHECK_CHANNELS",
    "DEFAULT_SHAPES",
    "DTYPES",
    "IMPLS",
    "LAYOUTS",
    "OPS",
    "PEER_TOLERANCE",
    "QUICK_SHAPES",
    "SWEEP_MAX_TIME_S",
    "TOLERANCE",
    "BenchCheckError",
    "BenchConfig",
    "BenchError",
    "CacheLevel",
    "Case",
    "CopyBandwidth",
    "Prepared",
    "Timing",
    "add_arguments",
    "baseline_threshold",
    "cache_sizes",
    "check_channel_subset",
    "check_outputs",
    "config_from_args",
    "copy_bandwidth",
    "fits_in",
    "format_sweep_table",
    "format_table",
    "layouts_for",
    "main_from_args",
    "make_case",
    "parse_shape",
    "parse_shapes",
    "parse_size",
    "prepare",
    "rel_err",
    "run_bench",
    "run_sweep",
    "sweep_shape",
    "sweep_sizes",
    "time_call",
    "time_calls",
]
