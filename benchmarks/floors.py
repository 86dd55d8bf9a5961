"""The floors of the large float32 rows on this machine, next to what the kernels take.

For x of ``--mib`` MiB (default 98: 32x256x56x56 float32), NCHW and channels-last, at one and two
threads, each kernel's time in passes (the time of one pass: bytes(x) at the rate of a copy of x
with streaming stores, measured in the same run at the same thread count) beside two floors:

* memory: the traffic the kernel cannot avoid, in passes, with a read-only pass priced as
  measured (on the Zen 4 VM of docs/benchmarks.md a read alone runs at 1.3-1.6 passes: one core
  keeps too few misses in flight, and a copy with streaming stores overlaps its reads and writes
  better than a read does alone).  Statistics: one read.  Inference: a copy.  NCHW training
  forward: a copy (the fused kernel reads a channel from memory once, then from L2).  NCHW
  backward: two reads and a write (a copy and a read).  Channels-last: every statistic is needed
  before any output, so the forward is a read and a copy, the backward two reads, then two reads
  and a write.
* arithmetic: the same kernel on data resident in L2 (16x3136 values, NCHW; 196x256,
  channels-last), per value, times the values of x, in passes; at two threads, half of one
  thread's.  Every value is computed in double and rounded once: two to three conversions a value
  on this core, which make one thread's kernels compute-bound.

When torch is importable, a second line per layout gives torch's kernels (the bench's peer:
``native_batch_norm.out`` and its backward, on 4-D shapes of the same sizes, preallocated outputs
where torch has them) the same way: their passes on x and, in brackets, the same kernel on the
L2-resident data scaled to x's size (for torch that includes its per-call cost, 5-10 us, a large
part of a call on 200 KB).

Usage: ``python benchmarks/floors.py [--mib 98] [--samples 15] [--no-torch]`` (uses bnkernel's
private ``_core`` kernels directly, without the argument checks, as the bench's timing does).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import bnkernel as bk
from bnkernel import _core


def median_time(f: Callable[[], Any], samples: int) -> float:
    f()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def kernels(x3: np.ndarray) -> dict[str, Callable[[], Any]]:
    """The four kernels on x3 (outer, C, inner) float32, outputs preallocated."""
    C = x3.shape[1]
    y = np.empty_like(x3)
    dy = np.random.default_rng(1).standard_normal(x3.shape, dtype=np.float32)
    dx = np.empty_like(x3)
    mean, m2, invstd = np.zeros(C), np.empty(C), np.ones(C)
    g, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    dg, db = np.empty(C, np.float32), np.empty(C, np.float32)
    return {
        "statistics": lambda: _core.channel_stats(x3, mean, m2),
        "inference": lambda: _core.normalize(x3, mean, invstd, g, b, y),
        "training forward": lambda: _core.forward_train(
            x3, g, b, 1e-5, y, mean, invstd, rm, rv, 0.1, True
        ),
        "training backward": lambda: _core.backward(True, dy, x3, mean, invstd, g, dx, dg, db),
    }


# floors' kernel names -> the bench's ops (torch has no statistics-only kernel)
TORCH_OPS = {
    "inference": "forward_infer",
    "training forward": "forward_train",
    "training backward": "backward_train",
}


def torch_kernels(torch: Any, shape: tuple[int, ...], layout: str) -> dict[str, Callable[[], Any]]:
    """torch's kernels as the bench times them (preallocated outputs), on seeded data of the
    logical (N, C, H, W) ``shape`` stored in ``layout``."""
    from bnkernel.bench.cases import make_case
    from bnkernel.bench.peers import prepare

    case = make_case(shape, layout, np.float32)
    return {name: prepare(case, op, "torch", torch).call for name, op in TORCH_OPS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=98, help="size of x in MiB (default 98)")
    parser.add_argument("--samples", type=int, default=15, help="timed calls per median")
    parser.add_argument("--no-torch", action="store_true", help="leave torch's kernels out")
    args = parser.parse_args(argv)
    torch: Any = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            torch = None
    C = 256
    n = (args.mib << 20) // 4 // (C * 32) * (C * 32)
    if n == 0:
        parser.error("--mib: too small for 32 x 256 channels")
    x = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    copy_out = np.empty_like(x)
    small = np.random.default_rng(2).standard_normal(16 * 3136, dtype=np.float32)
    layouts = {
        "NCHW": (x.reshape(32, C, -1), small.reshape(1, 16, 3136)),
        "channels-last": (x.reshape(-1, C, 1), small.reshape(-1, C, 1)),
    }
    arithmetic: dict[tuple[str, str], float] = {}  # seconds a value, one thread, in L2
    hw = n // (32 * C)  # 3136 at the default size: 56 x 56
    side = round(hw**0.5)
    big4 = (32, C, side, hw // side) if side * (hw // side) == hw else (32, C, hw, 1)
    torch_shapes = {  # logical 4-D (N, C, H, W) shapes of the same big and cached data, for torch
        # (4-D: torch's channels-last memory format is 4-D only)
        "NCHW": (big4, "NCHW", (1, 16, 56, 56), "NCHW"),
        "channels-last": (big4, "NHWC", (1, C, 14, 14), "NHWC"),
    }
    print(f"x: {n * 4 / 2**20:.0f} MiB float32, C = {C}; passes (memory floor, arithmetic floor)")
    if torch is not None:
        print(f"torch {torch.__version__}: passes [its arithmetic floor]")
    for threads in (1, 2):
        bk.set_num_threads(threads)
        if torch is not None:
            torch.set_num_threads(threads)
        # (at least 5 samples: the pass every row is measured against must not be one slow
        # sample's, as a median of 2 can be on a busy machine)
        copy = median_time(lambda: _core.memory_pass("copy", x, copy_out), max(5, args.samples))
        read = median_time(lambda: _core.memory_pass("read", x, copy_out), max(5, args.samples))
        one_pass = copy / 2
        r = read / one_pass
        print(f"{threads} thread(s): a copy {copy * 1e3:.2f} ms = 2 passes, a read {r:.2f} passes")
        for layout, (big, cached) in layouts.items():
            planar = layout == "NCHW"
            memory = {
                "statistics": r,
                "inference": 2.0,
                "training forward": 2.0 if planar else 2.0 + r,
                "training backward": 2.0 + r if planar else 2.0 + 3 * r,
            }
            on_big, on_cached = kernels(big), kernels(cached)
            cells = []
            for name, run in on_big.items():
                passes = median_time(run, args.samples) / one_pass
                if threads == 1:
                    arithmetic[(layout, name)] = (
                        median_time(on_cached[name], 7 * args.samples) / cached.size
                    )
                floor = arithmetic[(layout, name)] / threads * n / one_pass
                cells.append(f"{name} {passes:.2f} ({memory[name]:.2f}, {floor:.2f})")
            print(f"  {layout}: " + "; ".join(cells))
            if torch is not None:
                big_shape, big_layout, small_shape, small_layout = torch_shapes[layout]
                t_big = torch_kernels(torch, big_shape, big_layout)
                t_small = torch_kernels(torch, small_shape, small_layout)
                small_size = int(np.prod(small_shape))
                cells = []
                for name, run in t_big.items():
                    passes = median_time(run, args.samples) / one_pass
                    if threads == 1:
                        arithmetic[("torch " + layout, name)] = (
                            median_time(t_small[name], 7 * args.samples) / small_size
                        )
                    floor = arithmetic[("torch " + layout, name)] / threads * n / one_pass
                    cells.append(f"{name} {passes:.2f} [{floor:.2f}]")
                print(f"  torch {layout}: " + "; ".join(cells))
                del t_big, t_small
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
