"""Synchronized batch normalization across processes, over MPI (mpi4py).

When a batch is split across processes (data-parallel training), the statistics must be those of
the whole batch.  Each training step of a layer costs exactly two collectives, each one message of
packed per-channel values:

* forward: every process computes its local ``(count, mean, M2)`` (:func:`bnkernel.channel_stats`),
  the processes exchange them, and every process merges all of them with Chan's formula
  (:func:`bnkernel.merge_stats`, in rank order), then normalizes its own part with the global
  statistics and updates its running statistics identically;
* backward: every process computes its local ``(sum(dy), sum(dy * xhat))``
  (:func:`bnkernel.backward_reduce`), the processes exchange them and add them in rank order, and
  each computes its own ``dx`` (:func:`bnkernel.backward_elementwise` with the global count).

The exchange is one ``Allgather`` of a packed buffer (a status word, then the ``2 C`` or
``1 + 2 C`` numbers) followed by the merge on every process: an all-reduce whose reduction order is
fixed by this code rather than by MPI's algorithm, so every process holds bit-identical statistics
and gradients (data-parallel replicas must not drift apart), and the result equals a single
process's on the concatenated batch to rounding.  Processes with uneven batches, or none at all,
take part like any other.

Errors: a process whose arguments fail the checks still takes part in the exchange, flagging
itself, so that every process raises (the failing one its own error, the others a
``RuntimeError`` naming it) instead of the others waiting forever.  A batch with fewer than two
values per channel in total raises on every process.  An error before the channel count is known
(for example ``x`` is not an array and no ``gamma`` was given) cannot be shared; run the job under
``mpiexec -n N python -m mpi4py script.py``, which aborts every process when one raises.

``mpi4py`` is needed only here (``pip install bnkernel[mpi]``, or ``pip install mpi4py mpich`` for
an MPI from the package index); ``import bnkernel`` never imports it.
"""

from __future__ import annotations

import numbers
from typing import Any, Literal, overload

import numpy as np
from numpy.typing import NDArray

from . import _checks as chk
from .functional import (
    Stats,
    backward_elementwise,
    backward_reduce,
    channel_stats,
    invstd_from_stats,
    merge_stats,
    normalize,
    update_running_stats,
)
from .layer import DEFAULT, BatchNorm, Convention, _Default, _exclusive

try:
    from mpi4py import MPI
except ImportError as exc:  # pragma: no cover - exercised without mpi4py only
    raise ImportError(
        "bnkernel.distributed needs mpi4py: pip install 'bnkernel[mpi]' "
        "(or pip install mpi4py mpich for an MPI from the package index)"
    ) from exc

__all__ = [
    "SyncBatchNorm",
    "allreduce_stats",
    "allreduce_sums",
    "sum_over_ranks",
    "sync_batch_norm_backward",
    "sync_batch_norm_forward",
]

_OK = 0.0
_FAILED = 1.0


class PeerError(RuntimeError):
    """Another process failed its part of a synchronized step (its own error is raised there)."""


def _comm_arg(comm: Any) -> Any:
    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"comm: expected an mpi4py communicator, got {type(comm).__name__}")
    return comm


def _exchange(
    comm: Any, what: str, width: int, local: NDArray[np.float64] | None, error: BaseException | None
) -> NDArray[np.float64]:
    """Every process's `width` numbers as a (size, width) array, in rank order, after one
    Allgather; raises on every process when any of them failed (error given, local None)."""
    send = np.zeros(width + 1)
    if error is not None or local is None:
        send[0] = _FAILED
    else:
        send[0] = _OK
        send[1:] = local
    recv = np.empty((comm.Get_size(), width + 1))
    comm.Allgather(send, recv)
    if error is not None:
        raise error
    failed = [int(r) for r in np.flatnonzero(recv[:, 0] != _OK)]
    if failed:
        raise PeerError(
            f"{what}: rank(s) {failed} of the communicator failed their part of the step "
            "(their own errors are raised there); this rank stops too"
        )
    return recv[:, 1:]


def _channels_of(x: Any, gamma: Any, axis: Any) -> int | None:
    """The channel count, if it can be told without validating anything (for sizing the exchange
    when a check fails)."""
    if gamma is not None and np.ndim(gamma) == 1:
        return int(np.shape(gamma)[0])
    try:
        shape = np.shape(x)
        return int(shape[int(axis)])
    except (TypeError, ValueError, IndexError):
        return None


def allreduce_stats(stats: Stats, *, comm: Any = None) -> Stats:
    """The global ``(count, mean, M2)`` from every process's local statistics: one Allgather of
    the packed ``1 + 2 C`` numbers, then Chan's merge in rank order on every process (identical
    results everywhere).  All processes must pass the same number of channels."""
    comm = _comm_arg(comm)
    count, mean, m2 = stats
    C = int(np.shape(mean)[0])
    local = np.concatenate(
        ([float(count)], np.asarray(mean, np.float64), np.asarray(m2, np.float64))
    )
    rows = _exchange(comm, "allreduce_stats", 1 + 2 * C, local, None)
    return _merge_rows(rows, C)


def _merge_rows(rows: NDArray[np.float64], C: int) -> Stats:
    parts = [(int(r[0]), r[1 : 1 + C], r[1 + C :]) for r in rows]
    return merge_stats(*parts)


def _sum_rows(rows: NDArray[np.float64]) -> NDArray[np.float64]:
    """The ranks' rows added in rank order (the same additions, so the same bits, everywhere)."""
    total: NDArray[np.float64] = rows[0].copy()
    for r in rows[1:]:
        total += r
    return total


def sum_over_ranks(*arrays: NDArray[Any], comm: Any = None) -> list[NDArray[np.float64]]:
    """The element-wise sums over all processes of the given float arrays (each process passing
    arrays of the same shapes), in float64: one Allgather of the arrays packed together, then the
    sum in rank order on every process, so that every process gets bit-identical sums (which an
    MPI all-reduce does not promise).  For the gradients of a data-parallel model's other layers."""
    comm = _comm_arg(comm)
    flat = [np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays]
    sizes = [f.size for f in flat]
    packed = np.concatenate(flat) if flat else np.zeros(0)
    total = _sum_rows(_exchange(comm, "sum_over_ranks", packed.size, packed, None))
    out = []
    start = 0
    for a, n in zip(arrays, sizes, strict=True):
        out.append(total[start : start + n].reshape(np.shape(a)))
        start += n
    return out


def allreduce_sums(
    sum_dy: NDArray[Any], sum_dy_xhat: NDArray[Any], *, comm: Any = None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The global backward sums from every process's :func:`bnkernel.backward_reduce` (one
    Allgather of the packed ``2 C`` numbers, summed in rank order)."""
    a, b = sum_over_ranks(sum_dy, sum_dy_xhat, comm=comm)
    return a, b


def sync_batch_norm_forward(
    x: NDArray[Any],
    gamma: NDArray[Any] | None = None,
    beta: NDArray[Any] | None = None,
    *,
    comm: Any = None,
    running_mean: NDArray[Any] | None = None,
    running_var: NDArray[Any] | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    running_var_unbiased: bool = True,
    activation: str | None = None,
    residual: NDArray[Any] | None = None,
    mask: NDArray[np.bool_] | None = None,
    out: NDArray[Any] | None = None,
) -> tuple[NDArray[Any], NDArray[np.float64], NDArray[np.float64], int]:
    """The training forward of :func:`bnkernel.batch_norm_forward` with the statistics of the
    batch spread over the processes of ``comm`` (default ``MPI.COMM_WORLD``); returns
    ``(y, mean, invstd, count)``, ``count`` being the global number of values per channel (valid
    positions with ``mask``), which :func:`sync_batch_norm_backward` needs.

    ``x`` is this process's part of the batch (any number of samples, none included); every
    process passes the same channel count, axis and arguments otherwise.  Running statistics are
    updated with the global statistics, identically on every process.  Inference needs no
    communication: use :func:`bnkernel.batch_norm_forward` with ``training=False``.
    """
    comm = _comm_arg(comm)
    C = _channels_of(x, gamma, axis)
    if C is None:
        raise TypeError("x: expected an array with a channel axis (the step cannot be shared)")
    local: NDArray[np.float64] | None = None
    error: BaseException | None = None
    try:
        xa = chk.as_input(x, "x", allow_empty=True)
        ax = chk.channel_axis(xa.ndim, axis)
        if xa.shape[ax] != C:
            raise ValueError(f"x: expected {C} channels (gamma's length), got shape {xa.shape}")
        eps_f = chk.real_number(eps, "eps", minimum=0.0)
        mom = chk.real_number(momentum, "momentum")
        # checked now, used after the exchange (a bad argument must not strand the others)
        chk.channel_param(gamma, "gamma", C, xa.dtype)
        chk.channel_param(beta, "beta", C, xa.dtype)
        chk.running_buffer(running_mean, "running_mean", C, xa.dtype)
        chk.running_buffer(running_var, "running_var", C, xa.dtype)
        n, mean_l, m2_l = channel_stats(xa, axis=ax, mask=mask)
        local = np.concatenate(([float(n)], mean_l, m2_l))
    except Exception as e:  # shared with the other processes, then raised here
        error = e
    rows = _exchange(comm, "sync_batch_norm_forward", 1 + 2 * C, local, error)
    count, mean, m2 = _merge_rows(rows, C)
    if count < 2:
        raise ValueError(
            f"x: expected more than 1 value per channel in the whole batch when training, got "
            f"{count} over {comm.Get_size()} processes"
        )
    invstd = invstd_from_stats(count, m2, eps_f)
    y = normalize(xa, mean, invstd, gamma, beta, axis=ax, activation=activation,
                  residual=residual, out=out)  # fmt: skip
    update_running_stats(running_mean, running_var, count, mean, m2, momentum=mom,
                         unbiased=bool(running_var_unbiased))  # fmt: skip
    return y, mean, invstd, count


@overload
def sync_batch_norm_backward(
    dy: NDArray[Any], x: NDArray[Any], mean: NDArray[Any], invstd: NDArray[Any], count: int,
    gamma: NDArray[Any] | None = None, *, comm: Any = None, axis: int = 1,
    activation: str | None = None, y: NDArray[Any] | None = None,
    residual_grad: Literal[False] = False, mask: NDArray[np.bool_] | None = None,
    out: NDArray[Any] | None = None,
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]: ...  # fmt: skip
@overload
def sync_batch_norm_backward(
    dy: NDArray[Any], x: NDArray[Any], mean: NDArray[Any], invstd: NDArray[Any], count: int,
    gamma: NDArray[Any] | None = None, *, comm: Any = None, axis: int = 1,
    activation: str | None = None, y: NDArray[Any] | None = None,
    residual_grad: Literal[True], mask: NDArray[np.bool_] | None = None,
    out: NDArray[Any] | None = None,
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any]]: ...  # fmt: skip
def sync_batch_norm_backward(
    dy: NDArray[Any],
    x: NDArray[Any],
    mean: NDArray[Any],
    invstd: NDArray[Any],
    count: int,
    gamma: NDArray[Any] | None = None,
    *,
    comm: Any = None,
    axis: int = 1,
    activation: str | None = None,
    y: NDArray[Any] | None = None,
    residual_grad: bool = False,
    mask: NDArray[np.bool_] | None = None,
    out: NDArray[Any] | None = None,
) -> tuple[NDArray[Any], ...]:
    """Gradients ``(dx, dgamma, dbeta)`` of :func:`sync_batch_norm_forward` (``+ dresidual`` with
    ``residual_grad=True``), ``dy`` being this process's part of dL/dy for the global loss.

    ``dgamma`` and ``dbeta`` are the global sums, the same on every process: do not reduce them
    again (the other layers' gradients are local sums; :func:`sum_over_ranks` adds them up)."""
    comm = _comm_arg(comm)
    C = _channels_of(x, gamma if gamma is not None else mean, axis)
    if C is None:
        raise TypeError("x: expected an array with a channel axis (the step cannot be shared)")
    local: NDArray[np.float64] | None = None
    error: BaseException | None = None
    relu = activation == "relu"
    dres = None
    try:
        xa = chk.as_input(x, "x", allow_empty=True)
        ax = chk.channel_axis(xa.ndim, axis)
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
            raise ValueError(
                f"count: expected the forward's global count (an int >= 1), got {count!r}"
            )
        if activation not in (None, "relu"):
            raise ValueError(f"activation: expected None or 'relu', got {activation!r}")
        if relu and y is None:
            raise ValueError("y: activation='relu' needs the forward's output y (for the mask)")
        chk.channel_param(gamma, "gamma", C, xa.dtype)
        dres = np.empty(xa.shape, dtype=xa.dtype) if relu and residual_grad else None
        sdy, sdyx = backward_reduce(dy, xa, mean, invstd, axis=ax, y=y if relu else None,
                                    dresidual=dres)  # fmt: skip
        local = np.concatenate((sdy, sdyx))
    except Exception as e:  # shared with the other processes, then raised here
        error = e
    total = _sum_rows(_exchange(comm, "sync_batch_norm_backward", 2 * C, local, error))
    sum_dy, sum_dy_xhat = total[:C], total[C:]
    dx = backward_elementwise(dy, xa, mean, invstd, gamma, sum_dy, sum_dy_xhat, int(count),
                              axis=ax, y=y if relu else None, mask=mask, out=out)  # fmt: skip
    P = chk.param_dtype(xa.dtype)
    dgamma, dbeta = sum_dy_xhat.astype(P), sum_dy.astype(P)
    if residual_grad:
        return dx, dgamma, dbeta, (dres if dres is not None else np.asarray(dy))
    return dx, dgamma, dbeta


class SyncBatchNorm(BatchNorm):
    """:class:`bnkernel.BatchNorm` whose training statistics are those of the batch spread over
    the processes of ``comm`` (default ``MPI.COMM_WORLD``): two collectives per training step
    (see the module's documentation), none in eval or frozen mode, which use the running
    statistics.  Every process holds the same running statistics, and after ``backward`` the same
    ``grads`` (the global dgamma and dbeta: do not reduce them again).

    Takes BatchNorm's arguments but the variants (``renorm``, ``virtual_batch_size``,
    ``single_value``): a whole batch with one value per channel raises on every process.
    """

    def __init__(
        self,
        num_features: int,
        *,
        comm: Any = None,
        axis: int = 1,
        convention: Convention = "torch",
        eps: float | None = None,
        momentum: float | _Default | None = DEFAULT,
        affine: bool = True,
        track_running_stats: bool = True,
        dtype: Any = np.float32,
        activation: Literal["relu"] | None = None,
    ) -> None:
        super().__init__(
            num_features, axis=axis, convention=convention, eps=eps, momentum=momentum,
            affine=affine, track_running_stats=track_running_stats, dtype=dtype,
            activation=activation,
        )  # fmt: skip
        self.comm = _comm_arg(comm)

    def __repr__(self) -> str:
        return super().__repr__().replace("BatchNorm(", "SyncBatchNorm(", 1)[:-1] + (
            f", ranks={self.comm.Get_size()})"
        )

    @_exclusive
    def forward(
        self,
        x: NDArray[Any],
        residual: NDArray[Any] | None = None,
        mask: NDArray[Any] | None = None,
    ) -> NDArray[Any]:
        use_batch_stats = self.mode == "train" or not self.track_running_stats
        if not use_batch_stats:
            return super().forward(x, residual=residual, mask=mask)
        try:
            xa = self._check_input(x, allow_empty=True)  # a rank may have no samples
        except Exception as e:  # still take part in the exchange, so the others raise too
            _exchange(self.comm, "SyncBatchNorm.forward", 1 + 2 * self.num_features, None, e)
        updating = self.mode == "train" and self.track_running_stats
        momentum = self._kernel_momentum(self.num_batches_tracked + 1) if updating else 0.0
        y, mean, invstd, count = sync_batch_norm_forward(
            xa, self.gamma, self.beta, comm=self.comm,
            running_mean=self.running_mean if updating else None,
            running_var=self.running_var if updating else None, momentum=momentum, eps=self.eps,
            axis=self.axis, running_var_unbiased=self.unbiased_running_var,
            activation=self.activation, residual=residual, mask=mask,
        )  # fmt: skip
        self._saved = ("sync", xa, mean, invstd, (y, residual is not None, mask, count))
        if updating:
            self.num_batches_tracked += 1
        return y

    __call__ = forward

    @_exclusive
    def backward(self, dy: NDArray[Any]) -> Any:
        if self._saved is None or self._saved[0] != "sync":
            return super().backward(dy)
        _, x, mean, invstd, (y, had_residual, mask, count) = self._saved
        relu = self.activation == "relu"
        dx, dgamma, dbeta, dres = sync_batch_norm_backward(
            dy, x, mean, invstd, count, self.gamma, comm=self.comm, axis=self.axis,
            activation=self.activation, y=y if relu else None, residual_grad=True, mask=mask,
        )  # fmt: skip
        if self.affine:
            self.grads["gamma"][...] = dgamma
            self.grads["beta"][...] = dbeta
        return (dx, dres) if had_residual else dx
