"""Data-parallel training with SyncBatchNorm: the circles model of bnkernel.examples.train_circles,
every global batch of 32 split across the processes (unevenly when 32 is not a multiple).

    mpiexec -n 3 python -m mpi4py -m bnkernel.examples.train_distributed
    mpiexec -n 2 python -m mpi4py -m bnkernel.examples.train_distributed --out weights-2.npz
    python -m bnkernel.examples.train_distributed --plain --out weights-1.npz   # one process

Every process starts from the same weights (the same seed) and walks the same global batches;
each takes its slice, and per step:

* the batch-norm layers are bnkernel.distributed.SyncBatchNorm: their statistics are the global
  batch's (a header and one data exchange in the forward, the same in the backward) and their
  gradients come out global;
* the dense layers' gradients are local sums, added up over the processes with
  bnkernel.distributed.sum_over_ranks (a header and one data exchange), so every process applies
  the same update.

The loss is the mean over the global batch.  So the processes hold identical weights throughout,
and the same weights as one process training on the whole batches (`--plain`, plain BatchNorm):
to float64 rounding (tests/test_distributed.py checks 1, 2 and 3 processes against each other).
`python -m mpi4py` makes an uncaught exception on one process abort them all.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from bnkernel import BatchNorm
from bnkernel.examples.data import load
from bnkernel.examples.nn import (
    Adam,
    BatchNorm1d,
    Dense,
    ReLU,
    Sequential,
    minibatches,
    sigmoid,
)


def build(seed: int, dtype: Any) -> tuple[Sequential, np.random.Generator]:
    rng = np.random.default_rng(seed)
    model = Sequential(
        Dense(2, 3, rng, dtype=dtype), ReLU(), BatchNorm1d(3, convention="keras", dtype=dtype),
        Dense(3, 2, rng, dtype=dtype), ReLU(), BatchNorm1d(2, convention="keras", dtype=dtype),
        Dense(2, 1, rng, init="glorot", dtype=dtype),
    )  # fmt: skip
    return model, rng


def main(
    epochs: int = 20, seed: int = 0, dtype: Any = np.float64, plain: bool = False,
    out: str | None = None, verbose: bool = True,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Train; returns the final weights (and running statistics) by name."""
    if plain:
        comm, rank, size = None, 0, 1
    else:
        from mpi4py import MPI

        from bnkernel.distributed import SyncBatchNorm, sum_over_ranks

        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
    data = load("circles", seed, n=1000)
    model, rng = build(seed, dtype)
    if not plain:  # the same layers, synchronized
        for m in model.batch_norms():
            m.bn = SyncBatchNorm(m.bn.num_features, comm=comm, axis=1, convention="keras",
                                 dtype=dtype)  # fmt: skip
    dense = [p for m in model.modules if isinstance(m, Dense) for p in m.parameters()]
    optimizer = Adam(model.parameters(), lr=1e-2)
    x_train = data.x_train.astype(dtype)
    targets = data.y_train.astype(dtype)
    for epoch in range(1, epochs + 1):
        model.train()
        loss_sum, seen = 0.0, 0
        for idx in minibatches(len(x_train), 32, rng):
            mine = np.array_split(idx, size)[rank]  # this process's slice of the global batch
            z = model.forward(x_train[mine]).reshape(-1)
            t = targets[mine]
            loss_sum += float(np.sum(np.logaddexp(0.0, -np.abs(z)) + np.maximum(z, 0) - z * t))
            # d(mean over the global batch)/dz for this process's samples
            dz = ((sigmoid(z) - t) / len(idx)).reshape(-1, 1).astype(dtype)
            model.backward(dz)
            if not plain:  # the dense layers' gradients over all processes (BN's are global)
                for p, total in zip(dense, sum_over_ranks(*[p.grad for p in dense], comm=comm),
                                    strict=True):  # fmt: skip
                    p.grad[...] = total
            optimizer.step()
            seen += len(idx)
        if not plain:
            loss_sum = float(sum_over_ranks(np.array([loss_sum]), comm=comm)[0][0])
        model.eval()
        accuracy = float(np.mean((model.forward(data.x_test.astype(dtype)).reshape(-1) > 0)
                                 == data.y_test))  # fmt: skip
        if verbose and rank == 0 and (epoch % 5 == 0 or epoch == 1):
            print(f"epoch {epoch:3d}  loss {loss_sum / seen:.4f}  test accuracy {accuracy:.3f}"
                  f"  ({size} process{'es' if size > 1 else ''})")  # fmt: skip
    weights: dict[str, np.ndarray] = {}
    for i, module in enumerate(model.modules):
        for p in module.parameters():
            weights[f"{i}.{p.name}"] = p.value.copy()
        if isinstance(module, BatchNorm1d):
            bn: BatchNorm = module.bn
            assert bn.running_mean is not None and bn.running_var is not None
            weights[f"{i}.running_mean"] = bn.running_mean.copy()
            weights[f"{i}.running_var"] = bn.running_var.copy()
    if out is not None and rank == 0:
        np.savez(out, **weights)  # type: ignore[arg-type]  # numpy's stub: allow_pickle in **
    return weights


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--plain", action="store_true", help="one process, plain BatchNorm, no MPI")
    parser.add_argument("--out", default=None, help="save the final weights (.npz) from rank 0")
    args = parser.parse_args()
    main(args.epochs, args.seed, np.dtype(args.dtype), args.plain, args.out)
