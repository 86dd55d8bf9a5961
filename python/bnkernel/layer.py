"""``BatchNorm``: a batch-normalization layer for hand-written NumPy training loops."""

from __future__ import annotations

import enum
import functools
import numbers
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, cast

import numpy as np
from numpy.typing import DTypeLike, NDArray

from . import _checks as chk
from . import _device
from .functional import batch_norm_backward, batch_norm_forward
from .phases import Stats
from .variants import (
    batch_renorm_backward,
    batch_renorm_forward,
    ghost_batch_norm_backward,
    ghost_batch_norm_forward,
    population_stats,
)

__all__ = ["CONVENTIONS", "BatchNorm"]

Convention = Literal["torch", "keras"]


class DefaultType(enum.Enum):
    DEFAULT = "default"

    def __repr__(self) -> str:
        return "<convention default>"


DEFAULT = DefaultType.DEFAULT

# What each framework does, by name.  momentum is in the framework's own direction:
#   torch: running = (1 - momentum) * running + momentum * batch, unbiased running variance
#   keras: moving  = momentum * moving + (1 - momentum) * batch,  biased moving variance
CONVENTIONS: dict[str, dict[str, Any]] = {
    "torch": {"momentum": 0.1, "eps": 1e-5, "unbiased_running_var": True, "axis": 1},
    "keras": {"momentum": 0.99, "eps": 1e-3, "unbiased_running_var": False, "axis": -1},
}

_STATE_KEYS = {
    "torch": ("weight", "bias", "running_mean", "running_var"),
    "keras": ("gamma", "beta", "moving_mean", "moving_variance"),
}


F = TypeVar("F", bound=Callable[..., Any])


def exclusive(method: F) -> F:
    """One thread at a time in a layer's forward / backward: the layer keeps the forward's inputs
    for the backward and updates its running statistics in place, so overlapping calls from two
    threads would mix their steps up.  A call while another thread is inside one raises instead of
    waiting (a wait would hide the mix-up in the order of the steps); the same thread may nest."""

    @functools.wraps(method)
    def wrapper(self: BatchNorm, *args: Any, **kwargs: Any) -> Any:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                f"{type(self).__name__}.{method.__name__}: the layer is in use by another thread; "
                "a layer holds one training step's state at a time, so give each thread its own"
            )
        try:
            with _device.current(getattr(self, "device", None)):  # (CuPy's work on its device)
                return method(self, *args, **kwargs)
        finally:
            self._busy.release()

    return cast(F, wrapper)


class BatchNorm:
    """Batch normalization over ``num_features`` channels along ``axis``.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    axis : int, optional
        The channel axis; the convention's default (torch: 1, keras: -1) when None.
    convention : {"torch", "keras"}, default "torch"
        The defaults of ``momentum``, ``eps`` and ``axis``, momentum's direction, and the running
        variance's correction (see the table below).
    eps : float, optional
        The convention's default (1e-5, 1e-3) when None.
    momentum : float or None, optional
        In the convention's own direction; None is a cumulative average.
    affine : bool, default True
        Learn gamma and beta.
    track_running_stats : bool, default True
        Keep running statistics (and use them in ``eval()``).
    dtype : dtype, default float32
        The data's: float32, float64, float16 or ``ml_dtypes.bfloat16``.
    renorm, r_max, d_max : bool, float, float
        Batch renormalization and its clipping limits.
    virtual_batch_size : int, optional
        Ghost batch normalization's group size along axis 0.
    single_value : {"raise", "running"}, default "raise"
        What a training batch with one value per channel does.
    activation : {None, "relu"}, optional
        The fused ReLU (``forward(x, residual=...)`` adds a residual before it).
    device : None, "cpu", "cuda", "cuda:N" or int, optional
        Where the parameters, gradients and running statistics live (CuPy arrays on a device).

    Notes
    -----
    Holds ``4 * C`` numbers: ``gamma`` (ones) and ``beta`` (zeros) are trainable, the running mean
    and variance are not.  Modes:

    * ``train()``: normalize with the batch statistics, update the running statistics, and
      backpropagate through the batch statistics.
    * ``eval()``: normalize with the running statistics (batch statistics if
      ``track_running_stats=False``); ``backward`` then treats them as constants.
    * ``freeze()``: for fine-tuning with frozen BN: running statistics in the forward, constant in
      the backward, gamma and beta still receive gradients.

    ``convention`` picks the defaults and the meaning of ``momentum``:

    ============  ========  =====  ====  ===================================  ===============
    convention    momentum  eps    axis  running update                        running var
    ============  ========  =====  ====  ===================================  ===============
    ``"torch"``   0.1       1e-5   1     ``(1 - m) * running + m * batch``    unbiased
    ``"keras"``   0.99      1e-3   -1    ``m * moving + (1 - m) * batch``     biased
    ============  ========  =====  ====  ===================================  ===============

    An empty batch (a zero-length batch axis) gives an empty output and leaves the running
    statistics as they were, as torch's layers do (``num_batches_tracked`` still counts it, as
    torch's does); its backward gives zero gradients.

    ``momentum=None`` is a cumulative average: the batch's weight is ``1 / num_batches_tracked``.

    ``params`` and ``grads`` are dicts of the arrays themselves (``"gamma"``, ``"beta"``), so an
    optimizer can update ``params[k]`` in place from ``grads[k]``.  ``backward`` overwrites
    ``grads``; it does not accumulate.

    ``dtype`` is the data's: float32, float64, float16 or ``ml_dtypes.bfloat16``.  Parameters,
    gradients and running statistics are of ``param_dtype``: the same, or float32 for the 16-bit
    dtypes (mixed precision as PyTorch and Keras keep it); statistics are computed in double.

    Variants, all in training mode (inference is the same for all of them):

    * ``renorm=True``: Batch Renormalization (Ioffe 2017) with the corrections clipped by the
      attributes ``r_max`` and ``d_max``, which the caller may change between steps to follow a
      schedule (see :func:`bnkernel.batch_renorm_forward`).  Needs the running statistics.
    * ``virtual_batch_size=V``: ghost batch normalization, statistics per group of V examples
      along axis 0 (see :func:`bnkernel.ghost_batch_norm_forward`).
    * ``single_value="running"``: a training batch with one value per channel is normalized with
      the running statistics instead of raising (the default, ``"raise"``).
    * ``activation="relu"``: ``y = relu(bn(x) + residual)`` in one pass (``forward(x,
      residual=...)``; the residual is optional), and a backward that takes the mask from y.

    :meth:`set_population_stats` / :meth:`estimate_population_stats` load exact statistics over
    many batches ("precise BN") as the running statistics.

    ``device="cuda"`` (or ``"cuda:N"``, or an int N) keeps the parameters, gradients and running
    statistics on that CUDA device as CuPy arrays, and takes x there (any CUDA array, without a
    copy); :meth:`to` moves a layer.  :meth:`state_dict` returns NumPy arrays wherever the layer
    lives, and :meth:`load_state_dict` takes them.

    Examples
    --------
    >>> import numpy as np, bnkernel
    >>> bn = bnkernel.BatchNorm(3)
    >>> x = np.random.default_rng(0).standard_normal((16, 3, 4, 4)).astype(np.float32)
    >>> y = bn(x)                       # training mode: batch statistics
    >>> dx = bn.backward(np.ones_like(y))
    >>> sorted(bn.grads)
    ['beta', 'gamma']
    >>> bn.num_batches_tracked
    1
    >>> y_eval = bn.eval()(x)           # inference: the running statistics
    >>> bn.count_params()
    {'total': 12, 'trainable': 6, 'non_trainable': 6}
    """

    num_features: int
    axis: int
    eps: float
    affine: bool
    track_running_stats: bool
    dtype: np.dtype[Any]
    num_batches_tracked: int
    renorm: bool
    r_max: float
    d_max: float
    virtual_batch_size: int | None
    single_value: str
    activation: Literal["relu"] | None
    device: int | None
    _busy: threading.RLock

    def __init__(
        self,
        num_features: int,
        *,
        axis: int | None = None,
        convention: Convention = "torch",
        eps: float | None = None,
        momentum: float | DefaultType | None = DEFAULT,
        affine: bool = True,
        track_running_stats: bool = True,
        dtype: DTypeLike = np.float32,
        renorm: bool = False,
        r_max: float = 3.0,
        d_max: float = 5.0,
        virtual_batch_size: int | None = None,
        single_value: Literal["raise", "running"] = "raise",
        activation: Literal["relu"] | None = None,
        device: str | int | None = None,
    ) -> None:
        num_features = chk.positive_int(num_features, "num_features")
        if convention not in CONVENTIONS:
            raise ValueError(f"convention: expected 'torch' or 'keras', got {convention!r}")
        axis = chk.int_arg(CONVENTIONS[convention]["axis"] if axis is None else axis, "axis")
        self.dtype = np.dtype(dtype)
        if not chk.is_data_dtype(self.dtype):
            raise TypeError(
                f"dtype: expected float16, bfloat16, float32 or float64, got {self.dtype}"
            )
        # the parameters, their gradients and the running statistics: float32 for 16-bit data
        self.param_dtype: np.dtype[Any] = chk.param_dtype(self.dtype)
        defaults = CONVENTIONS[convention]
        self.num_features = int(num_features)
        self.axis = int(axis)
        self.convention: Convention = convention
        self.eps = chk.eps(defaults["eps"] if eps is None else eps)
        if momentum is DEFAULT:
            momentum = defaults["momentum"]
        self.momentum: float | None = chk.momentum(momentum, optional=True)
        self.unbiased_running_var: bool = defaults["unbiased_running_var"]
        self.affine = chk.flag(affine, "affine")
        self.track_running_stats = chk.flag(track_running_stats, "track_running_stats")

        C = self.num_features
        self.params: dict[str, NDArray[Any]] = {}
        self.grads: dict[str, NDArray[Any]] = {}
        if self.affine:
            P = self.param_dtype
            self.params = {"gamma": np.ones(C, P), "beta": np.zeros(C, P)}
            self.grads = {"gamma": np.zeros(C, P), "beta": np.zeros(C, P)}
        self.running_mean: NDArray[Any] | None = None
        self.running_var: NDArray[Any] | None = None
        self.num_batches_tracked = 0
        if self.track_running_stats:
            self.running_mean = np.zeros(C, self.param_dtype)
            self.running_var = np.ones(C, self.param_dtype)
        self.mode: Literal["train", "eval", "frozen"] = "train"
        self.renorm = chk.flag(renorm, "renorm")
        self.r_max, self.d_max = chk.renorm_limits(r_max, d_max)
        if self.renorm and not self.track_running_stats:
            raise ValueError("renorm: batch renormalization needs track_running_stats=True")
        if virtual_batch_size is not None:
            virtual_batch_size = chk.positive_int(virtual_batch_size, "virtual_batch_size")
            if self.renorm:
                raise ValueError("virtual_batch_size: not supported together with renorm=True")
        self.virtual_batch_size = None if virtual_batch_size is None else int(virtual_batch_size)
        self.single_value = chk.single_value(single_value)
        if activation is not None and (self.renorm or self.virtual_batch_size is not None):
            raise ValueError(
                "activation: the fused ReLU is not supported with renorm or virtual_batch_size"
            )
        self.activation: Literal["relu"] | None = "relu" if chk.activation(activation) else None
        self.device = None
        self.to(device)
        # what backward needs from the last forward: (kind, x, mean, invstd, extra)
        self._saved: tuple[str, NDArray[Any], NDArray[Any], NDArray[Any], Any] | None = None
        self._busy = threading.RLock()  # see exclusive

    # ---- parameters ----------------------------------------------------------------------------

    @property
    def gamma(self) -> NDArray[Any] | None:
        """The scale, ``params["gamma"]`` (None with ``affine=False``)."""
        return self.params.get("gamma")

    @property
    def beta(self) -> NDArray[Any] | None:
        """The shift, ``params["beta"]`` (None with ``affine=False``)."""
        return self.params.get("beta")

    def count_params(self) -> dict[str, int]:
        """``{"total", "trainable", "non_trainable"}``: 4C, 2C, 2C with the defaults."""
        trainable = 2 * self.num_features if self.affine else 0
        non_trainable = 2 * self.num_features if self.track_running_stats else 0
        return {
            "total": trainable + non_trainable,
            "trainable": trainable,
            "non_trainable": non_trainable,
        }

    def summary(self) -> str:
        """A parameter summary in the style Keras prints."""
        counts = self.count_params()
        return "\n".join(
            [
                repr(self),
                f"Total params: {counts['total']:,}",
                f"Trainable params: {counts['trainable']:,}",
                f"Non-trainable params: {counts['non_trainable']:,}",
            ]
        )

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.num_features}, axis={self.axis}, convention={self.convention!r}, "
            f"eps={self.eps:g}, momentum={self.momentum!r}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, dtype={self.dtype.name}, "
            f"mode={self.mode!r})"
        )

    # ---- where it lives ------------------------------------------------------------------------

    def to(self, device: str | int | None) -> BatchNorm:
        """Move the parameters, gradients and running statistics to ``device``.

        Parameters
        ----------
        device : str, int or None
            ``"cuda"`` (CuPy's current device), ``"cuda:N"`` or an int N for CUDA device N,
            ``None`` or ``"cpu"`` for host memory (NumPy).

        Returns
        -------
        BatchNorm
            The layer itself; the last forward's saved state is dropped.
        """
        target = _device_index(device)
        if target == self.device:
            return self

        def move(a: Any) -> Any:
            if a is None:
                return None
            host = _device.cupy().asnumpy(a) if chk.on_device(a) else a
            return host if target is None else _device.empty_like_host(target, host)

        self.params = {k: move(v) for k, v in self.params.items()}
        self.grads = {k: move(v) for k, v in self.grads.items()}
        self.running_mean = move(self.running_mean)
        self.running_var = move(self.running_var)
        self.device = target
        self._saved = None
        return self

    # ---- modes ---------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> BatchNorm:
        """Training mode (``train(False)`` is ``eval()``)."""
        self.mode = "train" if chk.flag(mode, "mode") else "eval"
        return self

    def eval(self) -> BatchNorm:
        """Inference mode: normalize with the running statistics."""
        self.mode = "eval"
        return self

    def freeze(self) -> BatchNorm:
        """Frozen-statistics mode for fine-tuning.

        Like :meth:`eval`, the running statistics normalize and are not updated, and the backward
        treats them as constants; gamma and beta still get gradients (which they do in every
        mode: the name says what the statistics do).

        Returns
        -------
        BatchNorm
            The layer itself.

        Raises
        ------
        ValueError
            Without running statistics (``track_running_stats=False``).
        """
        if not self.track_running_stats:
            raise ValueError(
                "freeze: the layer has no running statistics (track_running_stats=False)"
            )
        self.mode = "frozen"
        return self

    @property
    def training(self) -> bool:
        """Whether the layer is in training mode (torch.nn's attribute, read-only here)."""
        return self.mode == "train"

    # ---- resets (torch.nn's names) -------------------------------------------------------------

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0 (torch's
        ``reset_running_stats``); nothing to do without running statistics."""
        if self.running_mean is not None and self.running_var is not None:
            self.running_mean.fill(0)
            self.running_var.fill(1)
        self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """:meth:`reset_running_stats`, then gamma 1 and beta 0 (torch's ``reset_parameters``);
        the gradients are zeroed too."""
        self.reset_running_stats()
        if self.affine:
            self.params["gamma"].fill(1)
            self.params["beta"].fill(0)
            self.grads["gamma"].fill(0)
            self.grads["beta"].fill(0)

    # ---- forward / backward ----------------------------------------------------------------------

    def _kernel_momentum(self, batches: int) -> float:
        """The weight of the batch statistics in the running update of batch number ``batches``."""
        if self.momentum is None:
            return 1.0 / batches
        if self.convention == "keras":
            return 1.0 - self.momentum
        return self.momentum

    def _check_input(self, x: Any, *, allow_empty: bool = True, name: str = "x") -> NDArray[Any]:
        xa = chk.as_input(x, name, allow_empty=allow_empty)
        here = _device.device_of(xa) if chk.on_device(xa) else None
        if here != self.device:
            lives = "in host memory" if self.device is None else f"on CUDA device {self.device}"
            raise TypeError(
                f"{name}: {chk.where(xa)}, while the layer lives {lives}: move the data, or the "
                "layer with layer.to(...)"
            )
        ax = chk.channel_axis(xa.ndim, self.axis)
        if xa.shape[ax] != self.num_features:
            others = [a - xa.ndim for a in range(xa.ndim) if xa.shape[a] == self.num_features]
            hint = ""
            if others:
                a = others[-1] if others[-1] == -1 else others[0] + xa.ndim
                hint = f"; axis {a} has {self.num_features}: create the layer with axis={a}" + (
                    " (channels-last, Keras' default)" if a == -1 else ""
                )
            raise ValueError(
                f"x: expected {self.num_features} channels on axis {self.axis}, "
                f"got shape {xa.shape}{hint}"
            )
        if xa.dtype != self.dtype:
            if not hasattr(x, "dtype"):
                raise TypeError(
                    f"x: expected an array of dtype {self.dtype} (the layer's dtype), got a "
                    f"{type(x).__name__} (which NumPy makes {xa.dtype}); pass "
                    f"np.asarray(x, np.{self.dtype.name})"
                )
            raise TypeError(
                f"x: expected dtype {self.dtype} (the layer's dtype), got {xa.dtype}; "
                "cast x or create the layer with a matching dtype"
            )
        return xa

    @exclusive
    def forward(
        self,
        x: NDArray[Any],
        residual: NDArray[Any] | None = None,
        mask: NDArray[Any] | None = None,
    ) -> NDArray[Any]:
        """Normalize ``x``; in training mode also update the running statistics.

        Parameters
        ----------
        x : array
            ``num_features`` channels on the layer's axis; the layer's dtype (float32 parameters
            take float32, float16 or bfloat16 data; float64 takes float64).  An empty batch
            gives an empty output and changes no state, as in torch.
        residual : array, optional
            x's shape and dtype: added after the normalization, before the activation if there
            is one; :meth:`backward` then returns ``(dx, dresidual)``.
        mask : bool array, optional
            x's shape without the channel axis (or one that broadcasts to it), False at padding:
            keeps padded positions out of the batch statistics in training; ignored when the
            running statistics are used.

        Returns
        -------
        y : array
            x's shape and dtype, in x's place (NumPy, or CuPy on the layer's device).

        Raises
        ------
        TypeError
            x of another dtype or place than the layer's.
        ValueError
            The wrong channel count (with a hint when another axis has it), or a batch with one
            value per channel in training.
        """
        xa = self._check_input(x)
        if (residual is not None or mask is not None) and (
            self.renorm or self.virtual_batch_size is not None
        ):
            raise ValueError("residual, mask: not supported with renorm or virtual_batch_size")
        fused: dict[str, Any] = {"activation": self.activation, "residual": residual}
        ax = self.axis % xa.ndim
        use_batch_stats = self.mode == "train" or not self.track_running_stats
        updating = self.mode == "train" and self.track_running_stats
        if use_batch_stats and xa.size == 0:  # an empty batch, as torch: nothing to learn from
            y, mean, invstd = batch_norm_forward(
                xa, self.gamma, self.beta, training=True, eps=self.eps, axis=self.axis, mask=mask,
                **fused,
            )  # fmt: skip
            self._saved = ("batch", xa, mean, invstd, (y, residual is not None, mask))
            self.num_batches_tracked += int(updating)
            return y
        if (
            use_batch_stats
            and self.track_running_stats
            and self.single_value == "running"
            and 0 < xa.size // xa.shape[ax] < 2
        ):
            use_batch_stats = False  # one value per channel: the running statistics instead
        if not use_batch_stats:
            y, mean, invstd = batch_norm_forward(
                xa,
                self.gamma,
                self.beta,
                running_mean=self.running_mean,
                running_var=self.running_var,
                training=False,
                eps=self.eps,
                axis=self.axis,
                **fused,
            )
            self._saved = ("frozen", xa, mean, invstd, (y, residual is not None, None))
            return y
        momentum = self._kernel_momentum(self.num_batches_tracked + 1) if updating else 0.0
        rm = self.running_mean if updating else None
        rv = self.running_var if updating else None
        if self.renorm and updating:
            assert rm is not None and rv is not None
            y, mean, invstd, r, d = batch_renorm_forward(
                xa, self.gamma, self.beta, running_mean=rm, running_var=rv, r_max=self.r_max,
                d_max=self.d_max, momentum=momentum, eps=self.eps, axis=self.axis,
                running_var_unbiased=self.unbiased_running_var,
            )  # fmt: skip
            self._saved = ("renorm", xa, mean, invstd, (r, d))
        elif self.virtual_batch_size is not None:
            y, mean, invstd = ghost_batch_norm_forward(
                xa, self.gamma, self.beta, virtual_batch_size=self.virtual_batch_size,
                running_mean=rm, running_var=rv, momentum=momentum, eps=self.eps,
                axis=self.axis, running_var_unbiased=self.unbiased_running_var,
            )  # fmt: skip
            self._saved = ("ghost", xa, mean, invstd, None)
        else:
            y, mean, invstd = batch_norm_forward(
                xa, self.gamma, self.beta, running_mean=rm, running_var=rv, training=True,
                momentum=momentum, eps=self.eps, axis=self.axis,
                running_var_unbiased=self.unbiased_running_var, mask=mask, **fused,
            )  # fmt: skip
            self._saved = ("batch", xa, mean, invstd, (y, residual is not None, mask))
        if updating:
            self.num_batches_tracked += 1
        return y

    __call__ = forward

    # copy / pickle: everything but the lock, a fresh one on the other side
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_busy"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._busy = threading.RLock()

    @exclusive
    def backward(self, dy: NDArray[Any]) -> Any:
        """Gradients through the last forward; stores dgamma and dbeta in ``grads``.

        Parameters
        ----------
        dy : array
            dL/dy, the last forward's shape and dtype.

        Returns
        -------
        dx : array
            Or ``(dx, dresidual)`` after a forward with a residual.  Through the batch
            statistics in training mode; with the statistics as constants in eval and frozen
            mode.

        Raises
        ------
        RuntimeError
            No forward before it.
        """
        if self._saved is None:
            raise RuntimeError("backward: call forward first")
        kind, x, mean, invstd, extra = self._saved
        dya = chk.as_input(dy, "dy", allow_empty=True)
        if chk.where(dya) != chk.where(x):
            raise TypeError(f"dy: {chk.where(dya)}, while the last forward's x was {chk.where(x)}")
        chk.check_same_shape(dya, x, "dy", "the last forward's x")
        if kind == "renorm":
            r, d = extra
            dx, dgamma, dbeta = batch_renorm_backward(
                dya, x, mean, invstd, r, d, self.gamma, axis=self.axis
            )
        elif kind == "ghost":
            assert self.virtual_batch_size is not None
            dx, dgamma, dbeta = ghost_batch_norm_backward(
                dya, x, mean, invstd, self.gamma, virtual_batch_size=self.virtual_batch_size,
                axis=self.axis,
            )  # fmt: skip
        else:
            # through the batch statistics only when they were used
            y, had_residual, mask = extra
            relu = self.activation == "relu"
            grads = batch_norm_backward(
                dya, x, mean, invstd, self.gamma, training=kind == "batch", axis=self.axis,
                activation=self.activation, y=y if relu else None, residual_grad=True, mask=mask,
            )  # fmt: skip
            dx, dgamma, dbeta, dres = grads
            if self.affine:
                self.grads["gamma"][...] = dgamma
                self.grads["beta"][...] = dbeta
            return (dx, dres) if had_residual else dx
        if self.affine:
            self.grads["gamma"][...] = dgamma
            self.grads["beta"][...] = dbeta
        return dx

    # ---- population statistics ("precise BN") --------------------------------------------------

    def set_population_stats(self, stats: Stats) -> BatchNorm:
        """Make exact population statistics the running statistics.

        Parameters
        ----------
        stats : (int, array, array)
            ``(count, mean, M2)``, e.g. from :func:`bnkernel.population_stats`.

        Returns
        -------
        BatchNorm
            The layer, with ``running_mean = mean`` and ``running_var = M2 / (count - 1)``
            (unbiased, the torch convention) or ``M2 / count`` (keras).
        """
        if self.running_mean is None or self.running_var is None:
            raise ValueError(
                "set_population_stats: the layer has no running statistics "
                "(track_running_stats=False)"
            )
        if not isinstance(stats, tuple) or len(stats) != 3:
            raise TypeError("stats: expected a (count, mean, M2) tuple")
        count, mean, m2 = stats
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
            raise ValueError(f"stats: expected a count >= 1, got {count!r}")
        mu = _host(chk.saved_stat(mean, "stats mean", self.num_features))
        q = _host(chk.saved_stat(m2, "stats M2", self.num_features))
        denom = count - 1 if self.unbiased_running_var and count > 1 else count
        _put(self.running_mean, mu)
        _put(self.running_var, q / float(denom))
        return self

    def estimate_population_stats(self, inputs: Iterable[NDArray[Any]]) -> BatchNorm:
        """Precise BN: the exact statistics of every batch in ``inputs`` become the running ones.

        Parameters
        ----------
        inputs : iterable of arrays
            This layer's inputs, e.g. the activations feeding it over a pass of the training set.

        Returns
        -------
        BatchNorm
            The layer; see :func:`bnkernel.population_stats` and :meth:`set_population_stats`.
        """
        return self.set_population_stats(population_stats(inputs, axis=self.axis))

    # ---- state -----------------------------------------------------------------------------------

    def state_dict(self, style: Convention | None = None) -> dict[str, NDArray[Any]]:
        """Copies of the layer's numbers, as NumPy arrays, under PyTorch's or Keras' names.

        Parameters
        ----------
        style : {"torch", "keras"}, optional
            ``"torch"``: ``weight, bias, running_mean, running_var, num_batches_tracked``;
            ``"keras"``: ``gamma, beta, moving_mean, moving_variance``.  Defaults to the layer's
            convention.  Entries the layer lacks (``affine=False``, no running statistics) are
            left out.

        Returns
        -------
        dict of str to ndarray
        """
        style = self.convention if style is None else style
        if style not in _STATE_KEYS:
            raise ValueError(f"style: expected 'torch' or 'keras', got {style!r}")
        k_gamma, k_beta, k_mean, k_var = _STATE_KEYS[style]
        state: dict[str, NDArray[Any]] = {}
        if self.affine:
            state[k_gamma] = _host(self.params["gamma"]).copy()
            state[k_beta] = _host(self.params["beta"]).copy()
        if self.running_mean is not None and self.running_var is not None:
            state[k_mean] = _host(self.running_mean).copy()
            state[k_var] = _host(self.running_var).copy()
            if style == "torch":
                state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def get_weights(self) -> list[NDArray[Any]]:
        """The layer's numbers in Keras' ``get_weights()`` order, as NumPy copies.

        Returns
        -------
        list of ndarray
            ``[gamma, beta, moving_mean, moving_variance]``, leaving out those the layer does not
            have (``affine=False`` is Keras' ``center=False, scale=False``).
        """
        return list(self.state_dict("keras").values())

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Load a list in Keras' ``get_weights()`` order (see :meth:`get_weights`).

        Parameters
        ----------
        weights : sequence of arrays
        """
        self.load_state_dict(weights)

    def load_state_dict(
        self,
        state: Mapping[str, Any] | Sequence[Any],
        style: Convention | None = None,
        *,
        strict: bool = True,
    ) -> None:
        """Load a state saved by :meth:`state_dict`, by PyTorch or by Keras.

        Parameters
        ----------
        state : mapping of str to array, or sequence of arrays
            A state dict (PyTorch's or Keras' names; the values any arrays, torch tensors
            included), or a list in Keras' ``get_weights()`` order (``[gamma, beta, moving_mean,
            moving_variance]``, those the layer has).
        style : {"torch", "keras"}, optional
            Guessed from the keys when not given.
        strict : bool, default True
            The keys must be exactly the expected ones.

        Raises
        ------
        TypeError
            ``state`` is neither a mapping nor a list.
        KeyError
            With ``strict``, missing or unexpected keys (both are listed).
        ValueError
            A value of the wrong shape, or a list of the wrong length.

        Notes
        -----
        Values are copied into the layer's arrays (cast to its dtype, moved to its device).
        Every value is checked before any is written: a bad entry leaves the layer as it was.

        Examples
        --------
        >>> import numpy as np, bnkernel
        >>> bn = bnkernel.BatchNorm(2, convention="keras")
        >>> bn.load_state_dict([np.full(2, 2.0), np.zeros(2), np.ones(2), np.full(2, 4.0)])
        >>> bn.get_weights()[3]
        array([4., 4.], dtype=float32)
        """
        keras_order = list(self.state_dict("keras"))
        if isinstance(state, (list, tuple)):
            if len(state) != len(keras_order):
                raise ValueError(
                    f"state: expected a list of {len(keras_order)} arrays in Keras' "
                    f"get_weights() order ({', '.join(keras_order)}), got {len(state)}"
                )
            state, style = dict(zip(keras_order, state, strict=True)), "keras"
        if not isinstance(state, Mapping):
            raise TypeError(
                "state: expected a mapping of names to arrays (what state_dict() returns) or a "
                f"list in Keras' get_weights() order ({', '.join(keras_order)}), got "
                f"{type(state).__name__}"
            )
        if style is None:
            style = "keras" if "moving_mean" in state or "gamma" in state else "torch"
        if style not in _STATE_KEYS:
            raise ValueError(f"style: expected 'torch' or 'keras', got {style!r}")
        expected = set(self.state_dict(style))
        given = set(state)
        if strict and given != expected:
            raise KeyError(
                f"state: expected keys {sorted(expected)}, got {sorted(given)} "
                f"(missing {sorted(expected - given)}, unexpected {sorted(given - expected)})"
            )
        k_gamma, k_beta, k_mean, k_var = _STATE_KEYS[style]
        targets: list[tuple[str, NDArray[Any] | None]] = [
            (k_gamma, self.params.get("gamma")),
            (k_beta, self.params.get("beta")),
            (k_mean, self.running_mean),
            (k_var, self.running_var),
        ]
        # every value is checked and converted first, then all are written: a bad entry leaves
        # the layer as it was
        staged: list[tuple[NDArray[Any], NDArray[Any]]] = []
        for key, target in targets:
            if key not in state or target is None:
                continue
            try:
                value = _host(chk.as_array(state[key], f"state[{key!r}]")).astype(target.dtype)
            except (TypeError, ValueError) as e:
                raise type(e)(
                    f"state[{key!r}]: expected numbers convertible to {target.dtype}: {e}"
                ) from e
            if value.shape != target.shape:
                raise ValueError(
                    f"state[{key!r}]: expected shape {target.shape}, got {value.shape}"
                )
            staged.append((target, value))
        batches = self.num_batches_tracked
        if "num_batches_tracked" in state:
            batches = _batch_count(state["num_batches_tracked"])
        for target, value in staged:
            _put(target, value)
        self.num_batches_tracked = batches


def _device_index(device: Any) -> int | None:
    """A layer's device: None (host memory) or a CUDA device index."""
    if device is None or device == "cpu":
        return None
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        if device == "cuda":
            return int(_device.cupy().cuda.Device().id)
        index = device.removeprefix("cuda:")
        if index.isdigit():
            return int(index)
    elif isinstance(device, (int, np.integer)) and not isinstance(device, bool) and device >= 0:
        return int(device)
    raise ValueError(
        f"device: expected None, 'cpu', 'cuda', 'cuda:N' or an int N >= 0, got {device!r}"
    )


def _host(a: Any) -> NDArray[Any]:
    """a in host memory (a copy of a device array)."""
    return _device.cupy().asnumpy(a) if chk.on_device(a) else a  # type: ignore[no-any-return]


def _put(target: Any, value: NDArray[Any]) -> None:
    """target[...] = value, for a target in host or device memory and a host value."""
    if chk.on_device(target):
        target.set(np.ascontiguousarray(value, dtype=target.dtype))
    else:
        target[...] = value


def _batch_count(v: Any) -> int:
    """A saved num_batches_tracked: an integer >= 0 (a Python int or a 0-d / 1-element array)."""
    arr = np.asarray(v)
    if isinstance(v, bool) or arr.size != 1 or arr.dtype.kind not in "iu":
        raise TypeError(
            f"state['num_batches_tracked']: expected an integer >= 0, got {type(v).__name__} {v!r}"
        )
    n = int(arr.reshape(()))
    if n < 0:
        raise ValueError(f"state['num_batches_tracked']: expected an integer >= 0, got {n}")
    return n
