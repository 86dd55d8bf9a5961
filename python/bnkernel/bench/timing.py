"""Timing: medians of ``time.perf_counter`` samples, and the machine's copy bandwidth.

:func:`time_call` is the one timer of ``python -m bnkernel bench`` and ``check``: a warm-up call,
then samples (calls shorter than ~20 us batched and averaged) until enough are in.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

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


def time_call(
    fn: Callable[[], object],
    repeat: int = 10,
    min_time: float = 0.1,
    *,
    max_time: float | None = None,
    max_samples: int = MAX_SAMPLES,
) -> Timing:
    """Time ``fn`` with ``time.perf_counter``: a warm-up call, then samples until there are at
    least ``repeat`` of them and they took at least ``min_time`` seconds (at most ``max_samples``
    samples; with ``max_time``, stop once that much time is spent and 3 samples are in).  Calls
    shorter than ~20 us are timed in batches and averaged, so the clock's own cost stays out."""
    clock = time.perf_counter
    repeat = max(1, repeat)
    t0 = clock()
    fn()  # warm-up: page faults of new outputs, lazy initialization, thread start-up
    first = clock() - t0
    number = 1
    if first < 1e-3:
        t0 = clock()
        for _ in range(5):
            fn()
        per_call = (clock() - t0) / 5
        if per_call < SHORT_CALL_S:
            number = int(min(1000, max(1, BATCH_TARGET_S // max(per_call, 1e-9))))
    times: list[float] = []
    total = 0.0
    while True:
        if number == 1:
            t0 = clock()
            fn()
            dt = clock() - t0
        else:
            t0 = clock()
            for _ in range(number):
                fn()
            dt = (clock() - t0) / number
        times.append(dt)
        total += dt * number
        n = len(times)
        if n >= max_samples or (n >= repeat and total >= min_time):
            break
        if max_time is not None and total >= max_time and n >= min(repeat, 3):
            break
    return Timing(times, number)


def median_time(fn: Callable[[], object], repeat: int) -> float:
    """The median seconds per call of ``repeat`` samples of ``fn`` (:func:`time_call`)."""
    return time_call(fn, repeat, 0.0, max_samples=max(1, repeat)).median


@dataclass
class CopyBandwidth:
    """The copy bandwidth measured with ``threads`` threads on ``nbytes`` arrays."""

    threads: int
    nbytes: int
    timing: Timing

    @property
    def gbps(self) -> float:
        """2 * bytes / median time, in GB/s (1e9 bytes): a copy reads and writes every byte."""
        return 2.0 * self.nbytes / self.timing.median / 1e9

    def to_json(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "bytes": self.nbytes,
            "GBps": self.gbps,
            "method": "np.copyto"
            if self.threads == 1
            else f"np.copyto in {self.threads} chunks by {self.threads} Python threads",
            "timing": self.timing.to_json(),
        }


def copy_bandwidth(threads: int = 1, nbytes: int = 256 << 20, repeat: int = 7) -> CopyBandwidth:
    """The machine's copy bandwidth with ``threads`` threads: the median time of ``np.copyto``
    between two prefaulted ``nbytes`` arrays, split into ``threads`` contiguous chunks copied
    concurrently (np.copyto releases the GIL)."""
    n = max(1, nbytes // 8)
    src = np.full(n, 1.0)  # written, so its pages are real memory (not the shared zero page)
    dst = np.empty_like(src)
    if threads == 1:

        def copy() -> None:
            np.copyto(dst, src)

        timing = time_call(copy, repeat, 0.0)
    else:
        pairs = list(zip(np.array_split(dst, threads), np.array_split(src, threads), strict=True))
        with ThreadPoolExecutor(max_workers=threads) as pool:

            def copy_chunk(pair: tuple[NDArray[Any], NDArray[Any]]) -> None:
                np.copyto(pair[0], pair[1])

            def copy_threads() -> None:
                for f in [pool.submit(copy_chunk, p) for p in pairs]:
                    f.result()

            timing = time_call(copy_threads, repeat, 0.0)
    return CopyBandwidth(threads, int(src.nbytes), timing)
