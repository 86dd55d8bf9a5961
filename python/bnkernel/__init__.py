"""bnkernel: fused, exact, deterministic batch normalization for NumPy.

The functional API works on NumPy arrays with any channel axis: :mod:`bnkernel.functional` holds
the fused forward and backward, :mod:`bnkernel.phases` the split phases, :mod:`bnkernel.variants`
batch renormalization, ghost batch normalization and population statistics (all re-exported
here); masks (:mod:`bnkernel.masked`) come in through ``mask=``.  :class:`BatchNorm` is a layer
for hand-written training loops; :mod:`bnkernel.distributed` (imported on its own: it needs
mpi4py) synchronizes batch normalization across the processes of an MPI job; and
:mod:`bnkernel.reference` is the plain float64 implementation every kernel is tested against.
"""

from . import _core
from ._version import __version__
from .functional import batch_norm_backward, batch_norm_forward
from .layer import CONVENTIONS, BatchNorm
from .phases import (
    backward_elementwise,
    backward_reduce,
    channel_stats,
    invstd_from_stats,
    merge_stats,
    normalize,
    update_running_stats,
)
from .variants import (
    batch_renorm_backward,
    batch_renorm_forward,
    ghost_batch_norm_backward,
    ghost_batch_norm_forward,
    population_stats,
    renorm_corrections,
)

__all__ = [
    "CONVENTIONS",
    "BatchNorm",
    "__version__",
    "backward_elementwise",
    "backward_reduce",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_renorm_backward",
    "batch_renorm_forward",
    "channel_stats",
    "get_max_threads",
    "get_num_threads",
    "ghost_batch_norm_backward",
    "ghost_batch_norm_forward",
    "invstd_from_stats",
    "merge_stats",
    "normalize",
    "population_stats",
    "renorm_corrections",
    "set_num_threads",
    "update_running_stats",
]


def set_num_threads(n: int | None) -> None:
    """Use ``n`` threads in every kernel, from every calling thread.

    ``None`` (or 0) goes back to the default: follow OpenMP's setting, i.e. ``OMP_NUM_THREADS`` and
    any ``threadpoolctl`` limit, clamped to :func:`get_max_threads`.  Small inputs always run on
    one thread.  ``n`` above :func:`get_max_threads` raises ``ValueError``.

    In a process forked from one that imported bnkernel (``os.fork``, multiprocessing's "fork"
    start method) the kernels always run on one thread, since OpenMP's threads do not survive a
    fork: there this call is accepted but has no effect, and :func:`get_num_threads` returns 1.
    """
    if n is None:
        n = 0
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0 or None, got {n!r}")
    limit = int(_core.max_threads)
    if n > limit:
        raise ValueError(
            f"n: {n} is more than the maximum of {limit} threads (bnkernel.get_max_threads())"
        )
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """The number of threads the kernels use for large inputs.

    At most :func:`get_max_threads`; 1 in a forked child process (see :func:`set_num_threads`).
    """
    return int(_core.get_num_threads())


def get_max_threads() -> int:
    """The most threads the kernels run on (256).

    Larger OpenMP settings (``OMP_NUM_THREADS``, ``omp_set_num_threads``, ``threadpoolctl``) are
    clamped to it, and :func:`set_num_threads` refuses more: OpenMP's runtime (libgomp) crashes
    when asked for tens of thousands of threads.
    """
    return int(_core.max_threads)
