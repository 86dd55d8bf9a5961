"""Timing: medians of ``time.perf_counter`` samples, and the machine's memory bandwidth.

:func:`time_calls` is the one timer of ``python -m bnkernel bench`` and ``check``: a warm-up call of
each function, then rounds of one sample of each (calls shorter than ~20 us batched and averaged)
until enough are in; :func:`time_call` times one function that way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .. import _core

# Samples of one call, or of a batch of calls averaged when a call is too short to time on its
# own; at least `repeat` samples and `min_time` seconds, at most MAX_SAMPLES samples.
MAX_SAMPLES = 2000
SHORT_CALL_S = 2e-5  # calls shorter than this are timed in batches ...
BATCH_TARGET_S = 2e-4  # ... of about this long
PEER_MAX_TIME_S = 1.0  # the NumPy textbook stops after this much time (and >= 3 samples)
SWEEP_MAX_TIME_S = 2.0  # a measurement in a sweep stops after this once it has 3 samples


@dataclass
class Timing:
    """Seconds per call: one sample per entry of ``times`` (each the mean of ``number`` calls)."""

    times: list[float]
    number: int = 1

    @property
    def median(self) -> float:
        return float(statistics.median(self.times))

    @property
    def min(self) -> float:
        return float(min(self.times))

    def quartiles(self) -> tuple[float, float]:
        q1, q3 = np.percentile(self.times, [25.0, 75.0])
        return float(q1), float(q3)

    def to_json(self, keep_times: int = 200) -> dict[str, Any]:
        q1, q3 = self.quartiles()
        d: dict[str, Any] = {
            "median_s": self.median,
            "min_s": self.min,
            "max_s": float(max(self.times)),
            "q1_s": q1,
            "q3_s": q3,
            "iqr_s": q3 - q1,
            "samples": len(self.times),
            "calls_per_sample": self.number,
        }
        if len(self.times) <= keep_times:
            d["times_s"] = list(self.times)
        return d


def _calls_per_sample(fn: Callable[[], object]) -> int:
    """A warm-up call of ``fn`` (page faults of new outputs, lazy initialization, thread
    start-up), then how many calls one sample averages: 1, or for calls shorter than ~20 us a
    batch of about 0.2 ms."""
    clock = time.perf_counter
    t0 = clock()
    fn()
    first = clock() - t0
    if first < 1e-3:
        t0 = clock()
        for _ in range(5):
            fn()
        per_call = (clock() - t0) / 5
        if per_call < SHORT_CALL_S:
            return int(min(1000, max(1, BATCH_TARGET_S // max(per_call, 1e-9))))
    return 1


def _sample(fn: Callable[[], object], number: int) -> float:
    """Seconds per call of one sample: ``number`` calls of ``fn``, averaged."""
    clock = time.perf_counter
    t0 = clock()
    if number == 1:
        fn()
    else:
        for _ in range(number):
            fn()
    return (clock() - t0) / number


def time_calls(
    fns: Mapping[str, Callable[[], object]],
    repeat: int = 10,
    min_time: float = 0.1,
    *,
    max_time: float | None = None,
    max_samples: int = MAX_SAMPLES,
) -> dict[str, Timing]:
    """Time several functions in the same rounds: each round takes one sample of every function
    still sampling, the order rotated from round to round, so a slow period of a shared machine
    slows them all alike and their ratios stay honest.  A function samples until it has at least
    ``repeat`` samples that took at least ``min_time`` seconds (at most ``max_samples``; with
    ``max_time``, until that much time is spent and 3 samples are in).  A warm-up call each first;
    calls shorter than ~20 us are timed in batches and averaged, so the clock's own cost stays
    out."""
    repeat = max(1, repeat)
    names = list(fns)
    number = {name: _calls_per_sample(fns[name]) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    total = dict.fromkeys(names, 0.0)

    def done(name: str) -> bool:
        n = len(times[name])
        if n >= max_samples or (n >= repeat and total[name] >= min_time):
            return True
        return max_time is not None and total[name] >= max_time and n >= min(repeat, 3)

    rounds = 0
    while not all(done(name) for name in names):
        for k in range(len(names)):
            name = names[(rounds + k) % len(names)]
            if done(name):
                continue
            dt = _sample(fns[name], number[name])
            times[name].append(dt)
            total[name] += dt * number[name]
        rounds += 1
    return {name: Timing(times[name], number[name]) for name in names}


def time_call(
    fn: Callable[[], object],
    repeat: int = 10,
    min_time: float = 0.1,
    *,
    max_time: float | None = None,
    max_samples: int = MAX_SAMPLES,
) -> Timing:
    """Time ``fn`` with ``time.perf_counter``: :func:`time_calls` of one function."""
    return time_calls({"fn": fn}, repeat, min_time, max_time=max_time, max_samples=max_samples)[
        "fn"
    ]


def median_time(fn: Callable[[], object], repeat: int) -> float:
    """The median seconds per call of ``repeat`` samples of ``fn`` (:func:`time_call`)."""
    return time_call(fn, repeat, 0.0, max_samples=max(1, repeat)).median


@dataclass
class CopyBandwidth:
    """The memory bandwidth measured with ``threads`` threads on ``nbytes`` arrays: a copy, a read
    and a write (:func:`bnkernel._core.memory_pass`: the kernels' own threads and store policy,
    streaming stores past the caches)."""

    threads: int
    nbytes: int
    timing: Timing  # the copy
    read: Timing | None = None
    write: Timing | None = None

    @property
    def gbps(self) -> float:
        """2 * bytes / median time of the copy, in GB/s (1e9 bytes): it reads and writes every
        byte."""
        return 2.0 * self.nbytes / self.timing.median / 1e9

    @property
    def read_gbps(self) -> float | None:
        return None if self.read is None else self.nbytes / self.read.median / 1e9

    @property
    def write_gbps(self) -> float | None:
        return None if self.write is None else self.nbytes / self.write.median / 1e9

    def to_json(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "bytes": self.nbytes,
            "GBps": self.gbps,
            "read_GBps": self.read_gbps,
            "write_GBps": self.write_gbps,
            "method": COPY_METHOD,
            "timing": self.timing.to_json(),
            "read_timing": None if self.read is None else self.read.to_json(),
            "write_timing": None if self.write is None else self.write.to_json(),
        }


COPY_METHOD = (
    "bnkernel._core.memory_pass: the kernels' threads for the size and store policy (streaming "
    "stores for an output of 16 MiB or more), 64-byte lines"
)


_PASSES = ("copy", "read", "write")


def _pass(kind: str, src: NDArray[Any], dst: NDArray[Any]) -> Callable[[], object]:
    """One memory pass of ``kind`` from ``src`` into ``dst``, ready to time."""
    return lambda: _core.memory_pass(kind, src, dst)


def copy_bandwidth(
    threads: int = 1, nbytes: int = 256 << 20, repeat: int = 7, *, dtype: Any = np.float64
) -> CopyBandwidth:
    """The machine's memory bandwidth with ``threads`` threads: median times of a copy, a read and
    a write of ``nbytes`` arrays of ``dtype`` (prefaulted) with :func:`bnkernel._core.memory_pass`,
    the passes a kernel is measured against."""
    src = np.ones(max(1, nbytes // np.dtype(dtype).itemsize), dtype=dtype)
    dst = np.ones_like(src)  # written, so its pages are real memory (not the shared zero page)
    _core.set_num_threads(threads)
    try:
        times = time_calls({kind: _pass(kind, src, dst) for kind in _PASSES}, repeat, 0.0)
    finally:
        _core.set_num_threads(0)  # follow OpenMP's setting again, as the bench leaves it
    return CopyBandwidth(threads, int(src.nbytes), times["copy"], times["read"], times["write"])


def copy_call(src: NDArray[Any]) -> Callable[[], object]:
    """The copy of ``src`` into an array like it at the current thread count
    (:func:`bnkernel._core.memory_pass`), ready to time: a row's own bound, in its own regime
    (cache or memory, the kernels' thread count and store policy for that size)."""
    flat = src.reshape(-1)
    return _pass("copy", flat, np.ones_like(flat))
