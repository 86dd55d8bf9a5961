"""Synchronized batch normalization across processes, over MPI (mpi4py).

When a batch is split across processes (data-parallel training), the statistics must be those of
the whole batch:

* forward: every process computes its local ``(count, mean, M2)``, the processes exchange them,
  and every process merges all of them with Chan's formula (in rank order), then normalizes its
  own part with the global statistics and updates its running statistics identically;
* backward: every process computes its local ``(sum(dy), sum(dy * xhat))``, the processes
  exchange them and add them in rank order, and each computes its own ``dx`` with the global
  count.

Every process agrees before any number is used.  Each synchronized call runs in three stages:

1. local: every argument is checked (:class:`bnkernel._checks.Call`, the overlap rule included)
   and the local reduction computed; any exception is caught, and nothing is written;
2. the header: one ``Allgather`` of a fixed-size header, ``_HEADER_LEN`` int64 a process
   (``[status, call, channels, dtype, count, settings]``: status 0 ok / 1 failed; the call's code,
   so a forward never pairs with a backward; the channel count (or the exchanged width, -1 when
   unknown); the data dtype's code; the local count in a forward, the global count in a backward;
   a CRC-32 of the settings that must be equal everywhere: eps, momentum, running_var_unbiased,
   activation, which running statistics are updated).  A fixed size cannot truncate, whatever a
   process passed.  Every process derives the same verdict from the same headers: when a process
   failed or the processes disagree, one more collective (only then: an ``allgather`` of each
   process's reason and readable values, pickled, so it cannot truncate either) and every process
   raises the same :class:`PeerError`, naming each offending rank and why, before anything is
   written (running statistics, ``out=``, grads);
3. the data: one ``Allgather`` of the packed per-channel numbers (``2 C`` doubles: the means and
   ``M2``, or the two sums; the widths are now known to be equal), then the merge in rank order and
   the writes.  Nothing after it can fail for an argument's sake: a whole batch with fewer than
   two values per channel is seen in the headers and raises the same ``ValueError`` on every
   process before the data exchange.

So a training step of a layer costs four collectives, two per direction (header + data), none in
eval or frozen mode (the helpers :func:`allreduce_stats`, :func:`allreduce_sums` and
:func:`sum_over_ranks` are a header and the data too).  The header is 48 bytes a process; on two
processes of a 2-core VM the two headers of a step take 0.028 ms, all four collectives
0.05-0.08 ms (``OMP_NUM_THREADS=1 mpiexec -n 2 python -m mpi4py benchmarks/bench_distributed.py``,
the ``headers`` and ``exchanges`` columns).  The header cannot ride in the data exchange: an
``Allgather`` of unequal widths (processes with different channel counts, or a forward meeting a
backward) truncates on one process and leaves uninitialized memory on another, so the widths
must be agreed first, and only a fixed size can be exchanged before that.

The data exchange is an all-reduce whose reduction order is fixed by this code rather than by
MPI's algorithm, so every process holds bit-identical statistics and gradients (data-parallel
replicas must not drift apart), and the result equals a single process's on the concatenated
batch to rounding.  Processes with uneven batches, or none at all, take part like any other.

:class:`PeerError` is a ``ValueError`` (a bad or mismatched argument of some process): code that
catches ``ValueError`` around a step catches it on every process alike.  On the failing process
the local exception (a ``TypeError``, an ``AxisError``...) is its ``__cause__``.  What cannot be
shared: a ``comm`` that is not a communicator, and a process that never enters the call (an
uncaught exception elsewhere); run the job under ``mpiexec -n N python -m mpi4py script.py``, which
aborts every process when one raises.

``mpi4py`` is needed only here (``pip install bnkernel[mpi]``, or ``pip install mpi4py mpich`` for
an MPI from the package index); ``import bnkernel`` never imports it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import numpy as np
from numpy.typing import NDArray

from . import _checks as chk
from . import _core, _device
from .layer import DEFAULT, BatchNorm, Convention, DefaultType, exclusive
from .masked import backward_from_sums, masked_sums
from .phases import Stats, invstd_of, running_update

try:
    from mpi4py import MPI
except ImportError as exc:  # pragma: no cover - exercised without mpi4py only
    raise ImportError(
        "bnkernel.distributed needs mpi4py: pip install 'bnkernel[mpi]' "
        "(or pip install mpi4py mpich for an MPI from the package index)"
    ) from exc

__all__ = [
    "PeerError",
    "SyncBatchNorm",
    "allreduce_stats",
    "allreduce_sums",
    "sum_over_ranks",
    "sync_batch_norm_backward",
    "sync_batch_norm_forward",
]

# ---- the header ---------------------------------------------------------------------------------

_HEADER_LEN = 6
_STATUS, _CALL, _CHANNELS, _DTYPE, _COUNT, _SETTINGS = range(_HEADER_LEN)
HEADER_BYTES = 8 * _HEADER_LEN

# the calls (a forward never pairs with a backward, nor a helper with either)
_FORWARD, _BACKWARD, _STATS, _SUMS = 1, 2, 3, 4
_CALL_NAMES = {
    _FORWARD: "a forward",
    _BACKWARD: "a backward",
    _STATS: "allreduce_stats",
    _SUMS: "sum_over_ranks",
}  # in messages: "rank 0 is in a forward, rank 1 is in a backward"
_UNKNOWN = -1


def _dtype_code(dtype: np.dtype[Any]) -> int:
    if dtype == chk.F64:
        return 4
    if dtype == chk.F32:
        return 3
    if dtype == chk.F16:
        return 2
    return 1  # bfloat16: the only other data dtype (the checks refused the rest)


def _settings_key(settings: dict[str, Any]) -> int:
    """A CRC-32 of the settings (the same on every process for the same values: no hash seed)."""
    return zlib.crc32(repr(sorted(settings.items())).encode())


class PeerError(ValueError):
    """A synchronized call failed on some process, or the processes disagree (channel counts,
    dtypes, settings, which call they are in).  Every process of the communicator raises it, with
    the same message, before anything is written.

    ``ranks``: the offending ranks, sorted (those that failed, and where values differ those
    outside the largest group, on a tie the group of the lowest rank); ``reasons``: for each of
    them, why (the local exception as ``"TypeError: ..."``, or the disagreement).  On a failing
    rank the local exception is the ``__cause__``.  A ``ValueError``, so that code catching
    ``ValueError`` for bad arguments catches it on every process alike."""

    def __init__(
        self, message: str, ranks: Sequence[int] = (), reasons: dict[int, str] | None = None
    ) -> None:
        super().__init__(message)
        self.ranks: list[int] = sorted(ranks)
        self.reasons: dict[int, str] = dict(reasons or {})

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.ranks, self.reasons))


def _comm_arg(comm: Any) -> Any:
    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"comm: expected an mpi4py communicator, got {type(comm).__name__}")
    return comm


def _ranks_text(ranks: list[int]) -> str:
    """'rank 1', 'ranks 0, 2', 'ranks 0-4, 7'."""
    runs: list[str] = []
    start = prev = ranks[0]
    for r in [*ranks[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(runs)


def _disagreement(
    label: str, values: dict[int, Any], verbs: tuple[str, str] = ("has", "have")
) -> tuple[str, list[int]] | None:
    """(text, offending ranks) when the ranks' values differ: the offenders are the ranks outside
    the largest group (on a tie, the group of the lowest rank)."""
    groups: dict[Any, list[int]] = {}
    for r, v in values.items():
        groups.setdefault(v, []).append(r)
    if len(groups) < 2:
        return None
    majority = max(groups.values(), key=lambda rs: (len(rs), -rs[0]))
    parts = [f"{_ranks_text(rs)} {verbs[len(rs) > 1]} {v}" for v, rs in groups.items()]
    offenders = sorted(r for rs in groups.values() if rs is not majority for r in rs)
    return f"{label} differ: " + ", ".join(parts), offenders


def _verdict_needs_details(heads: NDArray[np.int64]) -> bool:
    """Whether anything is wrong, from the headers alone (so every process decides the same)."""
    if (heads[:, _STATUS] != 0).any():
        return True
    fields = [_CALL, _CHANNELS, _DTYPE, _SETTINGS]
    if heads[0, _CALL] == _BACKWARD:
        fields.append(_COUNT)  # the forward's global count, passed to every backward
    return bool((heads[:, fields] != heads[0, fields]).any())


@dataclass
class _Header:
    """What a process says of its part of one collective call before any data moves: the local
    error (None: its checks passed), channels, dtype, count and the settings all must share."""

    error: BaseException | None = None
    channels: int = _UNKNOWN
    dtype: np.dtype[Any] | None = None
    count: int = 0
    settings: dict[str, Any] = field(default_factory=dict)


def _agree(comm: Any, what: str, call: int, head: _Header) -> NDArray[np.int64]:
    """The header exchange: every process's header, in rank order, when all took their part and
    agree; otherwise every process raises the same PeerError (one more collective, for the
    reasons)."""
    error, channels, dtype, count, settings = (
        head.error, head.channels, head.dtype, head.count, head.settings,
    )  # fmt: skip
    failed = error is not None
    header = np.array(
        [
            1 if failed else 0,
            call,
            _UNKNOWN if failed else channels,
            _UNKNOWN if failed or dtype is None else _dtype_code(dtype),
            0 if failed else count,
            0 if failed else _settings_key(settings),
        ],
        dtype=np.int64,
    )
    heads = np.empty((comm.Get_size(), _HEADER_LEN), dtype=np.int64)
    comm.Allgather(header, heads)
    if not _verdict_needs_details(heads):
        return heads
    mine: dict[str, Any] = {
        "reason": None if error is None else f"{type(error).__name__}: {error}",
        "channels": channels,
        "dtype": None if dtype is None else dtype.name,
        "count": count,
        "settings": settings,
    }
    infos: list[dict[str, Any]] = comm.allgather(mine)
    message, ranks, reasons = _explain(heads, infos)
    raise PeerError(f"{what}: {message}", ranks, reasons) from error


def _explain(
    heads: NDArray[np.int64], infos: list[dict[str, Any]]
) -> tuple[str, list[int], dict[int, str]]:
    """The message, offending ranks and reasons: a function of what every process holds, so the
    same everywhere."""
    problems: list[str] = []
    reasons: dict[int, list[str]] = {}
    for r, info in enumerate(infos):
        if heads[r, _STATUS] != 0:
            problems.append(f"rank {r}: {info['reason']}")
            reasons.setdefault(r, []).append(str(info["reason"]))
    ok = [r for r in range(len(infos)) if heads[r, _STATUS] == 0]

    def compare(
        label: str, values: dict[int, Any], verbs: tuple[str, str] = ("has", "have")
    ) -> bool:
        found = _disagreement(label, values, verbs)
        if found is None:
            return False
        text, offenders = found
        problems.append(text)
        for r in offenders:
            reasons.setdefault(r, []).append(text)
        return True

    calls = {r: _CALL_NAMES.get(int(heads[r, _CALL]), "another call") for r in ok}
    if not compare("calls", calls, ("is in", "are in")) and ok:
        if heads[ok[0], _CALL] != _SUMS:  # there: the shapes below
            compare("channel counts", {r: infos[r]["channels"] for r in ok})
        compare("dtypes", {r: infos[r]["dtype"] for r in ok})
        if heads[ok[0], _CALL] == _BACKWARD:
            compare("counts (the forward's global count)", {r: infos[r]["count"] for r in ok})
        names = sorted({k for r in ok for k in infos[r]["settings"]})
        for name in names:
            compare(name, {r: infos[r]["settings"].get(name, "not given") for r in ok})
    if not problems:  # the headers differed in a way the readable values do not show
        problems.append("the processes' headers differ")
    return "; ".join(problems), sorted(reasons), {r: "; ".join(t) for r, t in reasons.items()}


def _staged(a: Any) -> NDArray[np.float64]:
    """A process's per-channel numbers in host memory, for MPI: device arrays are copied (a small
    message: C numbers; the copy waits for the kernels that computed them)."""
    if chk.on_device(a):
        host: NDArray[np.float64] = _device.cupy().asnumpy(a)
        return host
    return a  # type: ignore[no-any-return]


def _placed(call: chk.Call, a: NDArray[np.float64]) -> Any:
    """Merged numbers (host memory) where the call runs: copied to x's device for a device call."""
    if call.device is None:
        return a
    return _device.empty_like_host(call.device, np.ascontiguousarray(a))


def _gather(comm: Any, local: NDArray[np.float64]) -> NDArray[np.float64]:
    """Every process's row of packed numbers, in rank order (the widths agreed in the header)."""
    rows = np.empty((comm.Get_size(), local.size), dtype=np.float64)
    if local.size:
        comm.Allgather(np.ascontiguousarray(local, dtype=np.float64), rows)
    return rows


def _sum_rows(rows: NDArray[np.float64]) -> NDArray[np.float64]:
    """The ranks' rows added in rank order (the same additions, so the same bits, everywhere)."""
    total: NDArray[np.float64] = rows[0].copy()
    for r in rows[1:]:
        total += r
    return total


def _merge(
    heads: NDArray[np.int64], rows: NDArray[np.float64], C: int
) -> tuple[int, NDArray[np.float64], NDArray[np.float64]]:
    """Chan's merge of every process's (count, mean, M2), in rank order."""
    counts = np.ascontiguousarray(heads[:, _COUNT], dtype=np.int64)
    mean = np.empty(C, dtype=np.float64)
    m2 = np.empty(C, dtype=np.float64)
    n = _core.merge_stats(
        counts, np.ascontiguousarray(rows[:, :C]), np.ascontiguousarray(rows[:, C:]), mean, m2
    )
    return int(n), mean, m2


def _total_count(heads: NDArray[np.int64]) -> int:
    total = sum(int(c) for c in heads[:, _COUNT])
    if total > chk.INT64_MAX:
        raise OverflowError(f"the total count {total} does not fit in 64 bits (at most 2**63 - 1)")
    return total


# ---- helpers ------------------------------------------------------------------------------------


def allreduce_stats(stats: Stats, *, comm: Any = None) -> Stats:
    """The global ``(count, mean, M2)`` from every process's local statistics.

    Parameters
    ----------
    stats : (int, array, array)
        This process's ``(count, mean, M2)`` (from :func:`bnkernel.channel_stats`); every process
        passes the same channel count C; a count of 0 (no data here) takes part like any other.
    comm : mpi4py communicator, optional
        Default ``MPI.COMM_WORLD``.

    Returns
    -------
    count : int
        The total over the processes.
    mean, M2 : float64 arrays of shape (C,)
        Bit-identical on every process.

    Raises
    ------
    PeerError
        On every process, when any process's argument is malformed or the channel counts differ.

    Notes
    -----
    A header, one ``Allgather`` of the packed ``2 C`` numbers, then Chan's merge in rank order on
    every process: the result equals a single process's statistics of the concatenated batch to
    rounding.

    Examples
    --------
    Under ``mpiexec -n 2 python -m mpi4py script.py``, each process with its own part:

    >>> from bnkernel.distributed import allreduce_stats  # doctest: +SKIP
    >>> count, mean, m2 = allreduce_stats(bnkernel.channel_stats(x_part))  # doctest: +SKIP
    """
    comm = _comm_arg(comm)
    error: BaseException | None = None
    C = n = 0
    local = np.zeros(0)
    try:
        if not isinstance(stats, tuple) or len(stats) != 3:
            raise TypeError("stats: expected a (count, mean, M2) tuple")
        count, mean, m2 = stats
        if (
            isinstance(count, bool)
            or not isinstance(count, (int, np.integer))
            or not 0 <= count <= chk.INT64_MAX
        ):
            raise ValueError(f"stats: count must be an int in [0, 2**63 - 1], got {count!r}")
        mu = np.asarray(mean, dtype=np.float64)
        m2a = np.asarray(m2, dtype=np.float64)
        if mu.ndim != 1 or m2a.shape != mu.shape:
            raise ValueError(
                f"stats: expected mean and M2 of one shape (C,), got {mu.shape} and {m2a.shape}"
            )
        C, n = mu.shape[0], int(count)
        local = np.concatenate((mu, m2a))
    except Exception as e:  # shared with the other processes, then raised as a PeerError
        error = e
    heads = _agree(comm, "allreduce_stats", _STATS, _Header(error, C, None, n))
    _total_count(heads)
    return _merge(heads, _gather(comm, local), C)


def sum_over_ranks(*arrays: NDArray[Any], comm: Any = None) -> list[NDArray[np.float64]]:
    """Element-wise sums over all processes, in float64, bit-identical on every process.

    For the gradients of a data-parallel model's other layers (which an MPI all-reduce sums in an
    order of its own choosing, so replicas may drift apart by rounding).

    Parameters
    ----------
    *arrays : arrays
        Any number of arrays; every process passes the same number, of the same shapes.
    comm : mpi4py communicator, optional
        Default ``MPI.COMM_WORLD``.

    Returns
    -------
    list of float64 arrays
        The sums, in the arrays' order and shapes.

    Raises
    ------
    PeerError
        On every process, when any process's arrays cannot be read as floats or the shapes differ.

    Notes
    -----
    A header, one ``Allgather`` of the arrays packed together, then the sum in rank order.

    Examples
    --------
    Under ``mpiexec -n 2 python -m mpi4py script.py``:

    >>> from bnkernel.distributed import sum_over_ranks  # doctest: +SKIP
    >>> dW, db = sum_over_ranks(dW_local, db_local)  # doctest: +SKIP
    """
    comm = _comm_arg(comm)
    error: BaseException | None = None
    flat: list[NDArray[np.float64]] = []
    shapes: list[tuple[int, ...]] = []
    try:
        for a in arrays:
            arr = np.asarray(a, dtype=np.float64)
            flat.append(arr.reshape(-1))
            shapes.append(arr.shape)
    except Exception as e:  # shared with the other processes, then raised as a PeerError
        error = e
    packed = np.concatenate(flat) if flat else np.zeros(0)
    _agree(comm, "sum_over_ranks", _SUMS,
           _Header(error, packed.size, settings={"array shapes": tuple(shapes)}))  # fmt: skip
    total = _sum_rows(_gather(comm, packed))
    out = []
    start = 0
    for shape, f in zip(shapes, flat, strict=True):
        n = f.size
        out.append(total[start : start + n].reshape(shape))
        start += n
    return out


def allreduce_sums(
    sum_dy: NDArray[Any], sum_dy_xhat: NDArray[Any], *, comm: Any = None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The global backward sums from every process's :func:`bnkernel.backward_reduce`.

    Parameters
    ----------
    sum_dy, sum_dy_xhat : arrays of shape (C,)
        This process's sums.
    comm : mpi4py communicator, optional
        Default ``MPI.COMM_WORLD``.

    Returns
    -------
    sum_dy, sum_dy_xhat : float64 arrays of shape (C,)
        Summed in rank order, bit-identical on every process; pass them to
        :func:`bnkernel.backward_elementwise` with the global count.
    """
    a, b = sum_over_ranks(sum_dy, sum_dy_xhat, comm=comm)
    return a, b


# ---- the forward --------------------------------------------------------------------------------


def _forward(
    what: str, comm: Any, x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any,
    momentum: Any, eps: Any, axis: Any, running_var_unbiased: Any, activation: Any, residual: Any,
    mask: Any, out: Any, check: Callable[[], object] | None = None,
) -> tuple[NDArray[Any], NDArray[np.float64], NDArray[np.float64], int, NDArray[Any]]:  # fmt: skip
    """The synchronized training forward; returns (y, mean, invstd, count, x as an ndarray).
    `check` (the layer's input check) runs first, among the local checks."""
    head = _Header()
    call = chk.Call()
    local = np.zeros(0)
    try:
        if check is not None:
            check()
        xa = call.data(x, axis, allow_empty=True)
        C = head.channels = call.C
        head.dtype = xa.dtype
        valid = call.mask(mask)
        eps_f = chk.eps(eps)
        mom = chk.weight(momentum)
        unbiased = chk.flag(running_var_unbiased, "running_var_unbiased")
        relu = chk.activation(activation)
        g, b, rm, rv, y, res3 = call.training_forward(
            gamma, beta, running_mean, running_var, out, residual
        )
        call.seal()
        # the local statistics (the valid positions' with a mask)
        x3 = call.view3(xa)
        mean_l = call.empty(C, np.float64)
        m2_l = call.empty(C, np.float64)
        k = call.kernels
        if valid is not None:
            head.count = int(k.masked_channel_stats(x3, chk.mask_view(valid, x3), mean_l, m2_l))
        else:
            k.channel_stats(x3, mean_l, m2_l)
            head.count = xa.size // C
        local = np.concatenate((_staged(mean_l), _staged(m2_l)))
        updates = rm is not None or rv is not None
        head.settings = {
            "eps": eps_f,
            "activation": "relu" if relu else None,
            "running statistics updated": ", ".join(
                name for name, a in (("running_mean", rm), ("running_var", rv)) if a is not None
            )
            or "none",
            "momentum": mom if updates else None,
            "running_var_unbiased": unbiased if rv is not None else None,
        }
    except Exception as e:  # shared with the other processes, then raised as a PeerError
        head.error = e
    heads = _agree(comm, what, _FORWARD, head)
    # every process agrees: from here on, the same decisions everywhere and nothing to refuse
    total = _total_count(heads)
    if total < 2:
        raise ValueError(
            f"x: expected more than 1 value per channel in the whole batch when training, got "
            f"{total} over {comm.Get_size()} processes"
        )
    count, mean, m2 = _merge(heads, _gather(comm, local), C)
    mean, m2 = _placed(call, mean), _placed(call, m2)
    invstd = invstd_of(count, m2, eps_f)
    call.kernels.normalize(x3, mean, invstd, g, b, y.reshape(x3.shape), res3, relu)
    running_update(rm, rv, count, mean, m2, mom, unbiased)
    call.finish()
    return (y if out is None else out), mean, invstd, count, xa


@_device.follows_arrays
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
    """The training forward with the statistics of the batch spread over the processes.

    :func:`bnkernel.batch_norm_forward` (``training=True``) where the batch is the concatenation
    of every process's ``x``.

    Parameters
    ----------
    x : array, ndim >= 2
        This process's part of the batch (any number of samples, none included).
    gamma, beta : arrays of shape (C,), optional
    comm : mpi4py communicator, optional
        Default ``MPI.COMM_WORLD``.
    running_mean, running_var : arrays of shape (C,), optional
        Updated in place with the global statistics, identically on every process (both or
        neither).
    momentum, eps, axis, running_var_unbiased, activation, residual, mask, out
        As in :func:`bnkernel.batch_norm_forward`.

    Returns
    -------
    y : array
        x's shape and dtype.
    mean, invstd : float64 arrays of shape (C,)
        The global statistics.
    count : int
        The global number of values per channel (valid positions with ``mask``), which
        :func:`sync_batch_norm_backward` needs.

    Raises
    ------
    PeerError
        On every process, having written nothing, when any process's arguments fail the checks or
        the processes disagree on the channel count, dtype, eps, momentum, activation or which
        running statistics are updated.
    ValueError
        On every process, when the whole batch has fewer than two values per channel.

    See Also
    --------
    SyncBatchNorm : the layer.
    bnkernel.batch_norm_forward : inference (``training=False``) needs no communication.

    Examples
    --------
    Under ``mpiexec -n 2 python -m mpi4py script.py``, each process with its own part:

    >>> from bnkernel.distributed import sync_batch_norm_forward  # doctest: +SKIP
    >>> y, mean, invstd, count = sync_batch_norm_forward(
    ...     x_part, gamma, beta, running_mean=rm, running_var=rv)  # doctest: +SKIP
    """
    comm = _comm_arg(comm)
    y, mean, invstd, count, _ = _forward(
        "sync_batch_norm_forward", comm, x, gamma, beta, running_mean, running_var, momentum, eps,
        axis, running_var_unbiased, activation, residual, mask, out,
    )  # fmt: skip
    return y, mean, invstd, count


# ---- the backward -------------------------------------------------------------------------------


def _backward(
    what: str, comm: Any, dy: Any, x: Any, mean: Any, invstd: Any, count: Any, gamma: Any,
    axis: Any, activation: Any, y: Any, residual_grad: Any, mask: Any, out: Any,
) -> tuple[NDArray[Any], ...]:  # fmt: skip
    head = _Header()
    call = chk.Call()
    local = np.zeros(0)
    try:
        xa = call.data(x, axis, allow_empty=True)
        C = head.channels = call.C
        head.dtype = xa.dtype
        dy3 = call.grad(dy, allow_empty=True)
        n = head.count = chk.count(count)
        relu = chk.relu_output(activation, y)
        arrays = call.backward_arrays(mean, invstd, gamma, y, out)
        m, s, _, y3, _ = arrays
        with_dres = chk.flag(residual_grad, "residual_grad")
        valid = call.mask(mask)
        call.seal()
        x3 = call.view3(xa)
        dres = call.empty(xa.shape, xa.dtype) if relu and with_dres else None
        dres3 = None if dres is None else dres.reshape(x3.shape)
        if valid is not None:  # padding that is not finite enters no sum (as in one process)
            sdy, sdyx = masked_sums(dy3, x3, valid.reshape(x3.shape[0], x3.shape[2]), m, s, y3,
                                     dres3)  # fmt: skip
        else:
            sdy = call.empty(C, np.float64)
            sdyx = call.empty(C, np.float64)
            call.kernels.backward_reduce(dy3, x3, m, s, sdy, sdyx, y3, dres3)
        local = np.concatenate((_staged(sdy), _staged(sdyx)))
        head.settings = {"activation": "relu" if relu else None}
    except Exception as e:  # shared with the other processes, then raised as a PeerError
        head.error = e
    _agree(comm, what, _BACKWARD, head)
    total = _sum_rows(_gather(comm, local))
    sums = _placed(call, total[:C]), _placed(call, total[C:])
    return backward_from_sums(call, arrays, dy3, x3, *sums, n, valid, with_dres, dres, dy,
                              out)  # fmt: skip


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
@_device.follows_arrays
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
    """Gradients of :func:`sync_batch_norm_forward`.

    Parameters
    ----------
    dy : array
        This process's part of dL/dy for the global loss.
    x : array
        This process's forward input.
    mean, invstd : float64 arrays of shape (C,)
        The forward's global statistics.
    count : int
        The forward's global count.
    gamma : array of shape (C,), optional
    comm : mpi4py communicator, optional
        Default ``MPI.COMM_WORLD``.
    axis, activation, y, mask, out
        As in :func:`bnkernel.batch_norm_backward`; with ``mask``, padded positions whose values
        are not finite enter no sum.
    residual_grad : bool, default False
        Also return dresidual (with ``activation="relu"``).

    Returns
    -------
    dx : array
        x's shape and dtype.
    dgamma, dbeta : arrays of shape (C,)
        The global sums, the same on every process: do not reduce them again (the other layers'
        gradients are local sums; :func:`sum_over_ranks` adds them up).
    dresidual : array
        With ``residual_grad=True``.

    Raises
    ------
    PeerError
        On every process, having written nothing, when any process's arguments fail the checks
        or the processes disagree on the channel count, dtype, ``count`` or activation.
    """
    comm = _comm_arg(comm)
    return _backward("sync_batch_norm_backward", comm, dy, x, mean, invstd, count, gamma, axis,
                     activation, y, residual_grad, mask, out)  # fmt: skip


# ---- the layer ----------------------------------------------------------------------------------


class SyncBatchNorm(BatchNorm):
    """:class:`bnkernel.BatchNorm` whose training statistics span the processes of ``comm``.

    Parameters
    ----------
    num_features : int
    comm : mpi4py communicator, optional
        Default ``MPI.COMM_WORLD``.
    axis, convention, eps, momentum, affine, track_running_stats, dtype, activation, device
        As :class:`bnkernel.BatchNorm`'s.  The variants (``renorm``, ``virtual_batch_size``,
        ``single_value``) are not taken: a whole batch with one value per channel raises on every
        process.

    Notes
    -----
    Four collectives per training step (a header and the data in each direction; see the
    module's documentation), none in eval or frozen mode, which use the running statistics.
    Every process holds the same running statistics, and after ``backward`` the same ``grads``
    (the global dgamma and dbeta: do not reduce them again).  An input that fails the layer's
    checks on one process (wrong channel count or dtype) makes every process raise
    :class:`PeerError`, with no state changed.

    With ``device="cuda"`` the kernels run on the device; the per-channel messages (2 C numbers
    each way) are staged through host memory for MPI, which waits for the kernels that computed
    them (one synchronization per direction).

    Examples
    --------
    Under ``mpiexec -n 2 python -m mpi4py script.py``:

    >>> from bnkernel.distributed import SyncBatchNorm  # doctest: +SKIP
    >>> bn = SyncBatchNorm(16)  # doctest: +SKIP
    >>> y = bn(x_part); dx = bn.backward(dy_part)  # doctest: +SKIP
    """

    def __init__(
        self,
        num_features: int,
        *,
        comm: Any = None,
        axis: int = 1,
        convention: Convention = "torch",
        eps: float | None = None,
        momentum: float | DefaultType | None = DEFAULT,
        affine: bool = True,
        track_running_stats: bool = True,
        dtype: Any = np.float32,
        activation: Literal["relu"] | None = None,
        device: str | int | None = None,
    ) -> None:
        super().__init__(
            num_features, axis=axis, convention=convention, eps=eps, momentum=momentum,
            affine=affine, track_running_stats=track_running_stats, dtype=dtype,
            activation=activation, device=device,
        )  # fmt: skip
        self.comm = _comm_arg(comm)

    def __repr__(self) -> str:
        return super().__repr__().replace("BatchNorm(", "SyncBatchNorm(", 1)[:-1] + (
            f", ranks={self.comm.Get_size()})"
        )

    def _uses_batch_stats(self) -> bool:
        return self.mode == "train" or not self.track_running_stats

    @exclusive
    def forward(
        self,
        x: NDArray[Any],
        residual: NDArray[Any] | None = None,
        mask: NDArray[Any] | None = None,
    ) -> NDArray[Any]:
        if not self._uses_batch_stats():
            return super().forward(x, residual=residual, mask=mask)
        updating = self.mode == "train" and self.track_running_stats
        momentum = self._kernel_momentum(self.num_batches_tracked + 1) if updating else 0.0
        y, mean, invstd, count, xa = _forward(
            "SyncBatchNorm.forward", self.comm, x, self.gamma, self.beta,
            self.running_mean if updating else None, self.running_var if updating else None,
            momentum, self.eps, self.axis, self.unbiased_running_var, self.activation, residual,
            mask, None, check=lambda: self._check_input(x, allow_empty=True),
        )  # fmt: skip
        self._saved = ("sync", xa, mean, invstd, (y, residual is not None, mask, count))
        if updating:
            self.num_batches_tracked += 1
        return y

    __call__ = forward

    @exclusive
    def backward(self, dy: NDArray[Any]) -> Any:
        if self._saved is None and self._uses_batch_stats():
            # the other processes may be in their synchronized backward: fail there too
            _agree(self.comm, "SyncBatchNorm.backward", _BACKWARD,
                   _Header(RuntimeError("backward: call forward first")))  # fmt: skip
        if self._saved is None or self._saved[0] != "sync":
            return super().backward(dy)
        _, x, mean, invstd, (y, had_residual, mask, count) = self._saved
        relu = self.activation == "relu"
        dx, dgamma, dbeta, dres = _backward(
            "SyncBatchNorm.backward", self.comm, dy, x, mean, invstd, count, self.gamma,
            self.axis, self.activation, y if relu else None, True, mask, None,
        )  # fmt: skip
        if self.affine:
            self.grads["gamma"][...] = dgamma
            self.grads["beta"][...] = dbeta
        return (dx, dres) if had_residual else dx
