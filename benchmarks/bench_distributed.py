"""The cost of synchronizing batch normalization: per training step, the exchanges of
bnkernel.distributed next to the local kernels, at several sizes.

    mpiexec -n 2 python -m mpi4py benchmarks/bench_distributed.py
    mpiexec -n 3 python -m mpi4py benchmarks/bench_distributed.py --json sync.json

Each rank holds its own part of the batch (the shape in the table); per step it runs the local
kernels (channel_stats + normalize forward, backward_reduce + backward_elementwise backward) and
the four collectives: in each direction the fixed-size header (status, call, channels, dtype,
count, settings: 48 bytes a rank) and the data (the forward's packed (mean, M2), the backward's
packed sums: 2C doubles a rank each).  "exchanges" is both directions' header + data; "headers"
the two header exchanges alone (the agreement step: the data exchanges cost exchanges - headers).
Times are medians over repeats, each the slowest rank's (the step waits for it), measured between
barriers.  Kernels run with OMP_NUM_THREADS threads per
rank: on a machine with fewer cores than ranks x threads they compete, as they would in training.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
from mpi4py import MPI

import bnkernel as bk
from bnkernel import distributed as dist

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()

# per-rank shapes: (N, C, H, W) channels-first activations and an (N, C) dense batch
SHAPES = [(8, 64, 14, 14), (16, 64, 56, 56), (16, 256, 28, 28), (32, 512, 7, 7), (256, 1024)]
QUICK = [(4, 16, 8, 8), (64, 32)]


def slowest_median(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        COMM.Barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    worst = np.empty(len(times))
    COMM.Allreduce(np.asarray(times), worst, op=MPI.MAX)
    return float(np.median(worst))


def measure(shape: tuple[int, ...], repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(RANK)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    C = shape[1]
    out = np.empty_like(x)
    stats = bk.channel_stats(x)
    count, mean, m2 = dist.allreduce_stats(stats)
    invstd = bk.invstd_from_stats(count, m2)
    sdy, sdyx = bk.backward_reduce(dy, x, mean, invstd)

    def local_forward() -> None:
        bk.channel_stats(x)
        bk.normalize(x, mean, invstd, out=out)

    def local_backward() -> None:
        a, b = bk.backward_reduce(dy, x, mean, invstd)
        bk.backward_elementwise(dy, x, mean, invstd, None, a, b, count, out=out)

    def sync_step() -> None:
        _, mu, s, n = dist.sync_batch_norm_forward(x, out=out)
        dist.sync_batch_norm_backward(dy, x, mu, s, n, out=out)

    def headers() -> None:  # the forward's and the backward's agreement, as the step runs them
        forward = dist._Header(None, C, x.dtype, stats[0], {"eps": 1e-5, "activation": None})
        dist._agree(COMM, "bench", dist._FORWARD, forward)
        dist._agree(COMM, "bench", dist._BACKWARD,
                    dist._Header(None, C, x.dtype, count, {"activation": None}))  # fmt: skip

    kernels = slowest_median(local_forward, repeats) + slowest_median(local_backward, repeats)
    exchanges = slowest_median(lambda: dist.allreduce_stats(stats), repeats) + slowest_median(
        lambda: dist.allreduce_sums(sdy, sdyx), repeats
    )
    header = slowest_median(headers, repeats)
    step = slowest_median(sync_step, repeats)
    return {
        "shape": "x".join(map(str, shape)),
        "channels": C,
        "bytes_per_rank": 2 * dist.HEADER_BYTES + 8 * (2 * C + 2 * C),  # both directions
        "kernels_ms": kernels * 1e3,
        "exchanges_ms": exchanges * 1e3,
        "headers_ms": header * 1e3,
        "sync_step_ms": step * 1e3,
        "overhead": exchanges / kernels,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--quick", action="store_true", help="two tiny sizes (a smoke test)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    rows = [measure(s, args.repeats) for s in (QUICK if args.quick else SHAPES)]
    if RANK != 0:
        return
    print(f"{COMM.Get_size()} ranks, {bk.get_num_threads()} kernel threads each, float32, "
          "median of the slowest rank")  # fmt: skip
    print(f"{'per-rank x':>18} {'C':>5} {'exchanged':>10} {'kernels':>9} {'exchanges':>10} "
          f"{'headers':>9} {'sync step':>10} {'overhead':>9}")  # fmt: skip
    for r in rows:
        print(f"{r['shape']:>18} {r['channels']:>5} {r['bytes_per_rank']:>8} B "
              f"{r['kernels_ms']:>7.3f}ms {r['exchanges_ms']:>8.3f}ms {r['headers_ms']:>7.3f}ms "
              f"{r['sync_step_ms']:>8.3f}ms {100 * r['overhead']:>8.1f}%")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ranks": COMM.Get_size(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
