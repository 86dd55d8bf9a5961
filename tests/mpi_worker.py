"""Run by tests/test_distributed.py under ``mpiexec -n N python -m mpi4py tests/mpi_worker.py
SCENARIO``: every rank builds the same global data (same seeds), takes its part of the batch, runs
the synchronized op, and compares with the single-process result on the whole batch, computed on
the same rank.  A failed check raises, which ``python -m mpi4py`` turns into an abort of the whole
job (a non-zero exit, never a hang).  Rank 0 prints one JSON line with what it checked.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from mpi4py import MPI

import bnkernel as bk
from bnkernel import distributed as dist

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()
TOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}

# (shape, channel axis, batch axis to split)
LAYOUTS = [
    ((12, 5, 4, 3), 1, 0),  # NCHW
    ((12, 4, 3, 5), -1, 0),  # NHWC
    ((13, 7), 1, 0),  # (N, C)
    ((3, 4, 6, 9), 2, 0),  # channel axis in the middle
    ((5, 40), 0, 1),  # channels first, the batch along axis 1
    ((9, 1, 300), 1, 0),  # one channel, long runs
]


def splits(n: int) -> dict[str, list[int]]:
    """Per-rank sample counts summing to n: even-ish, uneven, and with empty ranks."""
    even = [len(a) for a in np.array_split(np.arange(n), SIZE)]
    uneven = [n - (SIZE - 1)] + [1] * (SIZE - 1)
    empty = [0] * (SIZE - 1) + [n]  # every rank but the last has nothing
    if SIZE == 1:
        return {"even": even}
    empty_middle = [n // 2] + [0] * (SIZE - 2) + [n - n // 2]
    return {"even": even, "uneven": uneven, "empty": empty, "empty-middle": empty_middle}


def part(a: np.ndarray, axis: int, counts: list[int]) -> np.ndarray:
    start = sum(counts[:RANK])
    idx = [slice(None)] * a.ndim
    idx[axis] = slice(start, start + counts[RANK])
    return np.ascontiguousarray(a[tuple(idx)])


def close(got, want, tol, scale=None, what=""):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if scale is None:
        scale = float(np.max(np.abs(want), initial=0.0))
    err = np.abs(got - want)
    bound = tol * np.abs(want) + tol * scale
    assert np.all(err <= bound), f"rank {RANK}: {what}: max error {err.max()} (scale {scale})"


def identical_everywhere(a, what):
    """The same bits on every rank."""
    mine = np.ascontiguousarray(np.asarray(a, np.float64))
    all_ = np.empty((SIZE, *mine.shape))
    COMM.Allgather(mine, all_)
    assert all(np.array_equal(all_[0], r) for r in all_[1:]), f"{what}: differs between ranks"


def consistency() -> dict:
    checked = 0
    for shape, axis, batch_axis in LAYOUTS:
        for dtype in (np.float32, np.float64):
            rng = np.random.default_rng(hash((shape, axis)) % 2**32)
            dt = np.dtype(dtype)
            x = (rng.standard_normal(shape) * 2 + 1).astype(dt)
            dy = rng.standard_normal(shape).astype(dt)
            C = shape[axis]
            g = rng.uniform(0.5, 1.5, C).astype(dt)
            b = rng.standard_normal(C).astype(dt)
            tol = TOL[dt]
            # single process, whole batch
            rm0, rv0 = np.zeros(C, dt), np.ones(C, dt)
            y0, mean0, invstd0 = bk.batch_norm_forward(
                x, g, b, running_mean=rm0, running_var=rv0, axis=axis
            )
            dx0, dg0, db0 = bk.batch_norm_backward(dy, x, mean0, invstd0, g, axis=axis)
            for name, counts in splits(shape[batch_axis]).items():
                xp, dyp = part(x, batch_axis, counts), part(dy, batch_axis, counts)
                rm, rv = np.zeros(C, dt), np.ones(C, dt)
                y, mean, invstd, count = dist.sync_batch_norm_forward(
                    xp, g, b, running_mean=rm, running_var=rv, axis=axis
                )
                assert count == x.size // C, (count, name)
                what = f"{shape} axis {axis} {dt.name} {name}"
                close(y, part(y0, batch_axis, counts), tol, scale=float(np.abs(y0).max()),
                      what=f"y {what}")  # fmt: skip
                close(mean, mean0, 1e-12, scale=float(np.abs(x).max()), what=f"mean {what}")
                close(invstd, invstd0, 1e-12, what=f"invstd {what}")
                close(rm, rm0, tol, what=f"running_mean {what}")
                close(rv, rv0, tol, what=f"running_var {what}")
                dx, dg, db = dist.sync_batch_norm_backward(dyp, xp, mean, invstd, count, g,
                                                           axis=axis)  # fmt: skip
                terms = float(np.abs(g).max() * np.abs(invstd0).max() * np.abs(dy).max())
                close(dx, part(dx0, batch_axis, counts), tol, scale=terms, what=f"dx {what}")
                size = float(np.abs(dy.astype(np.float64)).sum())
                close(dg, dg0, tol, scale=size * float(np.abs(invstd0).max()) * 4,
                      what=f"dgamma {what}")  # fmt: skip
                close(db, db0, tol, scale=size, what=f"dbeta {what}")
                for arr, nm in ((mean, "mean"), (invstd, "invstd"), (rv, "running_var"),
                                (dg, "dgamma"), (db, "dbeta")):  # fmt: skip
                    identical_everywhere(arr, f"{nm} {what}")
                checked += 1
    return {"checked": checked}


def fused_and_masked() -> dict:
    """relu + residual and a mask, through the synchronized split phases."""
    rng = np.random.default_rng(5)
    shape, axis = (10, 6, 4), -1  # (N, L, C), the mask over (N, L)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    res = rng.standard_normal(shape)
    mask = rng.random(shape[:2]) < 0.6
    mask[0, :2] = True
    g = rng.uniform(0.5, 1.5, 4)
    y0, mean0, invstd0 = bk.batch_norm_forward(x, g, None, axis=axis, activation="relu",
                                               residual=res, mask=mask)  # fmt: skip
    dx0, dg0, db0, dr0 = bk.batch_norm_backward(dy, x, mean0, invstd0, g, axis=axis,
                                                activation="relu", y=y0, residual_grad=True,
                                                mask=mask)  # fmt: skip
    for name, counts in splits(10).items():
        p = [part(a, 0, counts) for a in (x, dy, res)]
        pm = part(mask, 0, counts)
        y, mean, invstd, count = dist.sync_batch_norm_forward(
            p[0], g, None, axis=axis, activation="relu", residual=p[2], mask=pm
        )
        assert count == int(mask.sum())
        close(y, part(y0, 0, counts), 1e-12, scale=float(np.abs(y0).max()) + 3, what=f"y {name}")
        dx, dg, db, dr = dist.sync_batch_norm_backward(
            p[1], p[0], mean, invstd, count, g, axis=axis, activation="relu", y=y,
            residual_grad=True, mask=pm,
        )  # fmt: skip
        close(dx, part(dx0, 0, counts), 1e-12, scale=10.0, what=f"dx {name}")
        close(dg, dg0, 1e-12, scale=100.0, what=f"dgamma {name}")
        close(db, db0, 1e-12, scale=100.0, what=f"dbeta {name}")
        np.testing.assert_array_equal(dr, part(dr0, 0, counts))
    return {"checked": len(splits(10))}


def layer() -> dict:
    """SyncBatchNorm over several steps against BatchNorm on the whole batch, both conventions,
    then eval (no communication)."""
    rng = np.random.default_rng(7)
    checked = 0
    for convention in ("torch", "keras"):
        for dtype in (np.float32, np.float64):
            tol = TOL[np.dtype(dtype)]
            ref = bk.BatchNorm(3, axis=-1, convention=convention, dtype=dtype)
            sync = dist.SyncBatchNorm(3, axis=-1, convention=convention, dtype=dtype)
            for step in range(4):
                n = 5 + step
                x = (rng.standard_normal((n, 2, 3)) * 3 + step).astype(dtype)
                dy = rng.standard_normal((n, 2, 3)).astype(dtype)
                counts = splits(n)["uneven" if step % 2 else "empty"]
                y0 = ref.forward(x)
                dx0 = ref.backward(dy)
                y = sync.forward(part(x, 0, counts))
                dx = sync.backward(part(dy, 0, counts))
                close(y, part(y0, 0, counts), tol, scale=float(np.abs(y0).max()), what="y")
                close(dx, part(dx0, 0, counts), tol, scale=10.0, what="dx")
                close(sync.grads["gamma"], ref.grads["gamma"], tol, scale=100.0, what="dgamma")
                assert ref.running_var is not None and sync.running_var is not None
                close(sync.running_var, ref.running_var, tol, what="running_var")
                identical_everywhere(sync.running_var, "running_var")
                identical_everywhere(sync.grads["beta"], "dbeta")
                assert sync.num_batches_tracked == ref.num_batches_tracked
            sync.eval()
            ref.eval()
            x = rng.standard_normal((4, 2, 3)).astype(dtype)
            # the running statistics agree to rounding (merged from parts vs one pass)
            close(sync.forward(x), ref.forward(x), tol, scale=10.0, what="eval y")
            checked += 1
    assert "SyncBatchNorm(" in repr(sync) and f"ranks={SIZE}" in repr(sync)
    return {"checked": checked}


class CountingComm(MPI.Intracomm):
    """A communicator object counting the collectives bnkernel.distributed could call (the four
    methods below record their name in ``calls``, then run MPI.Intracomm's)."""

    calls: list[str]


def _counted(name: str):
    def method(self, *args, **kwargs):
        self.calls.append(name)
        return getattr(MPI.Intracomm, name)(self, *args, **kwargs)

    method.__name__ = method.__qualname__ = name
    return method


for _name in ("Allgather", "Allreduce", "allgather", "allreduce"):
    setattr(CountingComm, _name, _counted(_name))


def four_collectives() -> dict:
    """Exactly four collectives per training step of a layer (in each direction a fixed-size
    header, then the data), none in eval or frozen mode; a failed step costs the header and the
    reasons' exchange, and never reaches the data exchange."""
    comm = CountingComm(COMM)  # the same communicator, another Python object
    comm.calls = []
    bn = dist.SyncBatchNorm(4, comm=comm, dtype=np.float64)
    x = np.random.default_rng(RANK).standard_normal((3 + RANK, 4, 5))
    for _ in range(3):
        bn.forward(x)
        assert comm.calls == ["Allgather"] * 2, comm.calls
        bn.backward(x)
        assert comm.calls == ["Allgather"] * 4, comm.calls
        comm.calls.clear()
    try:
        bn.forward(x if RANK != 1 else x[:, :3])
    except dist.PeerError:
        assert comm.calls == ["Allgather", "allgather"], comm.calls
    else:
        raise AssertionError("expected a PeerError")
    comm.calls.clear()
    bn.eval()
    bn.forward(x)
    bn.backward(x)
    bn.freeze()
    bn.forward(x)
    bn.backward(x)
    assert comm.calls == [], comm.calls
    return {"checked": 3}


def total_of_one() -> dict:
    """One sample in the whole batch: every rank raises, none waits."""
    x = np.ones((1, 3)) if RANK == 0 else np.ones((0, 3))
    try:
        dist.sync_batch_norm_forward(x)
    except ValueError as e:
        assert type(e) is ValueError, repr(e)  # the same everywhere, no PeerError needed
        assert "more than 1 value per channel in the whole batch" in str(e), e
        return {"raised": True}
    raise AssertionError("expected a ValueError on every rank")


# ---- errors: every rank raises the same PeerError, nothing written anywhere ----------------------


def peer_error(fn, offenders, *fragments, cause=None, same_message=True) -> dist.PeerError:
    """fn() raises a PeerError on this rank naming `offenders` (ranks) and containing each
    fragment; on an offending rank that failed locally, its own exception (of class `cause`) is
    the __cause__; the message is the same on every rank."""
    try:
        fn()
    except dist.PeerError as e:
        msg = str(e)
        assert isinstance(e, ValueError)
        assert e.ranks == offenders, (RANK, e.ranks, msg)
        assert sorted(e.reasons) == offenders, (RANK, e.reasons)
        for f in fragments:
            assert f in msg, (RANK, f, msg)
        if cause is not None and RANK in offenders:
            assert isinstance(e.__cause__, cause), (RANK, repr(e.__cause__))
        else:
            assert e.__cause__ is None, (RANK, repr(e.__cause__))
        if same_message:
            msgs = COMM.allgather(msg)
            assert all(m == msgs[0] for m in msgs), msgs
        return e
    raise AssertionError(f"rank {RANK}: expected a PeerError")


def snapshot(*arrays):
    """Copies of the arrays among the arguments (the rest: None)."""
    return [np.array(a, copy=True) if isinstance(a, np.ndarray) else None for a in arrays]


def unchanged(arrays, copies, what):
    for i, (a, c) in enumerate(zip(arrays, copies, strict=True)):
        if c is not None:
            assert np.array_equal(a, c, equal_nan=True), (
                f"rank {RANK}: {what}: argument {i} written"
            )


def works_after() -> None:
    """The communicator is still in step after an error: a plain step runs."""
    x = np.random.default_rng(RANK).standard_normal((3, 2))
    _, mean, invstd, count = dist.sync_batch_norm_forward(x)
    dist.sync_batch_norm_backward(x, x, mean, invstd, count)


def forward_case(C: int, dtype=np.float64, **kw):
    """A forward's arguments on this rank (running statistics and out= included)."""
    x = np.random.default_rng(RANK).standard_normal((4, C)).astype(dtype)
    P = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
    args = {"running_mean": np.zeros(C, P), "running_var": np.ones(C, P),
            "out": np.full((4, C), 7.0, dtype), **kw}  # fmt: skip
    return x, args


def bad_argument() -> dict:
    """Rank 1 passes gamma of the wrong dtype: every rank raises the PeerError naming it (its own
    TypeError the cause there); likewise a bad count on rank 0 in the backward."""
    x = np.random.default_rng(RANK).standard_normal((4, 3))
    g = np.ones(3, np.float32 if RANK == 1 else np.float64)
    peer_error(lambda: dist.sync_batch_norm_forward(x, g), [1],
               "sync_batch_norm_forward: rank 1: TypeError: gamma: expected dtype float64",
               cause=TypeError)  # fmt: skip
    _, mean, invstd, count = dist.sync_batch_norm_forward(x)  # the communicator still works
    bad = 0 if RANK == 0 else count
    peer_error(lambda: dist.sync_batch_norm_backward(x, x, mean, invstd, bad), [0],
               "sync_batch_norm_backward: rank 0: ValueError: count:",
               cause=ValueError)  # fmt: skip
    works_after()
    return {"raised": True}


def channels_differ() -> dict:
    """Rank 1 has 4 channels, the others 3: every rank raises a PeerError naming rank 1 and the
    counts (no truncated message, no uninitialized statistics, nobody waiting), in the forward
    and in the backward, and nothing is written."""
    C = 4 if RANK == 1 else 3
    x, args = forward_case(C)
    before = snapshot(*args.values())
    want = "channel counts differ: rank 0 has 3, rank 1 has 4" if SIZE == 2 else (
        "channel counts differ: ranks 0, 2 have 3, rank 1 has 4")  # fmt: skip
    peer_error(lambda: dist.sync_batch_norm_forward(x, **args), [1], want)
    unchanged(args.values(), before, "channels forward")
    mean, invstd, dx = np.zeros(C), np.ones(C), np.full_like(x, 7.0)
    peer_error(lambda: dist.sync_batch_norm_backward(x, x, mean, invstd, 12, out=dx), [1], want)
    assert (dx == 7.0).all()
    works_after()
    return {"raised": True}


def dtypes_differ() -> dict:
    """Rank 1 passes float32, the others float64."""
    x, args = forward_case(3, np.float32 if RANK == 1 else np.float64)
    before = snapshot(*args.values())
    peer_error(lambda: dist.sync_batch_norm_forward(x, **args), [1], "dtypes differ",
               "rank 1 has float32")  # fmt: skip
    unchanged(args.values(), before, "dtypes")
    works_after()
    return {"raised": True}


def bad_out_forward() -> dict:
    """A wrong out= on rank 1 only: nobody writes its running statistics or out=."""
    x, args = forward_case(3)
    if RANK == 1:
        args["out"] = np.full((2, 3), 7.0)
    before = snapshot(*args.values())
    peer_error(lambda: dist.sync_batch_norm_forward(x, **args), [1],
               "sync_batch_norm_forward: rank 1: ValueError: out: expected shape (4, 3), "
               "got (2, 3)", cause=ValueError)  # fmt: skip
    unchanged(args.values(), before, "bad out forward")
    works_after()
    return {"raised": True}


def bad_out_backward() -> dict:
    """A wrong out= in rank 1's backward: no rank writes its out=."""
    x = np.random.default_rng(RANK).standard_normal((4, 3))
    g = np.ones(3)
    _, mean, invstd, count = dist.sync_batch_norm_forward(x, g)
    out = np.full((4, 3), 7.0, np.float32 if RANK == 1 else np.float64)
    before = snapshot(out, g, mean, invstd)
    peer_error(lambda: dist.sync_batch_norm_backward(x, x, mean, invstd, count, g, out=out), [1],
               "sync_batch_norm_backward: rank 1: TypeError: out: expected dtype float64",
               cause=TypeError)  # fmt: skip
    unchanged([out, g, mean, invstd], before, "bad out backward")
    works_after()
    return {"raised": True}


def gelu_on_one_rank() -> dict:
    x, args = forward_case(3, activation="gelu" if RANK == 1 else None)
    before = snapshot(*args.values())
    peer_error(lambda: dist.sync_batch_norm_forward(x, **args), [1],
               "rank 1: ValueError: activation: expected None or 'relu', got 'gelu'",
               cause=ValueError)  # fmt: skip
    unchanged(args.values(), before, "gelu")
    works_after()
    return {"raised": True}


def axis_out_of_range() -> dict:
    """An error before the channel count is known (axis out of range on rank 1): every rank
    raises instead of waiting."""
    x, args = forward_case(3)
    before = snapshot(*args.values())
    peer_error(lambda: dist.sync_batch_norm_forward(x, axis=5 if RANK == 1 else 1, **args), [1],
               "rank 1: AxisError: axis", cause=np.exceptions.AxisError)  # fmt: skip
    unchanged(args.values(), before, "axis")
    works_after()
    return {"raised": True}


def not_an_array() -> dict:
    """x is not an array on rank 1 (and no gamma tells the channel count)."""
    x, args = forward_case(3)
    before = snapshot(*args.values())
    peer_error(lambda: dist.sync_batch_norm_forward("x" if RANK == 1 else x, **args), [1],
               "rank 1: TypeError: x: expected", cause=TypeError)  # fmt: skip
    unchanged(args.values(), before, "not an array")
    works_after()
    return {"raised": True}


def settings_differ() -> dict:
    """eps (forward) and count (backward) must be the same everywhere; a forward never pairs
    with a backward."""
    x, args = forward_case(3)
    before = snapshot(*args.values())
    eps = 1e-3 if RANK == 1 else 1e-5
    peer_error(lambda: dist.sync_batch_norm_forward(x, eps=eps, **args), [1], "eps differ",
               "rank 1 has 0.001")  # fmt: skip
    unchanged(args.values(), before, "eps")
    _, mean, invstd, count = dist.sync_batch_norm_forward(x)
    peer_error(lambda: dist.sync_batch_norm_backward(x, x, mean, invstd, count + (RANK == 1)),
               [1], f"rank 1 has {count + 1}")  # fmt: skip
    if RANK == 1:
        call = lambda: dist.sync_batch_norm_backward(x, x, mean, invstd, count)  # noqa: E731
    else:
        call = lambda: dist.sync_batch_norm_forward(x, **args)  # noqa: E731
    peer_error(call, [1], "calls differ", "rank 1 is in a backward", same_message=False)
    unchanged(args.values(), before, "calls")
    works_after()
    return {"raised": True}


def layer_wrong_input() -> dict:
    """SyncBatchNorm: a wrong-channel input on rank 1 (forward), then a wrong dy on rank 1
    (backward), then a backward before any forward on rank 1: every rank raises, no state
    changes (running statistics, batch count, grads, the saved step)."""
    bn = dist.SyncBatchNorm(3, dtype=np.float64)
    x = np.random.default_rng(RANK).standard_normal((4, 3))
    state = lambda: [bn.running_mean, bn.running_var, bn.grads["gamma"], bn.grads["beta"]]  # noqa: E731
    before = snapshot(*state())
    peer_error(lambda: bn.forward(x if RANK != 1 else x[:, :2]), [1],
               "SyncBatchNorm.forward: rank 1: ValueError: x: expected 3 channels",
               cause=ValueError)  # fmt: skip
    unchanged(state(), before, "layer forward")
    assert bn.num_batches_tracked == 0 and bn._saved is None
    bn.forward(x)
    saved = bn._saved
    before = snapshot(*state())
    peer_error(lambda: bn.backward(x if RANK != 1 else x[:3]), [1],
               "SyncBatchNorm.backward: rank 1: ValueError: dy: expected the shape of x",
               cause=ValueError)  # fmt: skip
    unchanged(state(), before, "layer backward")
    assert bn._saved is saved and bn.num_batches_tracked == 1
    fresh = bn if RANK != 1 else dist.SyncBatchNorm(3, dtype=np.float64)  # no step saved on 1
    peer_error(lambda: fresh.backward(x), [1],
               "SyncBatchNorm.backward: rank 1: RuntimeError: backward: call forward first",
               cause=RuntimeError)  # fmt: skip
    unchanged(state(), before, "layer backward before forward")
    works_after()
    return {"raised": True}


def sums_disagree() -> dict:
    """sum_over_ranks with another shape on rank 1."""
    a = np.ones(3 if RANK == 1 else 2)
    peer_error(lambda: dist.sum_over_ranks(a), [1], "sum_over_ranks: array shapes differ")
    works_after()
    return {"raised": True}


def masked_nan_padding() -> dict:
    """NaN in the padded positions of x and dy: the synchronized backward keeps them out of the
    sums, as the single-process one does."""
    rng = np.random.default_rng(11)
    shape = (8, 3, 5)  # (N, C, L), the mask over (N, L)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    mask = rng.random((8, 5)) < 0.7
    mask[:2] = True
    pad = np.broadcast_to(~mask[:, None, :], shape)
    x[pad] = np.nan
    dy[pad] = np.nan
    g = rng.uniform(0.5, 1.5, 3)
    _, mean0, invstd0 = bk.batch_norm_forward(x, g, None, mask=mask)
    dx0, dg0, db0 = bk.batch_norm_backward(dy, x, mean0, invstd0, g, mask=mask)
    assert np.isfinite(dg0).all() and np.isfinite(db0).all()
    for name, counts in splits(8).items():
        xp, dyp, mp = part(x, 0, counts), part(dy, 0, counts), part(mask, 0, counts)
        _, mean, invstd, count = dist.sync_batch_norm_forward(xp, g, None, mask=mp)
        dx, dg, db = dist.sync_batch_norm_backward(dyp, xp, mean, invstd, count, g, mask=mp)
        close(dg, dg0, 1e-12, scale=100.0, what=f"dgamma {name}")
        close(db, db0, 1e-12, scale=100.0, what=f"dbeta {name}")
        want = part(dx0, 0, counts)
        assert np.array_equal(np.isnan(dx), np.isnan(want)), name
        close(np.nan_to_num(dx), np.nan_to_num(want), 1e-12, scale=10.0, what=f"dx {name}")
    return {"checked": len(splits(8))}


def uncaught() -> dict:
    """Rank 1 fails outside any synchronized call; the others go on to a collective.  Under
    `python -m mpi4py` the job is aborted rather than left waiting (the test checks the exit)."""
    if RANK == 1:
        raise RuntimeError("rank 1 fails on its own")
    dist.sync_batch_norm_forward(np.ones((4, 3)))
    return {}


def sums() -> dict:
    """sum_over_ranks: rank-ordered sums, identical everywhere."""
    a = np.full((2, 3), RANK + 0.1)
    b = np.arange(4.0) * (RANK + 1)
    sa, sb = dist.sum_over_ranks(a, b)
    np.testing.assert_allclose(sa, sum(r + 0.1 for r in range(SIZE)) * np.ones((2, 3)))
    np.testing.assert_allclose(sb, np.arange(4.0) * sum(r + 1 for r in range(SIZE)))
    identical_everywhere(sa, "sum")
    count, mean, m2 = dist.allreduce_stats(bk.channel_stats(np.full((RANK + 1, 2), float(RANK))))
    xs = np.concatenate([np.full((r + 1, 2), float(r)) for r in range(SIZE)])
    rc, rmean, rm2 = bk.channel_stats(xs)
    assert count == rc
    np.testing.assert_allclose(mean, rmean, rtol=1e-15)
    np.testing.assert_allclose(m2, rm2, rtol=1e-14)
    return {"checked": 1}


def device() -> dict:
    """SyncBatchNorm and the synchronized functions on device arrays (tests/fake_cuda.py's
    stand-ins for CuPy and the CUDA kernels on every rank): the same results as on the host,
    messages staged through host memory, outputs on the device."""
    from fake_cuda import FakeCupy, FakeKernels

    cp = sys.modules["cupy"] = FakeCupy()
    sys.modules["bnkernel._cuda"] = FakeKernels()
    rng = np.random.default_rng(11)
    ref = bk.BatchNorm(3, axis=-1)
    sync = dist.SyncBatchNorm(3, axis=-1, device="cuda")
    for step in range(3):
        n = 6 + step
        x = (rng.standard_normal((n, 2, 3)) * 3 + step).astype(np.float32)
        dy = rng.standard_normal((n, 2, 3)).astype(np.float32)
        counts = splits(n)["uneven" if step % 2 else "empty"]
        y0, dx0 = ref.forward(x), ref.backward(dy)
        y = sync.forward(cp.asarray(part(x, 0, counts)))
        dx = sync.backward(cp.asarray(part(dy, 0, counts)))
        assert isinstance(y, cp.ndarray) and isinstance(dx, cp.ndarray)
        close(y.get(), part(y0, 0, counts), 1e-6, scale=float(np.abs(y0).max()), what="y")
        close(dx.get(), part(dx0, 0, counts), 1e-6, scale=10.0, what="dx")
        close(sync.grads["gamma"].get(), ref.grads["gamma"], 1e-6, scale=100.0, what="dgamma")
        close(sync.running_var.get(), ref.running_var, 1e-6, what="running_var")
        identical_everywhere(sync.running_var.get(), "running_var")
    # masked, fused, through the functions
    shape = (10, 6, 4)
    x, dy, res = (rng.standard_normal(shape) for _ in range(3))
    mask = rng.random(shape[:2]) < 0.6
    mask[0, :2] = True
    y0, mean0, invstd0 = bk.batch_norm_forward(x, axis=-1, activation="relu", residual=res,
                                               mask=mask)  # fmt: skip
    dx0 = bk.batch_norm_backward(dy, x, mean0, invstd0, axis=-1, activation="relu", y=y0,
                                 mask=mask)[0]  # fmt: skip
    counts = splits(10)["uneven"]
    p = [cp.asarray(part(a, 0, counts)) for a in (x, dy, res)]
    pm = cp.asarray(part(mask, 0, counts))
    y, mean, invstd, count = dist.sync_batch_norm_forward(p[0], axis=-1, activation="relu",
                                                          residual=p[2], mask=pm)  # fmt: skip
    assert count == int(mask.sum()) and isinstance(mean, cp.ndarray)
    close(y.get(), part(y0, 0, counts), 1e-12, scale=float(np.abs(y0).max()) + 3, what="y")
    dx = dist.sync_batch_norm_backward(p[1], p[0], mean, invstd, count, axis=-1,
                                       activation="relu", y=y, mask=pm)[0]  # fmt: skip
    close(dx.get(), part(dx0, 0, counts), 1e-12, scale=10.0, what="dx")
    return {"checked": 4}


def torch_tensors() -> dict:
    """The synchronized forward and backward on torch CPU tensors (DLPack views, no copies): the
    running statistics updated in the tensors' memory, out= written into a tensor, the same
    results as on NumPy arrays."""
    import torch

    rng = np.random.default_rng(11)
    shape = (12, 5, 4, 3)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    counts = splits(12)["even"]
    xp, dyp = part(x, 0, counts), part(dy, 0, counts)
    rm, rv = np.zeros(5), np.ones(5)
    want = dist.sync_batch_norm_forward(xp, running_mean=rm, running_var=rv)
    rm_t, rv_t = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    out = torch.empty(xp.shape, dtype=torch.float64)
    got = dist.sync_batch_norm_forward(torch.from_numpy(xp), running_mean=rm_t, running_var=rv_t,
                                       out=out)  # fmt: skip
    assert got[0] is out and np.array_equal(out.numpy(), want[0])
    assert np.array_equal(rm_t.numpy(), rm) and np.array_equal(rv_t.numpy(), rv)
    grads = dist.sync_batch_norm_backward(dyp, xp, want[1], want[2], want[3])
    T = torch.from_numpy
    grads_t = dist.sync_batch_norm_backward(T(dyp), T(xp), T(want[1]), want[2], want[3])
    for a, b in zip(grads_t, grads, strict=True):
        assert np.array_equal(a, b)
    return {"checked": 3}


SCENARIOS = {
    "device": device,
    "torch_tensors": torch_tensors,
    "consistency": consistency,
    "fused_and_masked": fused_and_masked,
    "layer": layer,
    "total_of_one": total_of_one,
    "bad_argument": bad_argument,
    "uncaught": uncaught,
    "sums": sums,
    "four_collectives": four_collectives,
    "channels_differ": channels_differ,
    "dtypes_differ": dtypes_differ,
    "bad_out_forward": bad_out_forward,
    "bad_out_backward": bad_out_backward,
    "gelu_on_one_rank": gelu_on_one_rank,
    "axis_out_of_range": axis_out_of_range,
    "not_an_array": not_an_array,
    "settings_differ": settings_differ,
    "layer_wrong_input": layer_wrong_input,
    "sums_disagree": sums_disagree,
    "masked_nan_padding": masked_nan_padding,
}

if __name__ == "__main__":
    result = SCENARIOS[sys.argv[1]]()
    COMM.Barrier()
    if RANK == 0:
        print(json.dumps({"scenario": sys.argv[1], "size": SIZE, **result}))
